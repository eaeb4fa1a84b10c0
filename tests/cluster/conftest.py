"""Fixtures of the cluster suite: two real nodes on one throwaway PostgreSQL database."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support.postgres import PostgresServer

from .nodes import Cluster


@pytest.fixture(scope="session")
def _cluster(tmp_path_factory: pytest.TempPathFactory, postgres_server: PostgresServer) -> Iterator[Cluster]:
    """The session's two nodes on a database of their own; every node stopped at the end."""
    cluster = Cluster(tmp_path_factory.mktemp("cluster"), postgres_server.create_database("cluster"))
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def cluster(_cluster: Cluster) -> Cluster:
    """Both nodes up with a ready sandbox each and an empty queue, whatever the last test did to them."""
    _cluster.ensure()
    return _cluster
