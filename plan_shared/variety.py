"""Variety of each method's images: precision and recall against the real train split.

Features are the penultimate layer of phi_class (the site's class classifier, trained on
its real train split; L2-normalised): a space the pipeline trains itself, where
distances follow the class-relevant content rather than pixels. The metric itself is
:func:`plan_shared.metrics.precision_recall` (Kynkäänniemi et al. 2019).
"""

from __future__ import annotations

import torch

from plan_shared.classifiers import embed
from plan_shared.metrics import precision_recall
from plan_shared.models import Classifier

FEATURE_SPACE = "phi_class penultimate features (L2-normalised)"


def method_precision_recall(model: Classifier, real: torch.Tensor, sets: dict[str, torch.Tensor],
                            k: int) -> dict[str, dict[str, float | int | str | None]]:
    """``{method: {"precision", "recall", "pr_n", "pr_k", "pr_features"}}``; None where a set has <= k images."""
    real_f = embed(model, real)
    out: dict[str, dict[str, float | int | str | None]] = {}
    for name, x in sets.items():
        rec: dict[str, float | int | str | None] = {"precision": None, "recall": None, "pr_n": len(x),
                                                     "pr_k": k, "pr_features": FEATURE_SPACE}
        if len(x) > k and len(real_f) > k:
            rec["precision"], rec["recall"] = precision_recall(real_f, embed(model, x), k)
        out[name] = rec
    return out
