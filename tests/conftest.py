"""Shared fixtures: a real PostgreSQL for every integration test.

``PGPROXY_TEST_DSN`` (a superuser DSN) is used when set; otherwise a throwaway cluster is
started from the Postgres binaries on this machine and removed at the end of the run. Tests that
need a database skip with the reason when neither is available.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgproxy.pgcluster import Cluster, ClusterUnavailable


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster | None]:
    """The throwaway cluster, or None when PGPROXY_TEST_DSN points elsewhere."""
    if os.environ.get("PGPROXY_TEST_DSN"):
        yield None
        return
    base = Path(tempfile.mkdtemp(prefix="pgproxy-test-pg-"))
    try:
        cluster = Cluster.create(base)
    except ClusterUnavailable as exc:
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(f"no PostgreSQL available: {exc}")
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_dsn(pg_cluster: Cluster | None) -> str:
    """A superuser DSN to a real PostgreSQL."""
    if pg_cluster is None:
        return os.environ["PGPROXY_TEST_DSN"]
    return pg_cluster.dsn()
