"""A pulled pool as a data set: :class:`PooledDataset` and the pull's ``DATASHEET.md``.

``plan-server pool pull --out DIR`` writes ``DIR/<class>/<sha256>.png``, ``DIR/manifest.json``
(format ``plan-pool-pull/1``, see ``server/pool/client.py``) and ``DIR/DATASHEET.md``.
:class:`PooledDataset` is a ``torch.utils.data.Dataset`` over such a folder, one item per
manifest image (an image pushed in two bundles is two items, with two provenances)::

    ds = PooledDataset("pooled")
    x, y = ds[0]                 # float32 (C, H, W) in [-1, 1] (plan_shared.data.to_tensor), int label
    ds.classes                   # class name per label, e.g. ['normal', 'pneumonia']
    ds.provenance(0)             # site, bundle, generator round/digest, method, privacy record
    ds.records[0].record.dcr     # the privacy record (plan_shared.manifest.ImageRecord)

With ``transform`` the item is ``(transform(PIL image), label)`` instead (torchvision style).
Every file is checked to exist when the data set opens; ``verify=True`` also re-hashes each
against its sha256. Errors name the file and the manifest entry.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .bundle import sha256_file
from .data import read_image, to_tensor
from .manifest import ImageRecord, ManifestError, is_hex64, is_safe_name

PULL_FORMAT = "plan-pool-pull/1"


class PoolDatasetError(ValueError):
    """A pulled folder cannot be read; the message names the file or manifest entry."""


@dataclass(frozen=True)
class PooledRecord:
    """One image of the pulled pool with its provenance."""

    file: str                      # relative to the folder: <class>/<sha256>.png
    sha256: str
    label: int
    class_name: str
    method: str
    site_id: str
    bundle_id: str
    generator_sha256: str
    config_sha256: str
    generator_round: int | None
    record: ImageRecord            # the per-image privacy record, as the site signed it

    def provenance(self) -> dict[str, Any]:
        return {
            "site_id": self.site_id, "bundle_id": self.bundle_id, "generator_round": self.generator_round,
            "generator_sha256": self.generator_sha256, "config_sha256": self.config_sha256,
            "method": self.method, "sha256": self.sha256, "file": self.file, "privacy": self.record.to_dict(),
        }


def read_pull_manifest(root: str | Path) -> dict[str, Any]:
    """``root/manifest.json`` of a pull, checked for its format; raises :class:`PoolDatasetError`."""
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise PoolDatasetError(f"{path}: not found (is {root} a folder written by `plan-server pool pull`?)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PoolDatasetError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(doc, dict) or doc.get("format") != PULL_FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise PoolDatasetError(f"{path}: key 'format' = {got!r}: expected {PULL_FORMAT!r}")
    if not isinstance(doc.get("images"), list):
        raise PoolDatasetError(f"{path}: key 'images' must be a list")
    return doc


def _parse_image(root: Path, i: int, raw: Any, where: str) -> PooledRecord:
    if not isinstance(raw, dict):
        raise PoolDatasetError(f"{where}: images[{i}]: must be an object")
    w = f"{where}: images[{i}]"
    try:
        rec = ImageRecord.from_dict(raw.get("record"), f"{w} record")
    except ManifestError as err:
        raise PoolDatasetError(str(err)) from None
    for key in ("sha256", "bundle_id", "generator_sha256", "config_sha256"):
        if not is_hex64(raw.get(key)):
            raise PoolDatasetError(f"{w}: key '{key}' = {raw.get(key)!r}: must be 64 lower-case hex digits")
    for key in ("class_name", "site_id"):
        if not is_safe_name(raw.get(key)):
            raise PoolDatasetError(f"{w}: key '{key}' = {raw.get(key)!r}: must be a plain name")
    expected = f"{raw['class_name']}/{raw['sha256']}.png"
    if raw.get("file") != expected:
        raise PoolDatasetError(f"{w}: key 'file' = {raw.get('file')!r}: must be {expected!r}")
    if raw.get("label") != rec.label or raw.get("sha256") != rec.sha256:
        raise PoolDatasetError(f"{w}: label/sha256 differ from its privacy record")
    gr = raw.get("generator_round")
    if gr is not None and (not isinstance(gr, int) or isinstance(gr, bool) or gr < 0):
        raise PoolDatasetError(f"{w}: key 'generator_round' = {gr!r}: must be a non-negative integer or null")
    if not (root / expected).is_file():
        raise PoolDatasetError(f"{root / expected}: missing ({w}); pull again to complete the folder")
    return PooledRecord(
        file=expected, sha256=raw["sha256"], label=rec.label, class_name=raw["class_name"], method=rec.method,
        site_id=raw["site_id"], bundle_id=raw["bundle_id"], generator_sha256=raw["generator_sha256"],
        config_sha256=raw["config_sha256"], generator_round=gr, record=rec,
    )


def label_names(doc: dict[str, Any]) -> list[str]:
    """Class name per integer label 0..max of a pull manifest.

    A label that arrived under several names (an older bundle without names, ``"0"``,
    beside ``"normal"``) takes a real name over a bare number, then the most frequent; a
    label absent from the pull is named by its number.
    """
    counts = Counter((im["label"], im["class_name"]) for im in doc.get("images", []))
    best: dict[int, tuple[bool, int, str]] = {}
    for (label, name), n in counts.items():
        cand = (not name.isdigit(), n, name)
        if label not in best or cand[:2] > best[label][:2]:
            best[label] = cand
    size = max(best) + 1 if best else 0
    return [best[k][2] if k in best else str(k) for k in range(size)]


class PooledDataset(torch.utils.data.Dataset[tuple[Any, int]]):
    """A pulled pool folder as a ``torch.utils.data.Dataset`` (see the module docstring)."""

    def __init__(self, root: str | Path, transform: Callable[[Image.Image], Any] | None = None,
                 verify: bool = False) -> None:
        self.root = Path(root)
        self.manifest = read_pull_manifest(self.root)
        where = str(self.root / "manifest.json")
        self.records: list[PooledRecord] = [
            _parse_image(self.root, i, raw, where) for i, raw in enumerate(self.manifest["images"])
        ]
        if verify:
            for r in self.records:
                if sha256_file(self.root / r.file)[0] != r.sha256:
                    raise PoolDatasetError(f"{self.root / r.file}: content does not match its sha256")
        self.classes: list[str] = label_names(self.manifest)
        self.targets: list[int] = [r.label for r in self.records]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        r = self.records[i]
        path = self.root / r.file
        if self.transform is not None:
            with Image.open(path) as img:
                img.load()
                return self.transform(img), r.label
        arr = read_image(path)                       # (H, W, C) uint8
        return to_tensor(np.transpose(arr, (2, 0, 1)).copy()), r.label

    def provenance(self, i: int) -> dict[str, Any]:
        """Site, bundle, generator round and digest, method and the privacy record of item ``i``."""
        return self.records[i].provenance()


# ----------------------------------------------------------------------------- datasheet


def _rng(values: list[float]) -> str:
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return f"{lo:.4g}" if lo == hi else f"{lo:.4g} … {hi:.4g}"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def datasheet_text(doc: dict[str, Any], npz_name: str | None = None) -> str:
    """The ``DATASHEET.md`` of a pull manifest ``doc`` (sites, counts per class, generators,
    methods, the privacy thresholds seen in the records, intended use and limitations)."""
    images = doc["images"]
    names = label_names(doc)
    class_keys = sorted({(im["label"], im["class_name"]) for im in images})
    L: list[str] = [
        "# Datasheet: pooled synthetic images",
        "",
        f"Pulled from the pool at `{doc['pool']}` on {doc['pulled']}: **{doc['n_images']} image record(s)** "
        f"in {doc['n_files']} file(s), from {len({b['site_id'] for b in doc['bundles']})} site(s) and "
        f"{len(doc['bundles'])} bundle(s). Every file was verified against its sha256 when it was pulled.",
        "",
        "Layout: `<class>/<sha256>.png` with `manifest.json` (one entry per image with its site, bundle, "
        "generator and privacy record)" + (f"; `{npz_name}` holds the same images in the MedMNIST format "
        "(all in `train_*`, in the manifest's order; `val_*`/`test_*` empty)" if npz_name else "") + ".",
        "Read it with `plan_shared.pool_dataset.PooledDataset(folder)`, or as `--data folder`"
        + (f" / `--data folder/{npz_name}`" if npz_name else "") + " in the toolkit.",
        "",
        "## Classes",
        "",
    ]
    L += _table(["label", "class", "images"],
                [[lab, name, sum(1 for im in images if (im["label"], im["class_name"]) == (lab, name))]
                 for lab, name in class_keys])
    if len(names) < len(class_keys):
        L += ["", "Some labels arrived under more than one name (bundles from sources with and without class "
              f"names); the label order used for arrays is {names}."]
    L += ["", "## Sites", ""]
    cls_cols = [f"{name} ({lab})" for lab, name in class_keys]
    rows = []
    for site in sorted({im["site_id"] for im in images}):
        mine = [im for im in images if im["site_id"] == site]
        row = [site, len({im["bundle_id"] for im in mine}), len(mine)]
        row += [sum(1 for im in mine if (im["label"], im["class_name"]) == k) for k in class_keys]
        rows.append(row)
    L += _table(["site", "bundles", "images", *cls_cols], rows)
    L += ["", "## Generators", ""]
    L += _table(["site", "bundle", "created", "generator round", "generator sha256", "config sha256", "images"],
                [[b["site_id"], f"`{b['bundle_id'][:16]}`", b["created"],
                  "unknown" if b["generator_round"] is None else b["generator_round"],
                  f"`{b['generator_sha256']}`", f"`{b['config_sha256'][:16]}`", b["n_images"]]
                 for b in sorted(doc["bundles"], key=lambda b: (b["site_id"], b["created"]))])
    digests = {b["generator_sha256"] for b in doc["bundles"]}
    L += ["", f"{len(digests)} distinct generator digest(s)."]
    L += ["", "## Generation methods", ""]
    methods = Counter(im["method"] for im in images)
    L += _table(["method", "images"], [[m, n] for m, n in sorted(methods.items())])
    L += ["", "`plan`: images along PLAN latent paths between class anchors; `linear`: straight latent "
          "interpolation; `random`: plain GAN samples (method.md B4/B5).", ""]
    L += ["## Privacy filter (as recorded per image)", "",
          "Each image passed its site's filter (method.md B6): identity-model confidence `max_id_prob` < τ_id, "
          "an independent identity model's confidence `indep_id_prob` < τ_indep, and the distance to the closest "
          "real training image `dcr` > δ (a per-site quantile of real held-out distances). Thresholds and values "
          "as the sites recorded them:", ""]
    rows = []
    for site in sorted({im["site_id"] for im in images}):
        recs = [im["record"] for im in images if im["site_id"] == site]
        th = [r["thresholds"] for r in recs]
        rows.append([site, _rng([t["tau_id"] for t in th]), _rng([t["tau_indep"] for t in th]),
                     _rng([t["delta"] for t in th]), _rng([r["max_id_prob"] for r in recs]),
                     _rng([r["indep_id_prob"] for r in recs]), _rng([r["dcr"] for r in recs])])
    L += _table(["site", "τ_id", "τ_indep", "δ", "max_id_prob", "indep_id_prob", "dcr"], rows)
    L += ["", "## Intended use", "",
          "Research and method development: training and evaluating image models, data augmentation studies, "
          "and comparing sites, where the real images may not leave the hospitals.", "",
          "## Limitations", "",
          "- **Synthetic images.** Made by a style-GAN trained by federated learning across the sites; they are "
          "not patients and carry no clinical ground truth. The label is the class the generator was steered to, "
          "not a diagnosis.",
          "- **Not for clinical decisions**: not for diagnosis, treatment, triage or as evidence about any person, "
          "and not a validated medical device data set.",
          "- **Privacy is filtered, not proven.** The filter above rejects images too close to, or too "
          "recognisable as, training images at the thresholds listed; it lowers, but does not exclude, "
          "memorisation. The thresholds are the sites' own records unless the pool enforces a policy.",
          "- **Composition follows what the sites generated** (see the tables), not the prevalence of any "
          "condition; sites, generator rounds and methods may differ in quality. Models trained on it should "
          "be tested on real data before any conclusion.",
          ""]
    return "\n".join(L)
