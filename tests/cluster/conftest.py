"""Fixtures of the cluster suite: two real nodes on one throwaway PostgreSQL database."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
from support.postgres import PostgresServer

from .nodes import Cluster


@pytest.fixture(scope="session", autouse=True)
def _podman_on_path() -> None:
    """Skip the cluster suite, and only it, on a machine without Podman."""
    if shutil.which("podman") is None:
        pytest.skip("podman is not on PATH: the cluster tests need a real Podman")


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
