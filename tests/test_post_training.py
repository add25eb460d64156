"""server/post_training.py: the coordinator's inversion encoder (issue 14 item 2), trained once on the
final G_ema's own samples, written next to the run, reused for the same G, shipped in every synthesis task."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("flwr")

from client.site_stages import GeneratorSnapshot
from plan_shared.config import config_from_dict
from plan_shared.encoder import encode, encoder_from_payload
from plan_shared.gan import GanTrainer
from server.federation import FederationResult
from server.post_training import Phases
from tests.test_federation_util import tiny_config


def _phases(tmp_path, **encoder) -> tuple[Phases, GanTrainer]:
    raw = tiny_config()
    raw["inversion"]["encoder"].update(encoder)
    cfg = config_from_dict(raw)
    trainer = GanTrainer(cfg, 1, 8)
    result = FederationResult(cfg, tmp_path, trainer, 1, 8, [], {}, {"rounds_done": 1}, None)  # type: ignore[arg-type]
    return Phases(result), trainer


def test_the_coordinator_trains_e_once_writes_it_and_reuses_it_for_the_same_generator(tmp_path):
    ph, trainer = _phases(tmp_path)
    payload, info = ph.shipped_encoder()
    assert payload is not None and info["trained_by"] == "coordinator" and not info["loaded"]
    assert (tmp_path / "encoder.pt").is_file() and info["path"] == str(tmp_path / "encoder.pt")
    ec = ph.cfg.inversion.encoder
    assert info["steps"] == ec.steps and info["generator_evals"] == ec.steps * ec.batch * 2  # pixel loss: 2 per sample
    # the digest a site computes from the weights it receives is the one E is tied to
    site_digest = GeneratorSnapshot(trainer.weights("g"), 1, 8).digest()
    assert payload.generator_sha256 == site_digest == info["generator_sha256"]
    again, info2 = ph.shipped_encoder()  # e.g. a resumed post-training phase: loaded, not trained twice
    assert again is not None and info2["loaded"] and again.stats == payload.stats
    assert all(torch.equal(again.state[k], payload.state[k]) for k in payload.state)
    # other generator weights: the file no longer fits, E is trained anew and replaces it
    with torch.no_grad():
        next(trainer.G_ema.parameters()).add_(0.1)
    other, info3 = ph.shipped_encoder()
    assert other is not None and not info3["loaded"] and other.generator_sha256 != payload.generator_sha256
    x = trainer.G_ema.render(trainer.G_ema.sample_w(3))
    assert encode(encoder_from_payload(other, other.generator_sha256), x).shape == (3, trainer.G_ema.w_dim)


@pytest.mark.parametrize(("encoder", "trained_by"), [({"enabled": False}, "nobody"), ({"train_at": "site"}, "site")])
def test_no_encoder_is_shipped_when_the_sites_train_it_or_inversion_starts_from_w_avg(tmp_path, encoder, trained_by):
    ph, _ = _phases(tmp_path, **encoder)
    payload, info = ph.shipped_encoder()
    assert payload is None and info["trained_by"].startswith(trained_by)
    assert not (tmp_path / "encoder.pt").exists()
