"""Figures of the site report (matplotlib, Agg backend, PNG)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from plan_shared.imaging import save_grid, to_uint8_hwc  # noqa: E402


def _show(ax: Any, img: np.ndarray) -> None:
    if img.shape[2] == 1:
        ax.imshow(img[:, :, 0], cmap="gray", vmin=0, vmax=255)
    else:
        ax.imshow(img)
    ax.set_xticks([])
    ax.set_yticks([])


def path_strips(
    rows: Sequence[dict[str, Any]],
    path: str | Path,
    max_cols: int = 10,
) -> Path:
    """One row per (pair, method): ``{"title", "images" [T,C,H,W], "id_prob" [T], "dcr" [T]}``.

    At most ``max_cols`` evenly spaced points per path are drawn, each annotated with its
    max identity probability (p) and its distance to the closest real image (d).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not rows:
        return path
    T = len(rows[0]["images"])
    cols = np.unique(np.linspace(0, T - 1, min(max_cols, T)).round().astype(int))
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(1.3 * len(cols), 1.55 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        imgs = to_uint8_hwc(row["images"])
        for c, t in enumerate(cols):
            ax = axes[r, c]
            _show(ax, imgs[t])
            ax.set_title(f"p={row['id_prob'][t]:.2f}\nd={row['dcr'][t]:.2f}", fontsize=6)
            if c == 0:
                ax.set_ylabel(row["title"], fontsize=6)
    fig.suptitle("paths: p = max id-probability (phi_id), d = distance to closest protected real image", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def dcr_histogram(series: dict[str, np.ndarray], delta: float, path: str | Path) -> Path:
    """Overlaid normalised histograms of distances to the closest protected real image (train and held-out)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    vals = [np.asarray(v) for v in series.values() if len(v)]
    if vals:
        lo, hi = min(v.min() for v in vals), max(v.max() for v in vals)
        bins = np.linspace(lo, hi if hi > lo else lo + 1e-3, 40)
        for name, v in series.items():
            if len(v):
                ax.hist(v, bins=list(bins), density=True, alpha=0.45, label=f"{name} (n={len(v)})")
    ax.axvline(delta, color="k", ls="--", lw=1, label=f"delta={delta:.3f}")
    ax.set_xlabel("distance to closest protected real image (embedding)")
    ax.set_ylabel("density")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def spread_rows(total: int, n: int) -> list[int]:
    """``min(n, total)`` row indices evenly spaced over ``0..total-1`` (first and last included).

    A pool is written path by path, so its first rows are a few neighbouring points of a few
    paths: a grid of those would show near-copies where the pool may vary, and hide it where it
    does not. Evenly spaced rows show the whole set."""
    if total <= n:
        return list(range(total))
    if n <= 1:
        return [0][:n]
    return [round(i * (total - 1) / (n - 1)) for i in range(n)]


def sample_grid(images: torch.Tensor, path: str | Path, n: int = 64) -> Path:
    """A grid of ``n`` images evenly spaced over ``images`` (:func:`spread_rows`)."""
    return save_grid(images[spread_rows(len(images), n)], path)
