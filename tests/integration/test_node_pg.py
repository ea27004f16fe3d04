"""node-postgres (``pg`` from npm) through the proxy: a query, a parameterised and a named
prepared query, a binary result, and an error followed by recovery.

``npm install`` runs into ``tests/integration/node/`` at test time when ``node_modules`` is
absent; the test skips with the reason when node/npm is missing or the install fails (offline).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.integration.conftest import AGENT, AGENT_PASSWORD, RunningProxy

NODE_DIR = Path(__file__).parent / "node"
NODE, NPM = shutil.which("node"), shutil.which("npm")


@pytest.fixture(scope="module")
def node_pg() -> Path:
    if NODE is None or NPM is None:
        pytest.skip("node/npm are not installed")
    if not (NODE_DIR / "node_modules" / "pg").is_dir():
        try:
            proc = subprocess.run(
                [NPM, "install", "--no-audit", "--no-fund", "--loglevel=error"],
                cwd=NODE_DIR, capture_output=True, text=True, timeout=180,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            pytest.skip("npm install timed out (offline?)")
        if proc.returncode != 0:
            pytest.skip(f"npm install failed (offline?): {proc.stderr.strip()[-300:]}")
    return NODE_DIR / "query.js"


@pytest.mark.timeout(240)
def test_node_postgres(node_pg: Path, running_proxy: RunningProxy) -> None:
    assert NODE is not None
    env = {
        **os.environ,
        "PGHOST": running_proxy.host,
        "PGPORT": str(running_proxy.port),
        "PGUSER": AGENT,
        "PGPASSWORD": AGENT_PASSWORD,
        "PGDATABASE": "postgres",
    }
    proc = subprocess.run([NODE, str(node_pg)], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["simple"] == {"answer": 42, "name": "Fake Name"}
    assert out["param"] == {"next": 42, "label": "héllo"}
    assert out["prepared"] == [2, 4, 6]
    assert out["binary"] == "41424344"  # the int4's binary bytes, not its text digits
    assert out["error"]["code"] == "42P01"
    assert "pgproxy_no_such_table" in out["error"]["message"]
    assert out["after"] == "recovered"
