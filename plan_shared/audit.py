"""Privacy audit of a site's exported images: membership attacks and distances to closest records.

``privacy_audit`` measures what the images a site exported reveal about its training images:

- distance membership inference against the exported images: score of a real record
  = minus its pixel-space distance to the closest exported image; members = site
  train, non-members = site test (held out of every model). Pixel space is used on
  purpose: it belongs to no model of the pipeline, so navigation cannot have been
  optimised against it. Reported: ROC AUC with a 95 % percentile bootstrap interval
  (``mia_auc_lo``/``mia_auc_hi``; 1000 replicates, members and non-members resampled
  separately, seed 0), ``mia_auc_gap`` = |AUC - 0.5| (leakage in either direction: an
  attacker can flip the score) and TPR at 1 % FPR. The filter's exclusion zone and its
  identity models treat train, val and test alike (plan_shared/privacy.py), so chance (0.5)
  is the target. The same attack with non-members = the site's val split (``mia_val_*``) is
  reported too: the AUC compares two real sets, so it also measures any difference between
  them, and where the test split comes from another source than train (MedMNIST's official
  test split: an attack with a pool of *other sites'* real test images, which knows nothing
  of the site's membership, gets AUC 0.40-0.50 on the demo partition; benchmarks/mia_ablation.py)
  the test-based AUC departs from 0.5 without any leak. MedMNIST's val split is drawn from the
  train source, so ``mia_val_*`` separates membership from that shift;
- loss-threshold membership inference against phi_down (score = minus its loss);
- distance to closest record: ``dcr_ratio`` = median DCR(exported -> train) / median
  DCR(held-out -> train) (1 = as far as a real non-member; < 1 = closer);
  ``too_close_rate`` = share of exported images closer to a train image than the 5th
  percentile of held-out -> train distances;
- the re-identification attacker (:func:`attacker_audit`, plan_shared/attacker.py: a model that
  neither navigation nor the filter uses, trained by its own recipe on the site's train
  images, one class per identity): per image set its mean max identity probability and the
  distance to the closest train image in its L2-normalised embedding (issue #11.1 (b), (c)).

Only numbers are returned. The attacks run at the site (client/post_training.py); the
metrics themselves are plan_shared.metrics.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from plan_shared.attacker import embed, max_id_prob, predict_ids, train_attacker
from plan_shared.classifiers import predict_logits
from plan_shared.config import AttackerConfig
from plan_shared.data import ImageDataset, to_tensor
from plan_shared.metrics import bootstrap_auc_interval, bootstrap_tpr_interval, dcr, mia_auc, tpr_at_fpr, tpr_chance_band

__all__ = ["MIA_BOOTSTRAP", "AttackerAudit", "attacker_audit", "dcr_audit", "distance_mia", "loss_mia", "mia_summary",
           "privacy_audit"]


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).float()


MIA_BOOTSTRAP = 1000  # replicates of the AUC interval (seeded, so a report is reproducible)


def mia_summary(s_mem: np.ndarray, s_non: np.ndarray, prefix: str = "mia", n_boot: int = MIA_BOOTSTRAP) -> dict[str, float]:
    """AUC, its 95 % bootstrap interval, |AUC - 0.5| and TPR at 1 % FPR of a membership score, with the TPR's
    95 % bootstrap interval (``_tpr_lo``/``_tpr_hi``) and what chance alone gives at this many non-members
    (``_tpr_chance``, and ``_tpr_chance_hi`` exceeded one time in twenty: metrics.tpr_chance_band)."""
    auc = mia_auc(s_mem, s_non)
    lo, hi = bootstrap_auc_interval(s_mem, s_non, n_boot=n_boot, seed=0)
    t_lo, t_hi = bootstrap_tpr_interval(s_mem, s_non, 0.01, n_boot=n_boot, seed=0)
    chance, chance_hi = tpr_chance_band(len(s_non), 0.01)
    return {f"{prefix}_auc": auc, f"{prefix}_auc_lo": lo, f"{prefix}_auc_hi": hi, f"{prefix}_auc_gap": abs(auc - 0.5),
            f"{prefix}_tpr_at_1pct_fpr": tpr_at_fpr(s_mem, s_non, 0.01), f"{prefix}_tpr_lo": t_lo,
            f"{prefix}_tpr_hi": t_hi, f"{prefix}_tpr_chance": chance, f"{prefix}_tpr_chance_hi": chance_hi}


def distance_mia(members: torch.Tensor, nonmembers: torch.Tensor, synthetic: torch.Tensor,
                 n_boot: int = MIA_BOOTSTRAP, prefix: str = "mia") -> dict[str, float]:
    """Membership inference from the distance of each real record to the closest synthetic image
    (keys ``{prefix}_auc``, ``_auc_lo``, ``_auc_hi``, ``_auc_gap``, ``_tpr_at_1pct_fpr``)."""
    if len(synthetic) == 0 or len(nonmembers) == 0:
        return {f"{prefix}{k}": float("nan") for k in ("_auc", "_auc_lo", "_auc_hi", "_auc_gap", "_tpr_at_1pct_fpr",
                                                        "_tpr_lo", "_tpr_hi", "_tpr_chance", "_tpr_chance_hi")}
    syn = _flat(synthetic)
    s_mem = -dcr(_flat(members), syn)
    s_non = -dcr(_flat(nonmembers), syn)
    return mia_summary(s_mem, s_non, prefix, n_boot)


@torch.no_grad()
def loss_mia(model: torch.nn.Module, members: tuple[torch.Tensor, np.ndarray],
             nonmembers: tuple[torch.Tensor, np.ndarray]) -> dict[str, float]:
    """Loss-threshold membership inference against a classifier (lower loss = member)."""

    def neg_loss(x: torch.Tensor, y: np.ndarray) -> np.ndarray:
        logits = predict_logits(model, x)
        return (-F.cross_entropy(logits, torch.as_tensor(y, dtype=torch.long), reduction="none")).numpy()

    s_mem, s_non = neg_loss(*members), neg_loss(*nonmembers)
    return mia_summary(s_mem, s_non, "loss_mia")


def dcr_audit(train: torch.Tensor, heldout: torch.Tensor, synthetic: torch.Tensor, quantile: float = 0.05) -> dict[str, float]:
    tr = _flat(train)
    base = dcr(_flat(heldout), tr)
    if len(synthetic) == 0 or len(base) == 0:
        return {"dcr_ratio": float("nan"), "too_close_rate": float("nan"), "dcr_synthetic_median": float("nan"),
                "dcr_heldout_median": float(np.median(base)) if len(base) else float("nan")}
    syn = dcr(_flat(synthetic), tr)
    bar = float(np.quantile(base, quantile))
    return {
        "dcr_ratio": float(np.median(syn) / max(np.median(base), 1e-12)),
        "too_close_rate": float((syn < bar).mean()),
        "dcr_synthetic_median": float(np.median(syn)),
        "dcr_heldout_median": float(np.median(base)),
    }


def privacy_audit(ds: ImageDataset, synthetic_uint8: np.ndarray, phi_down: torch.nn.Module | None) -> dict[str, float]:
    """All privacy numbers of one site (members = train, non-members = test; ``mia_val_*``: non-members = val)."""
    train, test, val = to_tensor(ds.train.images), to_tensor(ds.test.images), to_tensor(ds.val.images)
    syn = to_tensor(synthetic_uint8) if len(synthetic_uint8) else torch.zeros(0, *train.shape[1:])
    out: dict[str, float] = {"n_members": int(len(train)), "n_nonmembers": int(len(test)), "n_synthetic": int(len(syn)),
                             "n_nonmembers_val": int(len(val))}
    out.update(distance_mia(train, test, syn))
    out.update(distance_mia(train, val, syn, prefix="mia_val"))
    out.update(dcr_audit(train, test, syn))
    if phi_down is not None:
        out.update(loss_mia(phi_down, (train, ds.train.labels), (test, ds.test.labels)))
    return out


@dataclass
class AttackerAudit:
    """What :func:`attacker_audit` measured.

    ``attacker``: the model itself -- images and identities it was trained on, epochs, its top-1 identity
    accuracy and mean max identity probability on those (members), the mean max identity probability on the
    held-out images (non-members: the floor a fresh patient gets) and the seconds it took.
    ``sets``: per image set ``attacker_max_id_prob`` (mean), ``attacker_dcr`` (mean distance to the closest site
    train image in the attacker's embedding), ``attacker_dcr_p05`` and ``attacker_n``.
    """

    attacker: dict[str, float]
    sets: dict[str, dict[str, float]]


def attacker_audit(cfg: AttackerConfig, train: torch.Tensor, ids: torch.Tensor, heldout: torch.Tensor,
                   sets: Mapping[str, torch.Tensor], device: torch.device | str, progress: bool = False) -> AttackerAudit:
    """Train the attacker once on the site's train images ``train`` (identity ``ids``; ``cfg.max_images`` a seeded
    subsample) and score every image set of ``sets`` (e.g. each method's filter-passing images) with it."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    if len(train) != len(ids):
        raise ValueError(f"attacker_audit: {len(train)} train images but {len(ids)} identity labels")
    t0 = time.perf_counter()
    rows = torch.arange(len(train))
    if cfg.max_images is not None and len(train) > cfg.max_images:
        rows = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.max_images].sort().values
    _, local = torch.unique(ids[rows], return_inverse=True)  # the subsample's identities as 0..n-1
    x_att = train[rows]
    att = train_attacker(x_att, local, cfg, device, progress=progress)
    emb_train = embed(att, train)
    summary = {
        "n_images": float(len(rows)), "n_ids": float(int(local.max()) + 1 if len(local) else 0), "epochs": float(cfg.epochs),
        "member_top1": float((predict_ids(att, x_att) == local).float().mean()),
        "member_max_id_prob": float(max_id_prob(att, x_att).mean()),
        "heldout_max_id_prob": float(max_id_prob(att, heldout).mean()) if len(heldout) else float("nan"),
    }
    out: dict[str, dict[str, float]] = {}
    for name, x in sets.items():
        if len(x) == 0:
            out[name] = {"attacker_max_id_prob": float("nan"), "attacker_dcr": float("nan"),
                         "attacker_dcr_p05": float("nan"), "attacker_n": 0.0}
            continue
        d = dcr(embed(att, x), emb_train)
        out[name] = {"attacker_max_id_prob": float(max_id_prob(att, x).mean()), "attacker_dcr": float(d.mean()),
                     "attacker_dcr_p05": float(np.quantile(d, 0.05)), "attacker_n": float(len(x))}
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    return AttackerAudit(summary, out)
