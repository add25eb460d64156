"""Per-image privacy records and the site manifest.json (plan_shared/manifest.py)."""

import copy
import json

import pytest

from plan_shared.manifest import (
    ImageRecord,
    ManifestError,
    SiteManifest,
    read_site_manifest,
    safe_class_names,
    write_site_manifest,
)

SHA = "ab" * 32
RECORD = {
    "id": "p3_t7", "file": "images/pneumonia/p3_t7.png", "sha256": SHA, "label": 1, "class_name": "pneumonia",
    "method": "plan", "path_id": 3, "position": 7, "max_id_prob": 0.12, "indep_id_prob": 0.08, "dcr": 4.2,
    "thresholds": {"tau_id": 0.5, "tau_indep": 0.4, "delta": 3.1},
}
SITE = {"site_id": "site-a", "generator_sha256": "cd" * 32, "config_sha256": "ef" * 32,
        "created": "2025-01-31T12:00:00+00:00", "images": [RECORD]}


def rec(**changes):
    r = copy.deepcopy(RECORD)
    r.update(changes)
    return r


def test_record_round_trip_and_passes():
    r = ImageRecord.from_dict(RECORD)
    assert r.passes() and r.failures() == []
    assert r.to_dict() == RECORD


@pytest.mark.parametrize(
    "changes, failed",
    [
        ({"max_id_prob": 0.5}, "max_id_prob 0.5 >= tau_id 0.5"),          # strict inequality
        ({"indep_id_prob": 0.41}, "indep_id_prob 0.41 >= tau_indep 0.4"),
        ({"dcr": 3.1}, "dcr 3.1 <= delta 3.1"),
    ],
)
def test_record_fails_its_thresholds(changes, failed):
    r = ImageRecord.from_dict(rec(**changes))
    assert not r.passes()
    assert r.failures() == [failed]


def test_random_method_with_null_path():
    r = ImageRecord.from_dict(rec(method="random", path_id=None, position=None))
    assert r.path_id is None and r.passes()


@pytest.mark.parametrize(
    "raw, needle",
    [
        (rec(extra=1), "unknown key 'extra'"),
        ({k: v for k, v in RECORD.items() if k != "dcr"}, "missing key 'dcr'"),
        (rec(sha256="XYZ"), "key 'sha256'"),
        (rec(file="images/normal/p3_t7.png"), "key 'file'"),
        (rec(method="gan"), "key 'method'"),
        (rec(label=True), "key 'label'"),
        (rec(label=-1), "key 'label'"),
        (rec(position=1.5), "key 'position'"),
        (rec(max_id_prob="0.1"), "key 'max_id_prob'"),
        (rec(dcr=float("nan")), "key 'dcr'"),
        (rec(id="../x", file="images/pneumonia/../x.png"), "key 'id'"),
        (rec(class_name="a/b"), "key 'class_name'"),
        (rec(thresholds={"tau_id": 0.5, "tau_indep": 0.5}), "missing key 'thresholds.delta'"),
        (rec(thresholds={"tau_id": 0.5, "tau_indep": 0.5, "delta": 1, "k": 2}), "unknown key 'thresholds.k'"),
        (rec(thresholds=None), "key 'thresholds'"),
    ],
)
def test_record_errors_name_key_and_record(raw, needle):
    with pytest.raises(ManifestError) as ei:
        ImageRecord.from_dict(raw, "images[4]")
    msg = str(ei.value)
    assert needle in msg and msg.startswith("images[4]")
    if isinstance(raw.get("id"), str):
        assert repr(raw["id"]) in msg


def test_site_manifest_write_read(tmp_path):
    m = SiteManifest.from_dict(dict(SITE, generator_round=2))
    write_site_manifest(tmp_path / "manifest.json", m)
    back = read_site_manifest(tmp_path / "manifest.json")
    assert back == m and back.generator_round == 2
    assert json.loads((tmp_path / "manifest.json").read_text())["images"][0] == RECORD


def test_site_manifest_errors(tmp_path):
    with pytest.raises(ManifestError, match="missing key 'config_sha256'"):
        SiteManifest.from_dict({k: v for k, v in SITE.items() if k != "config_sha256"})
    with pytest.raises(ManifestError, match="unknown key 'comment'"):
        SiteManifest.from_dict(dict(SITE, comment="x"))
    with pytest.raises(ManifestError, match="key 'created'"):
        SiteManifest.from_dict(dict(SITE, created="yesterday"))
    with pytest.raises(ManifestError, match=r"images\[1\] \(id 'p3_t7'\): key 'id' duplicates images\[0\]"):
        SiteManifest.from_dict(dict(SITE, images=[RECORD, RECORD]))
    with pytest.raises(ManifestError, match=r"manifest.json: images\[0\] \(id 'p3_t7'\): key 'method'"):
        SiteManifest.from_dict(dict(SITE, images=[rec(method="x")]))
    p = tmp_path / "manifest.json"
    p.write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_site_manifest(p)
    with pytest.raises(ManifestError, match="not found"):
        read_site_manifest(tmp_path / "missing.json")


def test_safe_class_names():
    got = safe_class_names(["normal, benign", "Lungenentzündung", "..", "a b", "a_b", "", "x" * 200])
    assert got == ["normal_benign", "Lungenentzundung", "2", "a_b", "a_b_4", "5", "x" * 64]
    for name in got:
        ImageRecord.from_dict(dict(RECORD, class_name=name, file=f"images/{name}/p3_t7.png"))
    assert safe_class_names(["normal", "pneumonia"]) == ["normal", "pneumonia"]
