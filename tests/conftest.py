"""Fixtures shared by the test modules that run a real pool service."""
from __future__ import annotations

import pytest

from tests.pool_support import Pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """One federation per test module (tests.pool_support.Pki: CA, sites, reader, a foreign CA)."""
    return Pki(tmp_path_factory.mktemp("pki"))
