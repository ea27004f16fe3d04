"""pgbench through the proxy: initialise, then the select-only and TPC-B scripts in every
query mode (simple, extended, prepared), bounded by a transaction count."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from tests.integration.conftest import AGENT_PASSWORD, RunningProxy

PGBENCH = shutil.which("pgbench")
pytestmark = pytest.mark.skipif(PGBENCH is None, reason="pgbench is not installed")


def pgbench(p: RunningProxy, *args: str) -> subprocess.CompletedProcess[str]:
    assert PGBENCH is not None
    env = {**os.environ, "PGPASSWORD": AGENT_PASSWORD}
    return subprocess.run(
        [PGBENCH, "-h", p.host, "-p", str(p.port), "-U", "triage-bot", *args, "postgres"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


@pytest.fixture(scope="module")
def initialised(running_proxy: RunningProxy) -> Iterator[RunningProxy]:
    proc = pgbench(running_proxy, "-i", "-s", "1", "-q")
    assert proc.returncode == 0, proc.stderr
    assert "done" in proc.stderr
    yield running_proxy
    pgbench(running_proxy, "-i", "-I", "d")  # drop the pgbench tables again


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
@pytest.mark.parametrize("script", ["-S", "tpcb"])
def test_pgbench(initialised: RunningProxy, mode: str, script: str) -> None:
    args = ["-M", mode, "-c", "4", "-j", "2", "-t", "200"]
    if script == "-S":
        args.append("-S")
    proc = pgbench(initialised, *args)
    assert proc.returncode == 0, proc.stderr
    assert "number of failed transactions: 0" in proc.stdout
    assert "number of transactions actually processed: 800/800" in proc.stdout
