"""Site-local minimums (site.yaml ``site_minimums``) that the coordinator cannot loosen.

The ClientApp's synthesize handler is called directly (no Ray, no SuperNode), with the
node config ``plan-client start`` writes: a request whose settings are looser than the
site's own minimums is refused before any work, naming the key and both values.
"""

from __future__ import annotations

import pytest
import yaml

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, Context, Message, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from plan_shared.config import config_from_dict  # noqa: E402
from plan_shared.protocol import ConfigRef, SynthesisTask  # noqa: E402
from tests.test_federation_util import make_npz, tiny_config  # noqa: E402


@pytest.fixture(autouse=True)
def _identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 7, 1
    yield


def _node_config(tmp_path, **minimums) -> dict:
    """The node config ``plan-client start`` writes for a site.yaml with these ``site_minimums``."""
    from client.supernode import supernode_command_line
    from server.certs import init_ca, issue

    certs = tmp_path / "certs"
    if not certs.exists():
        init_ca(certs)
        issue(certs, "hospital-a", "site", tmp_path / "keys" / "hospital-a")
    npz = make_npz(tmp_path / "a.npz", n_train=12)
    raw = {"site_id": "hospital-a", "data": {"source": "medmnist", "path": str(npz)},
           "site": {"keys_dir": str(tmp_path / "keys" / "hospital-a"), "state_dir": str(tmp_path / "st"),
                    "pool_address": "127.0.0.1:1"}, "site_minimums": minimums}
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(raw))
    _, _, state = supernode_command_line(tmp_path / "site.yaml")
    import tomllib

    return tomllib.loads((state / "node.toml").read_text())


def _synthesize(tmp_path, node_config: dict, **coordinator) -> Message:
    from client.app import app
    from plan_shared.gan import GanTrainer

    raw = tiny_config()
    for dotted, v in coordinator.items():
        sec, key = dotted.split("__")
        raw.setdefault(sec, {})[key] = v
    cfg = config_from_dict(raw)
    g = GanTrainer(cfg, 1, 8).weights("g")
    task = SynthesisTask(ArrayRecord({k: v for k, v in g.items() if k.startswith("g_ema.")}), 1, 8, 1, "plan",
                         ConfigRef.full(cfg))
    msg = Message(task.to_record(), message_type=task.MESSAGE_TYPE, dst_node_id=7)
    ctx = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})
    return app(msg, ctx)


def test_start_writes_the_minimums_into_the_node_config(tmp_path):
    nc = _node_config(tmp_path, min_k=5, max_tau_id=0.3, block_on_planted=True)
    assert (nc["min-k"], nc["max-tau-id"], nc["block-on-planted"]) == ("5", "0.3", "true")
    assert "max-tau-indep" not in nc


@pytest.mark.parametrize("minimum,request_,want", [
    ({"min_k": 5}, {"anchors__k": 2}, "anchors.k = 2, below this site's site_minimums.min_k = 5"),
    ({"max_tau_id": 0.3}, {"filter__tau_id": 0.5}, "filter.tau_id = 0.5, above this site's site_minimums.max_tau_id = 0.3"),
    ({"max_tau_indep": 0.3}, {"filter__tau_indep": 0.9},
     "filter.tau_indep = 0.9, above this site's site_minimums.max_tau_indep = 0.3"),
    ({"min_delta_quantile": 0.1}, {"filter__delta_quantile": 0.05},
     "filter.delta_quantile = 0.05, below this site's site_minimums.min_delta_quantile = 0.1"),
    ({"min_planted": 50}, {"filter__planted": 4}, "filter.planted = 4, below this site's site_minimums.min_planted = 50"),
    ({"block_on_planted": True}, {"filter__block_on_planted": False},
     "filter.block_on_planted = False, this site's site_minimums.block_on_planted = True"),
])
def test_looser_request_is_refused_at_the_site(tmp_path, minimum, request_, want):
    nc = _node_config(tmp_path, **minimum)
    with pytest.raises(ValueError) as ei:
        _synthesize(tmp_path, nc, **request_)
    assert str(ei.value) == (f"hospital-a refuses the synthesis request: the coordinator asks {want} (site.yaml); "
                             "nothing was synthesised")
    assert not (tmp_path / "st" / "site" / "synthesis").exists()


def test_stricter_or_equal_request_passes_the_check(tmp_path):
    from client.post_training import check_site_minimums
    from client.site import Site

    nc = _node_config(tmp_path, min_k=2, max_tau_id=0.5, min_planted=4, block_on_planted=True)
    cfg = config_from_dict(tiny_config())
    site = Site.from_node_config(nc, cfg)
    assert site.cfg.site_minimums.min_k == 2 and site.cfg.site_minimums.max_tau_indep is None
    check_site_minimums(site, cfg)  # tiny: k 2, tau_id 0.5, planted 4, block_on_planted true
