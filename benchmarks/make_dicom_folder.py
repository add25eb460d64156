"""Build a DICOM folder (the toolkit's dicom source) from real MedMNIST images, for acceptance runs.

    python benchmarks/make_dicom_folder.py --from pneumoniamnist --out /tmp/dicom --n 120 [--per-patient 2]

Takes a seeded, stratified subsample of ``--n`` training images, groups them into fake
patients of ``--per-patient`` images of one class, and writes ``OUT/<patient>/<k>.dcm``
plus ``OUT/labels.csv`` (columns ``file``, ``label``, ``patient_id``). The files vary
the way hospital exports do, in turns:

- 12 bits stored in 16-bit words (value x 16), MONOCHROME2, window centre/width;
- the same but MONOCHROME1 (stored values inverted: the loader must invert back);
- CT-like rescale intercept -1024 with the window shifted to match, RLE Lossless compressed.

Headers carry made-up PatientID / PatientName / birth date and fresh UIDs, so that a run
can check that none of them reaches its output. ``--check`` reads every file back with the
toolkit's reader and prints the largest difference from the source image (expected <= 1).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np


def build(flag: str, out: Path, n: int, per_patient: int, seed: int) -> dict:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

    from plan_shared.config import DataConfig
    from plan_shared.data import load_dataset, stratified_subsample

    ds = load_dataset(DataConfig(source="medmnist", name=flag, size=None, channels=1, download=False), seed)
    keep = stratified_subsample(ds.train.labels, n, seed)
    images, labels = ds.train.images[keep, 0], ds.train.labels[keep]
    order = np.argsort(labels, kind="stable")  # patients hold images of one class
    out.mkdir(parents=True, exist_ok=True)
    rows, sources = [], {}
    for j, i in enumerate(order):
        p, k = divmod(j, per_patient)
        v = images[i].astype(np.uint16)
        meta = FileMetaDataset()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        d = Dataset()
        d.file_meta = meta
        d.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR image storage
        d.SOPInstanceUID = generate_uid()
        d.StudyInstanceUID = generate_uid()
        d.SeriesInstanceUID = generate_uid()
        d.PatientID = f"SYN{p:06d}"
        d.PatientName = f"Synthetic^Patient{p:04d}"
        d.PatientBirthDate = "19800101"
        d.Modality = "CR"
        kind = j % 3
        if kind == 1:
            d.set_pixel_data((255 - v) * 16, "MONOCHROME1", 12)
        else:
            d.set_pixel_data(v * 16, "MONOCHROME2", 12)
        d.WindowCenter, d.WindowWidth = 2048, 4096
        if kind == 2:
            d.RescaleSlope, d.RescaleIntercept, d.RescaleType = 1, -1024, "HU"
            d.WindowCenter = 2048 - 1024
            d.compress(RLELossless)
        rel = f"{d.PatientID}/{k}.dcm"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        d.save_as(out / rel, enforce_file_format=True)
        rows.append([rel, ds.class_names[int(labels[i])], f"patient-{p:04d}"])
        sources[rel] = images[i]
    with open(out / "labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "label", "patient_id"])
        w.writerows(rows)
    return sources


def check(out: Path, sources: dict) -> int:
    from plan_shared.data import read_dicom

    worst = 0
    for rel, src in sources.items():
        img, _ = read_dicom(out / rel, rel, None)
        worst = max(worst, int(np.abs(img[:, :, 0].astype(int) - src.astype(int)).max()))
    return worst


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from", dest="flag", default="pneumoniamnist", help="MedMNIST flag in $PLAN_DATA_DIR")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, default=120, help="number of images (files)")
    ap.add_argument("--per-patient", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true", help="read every file back and print the largest pixel error")
    a = ap.parse_args(argv)
    if a.out.exists() and any(a.out.iterdir()):
        sys.exit(f"{a.out} is not empty")
    sources = build(a.flag, a.out, a.n, a.per_patient, a.seed)
    print(f"wrote {len(sources)} DICOM files of {-(-len(sources) // a.per_patient)} patients + labels.csv to {a.out}")
    if a.check:
        print(f"largest pixel difference after reading back: {check(a.out, sources)}")


if __name__ == "__main__":
    main()
