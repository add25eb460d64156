"""Every command of plan-client and plan-server answers --help with an example."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest
import typer
from typer.testing import CliRunner

from client.cli import app as client_app
from server.cli import app as server_app


def _paths(app: typer.Typer) -> list[list[str]]:
    root = typer.main.get_command(app)
    out: list[list[str]] = []

    def walk(cmd: click.Command, path: list[str]) -> None:
        out.append(path)
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                walk(sub, path + [name])

    walk(root, [])
    return out


CASES = [(client_app, p) for p in _paths(client_app)] + [(server_app, p) for p in _paths(server_app)]


@pytest.mark.parametrize("app,path", CASES, ids=[("client " if a is client_app else "server ") + " ".join(p) for a, p in CASES])
def test_help(app, path):
    res = CliRunner().invoke(app, path + ["--help"])
    assert res.exit_code == 0, res.output
    assert "Usage" in res.output
    leaf = typer.main.get_command(app)
    for name in path:
        leaf = leaf.commands[name]
    if not isinstance(leaf, click.Group):
        assert "Example" in (leaf.help or ""), f"{' '.join(path)} --help has no example"


def test_expected_commands_exist():
    client = {" ".join(p) for p in _paths(client_app)}
    server = {" ".join(p) for p in _paths(server_app)}
    assert {"train-gan", "config show", "export", "start"} <= client
    assert {"certs init", "certs issue", "pool serve", "pool pull", "pool ls"} <= server


@pytest.mark.parametrize("script", ["client.cli", "server.cli"])
def test_console_entry_points_run(script):
    res = subprocess.run([sys.executable, "-m", script, "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_each_role_command_refuses_the_other_roles_file(tmp_path, capsys):
    """plan-client reads a site file, plan-server coordinate a coordinator file: the other role's section is refused
    naming the file and the key; an old key is refused naming its new home."""
    coord = tmp_path / "coordinator.yaml"
    coord.write_text("federation: {rounds: 2}\ncoordinator: {ca_dir: certs}\n")
    site = tmp_path / "site.yaml"
    site.write_text("site_id: a\nsite: {keys_dir: keys, pool_address: 'h:1'}\n")
    res = CliRunner().invoke(client_app, ["config", "show", "--config", str(coord)])
    assert res.exit_code == 2 and f"{coord}: key 'coordinator.ca_dir' belongs to the coordinator's" in res.output
    res = CliRunner().invoke(client_app, ["config", "show", "--config", str(site), "--set", "federation.certs_dir=k"])
    assert res.exit_code == 2 and "federation.certs_dir moved: use coordinator.ca_dir on the coordinator" in res.output
    res = CliRunner().invoke(client_app, ["config", "show", "--config", str(site)])
    assert res.exit_code == 0 and "pool_address: h:1" in res.output

    from client.supernode import start_command
    from server.coordinate import coordinate_command

    assert start_command(str(coord), dry_run=True) == 2
    assert f"{coord}: key 'coordinator.ca_dir' belongs to the coordinator's" in capsys.readouterr().err
    assert coordinate_command(str(site)) == 2
    assert f"{site}: key 'site.keys_dir' belongs to the site's" in capsys.readouterr().err
