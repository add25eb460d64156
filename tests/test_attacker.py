"""Re-identification attacker (plan_shared/attacker.py): learns identities on a tiny real set (above chance),
is not phi_id's architecture, and names the bad input."""

import numpy as np
import pytest
import torch

from plan_shared.attacker import Attacker, embed, max_id_prob, predict_ids, train_attacker
from plan_shared.config import AttackerConfig, load_config
from plan_shared.data import to_tensor
from plan_shared.models import Classifier


@pytest.fixture(scope="module")
def tiny_set():
    import os

    path = os.path.join(os.environ.get("PLAN_DATA_DIR", ""), "pneumoniamnist.npz")
    if not os.path.isfile(path):
        pytest.skip(f"{path} not found (set PLAN_DATA_DIR)")
    with np.load(path) as z:
        imgs = z["train_images"][:24]
    return to_tensor(imgs[:, None]), torch.arange(24)


def test_attacker_learns_identities_above_chance(tiny_set):
    x, ids = tiny_set
    cfg = AttackerConfig(width=8, epochs=20, batch_size=4, lr=3e-3)
    att = train_attacker(x, ids, cfg, "cpu", progress=False)
    acc = float((predict_ids(att, x) == ids).float().mean())
    assert acc >= 0.25, acc  # chance is 1/24 (6 of 24 right by chance: p < 1e-4)
    p = max_id_prob(att, x)
    assert p.shape == (24,) and float(p.mean()) > 1 / 24
    e = embed(att, x)
    assert e.shape == (24, cfg.feature_dim) and torch.allclose(e.norm(dim=1), torch.ones(24), atol=1e-5)


def test_attacker_is_a_different_architecture_than_phi_id():
    att = Attacker(10, 1, load_config().audit.attacker)
    assert not isinstance(att, Classifier)
    shortcuts = [m for m in att.modules() if type(m).__name__ == "_Block"]
    assert len(shortcuts) == sum(load_config().audit.attacker.blocks)
    assert not any(isinstance(m, Classifier) for m in att.modules())


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="one identity per image"):
        train_attacker(torch.zeros(4, 1, 8, 8), torch.arange(3), AttackerConfig(), "cpu", progress=False)
