"""B6 privacy filter: nothing leaves a site without passing (method.md B6).

A candidate is accepted only if all hold:

- ``max_id_prob < tau_id``: max softmax of phi_id (the identity classifier navigation used);
- ``indep_id_prob < tau_indep``: max softmax of an independent identity model (other seed,
  never used in navigation, so the paths cannot have been optimised against it);
- ``dcr > delta``: distance to the closest real train image in the embedding space
  (L2-normalised features of the independent identity model), with ``delta`` the
  ``delta_quantile`` quantile of the real held-out (val) to closest-train distances.

The filter's sensitivity is tested on every run: ``planted`` lightly augmented real
training images are mixed into the candidates; they must all be rejected and are never
exported (:func:`plant_duplicates`, :class:`FilterResult`)::

    delta = calibrate_delta(val_emb, train_emb, 0.05)
    scores = score_images(x, phi_id, indep, train_emb)
    accept = accept_mask(scores, Thresholds(tau_id, tau_indep, delta))
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from plan_shared.classifiers import embed, predict_logits
from plan_shared.manifest import Thresholds


@dataclass
class Scores:
    max_id_prob: np.ndarray
    indep_id_prob: np.ndarray
    dcr: np.ndarray
    nearest: np.ndarray  # index of the closest real train image

    def __len__(self) -> int:
        return len(self.dcr)

    def subset(self, idx) -> "Scores":
        return Scores(self.max_id_prob[idx], self.indep_id_prob[idx], self.dcr[idx], self.nearest[idx])


def closest_distance(query: torch.Tensor, reference: torch.Tensor, batch: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distance of every query row to its closest reference row, and that row's index."""
    if len(reference) == 0:
        raise ValueError("no reference embeddings")
    dists, idx = [], []
    for i in range(0, len(query), batch):
        d = torch.cdist(query[i : i + batch].double(), reference.double())
        m, j = d.min(1)
        dists.append(m.float())
        idx.append(j)
    if not dists:
        return np.zeros(0, np.float32), np.zeros(0, np.int64)
    return torch.cat(dists).numpy(), torch.cat(idx).numpy()


def calibrate_delta(heldout_emb: torch.Tensor, train_emb: torch.Tensor, quantile: float) -> float:
    """``quantile`` of held-out-to-closest-train distances: a real non-member is the bar."""
    d, _ = closest_distance(heldout_emb, train_emb)
    return float(np.quantile(d, quantile))


def score_images(
    images: torch.Tensor, phi_id: nn.Module, indep: nn.Module, train_emb: torch.Tensor, embed_net: nn.Module | None = None
) -> Scores:
    """The three filter quantities for images ``[N, C, H, W]`` in [-1, 1]."""
    p_id = F.softmax(predict_logits(phi_id, images), dim=1).max(1).values.numpy()
    p_in = F.softmax(predict_logits(indep, images), dim=1).max(1).values.numpy()
    emb = embed(embed_net or indep, images)
    d, j = closest_distance(emb, train_emb)
    return Scores(p_id.astype(np.float64), p_in.astype(np.float64), d.astype(np.float64), j)


def accept_mask(s: Scores, t: Thresholds) -> np.ndarray:
    ok = (s.max_id_prob < t.tau_id) & (s.indep_id_prob < t.tau_indep) & (s.dcr > t.delta)
    # an accepted image can never violate a threshold
    assert not np.any(ok & ~((s.max_id_prob < t.tau_id) & (s.indep_id_prob < t.tau_indep) & (s.dcr > t.delta)))
    return ok


def reject_reasons(s: Scores, t: Thresholds) -> dict[str, int]:
    return {
        "id_prob": int((s.max_id_prob >= t.tau_id).sum()),
        "indep_id_prob": int((s.indep_id_prob >= t.tau_indep).sum()),
        "dcr": int((s.dcr <= t.delta).sum()),
    }


def plant_duplicates(x_train: torch.Tensor, n: int, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """``n`` lightly augmented real training images (+-1 px shift, +-5 % brightness, tiny noise)
    and their source indices."""
    n = min(n, len(x_train))
    if n == 0:
        return x_train[:0], np.zeros(0, np.int64)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(x_train), generator=gen)[:n]
    x = x_train[idx].clone()
    dy, dx = torch.randint(-1, 2, (2,), generator=gen).tolist()
    h, w = x.shape[2:]
    # shift by one pixel with the edge repeated (a wrap-around roll would move a border row across the image)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
    x = padded[:, :, 1 - dy : 1 - dy + h, 1 - dx : 1 - dx + w]
    x = x * (1 + (torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.1)
    x = x + torch.randn(x.shape, generator=gen) * 0.02
    return x.clamp(-1, 1), idx.numpy()
