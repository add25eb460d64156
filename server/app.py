"""The coordinator's Flower ServerApp: R rounds of federated GAN training.

Run configuration (``[tool.flwr.app.config]`` in pyproject.toml, overridable with
``flwr run . --run-config 'plan-config="/abs/coordinator.yaml" out-dir="/abs/out"'``):
see :func:`server.federation.load_run_config`.
"""

from __future__ import annotations

import json
import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from plan_shared.runtime import setup_logging
from server.federation import Federation, FederationResult, load_run_config

LOG = logging.getLogger("plan.server")

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    setup_logging()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Flower API call otherwise
    cfg, out, expected = load_run_config(dict(context.run_config))
    LOG.info("federated GAN: %d rounds x %d local steps, share=%s, min_nodes=%d, out=%s", cfg.federation.rounds,
             cfg.federation.local_steps, cfg.federation.share, cfg.federation.min_nodes, out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        result = Federation(grid, cfg, out, expected_nodes=expected).run()
    except Exception as err:
        # The coordinator (another process) reads this to say why the run failed.
        (out / "error.json").write_text(json.dumps({"error": f"{type(err).__name__}: {err}"}))
        LOG.error("federation failed: %s", err)
        raise
    (out / "federation.json").write_text(json.dumps(result.summary, indent=1))
    LOG.info("federation finished: %d/%d rounds", result.rounds_done, result.summary["rounds"])
    if cfg.federation.post_training:
        _post_training(result)
    from server.coordinate import SERVERAPP_DONE

    (out / SERVERAPP_DONE).write_text("")  # the follower of the run checks its status now (server/coordinate.py)


def _post_training(result: FederationResult) -> None:
    """Phases after the rounds: synthesis + export, downstream on the pool, evaluation, report."""
    from server.post_training import run_post_training

    try:
        run_post_training(result)
    except Exception as err:
        (result.out / "error.json").write_text(json.dumps({"error": f"{type(err).__name__}: {err}",
                                                           "phase": "post-training"}))
        LOG.error("post-training phases failed: %s", err)
        raise
