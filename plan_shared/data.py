"""Data sources: MedMNIST ``.npz``, ImageFolder trees, APTOS-style CSV manifests and DICOM folders.

Every source ends as the same :class:`ImageDataset`: three :class:`Split` s
(train / val / test) of ``uint8`` images shaped ``(N, C, H, W)`` and ``int64``
labels, plus the class names::

    ds = load_dataset(cfg.data, seed=cfg.seed)
    print(ds.summary())
    x = to_tensor(ds.train.images)          # float32 in [-1, 1]

Choices written down here (the configuration documents the keys):

- Shape conversions are explicit. ``data.size`` resizes every image to
  ``size x size`` with Pillow's antialiased bilinear filter (the aspect ratio is not
  kept: non-square images are stretched). ``data.size: null`` keeps the native size,
  which must then be square and the same for all images. ``data.channels`` converts
  grey <-> RGB (RGB -> grey with the ITU-R 601 luma weights; grey -> RGB repeats the
  channel); ``null`` keeps the native channels, which must then agree.
- Pixel modes read from files: alpha channels are dropped, palette/CMYK/YCbCr images
  become RGB, 16-bit grey is mapped to 8 bits by ``value / 257`` (full 16-bit range),
  EXIF orientation is applied, multi-frame files contribute their first frame.
- Sources without a split (ImageFolder without ``train/``, CSV) get a seeded,
  stratified split with ``data.test_fraction`` and ``data.val_fraction`` (fractions
  of the whole set). ``data.max_train`` keeps a seeded, stratified subsample of the
  training split (it is logged).
- DICOM folders (``data.source: dicom``, settings in ``data.dicom``): every file below
  the folder with the ``DICM`` marker (or named ``*.dcm``) is read with pydicom and
  matched to a row of the labels CSV by its relative path or its SOP Instance UID.
  Grey pixels: bits stored only (pydicom masks the unused high bits), Modality LUT
  (rescale slope/intercept), then the VOI LUT or window centre/width mapped onto
  0..255, else ``data.dicom.no_window`` (per-image min..max, or the BitsStored range);
  MONOCHROME1 is inverted so that 255 is white. Colour files (RGB, YBR, palette) need
  ``data.channels`` set. Multi-frame files are refused. Compressed transfer syntaxes
  decode through pydicom's plugins (RLE with numpy alone; JPEG / JPEG 2000 with
  ``plan-toolkit[dicom-compressed]``). With a patient key (CSV column, or PatientID
  from the header, ``data.dicom.patient``) each split carries ``patient_ids`` (an
  opaque int per patient), the split is by patient and phi_id has one identity per
  patient. No header value is kept; errors name files and CSV lines, never header
  values.
- Class names travel with the data: MedMNIST label names (``medmnist.INFO`` when the
  package is installed, else :data:`MEDMNIST_LABELS` for the sets the toolkit ships, else
  the numbers; an npz's own ``class_names`` array wins), ImageFolder folder names, a CSV's
  label values when they are names. A folder written by ``plan-server pool pull`` reads as
  an ImageFolder with its classes in the pool's label order; a MedMNIST-format npz whose
  ``val``/``test`` arrays are empty (``pool pull --format npz``) gets the seeded split.
- Nothing is silently dropped: a file that is not a readable image, a label that is
  not an integer, a missing column or array, an empty class folder ... raises
  :class:`DataError` naming the file, row or value.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from .config import DataConfig, DicomConfig

LOG = logging.getLogger("plan.data")

MEDMNIST_ARRAYS = ("train_images", "train_labels", "val_images", "val_labels", "test_images", "test_labels")
MEDMNIST_SIZES = (28, 64, 128, 224)
SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """A data source could not be read; the message names the file, row or value."""


# ---------------------------------------------------------------------------------
# containers


@dataclass
class Split:
    """One split: ``images`` uint8 ``(N, C, H, W)``, ``labels`` int64 ``(N,)``.

    ``patient_ids`` (int64 ``(N,)`` or None) is the patient index of each image where the
    source knows patients (dicom): an opaque site-local integer, never the patient key
    itself. The site pipeline then trains phi_id with one identity per patient.
    """

    images: np.ndarray
    labels: np.ndarray
    patient_ids: np.ndarray | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.images, np.ndarray) or self.images.dtype != np.uint8 or self.images.ndim != 4:
            shape = getattr(self.images, "shape", None)
            dtype = getattr(self.images, "dtype", type(self.images).__name__)
            raise ValueError(f"Split.images must be a uint8 array (N, C, H, W), got {dtype} {shape}")
        labels = np.asarray(self.labels)
        if labels.ndim != 1 or len(labels) != len(self.images):
            raise ValueError(f"Split.labels must have shape ({len(self.images)},), got {labels.shape}")
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"Split.labels must be integers, got {labels.dtype}")
        self.labels = labels.astype(np.int64, copy=False)
        if self.patient_ids is not None:
            pid = np.asarray(self.patient_ids)
            if pid.shape != (len(self.images),) or (pid.size and not np.issubdtype(pid.dtype, np.integer)):
                raise ValueError(f"Split.patient_ids must be integers of shape ({len(self.images)},), got {pid.dtype} {pid.shape}")
            self.patient_ids = pid.astype(np.int64, copy=False)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, idx: np.ndarray | Sequence[int]) -> Split:
        """A new Split holding the rows ``idx`` (copied)."""
        idx = np.asarray(idx, dtype=np.int64)
        pid = None if self.patient_ids is None else self.patient_ids[idx]
        return Split(self.images[idx], self.labels[idx], pid)

    def class_counts(self, num_classes: int) -> np.ndarray:
        if not len(self):
            return np.zeros(num_classes, np.int64)
        return np.bincount(self.labels, minlength=num_classes)[:num_classes]


@dataclass
class ImageDataset:
    """A labelled image data set with its train / val / test splits."""

    name: str
    train: Split
    val: Split
    test: Split
    class_names: list[str]
    channels: int
    size: int
    source: str
    origin: str = ""  # file or folder it was read from (for reports)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def splits(self) -> dict[str, Split]:
        return {"train": self.train, "val": self.val, "test": self.test}

    def summary(self) -> str:
        """A printable block: name, shape and per-split class counts."""
        head = (
            f"{self.name} ({self.source}, {self.channels}x{self.size}x{self.size}, "
            f"{self.num_classes} classes){' from ' + self.origin if self.origin else ''}"
        )
        cols = [*self.class_names, "total"]
        rows = []
        for split_name, split in self.splits().items():
            counts = split.class_counts(self.num_classes)
            rows.append([split_name, *[str(int(c)) for c in counts], str(len(split))])
        text = head + "\n" + _table(["split", *cols], rows)
        if self.train.patient_ids is not None:
            n_pat = {k: len(np.unique(sp.patient_ids)) if sp.patient_ids is not None else 0
                     for k, sp in self.splits().items()}
            text += "\npatients: " + ", ".join(f"{k} {v}" for k, v in n_pat.items()) + " (one identity per patient)"
        return text


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for r in [header, *rows]:
        cells = [str(r[0]).ljust(widths[0])] + [str(c).rjust(w) for c, w in zip(r[1:], widths[1:])]
        lines.append("  ".join(cells))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------
# tensors


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 images (any shape, typically ``(N, C, H, W)``) -> float32 tensor in [-1, 1]."""
    arr = np.asarray(images)
    if arr.dtype != np.uint8:
        raise TypeError(f"to_tensor expects uint8 images, got {arr.dtype}")
    return torch.from_numpy(np.ascontiguousarray(arr)).to(torch.float32).div_(127.5).sub_(1.0)


def to_uint8(t: torch.Tensor) -> np.ndarray:
    """Inverse of :func:`to_tensor`: clamp to [-1, 1], map to 0..255, round, uint8 array."""
    x = t.detach().to("cpu", torch.float32).clamp(-1.0, 1.0).add(1.0).mul(127.5).round()
    return x.to(torch.uint8).numpy()


# ---------------------------------------------------------------------------------
# image reading and conversion


def _to_hwc(img: Image.Image, where: str) -> np.ndarray:
    """A PIL image -> uint8 array ``(H, W, 1)`` (grey) or ``(H, W, 3)`` (colour), native channels."""
    mode = img.mode
    if mode in ("1", "L", "LA", "La"):
        arr = np.asarray(img.convert("L"), dtype=np.uint8)
    elif mode.startswith("I;16") or mode == "I":
        raw = np.asarray(img).astype(np.int64)
        if raw.size and (raw.min() < 0 or raw.max() > 65535):
            raise DataError(f"{where}: integer image with values outside 0..65535 (mode {mode}) is not supported")
        arr = np.round(raw / 257.0).astype(np.uint8)
    elif mode in ("RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "P", "PA"):
        if mode in ("P", "PA") and ("transparency" in img.info or mode == "PA"):
            img = img.convert("RGBA")
        arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    else:
        raise DataError(f"{where}: unsupported pixel mode {mode!r} (expected grey, 16-bit grey or colour)")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr


def read_image(path: Path, where: str | None = None) -> np.ndarray:
    """Read one image file as uint8 ``(H, W, C)`` with its native channels (1 or 3)."""
    where = where or str(path)
    if not path.is_file():
        raise DataError(f"{where}: image file not found: {path}")
    try:
        with Image.open(path) as opened:
            opened.load()
            return _to_hwc(ImageOps.exif_transpose(opened), where)
    except DataError:
        raise
    except Exception as err:  # PIL raises many types for broken files
        raise DataError(f"{where}: cannot read image {path}: {type(err).__name__}: {err}") from None


def _resize(arr: np.ndarray, size: int) -> np.ndarray:
    """``(H, W, C)`` uint8 -> ``(size, size, C)`` with Pillow's antialiased bilinear filter."""
    if arr.shape[0] == size and arr.shape[1] == size:
        return arr
    if arr.shape[2] == 1:
        out = Image.fromarray(arr[:, :, 0], "L").resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(out, dtype=np.uint8)[:, :, None]
    out = Image.fromarray(arr, "RGB").resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(out, dtype=np.uint8)


def _convert_channels(arr: np.ndarray, channels: int) -> np.ndarray:
    """``(..., C)`` uint8 -> ``(..., channels)``: grey->RGB repeats, RGB->grey uses ITU-R 601 luma."""
    c = arr.shape[-1]
    if c == channels:
        return arr
    if c == 1 and channels == 3:
        return np.repeat(arr, 3, axis=-1)
    if c == 3 and channels == 1:
        luma = arr.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        return np.clip(np.round(luma), 0, 255).astype(np.uint8)[..., None]
    raise DataError(f"cannot convert {c} channels to {channels}")


class _Shaper:
    """Applies the configured size / channels to images one by one and checks agreement.

    With ``size`` (or ``channels``) unset, the first image fixes the native value and
    any later image that differs is an error naming both files.
    """

    def __init__(self, size: int | None, channels: int | None) -> None:
        self.size = size
        self.channels = channels
        self.first_shape: tuple[int, int] | None = None
        self.first_channels: int | None = None
        self.first_where = ""

    def __call__(self, arr: np.ndarray, where: str) -> np.ndarray:
        h, w, c = arr.shape
        if self.first_shape is None:
            self.first_shape, self.first_channels, self.first_where = (h, w), c, where
            if self.size is None and h != w:
                raise DataError(
                    f"{where}: image is {h}x{w} (not square) and data.size is null; set data.size to resize"
                )
        if self.size is None and (h, w) != self.first_shape:
            fh, fw = self.first_shape
            raise DataError(
                f"{where}: image is {h}x{w} but {self.first_where} is {fh}x{fw}; mixed sizes need data.size "
                "set to resize them"
            )
        if self.channels is None and c != self.first_channels:
            raise DataError(
                f"{where}: image has {c} channel(s) but {self.first_where} has {self.first_channels}; mixed "
                "grey/colour images need data.channels set (1 or 3)"
            )
        if self.size is not None:
            arr = _resize(arr, self.size)
        if self.channels is not None:
            arr = _convert_channels(arr, self.channels)
        return arr


def _shape_array(images: np.ndarray, size: int | None, channels: int | None, where: str) -> np.ndarray:
    """``(N, H, W, C)`` uint8 -> converted ``(N, C', S, S)``."""
    n, h, w, _ = images.shape
    if size is None and h != w:
        raise DataError(f"{where}: images are {h}x{w} (not square) and data.size is null; set data.size")
    if size is not None and (h, w) != (size, size):
        if n:
            images = np.stack([_resize(im, size) for im in images])
        else:
            images = np.zeros((0, size, size, images.shape[3]), np.uint8)
    if channels is not None:
        images = _convert_channels(images, channels)
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2))


def _stack(arrays: list[np.ndarray], shape_hint: tuple[int, int, int]) -> np.ndarray:
    """List of ``(H, W, C)`` -> ``(N, C, H, W)``."""
    if not arrays:
        h, w, c = shape_hint
        return np.zeros((0, c, h, w), np.uint8)
    return np.ascontiguousarray(np.stack(arrays).transpose(0, 3, 1, 2))


# ---------------------------------------------------------------------------------
# splitting


def _check_class_counts(
    labels: np.ndarray, class_names: list[str], need: int, what: str, where: str, unit: str = "image"
) -> None:
    counts = np.bincount(labels, minlength=len(class_names))
    for k, cnt in enumerate(counts):
        if cnt < need:
            raise DataError(
                f"{where}: class {class_names[k]!r} has {int(cnt)} {unit}(s); the seeded stratified {what} needs at "
                f"least {need} per class (add {unit}s, or drop the class)"
            )


def _stratified_split(
    labels: np.ndarray,
    fractions: Sequence[float],
    seed: int,
    class_names: list[str],
    where: str,
    part_names: Sequence[str] = ("val", "test"),
    unit: str = "image",
) -> list[np.ndarray]:
    """Split indices ``0..N-1`` into ``[rest, part_1, part_2, ...]`` by the given fractions of N.

    Each part is cut off the remainder with sklearn's stratified ``train_test_split``
    (a part gets at least as many images as there are classes); every index lands in
    exactly one part. Indices are sorted within each part.
    """
    from sklearn.model_selection import train_test_split

    n = len(labels)
    what = "split into " + "/".join(["train", *part_names])
    _check_class_counts(labels, class_names, len(fractions) + 1, what, where, unit)
    rest = np.arange(n)
    parts: list[np.ndarray] = []
    for k, frac in enumerate(fractions):
        # at least one slot per class, so that a tiny set can still be stratified
        n_take = max(int(round(frac * n)), len(np.unique(labels[rest])))
        try:
            rest, taken = train_test_split(
                rest, test_size=n_take, stratify=labels[rest], random_state=(seed * 7919 + k) % 2**32, shuffle=True
            )
        except ValueError as err:
            left = np.bincount(labels[rest], minlength=len(class_names))
            counts = {class_names[c]: int(v) for c, v in enumerate(left)}
            raise DataError(
                f"{where}: too few {unit}s for a stratified split (fraction {frac} of {n}, class counts {counts}): {err}"
            ) from None
        parts.append(np.sort(taken))
    return [np.sort(rest), *parts]


def stratified_subsample(labels: np.ndarray, n_keep: int, seed: int) -> np.ndarray:
    """Seeded subsample of ``n_keep`` indices whose class proportions follow ``labels``.

    Quotas by largest remainder; every class present keeps at least one image when
    ``n_keep`` allows it. Returns sorted indices.
    """
    n = len(labels)
    if n_keep >= n:
        return np.arange(n)
    rng = np.random.default_rng([seed, 0x5AB5])
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * (n_keep / n)
    quota = np.floor(exact).astype(np.int64)
    if n_keep >= len(classes):
        quota = np.maximum(quota, 1)
    while quota.sum() > n_keep:  # only after the at-least-one bump: take from the largest quotas
        quota[np.argmax(quota - exact)] -= 1
    order = np.argsort(-(exact - quota), kind="stable")
    i = 0
    while quota.sum() < n_keep:
        c = order[i % len(order)]
        if quota[c] < counts[c]:
            quota[c] += 1
        i += 1
    keep = [rng.choice(np.flatnonzero(labels == c), size=int(q), replace=False) for c, q in zip(classes, quota)]
    return np.sort(np.concatenate(keep)) if keep else np.arange(0)


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int,
                       min_per_class: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) sorted indices: a seeded :func:`stratified_subsample` of ``fraction`` of the images
    of the classes with at least ``min_per_class`` images is held out; every other index trains.

    A smaller class stays whole in train (a class seen only in validation would never be learnt).
    """
    classes, counts = np.unique(labels, return_counts=True)
    eligible = np.flatnonzero(np.isin(labels, classes[counts >= min_per_class]))
    held = eligible[stratified_subsample(labels[eligible], int(round(fraction * len(eligible))), seed)]
    return np.setdiff1d(np.arange(len(labels)), held), np.sort(held)


# ---------------------------------------------------------------------------------
# MedMNIST


def _medmnist_info() -> dict[str, Any] | None:
    try:
        from medmnist import INFO
    except Exception:
        return None
    info: dict[str, Any] = INFO
    return info


# Label names of the MedMNIST sets shipped with the toolkit (medmnist.INFO[flag]["label"]), so that
# class names travel with the data when the optional medmnist package is not installed.
MEDMNIST_LABELS: dict[str, list[str]] = {
    "pneumoniamnist": ["normal", "pneumonia"],
    "breastmnist": ["malignant", "normal, benign"],
}


def medmnist_class_names(flag: str) -> list[str] | None:
    """Class names of a MedMNIST flag: from ``medmnist.INFO`` when installed, else :data:`MEDMNIST_LABELS`."""
    info = _medmnist_info()
    if info is not None and flag in info:
        lab = info[flag].get("label", {})
        if lab:
            return [lab[k] for k in sorted(lab, key=int)]
    return MEDMNIST_LABELS.get(flag)


def _flag_of(path: Path) -> str:
    return re.sub(r"_\d+$", "", path.stem)


def _search_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("PLAN_DATA_DIR"):
        dirs.append(Path(os.environ["PLAN_DATA_DIR"]).expanduser())
    dirs.append(Path("~/.medmnist").expanduser())
    return dirs


def _candidate_names(name: str, size: int | None) -> list[str]:
    names = []
    if size is not None and size != 28:
        names.append(f"{name}_{size}.npz")
    names += [f"{name}.npz", f"{name}_28.npz"]
    # other resolutions of the same set, nearest-larger first, then smaller
    others = [s for s in MEDMNIST_SIZES if s != 28 and s != size]
    target = size or 28
    others.sort(key=lambda s: (s < target, abs(s - target)))
    names += [f"{name}_{s}.npz" for s in others]
    return names


def _download_medmnist(flag: str, size: int | None, root: Path) -> None:
    """Download one MedMNIST set through the ``medmnist`` package's own API into ``root``."""
    import medmnist

    info = medmnist.INFO[flag]
    cls = getattr(medmnist, info["python_class"])
    root.mkdir(parents=True, exist_ok=True)
    kwargs = {}
    if size is not None and size in MEDMNIST_SIZES and size != 28:
        kwargs["size"] = size
    px = f" ({size} px)" if kwargs else ""
    LOG.info("downloading MedMNIST %s%s into %s through the medmnist package", flag, px, root)
    try:
        cls(split="train", download=True, root=str(root), **kwargs)
    except TypeError:  # medmnist < 3 has no size argument
        cls(split="train", download=True, root=str(root))


def _find_medmnist(cfg: DataConfig) -> Path:
    if cfg.path:
        p = Path(cfg.path).expanduser()
        if not p.is_file():
            raise DataError(f"MedMNIST file not found: {p} (data.path)")
        return p
    if not cfg.name:
        raise DataError("data.source is medmnist but neither data.name nor data.path is set")
    name = cfg.name.strip().lower()
    dirs = _search_dirs()
    names = _candidate_names(name, cfg.size)
    for d in dirs:
        for n in names:
            if (d / n).is_file():
                return d / n
    info = _medmnist_info()
    looked = ", ".join(str(d) for d in dirs)
    hint = (
        "set PLAN_DATA_DIR to the folder holding the file, set data.path to the .npz, "
        "or pip install medmnist (plan-toolkit[medmnist]) so that it can be downloaded"
    )
    if info is None:
        raise DataError(f"MedMNIST data set {name!r} not found: looked for {', '.join(names[:2])} in {looked}; {hint}")
    if name not in info:
        known = ", ".join(sorted(k for k in info if not k.endswith("3d")))
        raise DataError(f"MedMNIST data set {name!r} not found in {looked} and not a known MedMNIST flag ({known})")
    if not cfg.download:
        raise DataError(
            f"MedMNIST data set {name!r} not found: looked for {', '.join(names[:2])} in {looked}, and "
            "data.download is false; set PLAN_DATA_DIR or data.path, or allow the download"
        )
    root = dirs[0]
    try:
        _download_medmnist(name, cfg.size, root)
    except Exception as err:
        raise DataError(
            f"MedMNIST data set {name!r} not found in {looked} and the download failed: {err}; {hint}"
        ) from None
    for n in names:
        if (root / n).is_file():
            return root / n
    raise DataError(f"MedMNIST download of {name!r} finished but no {names[0]} appeared in {root}")


def _load_medmnist(cfg: DataConfig, seed: int) -> ImageDataset:
    path = _find_medmnist(cfg)
    flag = cfg.name.strip().lower() if (cfg.name and not cfg.path) else _flag_of(path)
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as err:
        raise DataError(f"{path}: not a readable .npz file: {type(err).__name__}: {err}") from None
    with npz:
        missing = [k for k in MEDMNIST_ARRAYS if k not in npz.files]
        if missing:
            raise DataError(
                f"{path}: array {missing[0]!r} missing (MedMNIST format needs {', '.join(MEDMNIST_ARRAYS)}; "
                f"found {', '.join(npz.files) or 'none'})"
            )
        try:
            raw = {k: npz[k] for k in MEDMNIST_ARRAYS}
            own_names = npz["class_names"] if "class_names" in npz.files else None
        except Exception as err:
            raise DataError(f"{path}: cannot read arrays: {type(err).__name__}: {err}") from None

    # An optional ``class_names`` array (str, one per label; written by `pool pull --format npz`)
    # wins over the names known for the flag.
    if own_names is not None:
        if own_names.ndim != 1 or own_names.dtype.kind != "U":
            raise DataError(f"{path} [class_names]: expected a 1-D array of strings, got {own_names.dtype} {own_names.shape}")
        class_names: list[str] | None = [str(n) for n in own_names]
    else:
        class_names = medmnist_class_names(flag)

    labels: dict[str, np.ndarray] = {}
    images: dict[str, np.ndarray] = {}
    native_c = None
    for s in SPLITS:
        x, y = raw[f"{s}_images"], raw[f"{s}_labels"]
        where = f"{path} [{s}_images]"
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim != 4 or x.shape[3] not in (1, 3):
            raise DataError(
                f"{where}: expected images (N, H, W) or (N, H, W, 3), got shape {x.shape} (3D volumes are not supported)"
            )
        if x.dtype != np.uint8:
            if np.issubdtype(x.dtype, np.integer) and (x.size == 0 or (x.min() >= 0 and x.max() <= 255)):
                x = x.astype(np.uint8)
            else:
                raise DataError(f"{where}: expected uint8 images, got {x.dtype}")
        if native_c is None:
            native_c = x.shape[3]
            native_hw = x.shape[1:3]
        elif cfg.channels is None and x.shape[3] != native_c:
            raise DataError(f"{where}: {x.shape[3]} channel(s) but train_images has {native_c}; set data.channels")
        elif cfg.size is None and x.shape[1:3] != native_hw:
            raise DataError(
                f"{where}: images are {x.shape[1]}x{x.shape[2]} but train_images are "
                f"{native_hw[0]}x{native_hw[1]}; set data.size"
            )
        y = np.asarray(y)
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.ndim != 1:
            raise DataError(
                f"{path} [{s}_labels]: shape {y.shape}: multi-label data sets are not supported "
                "(one integer label per image)"
            )
        if len(y) != len(x):
            raise DataError(f"{path}: {s}_labels has {len(y)} entries but {s}_images has {len(x)}")
        if y.size and not np.issubdtype(y.dtype, np.integer):
            is_float = np.issubdtype(y.dtype, np.floating)
            if is_float and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
                y = y.astype(np.int64)
            else:
                bad = int(np.flatnonzero(~np.isfinite(y) | (y != np.round(y)))[0]) if is_float else 0
                raise DataError(f"{path} [{s}_labels]: row {bad}: label {y[bad]!r} is not an integer")
        y = y.astype(np.int64)
        if y.size and y.min() < 0:
            bad = int(np.argmin(y))
            raise DataError(f"{path} [{s}_labels]: row {bad}: unknown label {int(y[bad])} (labels must be >= 0)")
        if class_names is not None and y.size and y.max() >= len(class_names):
            bad = int(np.argmax(y))
            raise DataError(
                f"{path} [{s}_labels]: row {bad}: unknown label {int(y[bad])} ({flag} has {len(class_names)} classes)"
            )
        images[s], labels[s] = x, y
    if class_names is None:
        n_classes = int(max((labels[s].max() + 1) if labels[s].size else 0 for s in SPLITS))
        class_names = [str(k) for k in range(n_classes)]

    splits = {
        s: Split(_shape_array(images[s], cfg.size, cfg.channels, f"{path} [{s}_images]"), labels[s]) for s in SPLITS
    }
    if len(splits["val"]) == 0 and len(splits["test"]) == 0:
        # e.g. a pulled pool (`pool pull --format npz`): everything in train; split like a source without a split
        LOG.info("%s: val and test are empty; seeded stratified split of train (seed %d)", path, seed)
        splits = _split_three(splits["train"], cfg, seed, class_names, str(path))
    return _finish(flag, splits, class_names, "medmnist", str(path), cfg, seed)


# ---------------------------------------------------------------------------------
# ImageFolder and CSV


def _files_in(folder: Path) -> list[Path]:
    """Every non-hidden file below ``folder`` (recursively), sorted."""
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if p.is_file():
            out.append(p)
    return out


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


# Files `plan-server pool pull` writes beside the class folders (not images).
PULL_FILES = ("manifest.json", "DATASHEET.md", "pool.npz")


def _pulled_class_order(root: Path) -> list[str] | None:
    """Class folder names in label order when ``root`` was written by ``pool pull`` (its manifest.json
    says which label each class folder holds), so labels read back are the pool's labels; else None."""
    try:
        doc = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != "plan-pool-pull/1" or not isinstance(doc.get("classes"), list):
        return None
    try:
        pairs = sorted((int(c["label"]), str(c["name"])) for c in doc["classes"])
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{root / 'manifest.json'}: key 'classes' must list {{label, name}} objects") from None
    names: list[str] = []
    for _, n in pairs:
        if n not in names and (root / n).is_dir():
            names.append(n)
    return names


def _class_folder_files(root: Path, class_names: list[str] | None) -> tuple[list[str], list[tuple[Path, int]]]:
    dirs = _subdirs(root)
    pulled = _pulled_class_order(root)
    if class_names is None and pulled is not None:
        class_names = pulled
    loose = [p.name for p in root.iterdir() if p.is_file() and not p.name.startswith(".")
             and not (pulled is not None and p.name in PULL_FILES)]
    if loose:
        LOG.warning("%s: ignoring %d file(s) outside class folders: %s", root, len(loose), ", ".join(sorted(loose)[:5]))
    if not dirs:
        raise DataError(f"{root}: no class sub-folders (ImageFolder layout: <root>/<class>/<image>)")
    names = [d.name for d in dirs]
    if class_names is None:
        class_names = names
    else:
        extra = [n for n in names if n not in class_names]
        if extra:
            raise DataError(
                f"{root / extra[0]}: class folder {extra[0]!r} is not among the train classes {class_names}"
            )
    records: list[tuple[Path, int]] = []
    for d in dirs:
        files = _files_in(d)
        if not files:
            raise DataError(f"{d}: class folder {d.name!r} is empty")
        k = class_names.index(d.name)
        records += [(f, k) for f in files]
    return class_names, records


def _read_records(records: list[tuple[Path, int, str]], shaper: _Shaper) -> tuple[np.ndarray, np.ndarray]:
    arrays = [shaper(read_image(path, where), where) for path, _, where in records]
    labels = np.array([k for _, k, _ in records], dtype=np.int64)
    hint = (shaper.size or 1, shaper.size or 1, shaper.channels or 1)
    return _stack(arrays, hint), labels


def _load_imagefolder(cfg: DataConfig, seed: int) -> ImageDataset:
    if not cfg.path:
        raise DataError("data.source is imagefolder but data.path (the root folder) is not set")
    root = Path(cfg.path).expanduser()
    if not root.is_dir():
        raise DataError(f"ImageFolder root not found: {root} (data.path)")
    sub = {d.name.lower(): d for d in _subdirs(root)}
    split_layout = "train" in sub and ("val" in sub or "test" in sub) and set(sub) <= {"train", "val", "test"}
    shaper = _Shaper(cfg.size, cfg.channels)
    name = root.name
    if split_layout:
        class_names, train_rec = _class_folder_files(sub["train"], None)
        recs = {"train": train_rec}
        for s in ("val", "test"):
            if s in sub:
                _, recs[s] = _class_folder_files(sub[s], class_names)
        arrays = {s: _read_records([(p, k, str(p)) for p, k in r], shaper) for s, r in recs.items()}
        splits = {s: Split(*arrays[s]) for s in arrays}
        missing = [s for s in ("val", "test") if s not in splits]
        if missing:
            fr = {"val": cfg.val_fraction, "test": cfg.test_fraction}
            tr = splits["train"]
            parts = _stratified_split(
                tr.labels, [fr[s] for s in missing], seed, class_names, str(sub["train"]), missing
            )
            splits["train"] = tr.subset(parts[0])
            for s, idx in zip(missing, parts[1:]):
                splits[s] = tr.subset(idx)
            LOG.info("%s: no %s folder; split off the train folder (seed %d)", root, "/".join(missing), seed)
    else:
        class_names, rec = _class_folder_files(root, None)
        x, y = _read_records([(p, k, str(p)) for p, k in rec], shaper)
        splits = _split_three(Split(x, y), cfg, seed, class_names, str(root))
    return _finish(name, splits, class_names, "imagefolder", str(root), cfg, seed)


def _split_three(full: Split, cfg: DataConfig, seed: int, class_names: list[str], where: str) -> dict[str, Split]:
    tr, va, te = _stratified_split(full.labels, [cfg.val_fraction, cfg.test_fraction], seed, class_names, where)
    return {"train": full.subset(tr), "val": full.subset(va), "test": full.subset(te)}


def _resolve_image_dir(cfg: DataConfig, csv_path: Path) -> Path:
    if cfg.image_dir:
        d = Path(cfg.image_dir).expanduser()
        if not d.is_absolute() and not d.is_dir() and (csv_path.parent / d).is_dir():
            d = csv_path.parent / d
        if not d.is_dir():
            raise DataError(f"image folder not found: {d} (data.image_dir)")
        return d
    images = csv_path.parent / "images"
    return images if images.is_dir() else csv_path.parent


def _load_csv(cfg: DataConfig, seed: int) -> ImageDataset:
    if not cfg.path:
        raise DataError("data.source is csv but data.path (the CSV manifest) is not set")
    csv_path = Path(cfg.path).expanduser()
    if not csv_path.is_file():
        raise DataError(f"CSV manifest not found: {csv_path} (data.path)")
    image_dir = _resolve_image_dir(cfg, csv_path)
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = [c for c in (reader.fieldnames or [])]
            for col in (cfg.id_column, cfg.label_column):
                if col not in columns:
                    found = ", ".join(repr(c) for c in columns) or "none"
                    which = "data.id_column" if col == cfg.id_column else "data.label_column"
                    raise DataError(f"{csv_path}: column {col!r} ({which}) not found; columns found: {found}")
            rows = []
            for row in reader:
                rows.append((reader.line_num, row.get(cfg.id_column), row.get(cfg.label_column)))
    except DataError:
        raise
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{csv_path}: cannot read CSV: {type(err).__name__}: {err}") from None
    if not rows:
        raise DataError(f"{csv_path}: no data rows")

    seen: dict[str, int] = {}
    entries: list[tuple[int, str, str]] = []
    for line, id_, lab in rows:
        id_ = (id_ or "").strip()
        if not id_:
            raise DataError(f"{csv_path}, line {line}: empty {cfg.id_column!r}")
        if id_ in seen:
            raise DataError(f"{csv_path}, line {line}: id {id_!r} already listed on line {seen[id_]}")
        seen[id_] = line
        text = (lab or "").strip()
        if not text:
            raise DataError(f"{csv_path}, line {line} (id {id_!r}): empty label in column {cfg.label_column!r}")
        entries.append((line, id_, text))

    # Integer labels (APTOS: 0..4) keep their numbers as names; otherwise every value is a class
    # name (e.g. normal / pneumonia) and the labels are their sorted order.
    is_int = [bool(re.fullmatch(r"[+-]?\d+", t)) for _, _, t in entries]
    numeric = any(is_int)
    if numeric and not all(is_int):
        line, id_, t = entries[is_int.index(False)]
        raise DataError(f"{csv_path}, line {line} (id {id_!r}): label {t!r} in column {cfg.label_column!r} is not "
                        "an integer, unlike the other labels (labels are all integers or all class names)")
    values: list[tuple[int, str, int | str]] = list(entries)
    if numeric:
        values = [(line, id_, int(t)) for line, id_, t in entries]
        bad = next(((line, id_, v) for line, id_, v in values if int(v) < 0), None)
        if bad:
            raise DataError(f"{csv_path}, line {bad[0]} (id {bad[1]!r}): unknown label {bad[2]} (labels must be >= 0)")
    uniq: list[int | str] = sorted({v for _, _, v in values})  # all int or all str
    class_names = [str(v) for v in uniq]
    index = {v: k for k, v in enumerate(uniq)}
    records = []
    for line, id_, value in values:
        fname = id_ if id_.endswith(cfg.extension) else id_ + cfg.extension
        p = image_dir / fname
        where = f"{csv_path}, line {line} (id {id_!r}): {p}"
        if not p.is_file():
            raise DataError(f"{csv_path}, line {line} (id {id_!r}): image file not found: {p}")
        records.append((p, index[value], where))
    x, y = _read_records(records, _Shaper(cfg.size, cfg.channels))
    splits = _split_three(Split(x, y), cfg, seed, class_names, str(csv_path))
    return _finish(csv_path.stem, splits, class_names, "csv", str(csv_path), cfg, seed)


# ---------------------------------------------------------------------------------
# DICOM
#
# A folder of DICOM files (found recursively by the "DICM" marker after the 128-byte
# preamble; files named *.dcm / *.dicom without it are read by pydicom too) plus a labels
# CSV (data.dicom). Only pixels, the label and an opaque patient index leave the loader:
# no header value (PatientID, names, UIDs, dates) is stored in the ImageDataset, and
# error messages name files and CSV lines, never header values, because a federated
# ClientApp's error text can reach the coordinator.

DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
_DICOMDIR_UID = "1.2.840.10008.1.3.10"  # Media Storage Directory: an index, not an image
_GREY = ("MONOCHROME1", "MONOCHROME2")
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "PALETTE COLOR")


def is_dicom_file(path: Path) -> bool:
    """True when ``path`` carries the DICOM Part 10 marker ``DICM`` after its 128-byte preamble."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def holds_dicom(folder: Path, limit: int = 64) -> bool:
    """True when one of the first ``limit`` files below ``folder`` is a DICOM file (for ``--data DIR``)."""
    for k, p in enumerate(_files_in(Path(folder))):
        if k >= limit:
            break
        if is_dicom_file(p):
            return True
    return False


def _pydicom() -> Any:
    try:
        import pydicom  # noqa: F401
        import pydicom.pixels  # noqa: F401
    except ImportError:
        raise DataError("data.source is dicom but pydicom is not installed: pip install 'pydicom>=3'") from None
    return pydicom


def _scale(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Linear map of ``lo..hi`` onto 0..255 (clipped); a flat range gives 0."""
    arr = np.asarray(arr, dtype=np.float64)
    if not hi > lo:
        return np.zeros(arr.shape, np.float64)
    return np.clip((arr - lo) * (255.0 / (hi - lo)), 0.0, 255.0)


def _stored_range(ds: Any) -> tuple[int, int]:
    bits = int(ds.BitsStored)
    if int(getattr(ds, "PixelRepresentation", 0)) == 1:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _grey_to_uint8(arr: np.ndarray, ds: Any, no_window: str) -> np.ndarray:
    """Stored grey values -> 0..255: Modality LUT, then VOI LUT / window (or the fallback), MONOCHROME1 inverted."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = apply_modality_lut(arr, ds)
    has_lut = "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0
    has_window = ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None
    if has_lut or has_window:
        out = apply_voi_lut(values, ds, prefer_lut=True)
        if has_lut:
            # the LUT's output range: every entry, read back through pydicom's own LUT decoding
            n_entries, first = int(ds.VOILUTSequence[0].LUTDescriptor[0]) or 65536, int(ds.VOILUTSequence[0].LUTDescriptor[1])
            entries = apply_voi_lut(np.arange(first, first + n_entries), ds, prefer_lut=True)
            lo, hi = float(np.min(entries)), float(np.max(entries))
        else:
            # the window's output range: what the window makes of values far below / above it
            probe = apply_voi_lut(np.array([-1e12, 1e12]), ds, prefer_lut=False)
            lo, hi = float(probe.min()), float(probe.max())
        img = _scale(out, lo, hi)
    elif no_window == "bits_stored":
        ends = apply_modality_lut(np.array(_stored_range(ds)), ds)
        img = _scale(values, float(np.min(ends)), float(np.max(ends)))
    else:
        img = _scale(values, float(np.min(values)), float(np.max(values)))
    if ds.PhotometricInterpretation == "MONOCHROME1":  # 0 = white
        img = 255.0 - img
    return np.round(img).astype(np.uint8)[:, :, None]


def read_dicom(path: Path, where: str, channels: int | None, no_window: str = "minmax") -> tuple[np.ndarray, Any]:
    """One DICOM file -> ``(uint8 (H, W, C) image, pydicom Dataset)``; DataError naming ``where``.

    The returned Dataset is for the caller to read the CSV keys from; it is not kept.
    """
    pydicom = _pydicom()
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, force=not is_dicom_file(path))
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise DataError(f"{where}: not a readable DICOM file ({type(err).__name__})") from None
    if str(getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID", "")) == _DICOMDIR_UID:
        raise DataError(f"{where}: a DICOMDIR index, not an image (a DICOMDIR must be named DICOMDIR)")
    if "PixelData" not in ds and not is_dicom_file(path):
        raise DataError(f"{where}: not a readable DICOM file (no DICM marker and no pixel data)")
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise DataError(f"{where}: DICOM file has float pixel data (not supported); remove it from the folder")
        raise DataError(
            f"{where}: DICOM file has no pixel data (truncated, or not an image, e.g. a report); remove it from the folder"
        )
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        frames = 0
    if frames != 1:
        raise DataError(
            f"{where}: multi-frame DICOM ({ds.get('NumberOfFrames')} frames) is not supported; store one 2D image per "
            "file (e.g. export the frames you want as single-frame files)"
        )
    pi = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if pi not in _GREY + _COLOUR:
        raise DataError(f"{where}: photometric interpretation {pi!r} is not supported ({', '.join(_GREY + _COLOUR)})")
    if pi in _COLOUR and channels is None:
        raise DataError(
            f"{where}: colour DICOM ({pi}) but data.channels is null; set data.channels to 3 to keep colour "
            "(or 1 to convert to grey)"
        )
    try:
        arr = ds.pixel_array
    except Exception as err:  # decoders raise many types
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        ts_name = getattr(ts, "name", "unknown transfer syntax")
        hint = ""
        if getattr(ts, "is_compressed", False):
            hint = " (compressed transfer syntaxes need their decoders: pip install 'plan-toolkit[dicom-compressed]')"
        raise DataError(f"{where}: cannot decode the pixel data ({ts_name}): {type(err).__name__}: {err}{hint}") from None
    one_sample = pi in _GREY or pi == "PALETTE COLOR"
    if (one_sample and arr.ndim != 2) or (not one_sample and (arr.ndim != 3 or arr.shape[-1] != 3)):
        raise DataError(f"{where}: unexpected pixel array shape {arr.shape} for {pi}")
    try:
        if pi in _GREY:
            img = _grey_to_uint8(arr, ds, no_window)
        else:
            if pi == "PALETTE COLOR":
                from pydicom.pixels import apply_color_lut

                arr = apply_color_lut(arr, ds)  # uint8 or uint16 by the LUT's bit depth
                lo, hi = 0, (255 if arr.dtype == np.uint8 else 65535)
            else:
                lo, hi = 0, 2 ** int(ds.BitsStored) - 1
            img = np.round(_scale(arr, lo, hi)).astype(np.uint8)
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"{where}: cannot apply the Modality/VOI LUT: {type(err).__name__}: {err}") from None
    return img, ds


def _norm_rel(text: str) -> str:
    """A CSV file entry as a POSIX path relative to the DICOM folder."""
    parts = [p for p in text.strip().replace("\\", "/").split("/") if p not in ("", ".")]
    return "/".join(parts)


def _natural_classes(values: list[str]) -> list[str]:
    """Distinct class values, numerically sorted when all are integers, else alphabetically."""
    uniq = sorted(set(values))
    try:
        return sorted(uniq, key=lambda v: (int(v), v))
    except ValueError:
        return uniq


def _read_labels_csv(csv_path: Path, dc: DicomConfig) -> tuple[list[dict[str, Any]], bool, bool, bool]:
    """Rows ``{line, file, uid, label, patient}`` of the labels CSV; which key columns it has."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            reader.fieldnames = columns
            has_file, has_uid = dc.file_column in columns, dc.uid_column in columns
            found = ", ".join(repr(c) for c in columns) or "none"
            if dc.label_column not in columns:
                raise DataError(
                    f"{csv_path}: column {dc.label_column!r} (data.dicom.label_column) not found; columns found: {found}"
                )
            if not (has_file or has_uid):
                raise DataError(
                    f"{csv_path}: neither {dc.file_column!r} (data.dicom.file_column) nor {dc.uid_column!r} "
                    f"(data.dicom.uid_column) is a column; columns found: {found}"
                )
            has_patient = dc.patient_column in columns
            if dc.patient == "column" and not has_patient:
                raise DataError(
                    f"{csv_path}: column {dc.patient_column!r} (data.dicom.patient_column) not found and "
                    f"data.dicom.patient is 'column'; columns found: {found}"
                )
            rows = []
            for row in reader:
                def get(c: str, row: dict[str, str | None] = row) -> str:
                    return (row.get(c) or "").strip()

                rows.append({"line": reader.line_num, "file": _norm_rel(get(dc.file_column)) if has_file else "",
                             "uid": get(dc.uid_column) if has_uid else "", "label": get(dc.label_column),
                             "patient": get(dc.patient_column) if has_patient else ""})
    except DataError:
        raise
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{csv_path}: cannot read CSV: {type(err).__name__}: {err}") from None
    if not rows:
        raise DataError(f"{csv_path}: no data rows")
    return rows, has_file, has_uid, has_patient


def _index_rows(rows: list[dict[str, Any]], key: str, csv_path: Path, column: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        k = r[key]
        if not k:
            continue
        if k in out:
            raise DataError(f"{csv_path}, line {r['line']}: the {column!r} value is already listed on line {out[k]['line']}")
        out[k] = r
    return out


def _grouped_split(
    labels: np.ndarray, groups: np.ndarray, cfg: DataConfig, seed: int, class_names: list[str], where: str
) -> list[np.ndarray]:
    """[train, val, test] image indices with every patient in exactly one part.

    The existing stratified splitter cuts the *patients*, each stratified by its most
    frequent class (ties: the first class); the fractions are fractions of patients.
    """
    _, inv = np.unique(groups, return_inverse=True)
    counts = np.zeros((int(inv.max()) + 1, len(class_names)), np.int64)
    np.add.at(counts, (inv, labels), 1)
    g_label = counts.argmax(1)
    present = np.unique(g_label)
    remap = np.searchsorted(present, g_label)
    parts = _stratified_split(
        remap, [cfg.val_fraction, cfg.test_fraction], seed, [class_names[k] for k in present], where, unit="patient"
    )
    return [np.flatnonzero(np.isin(inv, p)) for p in parts]


def _load_dicom(cfg: DataConfig, seed: int) -> ImageDataset:
    if not cfg.path:
        raise DataError("data.source is dicom but data.path (the DICOM folder) is not set")
    root = Path(cfg.path).expanduser()
    if not root.is_dir():
        raise DataError(f"DICOM folder not found: {root} (data.path)")
    dc = cfg.dicom
    csv_path = Path(dc.labels_csv).expanduser() if dc.labels_csv else root / "labels.csv"
    if not csv_path.is_absolute() and dc.labels_csv:
        csv_path = root / csv_path
    if not csv_path.is_file():
        raise DataError(
            f"labels CSV not found: {csv_path} (data.dicom.labels_csv; default <data.path>/labels.csv). A DICOM folder "
            f"needs one: columns {dc.file_column!r} (path below the folder) or {dc.uid_column!r}, {dc.label_column!r}, "
            f"optionally {dc.patient_column!r}"
        )
    rows, has_file, has_uid, has_patient = _read_labels_csv(csv_path, dc)
    for r in rows:
        if not (r["file"] or r["uid"]):
            raise DataError(f"{csv_path}, line {r['line']}: no file and no SOP Instance UID given")
    by_file = _index_rows(rows, "file", csv_path, dc.file_column) if has_file else {}
    by_uid = _index_rows(rows, "uid", csv_path, dc.uid_column) if has_uid else {}
    patient_mode = dc.patient if dc.patient != "auto" else ("column" if has_patient else "none")

    candidates, skipped = [], []
    csv_resolved = csv_path.resolve()
    for p in _files_in(root):
        if p.resolve() == csv_resolved:
            continue
        if p.name.upper() == "DICOMDIR":
            skipped.append(p)
        elif is_dicom_file(p) or p.suffix.lower() in DICOM_SUFFIXES:
            candidates.append(p)
        else:
            skipped.append(p)
    if skipped:
        LOG.warning("%s: ignoring %d file(s) that are not DICOM: %s", root, len(skipped),
                    ", ".join(p.relative_to(root).as_posix() for p in skipped[:5]))
    if not candidates:
        raise DataError(f"{root}: no DICOM files found (looked for the DICM marker and *.dcm below this folder)")

    shaper = _Shaper(cfg.size, cfg.channels)
    arrays: list[np.ndarray] = []
    values: list[str] = []
    patients: list[str] = []
    used: dict[int, str] = {}  # CSV line -> file that matched it
    for p in candidates:
        rel = p.relative_to(root).as_posix()
        where = str(p)
        img, ds = read_dicom(p, where, cfg.channels, dc.no_window)
        uid = str(ds.get("SOPInstanceUID", "") or "").strip()
        row = by_file.get(rel) if has_file else None
        if row is None and has_uid and uid:
            row = by_uid.get(uid)
        if row is None:
            how = " or ".join(x for x, ok in ((f"its path in column {dc.file_column!r}", has_file),
                                                (f"its SOP Instance UID in column {dc.uid_column!r}", has_uid)) if ok)
            raise DataError(f"{where}: no label: {csv_path} lists neither {how}")
        if row["line"] in used:
            raise DataError(
                f"{where}: {csv_path}, line {row['line']} already matched {used[row['line']]} (same SOP Instance UID?)"
            )
        if has_uid and row["uid"] and uid != row["uid"]:
            raise DataError(
                f"{where}: {csv_path}, line {row['line']}: the {dc.uid_column!r} value differs from the file's SOP "
                "Instance UID"
            )
        if not row["label"]:
            raise DataError(f"{where}: {csv_path}, line {row['line']}: empty {dc.label_column!r} (no label)")
        used[row["line"]] = rel
        if patient_mode == "column":
            if not row["patient"]:
                raise DataError(f"{where}: {csv_path}, line {row['line']}: empty {dc.patient_column!r}")
            patients.append(row["patient"])
        elif patient_mode == "header":
            key = str(ds.get("PatientID", "") or "").strip()
            if not key:
                raise DataError(f"{where}: no PatientID (0010,0020) in the header and data.dicom.patient is 'header'")
            patients.append(key)
        del ds  # nothing of the header is kept
        arrays.append(shaper(img, where))
        values.append(row["label"])
    unmatched = [r for r in rows if r["line"] not in used]
    if unmatched:
        r = unmatched[0]
        key = f"file {r['file']!r}" if r["file"] else f"the {dc.uid_column!r} value"
        raise DataError(
            f"{csv_path}, line {r['line']}: no DICOM file below {root} matches {key}"
            + (f" ({len(unmatched) - 1} more such line(s))" if len(unmatched) > 1 else "")
        )

    class_names = _natural_classes(values)
    index = {v: k for k, v in enumerate(class_names)}
    y = np.array([index[v] for v in values], dtype=np.int64)
    pid = None
    if patients:
        order: dict[str, int] = {}
        pid = np.array([order.setdefault(k, len(order)) for k in patients], dtype=np.int64)
        del order, patients
    hint = (shaper.size or 1, shaper.size or 1, shaper.channels or 1)
    full = Split(_stack(arrays, hint), y, pid)
    if pid is None:
        splits = _split_three(full, cfg, seed, class_names, str(csv_path))
    else:
        tr, va, te = _grouped_split(y, pid, cfg, seed, class_names, str(csv_path))
        splits = {"train": full.subset(tr), "val": full.subset(va), "test": full.subset(te)}
    return _finish(root.name, splits, class_names, "dicom", str(root), cfg, seed)


# ---------------------------------------------------------------------------------
# entry point


def _finish(
    name: str, splits: dict[str, Split], class_names: list[str], source: str, origin: str, cfg: DataConfig, seed: int
) -> ImageDataset:
    train = splits["train"]
    if len(train) == 0:
        raise DataError(f"{origin}: the training split is empty")
    if cfg.max_train is not None and cfg.max_train < len(train):
        keep = stratified_subsample(train.labels, cfg.max_train, seed)
        LOG.info("%s: max_train=%d keeps %d of %d training images (stratified, seed %d)",
                 name, cfg.max_train, len(keep), len(train), seed)
        train = train.subset(keep)
    _, c, h, _ = train.images.shape
    ds = ImageDataset(
        name=name, train=train, val=splits["val"], test=splits["test"], class_names=list(class_names),
        channels=int(c), size=int(h), source=source, origin=origin,
    )
    LOG.info("loaded %s (seed %d)\n%s", name, seed, ds.summary())
    return ds


def load_dataset(cfg: DataConfig, seed: int) -> ImageDataset:
    """Read the configured data source into an :class:`ImageDataset` (see the module docs).

    Raises :class:`DataError` with the file, row or value at fault.
    """
    if cfg.source == "medmnist":
        return _load_medmnist(cfg, seed)
    if cfg.source == "imagefolder":
        return _load_imagefolder(cfg, seed)
    if cfg.source == "csv":
        return _load_csv(cfg, seed)
    if cfg.source == "dicom":
        return _load_dicom(cfg, seed)
    raise DataError(f"unknown data.source {cfg.source!r} (medmnist, imagefolder, csv or dicom)")
