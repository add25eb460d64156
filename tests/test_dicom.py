"""DICOM source (plan_shared/data.py): pixel handling, labels CSV, patients, errors, nothing from the header leaves.

Every file is built here with pydicom (Dataset + file meta, written in Part 10 format).
"""

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.tag import Tag  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless, generate_uid  # noqa: E402

from plan_shared.config import DataConfig, data_overrides  # noqa: E402
from plan_shared.data import DataError, holds_dicom, load_dataset, read_dicom  # noqa: E402

CT = "1.2.840.10008.5.1.4.1.1.2"
CR = "1.2.840.10008.5.1.4.1.1.1"


def make_ds(pixels, photometric="MONOCHROME2", bits_stored=None, patient="PAT-0001", **attrs) -> Dataset:
    """A minimal single-frame image dataset with identifying header values set."""
    pixels = np.asarray(pixels)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = attrs.pop("SOPClassUID", CR)
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = patient
    ds.PatientName = "Doe^Jane" + patient
    ds.PatientBirthDate = "19700101"
    ds.Modality = "CR"
    ds.set_pixel_data(pixels, photometric, bits_stored or pixels.dtype.itemsize * 8)
    for k, v in attrs.items():
        setattr(ds, k, v)
    return ds


def write(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def read_one(tmp_path, ds, name="a.dcm", channels=None, no_window="minmax"):
    p = write(ds, tmp_path / name)
    img, _ = read_dicom(p, str(p), channels, no_window)
    return img[:, :, 0] if img.shape[2] == 1 else img


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


RAMP = (np.arange(16, dtype=np.uint16).reshape(4, 4) * 17).astype(np.uint8)  # 0, 17, ..., 255


# ------------------------------------------------------------------ pixel handling


def test_monochrome2_keeps_values_and_monochrome1_is_inverted(tmp_path):
    m2 = read_one(tmp_path, make_ds(RAMP), "m2.dcm", no_window="bits_stored")
    assert np.array_equal(m2, RAMP)
    m1 = read_one(tmp_path, make_ds(RAMP, "MONOCHROME1"), "m1.dcm", no_window="bits_stored")
    assert np.array_equal(m1, 255 - RAMP)  # stored 0 is white in MONOCHROME1
    # the default fallback stretches each image's own range
    small = np.array([[10, 20], [30, 40]], np.uint8)
    assert read_one(tmp_path, make_ds(small), "mm.dcm").tolist() == [[0, 85], [170, 255]]


def test_rescale_slope_intercept_then_window(tmp_path):
    # stored 0..3 -> HU -1000, 0, 1000, 2000 by slope 1000, intercept -1000; window [-500, 1500] (centre 500, width 2000)
    stored = np.array([[0, 1], [2, 3]], np.uint16)
    ds = make_ds(stored, bits_stored=12, RescaleSlope=1000, RescaleIntercept=-1000,
                 WindowCenter=500.5, WindowWidth=2001, SOPClassUID=CT)  # LINEAR: c - 0.5, w - 1
    img = read_one(tmp_path, ds, "ct.dcm")
    # HU -1000 below window -> 0; 0 -> a quarter up; 1000 -> three quarters; 2000 above -> 255
    assert img.tolist() == [[0, 64], [191, 255]]
    # without the rescale the stored values 0..3 all sit a quarter up the same window
    ds2 = make_ds(stored, bits_stored=12, WindowCenter=500.5, WindowWidth=2001)
    assert read_one(tmp_path, ds2, "raw.dcm").tolist() == [[64, 64], [64, 64]]


def test_voi_lut_sequence_is_applied(tmp_path):
    stored = np.array([[0, 1], [2, 3]], np.uint16)
    ds = make_ds(stored, bits_stored=8)
    item = Dataset()
    item.add_new(0x00283002, "US", [4, 0, 8])  # LUT Descriptor: 4 entries, the first maps stored 0, 8-bit output
    item.add_new(0x00283006, "US", [0, 200, 40, 160])  # LUT Data, deliberately not monotone
    ds.VOILUTSequence = [item]
    img = read_one(tmp_path, ds, "lut.dcm")
    assert img.tolist() == [[0, 255], [51, 204]]  # LUT output range 0..200 onto 0..255


def test_bits_stored_12_in_16_bit_container(tmp_path):
    values = np.array([[0, 4095], [2048, 1024]], np.uint16)
    ds = make_ds(values, bits_stored=12)
    # garbage in the 4 unused high bits (e.g. an old overlay) must not count
    ds.PixelData = (values | 0xF000).astype("<u2").tobytes()
    img = read_one(tmp_path, ds, "b12.dcm", no_window="bits_stored")
    assert img.tolist() == [[0, 255], [128, 64]]  # scaled by 2**12 - 1, not by the uint16 container
    signed = np.array([[-2048, 2047], [0, -1024]], np.int16)
    img_s = read_one(tmp_path, make_ds(signed, bits_stored=12), "s12.dcm", no_window="bits_stored")
    assert img_s.tolist() == [[0, 255], [128, 64]]


def test_rle_lossless_compressed_file_decodes_to_the_same_image(tmp_path):
    ds = make_ds(RAMP)
    ds.compress(RLELossless)
    assert read_one(tmp_path, ds, "rle.dcm", no_window="bits_stored").tolist() == RAMP.tolist()


@pytest.mark.skipif(importlib.util.find_spec("openjpeg") is None,
                    reason="pylibjpeg-openjpeg not installed (plan-toolkit[dicom-compressed])")
def test_jpeg2000_lossless_file_decodes(tmp_path):
    px = (np.add.outer(np.arange(32), np.arange(32)) * 64).astype(np.uint16)  # 0..3968, 12-bit
    ds = make_ds(px, bits_stored=12)
    ds.compress(JPEG2000Lossless)
    img = read_one(tmp_path, ds, "j2k.dcm")
    expect = np.round(px / px.max() * 255)
    assert np.array_equal(img, expect.astype(np.uint8))


def test_jpeg_baseline_file_decodes(tmp_path):
    import io

    from PIL import Image
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    px = np.repeat(np.linspace(0, 255, 16).astype(np.uint8)[None], 16, 0)  # a smooth ramp survives lossy JPEG
    buf = io.BytesIO()
    Image.fromarray(px, "L").save(buf, format="JPEG", quality=95)
    ds = make_ds(px)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    img = read_one(tmp_path, ds, "jpeg.dcm", no_window="bits_stored")
    assert np.abs(img.astype(int) - px).max() <= 8


def test_rgb_needs_channels_and_is_kept_with_channels_3(tmp_path):
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 0], rgb[..., 2] = 255, 40
    ds = make_ds(rgb, "RGB")
    with pytest.raises(DataError, match=r"rgb\.dcm: colour DICOM \(RGB\).*data\.channels"):
        read_one(tmp_path, ds, "rgb.dcm")
    img = read_one(tmp_path, ds, "rgb.dcm", channels=3)
    assert img.shape == (4, 4, 3) and img[0, 0].tolist() == [255, 0, 40]


def test_palette_colour_goes_through_its_lookup_tables(tmp_path):
    idx = np.array([[0, 1], [2, 3]], np.uint8)
    ds = make_ds(idx, "PALETTE COLOR", bits_stored=8)
    lut = {"Red": [0, 65535, 0, 32896], "Green": [0, 0, 65535, 32896], "Blue": [65535, 0, 0, 32896]}
    for c, vals in lut.items():
        ds.add_new(Tag(f"{c}PaletteColorLookupTableDescriptor"), "US", [4, 0, 16])
        ds.add_new(Tag(f"{c}PaletteColorLookupTableData"), "OW",
                   np.array(vals, "<u2").tobytes())
    img = read_one(tmp_path, ds, "pal.dcm", channels=3)
    assert img.reshape(4, 3).tolist() == [[0, 0, 255], [255, 0, 0], [0, 255, 0], [128, 128, 128]]


def test_multi_frame_broken_and_pixelless_files_are_named(tmp_path):
    frames = np.zeros((2, 4, 4), np.uint8)
    ds = make_ds(frames[0])
    ds.NumberOfFrames = 2
    ds.PixelData = frames.tobytes()
    with pytest.raises(DataError, match=r"cine\.dcm: multi-frame DICOM \(2 frames\)"):
        read_one(tmp_path, ds, "cine.dcm")
    broken = tmp_path / "broken.dcm"
    good = write(make_ds(RAMP), tmp_path / "good.dcm").read_bytes()
    broken.write_bytes(good[: len(good) // 2])  # cut inside the pixel data
    with pytest.raises(DataError, match=r"broken\.dcm"):
        read_dicom(broken, str(broken), None)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not a dicom file at all")
    with pytest.raises(DataError, match=r"junk\.dcm: not a readable DICOM file"):
        read_dicom(junk, str(junk), None)
    sr = make_ds(RAMP)
    del sr.PixelData
    with pytest.raises(DataError, match=r"sr\.dcm: DICOM file has no pixel data"):
        read_one(tmp_path, sr, "sr.dcm")


# ------------------------------------------------------------------ folders + labels CSV


def _folder(root: Path, n_patients=12, per_patient=2, by="file", patient_column=True, nested=True):
    """``n_patients`` x ``per_patient`` files, class = patient % 2; returns (root, {file: (uid, patient)})."""
    rng = np.random.default_rng(0)
    rows, info = [], {}
    for p in range(n_patients):
        for j in range(per_patient):
            cls = "pneumonia" if p % 2 else "normal"
            rel = f"study{p:02d}/img{j}.dcm" if nested else f"p{p:02d}_{j}"  # no extension: found by DICM
            ds = make_ds(rng.integers(0, 4096, (12, 10), dtype=np.uint16), bits_stored=12, patient=f"MRN{p:05d}")
            write(ds, root / rel)
            info[rel] = (str(ds.SOPInstanceUID), f"MRN{p:05d}")
            key = rel if by == "file" else str(ds.SOPInstanceUID)
            rows.append([key, cls] + ([f"ptkey-{p:04d}"] if patient_column else []))
    head = ["file" if by == "file" else "sop_instance_uid", "label"] + (["patient_id"] if patient_column else [])
    write_csv(root / "labels.csv", head, rows)
    (root / "README.txt").write_text("export notes\n")  # not DICOM: ignored
    return root, info


def _cfg(root, **dicom) -> DataConfig:
    return DataConfig(source="dicom", path=str(root), size=8, dicom=dicom)


def test_folder_by_file_name_with_patients_splits_by_patient(tmp_path):
    root, _ = _folder(tmp_path / "d")
    assert holds_dicom(root) and data_overrides(data=root)["data.source"] == "dicom"
    ds = load_dataset(_cfg(root), seed=1)
    assert ds.source == "dicom" and ds.class_names == ["normal", "pneumonia"]
    assert (ds.channels, ds.size) == (1, 8)
    assert sum(len(s) for s in ds.splits().values()) == 24
    pats = {k: set(s.patient_ids.tolist()) for k, s in ds.splits().items()}
    assert not (pats["train"] & pats["val"]) and not (pats["train"] & pats["test"]) and not (pats["val"] & pats["test"])
    assert len(pats["train"] | pats["val"] | pats["test"]) == 12
    for s in ds.splits().values():  # both images of a patient stay together, with the patient's class
        assert np.all(np.bincount(s.patient_ids)[list(set(s.patient_ids.tolist()))] == 2)
        assert np.array_equal(s.labels, s.patient_ids % 2)  # ids follow first appearance: ptkey-0000 -> 0, ...
    assert "patients: train" in ds.summary()
    again = load_dataset(_cfg(root), seed=1)
    assert np.array_equal(again.test.patient_ids, ds.test.patient_ids)  # seeded


def test_folder_by_sop_uid_without_patients_and_patients_from_header(tmp_path):
    root, info = _folder(tmp_path / "d", by="uid", patient_column=False, nested=False)
    ds = load_dataset(_cfg(root), seed=0)
    assert ds.train.patient_ids is None and sum(len(s) for s in ds.splits().values()) == 24
    hdr = load_dataset(_cfg(root, patient="header"), seed=0)
    assert hdr.train.patient_ids is not None
    assert len(set().union(*(set(s.patient_ids.tolist()) for s in hdr.splits().values()))) == 12
    with pytest.raises(DataError, match=r"labels\.csv: column 'patient_id' \(data\.dicom\.patient_column\) not found"):
        load_dataset(_cfg(root, patient="column"), seed=0)


def test_label_errors_name_the_file_or_line(tmp_path):
    root, info = _folder(tmp_path / "d", n_patients=6)
    lines = (root / "labels.csv").read_text().splitlines()
    (root / "labels.csv").write_text("\n".join(lines[:-1]) + "\n")  # last file loses its label
    with pytest.raises(DataError, match=r"study05/img1\.dcm: no label: .*labels\.csv lists neither its path"):
        load_dataset(_cfg(root), seed=0)
    (root / "labels.csv").write_text("\n".join(lines + ["study99/none.dcm,normal,ptkey-0099"]) + "\n")
    with pytest.raises(DataError, match=r"labels\.csv, line 14: no DICOM file below .* matches file 'study99/none\.dcm'"):
        load_dataset(_cfg(root), seed=0)
    (root / "labels.csv").write_text("\n".join(lines[:1] + [lines[1].replace("normal", "")] + lines[2:]) + "\n")
    with pytest.raises(DataError, match=r"study00/img0\.dcm: .*labels\.csv, line 2: empty 'label'"):
        load_dataset(_cfg(root), seed=0)
    (root / "labels.csv").write_text("name,label\nx,normal\n")
    with pytest.raises(DataError, match=r"neither 'file' .* nor 'sop_instance_uid'.* columns found: 'name', 'label'"):
        load_dataset(_cfg(root), seed=0)
    (root / "labels.csv").unlink()
    with pytest.raises(DataError, match=r"labels CSV not found: .*labels\.csv"):
        load_dataset(_cfg(root), seed=0)


def test_file_and_uid_columns_must_agree(tmp_path):
    root, info = _folder(tmp_path / "d", n_patients=6)
    rows = [[rel, "pneumonia" if int(rel[5:7]) % 2 else "normal", uid] for rel, (uid, _) in info.items()]
    rows[2][2] = generate_uid()  # line 4 carries a UID that is not the file's
    write_csv(root / "labels.csv", ["file", "label", "sop_instance_uid"], rows)
    with pytest.raises(DataError, match=r"study01/img0\.dcm: .*labels\.csv, line 4: the 'sop_instance_uid' value differs"):
        load_dataset(_cfg(root), seed=0)
    rows[2][2] = info[rows[2][0]][0]
    write_csv(root / "labels.csv", ["file", "label", "sop_instance_uid"], rows)
    assert load_dataset(_cfg(root), seed=0).train.patient_ids is None  # no patient column: one identity per image


def test_too_few_patients_per_class_is_a_named_error(tmp_path):
    root, _ = _folder(tmp_path / "d", n_patients=4, per_patient=3)  # 2 patients per class < 3 parts
    with pytest.raises(DataError, match=r"class 'normal' has 2 patient\(s\)"):
        load_dataset(_cfg(root), seed=0)


def test_a_broken_file_in_the_folder_is_named(tmp_path):
    root, _ = _folder(tmp_path / "d", n_patients=6)
    (root / "study02" / "img1.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00garbage")
    with pytest.raises(DataError, match=r"study02/img1\.dcm"):
        load_dataset(_cfg(root), seed=0)


# ------------------------------------------------------------------ nothing from the header leaves the site


def test_synthesize_output_holds_no_header_value(tmp_path):
    from client.cli import app
    from tests.test_synthesize import TINY

    root, info = _folder(tmp_path / "dicom", n_patients=12, per_patient=3)
    cfg = dict(TINY, data={"size": 16})
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["synthesize", "--config", str(tmp_path / "site.yaml"), "--data", str(root),
                                   "--out", str(out), "--method", "plan"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    rep = json.loads((out / "report.json").read_text())
    assert rep["data"]["identity_unit"] == "patient"
    train = load_dataset(DataConfig(source="dicom", path=str(root), size=16), seed=TINY["seed"]).train
    assert rep["data"]["n_train"] == len(train) == 3 * len(np.unique(train.patient_ids))
    assert rep["data"]["n_identities"] == len(np.unique(train.patient_ids))  # one phi_id identity per patient
    assert rep["data"]["classes"] == ["normal", "pneumonia"]
    needles = set()
    for rel, (uid, mrn) in info.items():
        needles |= {uid, mrn, "Doe^Jane", "19700101", rel, Path(rel).parent.name, f"ptkey-{int(mrn[3:]):04d}"}
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "manifest.json" for p in files)
    for p in files:
        blob = p.read_bytes()
        for n in needles:
            assert n.encode() not in blob, f"{n!r} found in {p.relative_to(out)}"
