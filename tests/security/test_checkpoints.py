"""Checkpoints are loaded with ``torch.load(weights_only=True)`` (issue 12, deliverable 9): a
tampered pickle cannot run code on the machine that loads it."""

from __future__ import annotations

import builtins

import pytest
import torch

from plan_shared.gan import GanTrainer, load_generator


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("loader", [load_generator, GanTrainer.from_checkpoint])
def test_tampered_pickle_checkpoint_refused(tmp_path, loader):
    marker = tmp_path / "ran"
    path = tmp_path / "round-0001.pt"
    torch.save({"generator_ema": {}, "config": {}, "x": _Payload(marker)}, path)
    with pytest.raises(ValueError, match=r"not a readable checkpoint \(.*Weights only load failed"):
        loader(path)
    assert not marker.exists()
