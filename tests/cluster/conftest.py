"""Fixtures for the cluster/ tests. Nothing here starts Ray: the multi-node rehearsal runs its
cluster in a child process (rehearsal_cluster.py) so it never meets the session-wide `ray_local`."""

from __future__ import annotations

import pytest

from tests.cluster.cluster_helpers import CLUSTER, cluster_package


@pytest.fixture(scope="session")
def roles() -> tuple[str, dict]:
    """(node label key, role table) from cluster/resources.yaml."""
    return cluster_package().load_roles(CLUSTER / "resources.yaml")
