"""``coordinate`` drops a revoked site's node from the RUNNING SuperLink (issue 12, deliverable 7).

Real ``flower-superlink`` (TLS, node authentication) started by the Coordinator; the site
is revoked with ``server.certs.revoke`` while the SuperLink runs.
"""

from __future__ import annotations

import pytest

from server.certs import revoke
from tests.test_federation_deploy import _certs, _coordinator_yaml
from tests.test_federation_util import free_port

pytestmark = pytest.mark.slow


def test_revoked_site_unregistered_from_the_running_superlink(tmp_path):
    from server.coordinate import Coordinator

    certs = _certs(tmp_path, ["hospital-a", "hospital-b"])
    coord = Coordinator(_coordinator_yaml(tmp_path, certs, free_port()))
    try:
        coord.start_superlink()
        nodes = coord.register_sites()
        assert coord.unregister_revoked() == []  # nothing changed
        assert revoke(certs, "hospital-b")
        assert coord.unregister_revoked() == ["hospital-b"]  # what `follow` does at every poll
        listed = {str(n["node-id"]): n for n in coord.flwr("supernode", "ls")["nodes"]}
        assert nodes["hospital-a"] in listed
        assert nodes["hospital-b"] not in listed or listed[nodes["hospital-b"]]["status"] == "unregistered"
        assert coord.unregister_revoked() == []  # once
    finally:
        coord.stop_superlink()
