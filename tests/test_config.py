"""Configuration: defaults, YAML loading, overrides and errors that name the key."""

from __future__ import annotations

import pytest

from plan_shared.config import (
    NULL,
    ConfigError,
    PlanConfig,
    config_from_dict,
    data_overrides,
    describe_defaults,
    load_config,
)


def test_defaults_validate_and_round_trip(tmp_path):
    cfg = load_config()
    assert isinstance(cfg, PlanConfig)
    p = tmp_path / "c.yaml"
    p.write_text(cfg.to_yaml())
    again = load_config(p)
    assert again == cfg
    assert again.digest() == cfg.digest()


def test_digest_changes_with_content():
    assert load_config().digest() != load_config(overrides={"gan.steps": 7}).digest()


def test_yaml_values_and_overrides(tmp_path):
    p = tmp_path / "site.yaml"
    p.write_text("seed: 3\ngan:\n  steps: 11\n  augment: [translation]\ndata:\n  size: 64\n")
    cfg = load_config(p, overrides={"gan.batch_size": 8, "gan.steps": None})
    assert (cfg.seed, cfg.gan.steps, cfg.gan.batch_size, cfg.data.size) == (3, 11, 8, 64)
    assert cfg.gan.augment == ["translation"]


@pytest.mark.parametrize(
    "raw, fragment",
    [
        ({"gan": {"steps": -1}}, "gan.steps"),
        ({"gan": {"stepz": 1}}, "unknown key 'gan.stepz'"),
        ({"gan": {"augment": ["rotate"]}}, "gan.augment.0"),
        ({"data": {"source": "hdf5"}}, "data.source"),
        ({"partition": {"scheme": "round-robin"}}, "partition.scheme"),
        ({"device": "gpu7"}, "device"),
        ({"bogus": 1}, "unknown key 'bogus'"),
    ],
)
def test_errors_name_the_key(raw, fragment):
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw, "site.yaml")
    assert fragment in str(err.value)
    assert "site.yaml" in str(err.value)


def test_error_names_the_bad_value():
    with pytest.raises(ConfigError, match="'gan.lr_g' = 'fast'"):
        config_from_dict({"gan": {"lr_g": "fast"}}, "x.yaml")


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("gan: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(lst)


def test_override_into_non_section_is_refused():
    with pytest.raises(ConfigError, match="not a section"):
        config_from_dict({"seed": 1}, overrides={"seed.x": 1})
    with pytest.raises(ConfigError, match="seed"):
        config_from_dict({}, overrides={"seed.x": 1})


def test_data_overrides(tmp_path):
    assert data_overrides("breastmnist") == {"data.source": "medmnist", "data.name": "breastmnist", "data.path": NULL}
    assert data_overrides(data=tmp_path / "a.npz")["data.source"] == "medmnist"
    assert data_overrides(data=tmp_path / "a.csv")["data.source"] == "csv"
    assert data_overrides(data=tmp_path)["data.source"] == "imagefolder"
    with pytest.raises(ConfigError):
        data_overrides("a", tmp_path)
    with pytest.raises(ConfigError, match="expected"):
        data_overrides(data=tmp_path / "missing.txt")
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  path: /somewhere/else.npz\n")
    assert load_config(p, data_overrides("breastmnist")).data.path is None


def test_describe_defaults_lists_every_section():
    doc = describe_defaults()
    for key in ("`seed`", "`data.size`", "`gan.r1_gamma`", "`generator.w_dim`", "`downstream.width`"):
        assert key in doc


def test_filter_zone_keys():
    cfg = PlanConfig()
    assert cfg.filter.protect == ["train", "val", "test"] and cfg.filter.calibration_split == "val"
    with pytest.raises(Exception, match="must contain 'train'"):
        PlanConfig.model_validate({"filter": {"protect": ["val", "test"]}})
    with pytest.raises(Exception, match="calibration_split='test' is not in filter.protect"):
        PlanConfig.model_validate({"filter": {"protect": ["train", "val"], "calibration_split": "test"}})
    with pytest.raises(Exception, match="calibration_fraction"):
        PlanConfig.model_validate({"filter": {"calibration_fraction": 1.0}})
