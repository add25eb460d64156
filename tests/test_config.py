"""Configuration: defaults, YAML loading, overrides and errors that name the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from plan_shared.config import (
    MOVED_KEYS,
    NULL,
    ConfigError,
    CoordinatorConfig,
    PlanConfig,
    SiteConfig,
    config_from_dict,
    config_from_stored,
    data_overrides,
    describe_defaults,
    load_config,
    parse_sets,
)

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


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


# ---------------------------------------------------------------- site: / coordinator: split (#13.5)

def test_role_keys_live_in_their_sections_and_shared_keys_stay():
    cfg = load_config()
    assert set(SiteConfig.model_fields) == {"state_dir", "keys_dir", "superlink_address", "supernode_port",
                                            "superexec_poll_s", "worker", "pool_address", "pool_keys_dir",
                                            "supernode_poll_s", "clientapp_forkserver"}
    assert set(CoordinatorConfig.model_fields) == {"state_dir", "ca_dir", "superlink_port", "pool_listen",
                                                   "pool_address", "reader_dir"}
    for old in MOVED_KEYS:
        section, name = old.split(".")
        assert name not in type(getattr(cfg, section)).model_fields, old
    # keys both roles read alike stay where they were
    for shared in ("rounds", "local_steps", "share", "min_nodes", "round_timeout_s", "reply_poll_s", "post_training"):
        assert shared in type(cfg.federation).model_fields
    for shared in ("server_name", "retries", "backoff_s", "limits", "policy_file"):
        assert shared in type(cfg.pool).model_fields
    assert (cfg.site.superlink_address, cfg.site.supernode_port, cfg.coordinator.superlink_port) == \
        ("127.0.0.1:9443", 9094, 9093)
    assert cfg.site.pool_address is None and cfg.coordinator.pool_listen == "0.0.0.0:9444"


@pytest.mark.parametrize("old", sorted(MOVED_KEYS))
def test_an_old_key_in_a_file_names_the_file_the_key_and_its_new_home(tmp_path, old):
    section, name = old.split(".")
    p = tmp_path / "old.yaml"
    p.write_text(yaml.safe_dump({"seed": 1, section: {name: "x"}}))
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and f"{old} moved: use {MOVED_KEYS[old]}" in msg
    new_homes = [w.strip(",()") for w in MOVED_KEYS[old].split() if w.startswith(("site.", "coordinator."))]
    assert new_homes and all(h.split(".")[1] in (SiteConfig.model_fields | CoordinatorConfig.model_fields)
                             for h in new_homes)


def test_certs_dir_error_names_both_roles(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("federation: {rounds: 3, certs_dir: /etc/plan/certs}\n")
    with pytest.raises(ConfigError, match=r"federation.certs_dir moved: use coordinator.ca_dir on the coordinator, "
                                          r"site.keys_dir at a site"):
        load_config(p)


def test_an_old_key_in_a_set_override_is_refused():
    with pytest.raises(ConfigError, match=r"override: federation.state_dir moved: use coordinator.state_dir"):
        load_config(None, parse_sets(["federation.state_dir=/tmp/x"]))
    with pytest.raises(ConfigError, match=r"pool.listen moved: use coordinator.pool_listen"):
        config_from_dict({}, "x", {"pool.listen": NULL})


def test_set_null_sets_none_over_a_file_value(tmp_path):
    """--set KEY=null used to be dropped like an unset CLI option, so the file's value stayed."""
    p = tmp_path / "c.yaml"
    p.write_text("inversion: {max_images: 200}\nsynthesis: {max_paths: 16}\n")
    cfg = load_config(p, parse_sets(["inversion.max_images=null", "synthesis.max_paths=~"]))
    assert cfg.inversion.max_images is None and cfg.synthesis.max_paths is None
    assert load_config(p, parse_sets(["inversion.max_images=300"])).inversion.max_images == 300
    assert load_config(p).inversion.max_images == 200


def _write(tmp_path: Path, name: str, raw: dict) -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(raw))
    return p


def test_a_site_file_refuses_the_coordinators_sections(tmp_path):
    p = _write(tmp_path, "site.yaml", {"site_id": "a", "site": {"keys_dir": "k"}, "coordinator": {"ca_dir": "c"}})
    with pytest.raises(ConfigError) as e:
        load_config(p, role="site")
    assert str(p) in str(e.value) and "'coordinator.ca_dir' belongs to the coordinator's configuration" in str(e.value)
    p = _write(tmp_path, "site2.yaml", {"site": {"keys_dir": "k"}, "policy": {"min_k": 5}})
    with pytest.raises(ConfigError, match=r"site2.yaml: key 'policy.min_k' belongs to the coordinator's"):
        load_config(p, role="site")
    with pytest.raises(ConfigError, match=r"override: key 'coordinator.pool_listen' belongs to the coordinator's"):
        load_config(None, {"coordinator.pool_listen": "0.0.0.0:1"}, role="site")
    assert load_config(None, {"site.keys_dir": "k"}, role="site").site.keys_dir == "k"


def test_a_coordinator_file_refuses_the_sites_sections(tmp_path):
    p = _write(tmp_path, "coordinator.yaml", {"coordinator": {"ca_dir": "c"}, "site": {"pool_address": "h:1"}})
    with pytest.raises(ConfigError) as e:
        load_config(p, role="coordinator")
    assert str(p) in str(e.value) and "'site.pool_address' belongs to the site's configuration" in str(e.value)
    p = _write(tmp_path, "c2.yaml", {"site_minimums": {"min_k": 5}})
    with pytest.raises(ConfigError, match=r"c2.yaml: key 'site_minimums.min_k' belongs to the site's"):
        load_config(p, role="coordinator")


def test_a_simulation_file_may_hold_both_roles(tmp_path):
    p = _write(tmp_path, "sim.yaml", {"site": {"keys_dir": "keys"}, "coordinator": {"ca_dir": "certs"},
                                      "policy": {"min_k": 2}, "site_minimums": {"min_k": 2}})
    cfg = load_config(p)
    assert (cfg.site.keys_dir, cfg.coordinator.ca_dir) == ("keys", "certs")


def test_the_deploy_examples_load_in_their_own_role_only():
    site = load_config(DEPLOY / "site.yaml", role="site")
    assert site.site.pool_address == "coordinator.example.org:9444" and site.site.keys_dir == "/etc/plan/site"
    coord = load_config(DEPLOY / "coordinator.yaml", role="coordinator")
    assert coord.coordinator.ca_dir == "/etc/plan/certs" and coord.coordinator.pool_listen == "0.0.0.0:9444"
    with pytest.raises(ConfigError, match="site.yaml: key 'site"):
        load_config(DEPLOY / "site.yaml", role="coordinator")
    with pytest.raises(ConfigError, match="coordinator.yaml: key 'coordinator"):
        load_config(DEPLOY / "coordinator.yaml", role="site")


def test_describe_defaults_shows_the_role_sections():
    doc = describe_defaults()
    for key in ("site.state_dir", "site.keys_dir", "site.pool_address", "site.worker", "coordinator.state_dir",
                "coordinator.ca_dir", "coordinator.pool_listen", "coordinator.reader_dir"):
        assert f"| `{key}` |" in doc, key
    for old in MOVED_KEYS:
        assert f"| `{old}` |" not in doc, old


def test_a_configuration_stored_before_the_split_still_loads():
    """A checkpoint's config written with the old keys: they named the writer's folders, so they are dropped."""
    stored = load_config(None, {"gan.steps": 7}).to_dict()
    for section in ("site", "coordinator"):
        stored.pop(section)
    stored["federation"].update(state_dir="/old/state", certs_dir="/old/certs", superlink_port=1, site_worker=False)
    stored["pool"].update(address="h:1", listen=None, credentials="/c")
    before = json.dumps(stored, sort_keys=True)
    cfg = config_from_stored(stored, "ckpt.pt:config")
    assert cfg.gan.steps == 7 and cfg.site == SiteConfig() and cfg.coordinator == CoordinatorConfig()
    assert json.dumps(stored, sort_keys=True) == before  # the stored record is not changed
    stored["gan"]["nope"] = 1
    with pytest.raises(ConfigError, match=r"ckpt.pt:config: unknown key 'gan.nope'"):
        config_from_stored(stored, "ckpt.pt:config")
