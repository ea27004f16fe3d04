"""node-postgres (``pg`` from npm) through the proxy: a query, a parameterised and a named
prepared query, a binary result, and an error followed by recovery.

``npm install`` runs into ``tests/integration/node/`` at test time when ``node_modules`` is
absent; the test skips with the reason when node/npm is missing or the install fails (offline).
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.integration._util import NODE_DIR, node_with_pg
from tests.integration.conftest import AGENT, AGENT_PASSWORD, RunningProxy


@pytest.fixture(scope="module")
def node_pg() -> str:
    return node_with_pg()


@pytest.mark.timeout(240)
def test_node_postgres(node_pg: str, running_proxy: RunningProxy) -> None:
    env = {
        **os.environ,
        "PGHOST": running_proxy.host,
        "PGPORT": str(running_proxy.port),
        "PGUSER": AGENT,
        "PGPASSWORD": AGENT_PASSWORD,
        "PGDATABASE": "postgres",
    }
    script = str(NODE_DIR / "query.js")
    proc = subprocess.run([node_pg, script], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["simple"] == {"answer": 42, "name": "Fake Name"}
    assert out["param"] == {"next": 42, "label": "héllo"}
    assert out["prepared"] == [2, 4, 6]
    assert out["binary"] == "41424344"  # the int4's binary bytes, not its text digits
    assert out["error"]["code"] == "42P01"
    assert "pgproxy_no_such_table" in out["error"]["message"]
    assert out["after"] == "recovered"
