"""B6 privacy filter: nothing leaves a site without passing (method.md B6).

A candidate is accepted only if all hold:

- ``max_id_prob < tau_id``: max softmax of phi_id (the identity classifier navigation used);
- ``indep_id_prob < tau_indep``: max softmax of an independent identity model (other seed,
  never used in navigation, so the paths cannot have been optimised against it);
- ``dcr > delta``: distance to the closest *protected* real image in the embedding space
  (L2-normalised features of the independent identity model);
- with the pixel zone (``filter.pixel_zone``, default on): ``pixel_dcr > delta_pixel``, the
  same in pixel space (see :func:`build_zone` for why).

The exclusion zone is symmetric (:func:`build_zone`). Every real image at the site is a
patient to protect, so the protected set holds the train split *and* the held-out splits
(val, and test, which the distance membership inference uses as non-members). A zone
around the train images only is itself a membership signal: candidates are pushed away
from members and not from non-members, so members end up farther from the exported
images than non-members (method.md section 7). With members and non-members excluded
alike, distance to the pool tells an attacker nothing about membership.

``delta`` must be calibrated on images that are not in the set they are measured
against: a random half (``calibration_fraction``) of the calibration split (val) is
drawn, seeded; ``delta`` is the ``delta_quantile`` quantile of the distances of those
images to the closest image among all *other* protected images (the reference set,
disjoint from the calibration rows by construction). The calibration images are real
non-members of the reference set, i.e. the natural bar "as close as one real patient is to
another"; afterwards they join the protected set like every other real image, so
candidates are kept at least ``delta`` away from them too.

The identity criteria are symmetric too (``filter.identity_classes``, default
``"protected"``, :func:`identity_set`): phi_id (navigation's L_id and ``tau_id``) and the
independent model (``tau_indep`` and the ``dcr`` embedding) get one class per protected
identity of the zone's *reference* set, train and held-out alike. Trained on train
identities only, they reject or push away candidates that resemble a member and not those
that resemble a non-member, and their embedding spreads members apart while it crowds
held-out images together. The calibration rows are never a class: delta stays calibrated on
images that neither the reference set nor the embedding contains, as a candidate is.

The filter's sensitivity is tested on every run: ``planted`` lightly augmented real train
images are mixed into the candidates; they must all be rejected and are never exported
(:func:`plant_duplicates`). Light copies of held-out images are scored too and the share
caught is reported (with ``identity_classes="train"`` only the distance checks can catch
those)::

    zone = build_zone({"train": e_tr, "val": e_va, "test": e_te}, 0.05, "val", 0.5, seed)
    scores = score_images(x, phi_id, indep, zone.embeddings)
    accept = accept_mask(scores, Thresholds(tau_id, tau_indep, zone.delta))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from plan_shared.classifiers import embed, predict_logits
from plan_shared.manifest import Thresholds
from plan_shared.models import Classifier


@dataclass
class Scores:
    max_id_prob: np.ndarray
    indep_id_prob: np.ndarray
    dcr: np.ndarray
    nearest: np.ndarray  # row of the closest protected real image (in the reference set passed)
    pixel_dcr: np.ndarray | None = None  # pixel-space distance to the closest protected image (pixel zone)

    def __len__(self) -> int:
        return len(self.dcr)

    def subset(self, idx: np.ndarray) -> Scores:
        pix = None if self.pixel_dcr is None else self.pixel_dcr[idx]
        return Scores(self.max_id_prob[idx], self.indep_id_prob[idx], self.dcr[idx], self.nearest[idx], pix)


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


def calibrate_delta(heldout_emb: torch.Tensor, reference_emb: torch.Tensor, quantile: float) -> float:
    """``quantile`` of the distances of held-out rows to their closest reference row.

    The held-out rows must not be in ``reference_emb`` (a row's distance to itself is 0).
    """
    d, _ = closest_distance(heldout_emb, reference_emb)
    return float(np.quantile(d, quantile))


@dataclass
class ExclusionZone:
    """The protected real images of a site (as embeddings) and the calibrated ``delta``.

    ``split[r]`` / ``index[r]``: which split row ``r`` of ``embeddings`` comes from and its
    index in that split. ``calib`` and ``reference`` are rows of ``embeddings``: delta is the
    quantile of ``calib_dcr`` = distances of the ``calib`` rows to the closest ``reference``
    row; the two are disjoint and together cover every protected row.
    """

    embeddings: torch.Tensor
    split: np.ndarray
    index: np.ndarray
    calib: np.ndarray
    reference: np.ndarray
    calib_dcr: np.ndarray
    delta: float
    quantile: float
    calibration_split: str
    pixels: torch.Tensor | None = None  # flattened protected images (pixel zone), rows as ``embeddings``
    delta_pixel: float | None = None
    calib_dcr_pixel: np.ndarray | None = None

    def __post_init__(self) -> None:
        if np.intersect1d(self.calib, self.reference).size:
            raise ValueError("calibration rows and reference rows of the exclusion zone overlap")

    def nearest_splits(self, nearest: np.ndarray) -> dict[str, int]:
        """How many of the rows ``nearest`` (Scores.nearest) lie in each protected split."""
        names = self.split[np.asarray(nearest, dtype=np.int64)] if len(nearest) else np.zeros(0, dtype=self.split.dtype)
        return {s: int((names == s).sum()) for s in dict.fromkeys(self.split.tolist())}

    def summary(self) -> dict[str, Any]:
        return {
            "protected": {s: int((self.split == s).sum()) for s in dict.fromkeys(self.split.tolist())},
            "calibration_split": self.calibration_split,
            "n_calibration": int(len(self.calib)),
            "n_reference": int(len(self.reference)),
            "delta_quantile": self.quantile,
            "delta_pixel": self.delta_pixel,
        }


@dataclass(frozen=True)
class ZoneRows:
    """The rows of an exclusion zone: ``split[r]`` / ``index[r]`` as in :class:`ExclusionZone`; ``calib``
    (the seeded calibration rows) and ``reference`` (all others) partition them."""

    split: np.ndarray
    index: np.ndarray
    calib: np.ndarray
    reference: np.ndarray


def zone_rows(split_sizes: dict[str, int], calibration_split: str, calibration_fraction: float, seed: int) -> ZoneRows:
    """Which protected rows calibrate delta and which form the reference set (empty splits skipped).

    Depends on the split sizes and the seed only, so the identity models can be trained on the
    reference rows before the zone's embeddings exist (:func:`identity_set`) and
    :func:`build_zone` draws the same rows. ``ValueError`` naming the split when it is missing,
    empty, or leaves no reference row.
    """
    sizes = {k: int(n) for k, n in split_sizes.items() if n}
    if calibration_split not in sizes:
        raise ValueError(f"filter.calibration_split={calibration_split!r}: that split is not protected or has no images "
                         f"(protected, non-empty: {sorted(sizes)})")
    split = np.concatenate([np.full(n, k, dtype=object) for k, n in sizes.items()]).astype(str)
    index = np.concatenate([np.arange(n) for n in sizes.values()])
    rows = np.flatnonzero(split == calibration_split)
    n_cal = min(max(int(round(len(rows) * calibration_fraction)), 1), len(rows))
    if n_cal == len(split):
        raise ValueError(f"filter: the exclusion zone needs images besides the {n_cal} calibration images of split "
                         f"{calibration_split!r}")
    calib = np.sort(np.random.default_rng(seed).choice(rows, size=n_cal, replace=False))
    return ZoneRows(split, index, calib, np.setdiff1d(np.arange(len(split)), calib))


@dataclass
class IdentitySet:
    """What the identity models (phi_id, the independent one) are trained on: images and their identity class.

    ``mode`` ``"protected"``: one class per protected identity of the zone's reference set
    (train and held-out alike; the calibration rows are never a class, so delta is calibrated
    on images the embedding never saw, like a candidate). ``"train"``: the train identities
    only. Train identities come first, with the labels ``train_labels`` they had, so a
    train image's class is the same in both modes. ``unseen``: the calibration images (in
    no mode a class), for the report's non-member probabilities.
    """

    x: torch.Tensor
    labels: torch.Tensor
    n_classes: int
    n_train_classes: int
    mode: str
    by_split: dict[str, int]  # identity classes per split
    unseen: torch.Tensor


def identity_set(split_x: dict[str, torch.Tensor], train_labels: torch.Tensor, rows: ZoneRows, mode: str,
                 patient_ids: dict[str, np.ndarray | None] | None = None) -> IdentitySet:
    """The identity models' training set over the protected splits ``split_x`` (train first).

    ``rows`` (:func:`zone_rows` over the same splits) says which held-out rows are reference rows
    (classes in mode ``"protected"``) and which calibrate delta (never classes). A held-out
    split with ``patient_ids`` gets one class per patient, else one per image, as the train
    split (``train_labels``: 0..n-1).
    """
    if mode not in ("protected", "train"):
        raise ValueError(f"filter.identity_classes must be 'protected' or 'train', got {mode!r}")
    if "train" not in split_x or not len(split_x["train"]):
        raise ValueError("identity_set: the train split is required and must not be empty")
    n_tr = int(train_labels.max()) + 1
    xs, ys, by_split = [split_x["train"]], [train_labels.long()], {"train": n_tr}
    n = n_tr
    ref = np.zeros(len(rows.split), dtype=bool)
    ref[rows.reference] = True
    if mode == "protected":
        for k, x in split_x.items():
            if k == "train" or not len(x):
                continue
            keep = rows.index[(rows.split == k) & ref]
            pid = (patient_ids or {}).get(k)
            unit = np.asarray(pid)[keep] if pid is not None else keep
            _, lab = np.unique(unit, return_inverse=True)
            n_k = int(lab.max()) + 1 if len(lab) else 0
            xs.append(x[torch.as_tensor(keep, dtype=torch.long)])
            ys.append(torch.as_tensor(lab.reshape(-1) + n, dtype=torch.long))
            by_split[k], n = n_k, n + n_k
    cal = [split_x[k][torch.as_tensor(rows.index[(rows.split == k) & ~ref], dtype=torch.long)]
           for k in split_x if k != "train" and len(split_x[k])]
    unseen = torch.cat(cal) if cal else split_x["train"][:0]
    return IdentitySet(torch.cat(xs), torch.cat(ys), n, n_tr, mode, by_split, unseen)


def build_zone(split_embeddings: dict[str, torch.Tensor], quantile: float, calibration_split: str,
               calibration_fraction: float, seed: int,
               split_pixels: dict[str, torch.Tensor] | None = None) -> ExclusionZone:
    """The symmetric exclusion zone over every split in ``split_embeddings`` (empty ones skipped).

    A seeded ``calibration_fraction`` of ``calibration_split``'s rows calibrates delta against
    all other protected rows (see the module docstring). Raises ``ValueError`` naming the
    split when it is missing, empty, or too small to leave a calibration row.

    ``split_pixels`` (same splits and rows, images ``[N, C, H, W]``) adds a pixel-space zone:
    ``delta_pixel`` is calibrated on the same rows in pixel space. The embedding is learned
    (on the train images only with ``filter.identity_classes="train"``; never on the
    calibration rows), so it need not map a light copy of an image it did not learn close to
    its source; pixel distance belongs to no model and treats every split alike (it is also
    the distance the membership attack uses).
    """
    parts = {k: v for k, v in split_embeddings.items() if len(v)}
    zr = zone_rows({k: len(v) for k, v in parts.items()}, calibration_split, calibration_fraction, seed)
    emb = torch.cat([v.float() for v in parts.values()]) if parts else torch.zeros(0)
    split, index, calib, reference = zr.split, zr.index, zr.calib, zr.reference
    d, _ = closest_distance(emb[calib], emb[reference])
    delta = float(np.quantile(d, quantile))
    zone = ExclusionZone(emb, split, index, calib, reference, d, delta, float(quantile), calibration_split)
    if split_pixels is not None:
        pix = torch.cat([split_pixels[k].reshape(len(split_pixels[k]), -1).float() for k in parts])
        if len(pix) != len(emb):
            raise ValueError(f"split_pixels has {len(pix)} rows, split_embeddings {len(emb)}")
        dp, _ = closest_distance(pix[calib], pix[reference])
        zone.pixels, zone.delta_pixel, zone.calib_dcr_pixel = pix, float(np.quantile(dp, quantile)), dp
    return zone


def score_images(
    images: torch.Tensor, phi_id: nn.Module, indep: Classifier, protected_emb: torch.Tensor, embed_net: Classifier | None = None,
    protected_pixels: torch.Tensor | None = None,
) -> Scores:
    """The filter quantities for images ``[N, C, H, W]`` in [-1, 1].

    ``protected_emb``: embeddings of every protected real image (``ExclusionZone.embeddings``);
    ``dcr`` is the distance to the closest of them. With ``protected_pixels``
    (``ExclusionZone.pixels``) also ``pixel_dcr``, the same in pixel space.
    """
    p_id = F.softmax(predict_logits(phi_id, images), dim=1).max(1).values.numpy()
    p_in = F.softmax(predict_logits(indep, images), dim=1).max(1).values.numpy()
    emb = embed(embed_net or indep, images)
    d, j = closest_distance(emb, protected_emb)
    pix = None
    if protected_pixels is not None:
        pix = closest_distance(images.reshape(len(images), -1).float(), protected_pixels)[0].astype(np.float64)
    return Scores(p_id.astype(np.float64), p_in.astype(np.float64), d.astype(np.float64), j, pix)


def _pixel_ok(s: Scores, delta_pixel: float | None) -> np.ndarray:
    if delta_pixel is None:
        return np.ones(len(s), dtype=bool)
    if s.pixel_dcr is None:
        raise ValueError("a pixel-zone threshold was given but the scores have no pixel_dcr (score with protected_pixels)")
    return s.pixel_dcr > delta_pixel


def accept_mask(s: Scores, t: Thresholds, delta_pixel: float | None = None) -> np.ndarray:
    ok = (s.max_id_prob < t.tau_id) & (s.indep_id_prob < t.tau_indep) & (s.dcr > t.delta) & _pixel_ok(s, delta_pixel)
    # an accepted image can never violate a threshold
    assert not np.any(ok & ~((s.max_id_prob < t.tau_id) & (s.indep_id_prob < t.tau_indep) & (s.dcr > t.delta)))
    return np.asarray(ok, dtype=bool)


def reject_reasons(s: Scores, t: Thresholds, delta_pixel: float | None = None) -> dict[str, int]:
    out = {
        "id_prob": int((s.max_id_prob >= t.tau_id).sum()),
        "indep_id_prob": int((s.indep_id_prob >= t.tau_indep).sum()),
        "dcr": int((s.dcr <= t.delta).sum()),
    }
    if delta_pixel is not None:
        out["pixel_dcr"] = int((~_pixel_ok(s, delta_pixel)).sum())
    return out


def plant_duplicates(x_train: torch.Tensor, n: int, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """``n`` lightly augmented real images of ``x_train`` (+-1 px shift, +-5 % brightness, tiny
    noise) and their source indices (the pipeline passes every protected image)."""
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
