"""Pool settings in deployment (fast, no Flower processes; deploy/smoke.sh runs it all for real).

* a site's pool address and credentials come from its own site.yaml, through the node
  config that ``plan-client start`` writes, never from the coordinator's config;
* ``plan-server coordinate`` starts and stops the pool service, issues its reader
  identity when none exists, and hands the pull address + reader to the ServerApp
  through ``STATE/run-config.yaml``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib
import yaml

from plan_shared.config import load_config
from tests.test_federation_util import free_port, listening, make_npz


@pytest.fixture
def certs(tmp_path) -> Path:
    """The coordinator's CA folder; hospital-a's own keys are in ``tmp_path/hospital-a-keys``."""
    from server.certs import init_ca, issue

    d = tmp_path / "certs"
    init_ca(d)
    issue(d, "hospital-a", "site", tmp_path / "hospital-a-keys")
    return d


def _site_yaml(tmp_path: Path, certs: Path, server_name: str | None = None, **site) -> Path:
    raw = {"site_id": "hospital-a", "data": {"source": "medmnist", "path": str(make_npz(tmp_path / "a.npz"))},
           "site": {"keys_dir": str(tmp_path / "hospital-a-keys"), "state_dir": str(tmp_path / "site"), **site}}
    if server_name:
        raw["pool"] = {"server_name": server_name}
    p = tmp_path / "site.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def test_start_puts_the_sites_pool_settings_into_the_node_config(tmp_path, certs):
    from client.supernode import StartError, supernode_command_line

    _, _, state = supernode_command_line(_site_yaml(tmp_path, certs, pool_address="pool.example.org:9444",
                                                    server_name="pool.example.org"))
    node = tomllib.loads((state / "node.toml").read_text())
    assert node["pool-address"] == "pool.example.org:9444" and node["pool-server-name"] == "pool.example.org"
    assert node["pool-credentials"] == str((tmp_path / "hospital-a-keys").resolve())

    _, _, state = supernode_command_line(_site_yaml(tmp_path, certs))
    assert not any(k.startswith("pool-") for k in tomllib.loads((state / "node.toml").read_text()))

    with pytest.raises(StartError, match="client.crt missing: site.pool_keys_dir"):
        supernode_command_line(_site_yaml(tmp_path, certs, pool_address="x:1", pool_keys_dir=str(certs)))


def test_site_uses_its_own_pool_settings_not_the_coordinators(tmp_path):
    from client.site import Site

    coord = load_config(None, {"site.pool_address": "localhost:9444", "site.pool_keys_dir": "/keys/sites",
                               "pool.server_name": "evil.example.org"})
    nc = {"site-id": "a", "data-path": "/d.npz", "pool-address": "coord.example.org:9444", "pool-credentials": "/c"}
    cfg = Site.from_node_config(nc, coord).cfg
    assert (cfg.site.pool_address, cfg.site.pool_keys_dir, cfg.pool.server_name) == ("coord.example.org:9444", "/c", None)
    cfg = Site.from_node_config({"site-id": "a", "data-path": "/d.npz"}, coord).cfg
    assert cfg.site.pool_address is None and cfg.site.pool_keys_dir is None
    # simulation: every virtual site shares the coordinator's disk and config
    assert Site.from_node_config({"partition-id": 0, "num-partitions": 2}, coord).cfg.site.pool_address == "localhost:9444"


def test_site_without_pool_address_fails_before_running_the_pipeline(tmp_path):
    from client.post_training import synthesize_at_site
    from client.site import Site

    site = Site.from_node_config({"site-id": "a", "data-path": "/nonexistent.npz", "state-dir": str(tmp_path)},
                                 load_config(None, {"site.pool_address": "localhost:9444"}))
    with pytest.raises(RuntimeError, match="no pool address: set site.pool_address"):
        synthesize_at_site(site, site.cfg, {}, 1, 16, 1)
    assert not (tmp_path / "synthesis").exists()


def test_coordinator_starts_the_pool_issues_a_reader_and_passes_both_to_the_serverapp(tmp_path, certs):
    from server.coordinate import Coordinator

    port = free_port()
    cfg = {"federation": {"post_training": True},
           "coordinator": {"state_dir": "state", "ca_dir": "certs", "pool_listen": f"127.0.0.1:{port}"}}
    (tmp_path / "coordinator.yaml").write_text(yaml.safe_dump(cfg))
    coord = Coordinator(tmp_path / "coordinator.yaml")
    try:
        coord.start_pool()
        assert listening(port)
        assert coord.reader == tmp_path / "state" / "reader" and (coord.reader / "client.crt").is_file()
        assert coord.pool_address == f"127.0.0.1:{port}"
        run_cfg = load_config(coord.run_config_file())
        own = run_cfg.coordinator
        assert own.pool_address == f"127.0.0.1:{port}" and own.reader_dir == str(coord.reader)
        assert own.ca_dir == str(certs.resolve())  # absolute for the ServerApp
        assert (tmp_path / "state" / "pool-store" / "index.sqlite").is_file()
    finally:
        coord.stop_pool()
    assert not listening(port)
    # a second coordinator finds the reader it issued instead of issuing another one
    assert Coordinator(tmp_path / "coordinator.yaml").reader_credentials() == coord.reader
