"""Data sources: MedMNIST .npz, ImageFolder and CSV, conversions, splits and every bad-input error."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from plan_shared import data as data_mod
from plan_shared.config import DataConfig
from plan_shared.data import DataError, ImageDataset, Split, load_dataset, to_tensor, to_uint8

_REAL_DOWNLOAD = data_mod._download_medmnist


@pytest.fixture(autouse=True)
def _never_download(monkeypatch):
    """No test may reach the network, whether or not the medmnist package is installed."""

    def refuse(*a, **k):
        raise AssertionError("a test tried to download MedMNIST")

    monkeypatch.setattr(data_mod, "_download_medmnist", refuse)


@pytest.fixture
def real_dir() -> Path:
    d = os.environ.get("PLAN_DATA_DIR")
    if not d:
        pytest.skip("PLAN_DATA_DIR is not set")
    return Path(d)


def cfg(**kw) -> DataConfig:
    kw.setdefault("size", None)
    kw.setdefault("download", False)
    return DataConfig(**kw)


def png(path: Path, arr: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (Image.fromarray(arr, mode) if mode else Image.fromarray(arr)).save(path)
    return path


def grey(rng, n=8) -> np.ndarray:
    return rng.integers(0, 256, (n, n), dtype=np.uint8)


def rgb(rng, n=8) -> np.ndarray:
    return rng.integers(0, 256, (n, n, 3), dtype=np.uint8)


def make_folder(root: Path, counts: dict[str, int], rng, kind=grey, n=8) -> Path:
    for cls, k in counts.items():
        for i in range(k):
            png(root / cls / f"{cls}_{i:03d}.png", kind(rng, n))
    return root


def make_npz(path: Path, n=(12, 4, 6), hw=28, rgb_=False, n_classes=2, drop=None, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    arrays = {}
    for s, k in zip(("train", "val", "test"), n):
        shape = (k, hw, hw, 3) if rgb_ else (k, hw, hw)
        arrays[f"{s}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{s}_labels"] = (np.arange(k) % n_classes).astype(np.uint8)[:, None]
    if drop:
        arrays.pop(drop)
    np.savez(path, **arrays)
    return path


def make_csv(root: Path, labels: list, rng, header=("id_code", "diagnosis"), img_sub="images") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    lines = [",".join(header)]
    for i, lab in enumerate(labels):
        png(root / img_sub / f"img{i:03d}.png", rgb(rng))
        lines.append(f"img{i:03d},{lab}")
    p = root / "train.csv"
    p.write_text("\n".join(lines) + "\n")
    return p


# ----------------------------------------------------------------------------- MedMNIST


def test_pneumoniamnist_by_name_native_and_resized(real_dir, monkeypatch):
    monkeypatch.setenv("PLAN_DATA_DIR", str(real_dir))
    ds = load_dataset(cfg(name="pneumoniamnist", size=None), seed=0)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (2428, 270, 468)
    assert ds.train.images.shape == (2428, 1, 28, 28) and ds.train.images.dtype == np.uint8
    assert ds.train.labels.dtype == np.int64 and ds.train.labels.shape == (2428,)
    assert set(np.unique(ds.train.labels)) == {0, 1} and ds.num_classes == 2
    assert (ds.size, ds.channels, ds.source, ds.name) == (28, 1, "medmnist", "pneumoniamnist")
    raw = np.load(real_dir / "pneumoniamnist.npz")
    np.testing.assert_array_equal(ds.test.images[:, 0], raw["test_images"])
    np.testing.assert_array_equal(ds.test.labels, raw["test_labels"].ravel())

    ds32 = load_dataset(cfg(name="pneumoniamnist", size=32), seed=0)
    assert ds32.train.images.shape == (2428, 1, 32, 32) and ds32.size == 32
    np.testing.assert_array_equal(ds32.train.labels, ds.train.labels)
    s = ds32.summary()
    assert "1214" in s and "train" in s and "test" in s


def test_breastmnist_by_path_with_channels(real_dir):
    ds = load_dataset(cfg(source="medmnist", name=None, path=str(real_dir / "breastmnist.npz"), channels=3), seed=0)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (546, 78, 156)
    assert ds.train.images.shape == (546, 3, 28, 28) and ds.channels == 3
    np.testing.assert_array_equal(ds.train.images[:, 0], ds.train.images[:, 2])
    assert ds.name == "breastmnist"
    assert ds.class_names == ["malignant", "normal, benign"]  # medmnist.INFO's names, also without medmnist


def test_medmnist_class_names_without_the_package(monkeypatch, tmp_path):
    monkeypatch.setattr(data_mod, "_medmnist_info", lambda: None)
    assert data_mod.medmnist_class_names("pneumoniamnist") == ["normal", "pneumonia"]
    assert data_mod.medmnist_class_names("unknownmnist") is None
    p = make_npz(tmp_path / "pneumoniamnist.npz")
    assert load_dataset(cfg(source="medmnist", name=None, path=str(p)), seed=0).class_names == ["normal", "pneumonia"]


def test_npz_own_class_names_and_train_only(tmp_path):
    """The shape `pool pull --format npz` writes: class_names array, everything in train, val/test empty."""
    rng = np.random.default_rng(0)
    y = (np.arange(30) % 3).astype(np.uint8)[:, None]
    x = rng.integers(0, 256, (30, 28, 28), dtype=np.uint8)
    ex, ey = np.zeros((0, 28, 28), np.uint8), np.zeros((0, 1), np.uint8)
    p = tmp_path / "pool.npz"
    np.savez(p, train_images=x, train_labels=y, val_images=ex, val_labels=ey, test_images=ex, test_labels=ey,
             class_names=np.array(["a", "b", "c"]))
    ds = load_dataset(cfg(source="medmnist", name=None, path=str(p), val_fraction=0.2, test_fraction=0.2), seed=0)
    assert ds.class_names == ["a", "b", "c"]
    assert (len(ds.train), len(ds.val), len(ds.test)) == (18, 6, 6)  # seeded stratified split
    assert np.bincount(ds.val.labels).tolist() == [2, 2, 2]
    np.savez(p, train_images=x, train_labels=y, val_images=ex, val_labels=ey, test_images=ex, test_labels=ey,
             class_names=np.array([1, 2, 3]))
    with pytest.raises(DataError, match=r"pool.npz \[class_names\]: expected a 1-D array of strings"):
        load_dataset(cfg(source="medmnist", name=None, path=str(p)), seed=0)
    np.savez(p, train_images=x, train_labels=y, val_images=ex, val_labels=ey, test_images=ex, test_labels=ey,
             class_names=np.array(["a", "b"]))
    with pytest.raises(DataError, match=r"unknown label 2 \(pool has 2 classes\)"):
        load_dataset(cfg(source="medmnist", name=None, path=str(p)), seed=0)


def test_npz_rgb_and_to_grey(tmp_path):
    p = make_npz(tmp_path / "colourmnist.npz", rgb_=True, n_classes=3)
    ds = load_dataset(cfg(path=str(p)), seed=0)
    assert ds.train.images.shape == (12, 3, 28, 28) and ds.channels == 3
    assert ds.class_names == ["0", "1", "2"]
    raw = np.load(p)["train_images"]
    np.testing.assert_array_equal(ds.train.images.transpose(0, 2, 3, 1), raw)
    g = load_dataset(cfg(path=str(p), channels=1, size=16), seed=0)
    assert g.train.images.shape == (12, 1, 16, 16)
    flat = load_dataset(cfg(path=str(p), channels=1), seed=0)
    luma = np.round(raw.astype(np.float64) @ [0.299, 0.587, 0.114])
    assert np.abs(flat.train.images[:, 0].astype(float) - luma).max() <= 1


def test_npz_size_suffix_naming_and_search(tmp_path, monkeypatch):
    monkeypatch.setenv("PLAN_DATA_DIR", str(tmp_path))
    make_npz(tmp_path / "fakemnist_64.npz", hw=64)
    ds = load_dataset(cfg(name="fakemnist", size=64), seed=0)
    assert ds.train.images.shape[1:] == (1, 64, 64)
    ds = load_dataset(cfg(name="fakemnist", size=None), seed=0)  # native of the only file found
    assert ds.size == 64
    make_npz(tmp_path / "fakemnist.npz", hw=28)
    assert load_dataset(cfg(name="fakemnist", size=None), seed=0).size == 28
    assert load_dataset(cfg(name="fakemnist", size=64), seed=0).size == 64


def test_npz_not_found_says_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv("PLAN_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError) as e:
        load_dataset(cfg(name="nosuchmnist"), seed=0)
    msg = str(e.value)
    assert "nosuchmnist" in msg and str(tmp_path) in msg
    with pytest.raises(DataError, match="not found"):
        load_dataset(cfg(path=str(tmp_path / "missing.npz")), seed=0)


def test_download_goes_through_medmnist_api(tmp_path, monkeypatch):
    """The download path, exercised against a stand-in ``medmnist`` module (no network)."""
    import types

    calls = []

    class FakeSet:
        def __init__(self, split, download, root, size=None):
            calls.append((split, download, root, size))
            make_npz(Path(root) / (f"fakeflag_{size}.npz" if size else "fakeflag.npz"), hw=size or 28)

    fake = types.ModuleType("medmnist")
    fake.INFO = {"fakeflag": {"python_class": "FakeSet", "label": {"0": "healthy", "1": "sick"}}}
    fake.FakeSet = FakeSet
    monkeypatch.setitem(__import__("sys").modules, "medmnist", fake)
    monkeypatch.setattr(data_mod, "_download_medmnist", _REAL_DOWNLOAD)
    monkeypatch.setenv("PLAN_DATA_DIR", str(tmp_path / "cache"))
    with pytest.raises(DataError, match="download is false"):
        load_dataset(cfg(name="fakeflag", download=False), seed=0)
    assert calls == []
    ds = load_dataset(cfg(name="fakeflag", size=64, download=True), seed=0)
    assert calls == [("train", True, str(tmp_path / "cache"), 64)]
    assert ds.class_names == ["healthy", "sick"] and ds.size == 64
    with pytest.raises(DataError, match="not a known MedMNIST flag"):
        load_dataset(cfg(name="otherflag", download=True), seed=0)


def test_npz_bad_inputs(tmp_path):
    p = make_npz(tmp_path / "x.npz", drop="val_labels")
    with pytest.raises(DataError, match="val_labels") as e:
        load_dataset(cfg(path=str(p)), seed=0)
    assert str(p) in str(e.value)

    bad = tmp_path / "corrupt.npz"
    bad.write_bytes(b"not a zip at all")
    with pytest.raises(DataError, match="corrupt.npz"):
        load_dataset(cfg(path=str(bad)), seed=0)

    z = dict(np.load(make_npz(tmp_path / "ml.npz")))
    z["train_labels"] = np.zeros((12, 14), np.uint8)
    np.savez(tmp_path / "ml.npz", **z)
    with pytest.raises(DataError, match="multi-label"):
        load_dataset(cfg(path=str(tmp_path / "ml.npz")), seed=0)

    z = dict(np.load(make_npz(tmp_path / "neg.npz")))
    z["test_labels"] = np.array([[0], [1], [-3], [0], [1], [0]], np.int64)
    np.savez(tmp_path / "neg.npz", **z)
    with pytest.raises(DataError, match=r"row 2.*-3"):
        load_dataset(cfg(path=str(tmp_path / "neg.npz")), seed=0)


# ----------------------------------------------------------------------------- ImageFolder


def test_imagefolder_stratified_split_is_seeded(tmp_path):
    rng = np.random.default_rng(0)
    root = make_folder(tmp_path / "xr", {"normal": 20, "pneumonia": 10}, rng)
    c = cfg(source="imagefolder", path=str(root), val_fraction=0.2, test_fraction=0.2)
    ds = load_dataset(c, seed=1)
    assert ds.class_names == ["normal", "pneumonia"] and ds.source == "imagefolder"
    assert (len(ds.train), len(ds.val), len(ds.test)) == (18, 6, 6)
    assert ds.train.images.shape == (18, 1, 8, 8) and ds.train.images.dtype == np.uint8
    for sp in (ds.train, ds.val, ds.test):  # stratified: 2:1 everywhere
        counts = np.bincount(sp.labels, minlength=2)
        assert counts[0] == 2 * counts[1]
    # every file once, label from its folder
    all_imgs = np.concatenate([ds.train.images, ds.val.images, ds.test.images])
    assert len({im.tobytes() for im in all_imgs}) == 30
    first = np.asarray(Image.open(root / "pneumonia" / "pneumonia_000.png"))
    hit = [k for k, sp in enumerate((ds.train, ds.val, ds.test)) for i in range(len(sp))
           if np.array_equal(sp.images[i, 0], first) and sp.labels[i] == 1]
    assert len(hit) == 1

    same = load_dataset(c, seed=1)
    other = load_dataset(c, seed=2)
    np.testing.assert_array_equal(same.test.images, ds.test.images)
    assert not np.array_equal(other.test.images, ds.test.images)


def test_imagefolder_with_split_folders(tmp_path):
    rng = np.random.default_rng(0)
    for s, k in (("train", 6), ("val", 2), ("test", 3)):
        make_folder(tmp_path / "ds" / s, {"a": k, "b": k}, rng, kind=rgb)
    ds = load_dataset(cfg(source="imagefolder", path=str(tmp_path / "ds")), seed=0)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (12, 4, 6)
    assert ds.train.images.shape == (12, 3, 8, 8) and ds.class_names == ["a", "b"]
    g = load_dataset(cfg(source="imagefolder", path=str(tmp_path / "ds"), channels=1, size=12), seed=0)
    assert g.test.images.shape == (6, 1, 12, 12)


def test_imagefolder_train_test_only_carves_val(tmp_path):
    rng = np.random.default_rng(0)
    make_folder(tmp_path / "ds" / "train", {"a": 10, "b": 10}, rng)
    make_folder(tmp_path / "ds" / "test", {"a": 2, "b": 2}, rng)
    ds = load_dataset(cfg(source="imagefolder", path=str(tmp_path / "ds"), val_fraction=0.2), seed=0)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (16, 4, 4)
    assert list(np.bincount(ds.val.labels)) == [2, 2]


def test_resize_and_channel_conversion_of_mixed_files(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "mix"
    make_folder(root, {"a": 3, "b": 3}, rng, kind=grey, n=8)
    png(root / "a" / "big.png", rgb(rng, 20))
    ds = load_dataset(cfg(source="imagefolder", path=str(root), size=16, channels=3,
                          val_fraction=0.2, test_fraction=0.2), seed=0)
    assert ds.train.images.shape[1:] == (3, 16, 16) and ds.size == 16 and ds.channels == 3
    # a flat grey image stays flat through the resize and the channel copy
    png(root / "b" / "flat.png", np.full((8, 8), 77, np.uint8))
    ds = load_dataset(cfg(source="imagefolder", path=str(root), size=16, channels=3), seed=0)
    ims = np.concatenate([ds.train.images, ds.val.images, ds.test.images])
    assert any((im == 77).all() for im in ims)


def test_pixel_modes_rgba_palette_16bit(tmp_path):
    rng = np.random.default_rng(0)
    a = tmp_path / "modes"
    png(a / "c" / "rgba.png", rng.integers(0, 256, (8, 8, 4), dtype=np.uint8), "RGBA")
    png(a / "c" / "rgb.png", rgb(rng))
    Image.fromarray(rgb(rng)).convert("P").save(a / "c" / "pal.png")
    x16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    b = tmp_path / "g16" / "c"
    b.mkdir(parents=True)
    Image.fromarray(x16).save(b / "x.png")
    arr = data_mod.read_image(b / "x.png")
    assert arr.shape == (8, 8, 1) and arr.dtype == np.uint8
    np.testing.assert_array_equal(arr[:, :, 0], np.round(x16 / 257).astype(np.uint8))
    for f in ("rgba.png", "rgb.png", "pal.png"):
        assert data_mod.read_image(a / "c" / f).shape == (8, 8, 3)


def test_imagefolder_bad_inputs(tmp_path):
    rng = np.random.default_rng(0)
    with pytest.raises(DataError, match="not found"):
        load_dataset(cfg(source="imagefolder", path=str(tmp_path / "nope")), seed=0)

    root = make_folder(tmp_path / "e", {"a": 5, "b": 5}, rng)
    (root / "empty").mkdir()
    with pytest.raises(DataError, match="empty") as e:
        load_dataset(cfg(source="imagefolder", path=str(root)), seed=0)
    assert str(root / "empty") in str(e.value)

    root = make_folder(tmp_path / "c", {"a": 5, "b": 5}, rng)
    (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match="broken.png"):
        load_dataset(cfg(source="imagefolder", path=str(root)), seed=0)

    root = make_folder(tmp_path / "s", {"a": 5, "b": 5}, rng)
    png(root / "b" / "zz_big.png", grey(rng, 12))
    with pytest.raises(DataError, match=r"zz_big\.png.*12x12"):
        load_dataset(cfg(source="imagefolder", path=str(root), size=None), seed=0)
    load_dataset(cfg(source="imagefolder", path=str(root), size=8), seed=0)  # converting: fine

    root = make_folder(tmp_path / "ch", {"a": 5, "b": 5}, rng)
    png(root / "b" / "zz_colour.png", rgb(rng))
    with pytest.raises(DataError, match=r"zz_colour\.png.*channel"):
        load_dataset(cfg(source="imagefolder", path=str(root), channels=None), seed=0)
    assert load_dataset(cfg(source="imagefolder", path=str(root), channels=1), seed=0).channels == 1

    root = make_folder(tmp_path / "few", {"a": 10, "rare": 2}, rng)
    with pytest.raises(DataError, match=r"'rare' has 2 image"):
        load_dataset(cfg(source="imagefolder", path=str(root)), seed=0)

    root = make_folder(tmp_path / "ns", {"a": 5, "b": 5}, rng)
    png(root / "a" / "a_000.png", rng.integers(0, 256, (8, 10), dtype=np.uint8))
    with pytest.raises(DataError, match=r"a_000\.png.*not square"):
        load_dataset(cfg(source="imagefolder", path=str(root), size=None), seed=0)


# ----------------------------------------------------------------------------- CSV


def test_csv_aptos_style(tmp_path):
    rng = np.random.default_rng(0)
    labels = [0, 1, 2, 4] * 5
    p = make_csv(tmp_path / "aptos", labels, rng)
    ds = load_dataset(cfg(source="csv", path=str(p), size=16, val_fraction=0.2, test_fraction=0.2), seed=0)
    assert ds.class_names == ["0", "1", "2", "4"] and ds.source == "csv" and ds.name == "train"
    assert ds.train.images.shape == (12, 3, 16, 16)
    assert sorted(np.concatenate([ds.train.labels, ds.val.labels, ds.test.labels]).tolist()) == sorted(
        [0, 1, 2, 3] * 5)
    assert list(np.bincount(ds.test.labels, minlength=4)) == [1, 1, 1, 1]
    # label follows the row: img000 has diagnosis 0 -> index 0, img003 has 4 -> index 3
    raw3 = np.asarray(Image.open(tmp_path / "aptos" / "images" / "img003.png").resize((16, 16), Image.BILINEAR))
    every = [(sp.images[i], sp.labels[i]) for sp in (ds.train, ds.val, ds.test) for i in range(len(sp))]
    assert [lab for im, lab in every if np.array_equal(im.transpose(1, 2, 0), raw3)] == [3]
    same = load_dataset(cfg(source="csv", path=str(p), size=16, val_fraction=0.2, test_fraction=0.2), seed=0)
    other = load_dataset(cfg(source="csv", path=str(p), size=16, val_fraction=0.2, test_fraction=0.2), seed=5)
    np.testing.assert_array_equal(same.val.images, ds.val.images)
    assert not np.array_equal(other.val.images, ds.val.images)


def test_csv_class_names_as_labels(tmp_path):
    rng = np.random.default_rng(0)
    p = make_csv(tmp_path / "m", ["pneumonia", "normal"] * 6, rng)
    ds = load_dataset(cfg(source="csv", path=str(p), val_fraction=0.2, test_fraction=0.2), seed=0)
    assert ds.class_names == ["normal", "pneumonia"]
    assert np.bincount(np.concatenate([ds.train.labels, ds.val.labels, ds.test.labels])).tolist() == [6, 6]


def test_csv_custom_columns_and_image_dir(tmp_path):
    rng = np.random.default_rng(0)
    p = make_csv(tmp_path / "m", [0, 1] * 6, rng, header=("image", "grade"), img_sub="pics")
    c = cfg(source="csv", path=str(p), image_dir=str(tmp_path / "m" / "pics"), id_column="image",
            label_column="grade", val_fraction=0.2, test_fraction=0.2)
    ds = load_dataset(c, seed=0)
    assert len(ds.train) + len(ds.val) + len(ds.test) == 12 and ds.channels == 3


def test_csv_bad_inputs(tmp_path):
    rng = np.random.default_rng(0)
    p = make_csv(tmp_path / "a", [0, 1] * 5, rng)
    with pytest.raises(DataError, match=r"'label'.*columns found: 'id_code', 'diagnosis'"):
        load_dataset(cfg(source="csv", path=str(p), label_column="label"), seed=0)

    text = p.read_text().splitlines()
    text[4] = "img003,two"
    p.write_text("\n".join(text) + "\n")
    with pytest.raises(DataError, match=r"line 5.*img003.*'two'"):
        load_dataset(cfg(source="csv", path=str(p)), seed=0)

    text[4] = "img003,1"
    text.append("img099,0")
    p.write_text("\n".join(text) + "\n")
    with pytest.raises(DataError, match=r"line 12.*img099.*not found"):
        load_dataset(cfg(source="csv", path=str(p)), seed=0)

    text[-1] = "img003,0"
    p.write_text("\n".join(text) + "\n")
    with pytest.raises(DataError, match=r"line 12.*img003.*line 5"):
        load_dataset(cfg(source="csv", path=str(p)), seed=0)

    text[-1] = "img000,-1"
    text.pop(1)
    p.write_text("\n".join(text) + "\n")
    with pytest.raises(DataError, match=r"line 11.*-1"):
        load_dataset(cfg(source="csv", path=str(p)), seed=0)

    with pytest.raises(DataError, match="not found"):
        load_dataset(cfg(source="csv", path=str(tmp_path / "none.csv")), seed=0)


# ----------------------------------------------------------------------------- max_train, tensors, containers


def test_max_train_stratified_and_seeded(tmp_path):
    p = make_npz(tmp_path / "m.npz", n=(60, 4, 6), n_classes=3)
    ds = load_dataset(cfg(path=str(p), max_train=15), seed=0)
    assert len(ds.train) == 15 and list(np.bincount(ds.train.labels)) == [5, 5, 5]
    again = load_dataset(cfg(path=str(p), max_train=15), seed=0)
    other = load_dataset(cfg(path=str(p), max_train=15), seed=1)
    np.testing.assert_array_equal(again.train.images, ds.train.images)
    assert not np.array_equal(other.train.images, ds.train.images)
    assert len(load_dataset(cfg(path=str(p), max_train=1000), seed=0).train) == 60


def test_tensor_round_trip():
    x = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16)
    t = to_tensor(x)
    assert t.dtype == torch.float32 and t.min().item() == -1.0 and t.max().item() == 1.0
    np.testing.assert_array_equal(to_uint8(t), x)
    assert to_uint8(torch.tensor([-3.0, 0.0, 5.0])).tolist() == [0, 128, 255]
    with pytest.raises(TypeError):
        to_tensor(x.astype(np.float32))


def test_split_container():
    s = Split(np.zeros((5, 1, 4, 4), np.uint8), np.array([0, 1, 0, 1, 1], np.uint8))
    assert len(s) == 5 and s.labels.dtype == np.int64
    sub = s.subset([1, 3])
    assert len(sub) == 2 and sub.labels.tolist() == [1, 1]
    with pytest.raises(ValueError):
        Split(np.zeros((5, 4, 4), np.uint8), np.zeros(5))
    ds = ImageDataset("t", s, s.subset([0]), s.subset([]), ["x", "y"], 1, 4, "medmnist")
    assert ds.num_classes == 2 and "x" in ds.summary() and "y" in ds.summary()


def test_stratified_holdout_is_seeded_stratified_and_keeps_small_classes_whole():
    from plan_shared.data import stratified_holdout

    labels = np.array([0] * 60 + [1] * 20 + [2] * 3)
    tr, va = stratified_holdout(labels, 0.15, seed=3)
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(len(labels)))  # a partition
    assert np.bincount(labels[va], minlength=3).tolist() == [9, 3, 0]  # 15 % of classes 0 and 1; class 2 (< 4) trains
    again, va2 = stratified_holdout(labels, 0.15, seed=3)
    assert np.array_equal(va, va2) and np.array_equal(tr, again)
    assert not np.array_equal(stratified_holdout(labels, 0.15, seed=4)[1], va)
