"""plan_shared/credentials.py: the one rule for finding an identity's credentials folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from plan_shared.credentials import CLIENT_CERT, NODE_KEY, CredentialsError, find_identity_dir


def _identity(folder, *files):
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        (folder / f).write_text("x")
    return folder


def test_explicit_folder_wins(tmp_path):
    _identity(tmp_path / "certs" / "sites" / "site-a", CLIENT_CERT)
    assert find_identity_dir(tmp_path / "certs", "site", "site-a", explicit="~/keys") == Path.home() / "keys"


def test_own_keys_folder_then_simulation_layout(tmp_path):
    own = _identity(tmp_path / "keys", CLIENT_CERT, NODE_KEY)
    assert find_identity_dir(own, "site", "site-a") == own
    assert find_identity_dir(own, "site", "site-a", marker=NODE_KEY) == own
    shared = tmp_path / "sim"
    a = _identity(shared / "sites" / "site-a", CLIENT_CERT)
    assert find_identity_dir(shared, "site", "site-a") == a
    assert find_identity_dir(shared, "site", "site-b") is None


def test_first_reader_when_no_name_is_given(tmp_path):
    certs = tmp_path / "certs"
    assert find_identity_dir(certs, "reader") is None
    _identity(certs / "readers" / "zoe", CLIENT_CERT)
    alice = _identity(certs / "readers" / "alice", CLIENT_CERT)
    (certs / "readers" / "not-a-folder").write_text("")
    assert find_identity_dir(certs, "reader") == alice


def test_unknown_role_is_named(tmp_path):
    with pytest.raises(CredentialsError, match="role 'admin': expected one of site, reader"):
        find_identity_dir(tmp_path, "admin")
