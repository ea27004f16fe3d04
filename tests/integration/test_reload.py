"""SIGHUP reloads the rules of a running ``pgproxy serve``, and only rules that validate.

A ``pgproxy serve`` subprocess starts with one agent. A second rules file adding an agent is
written and the process gets SIGHUP: the new agent can log in. The file is then broken (an
unknown key at a known line) and SIGHUP sent again: the previous rules stay in force (the new
agent still logs in) and the log names the file and line. A last valid reload removes the agent
again. Throughout, /healthz and /metrics answer, and the audit's ``policy_events`` view, read
through the running server with ``pgproxy audit sql --http``, shows each reload and failure.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgproxy.pgcluster import free_port

RULES = """
agents:
  - name: triage-bot
    password: "s3cret"
approvals:
  hold: [ddl, privilege]
"""
NEW_AGENT = """agents:
  - name: reload-bot
    password: "n3w-agent"
"""
#: the same file with an unknown key on line 4
BROKEN = NEW_AGENT + "    colour: blue\n"


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    port: int
    http: int
    rules: Path
    output: bytearray = field(default_factory=bytearray)
    cond: threading.Condition = field(default_factory=threading.Condition)

    def pump(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while chunk := os.read(fd, 65536):
            with self.cond:
                self.output += chunk
                self.cond.notify_all()

    def text(self) -> str:
        with self.cond:
            return self.output.decode(errors="replace")

    def wait_for(self, needle: str, count: int = 1, timeout: float = 30) -> str:
        """The output once ``needle`` occurs ``count`` times in it."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while (text := self.output.decode(errors="replace")).count(needle) < count:
                left = deadline - time.monotonic()
                assert left > 0 and self.proc.poll() is None, f"no {needle!r} in:\n{text}"
                self.cond.wait(left)
            return text

    def reload(self, needle: str) -> str:
        """SIGHUP, then the log line containing ``needle`` that it caused."""
        before = self.text().count(needle)
        self.proc.send_signal(signal.SIGHUP)
        text = self.wait_for(needle, before + 1)
        return [line for line in text.splitlines() if needle in line][before]

    def login(self, user: str, password: str) -> int:
        dsn = f"postgresql://{user}:{password}@127.0.0.1:{self.port}/postgres"
        with psycopg.connect(dsn, connect_timeout=10) as conn:
            row = conn.execute("SELECT 40 + 2").fetchone()
        assert row is not None
        return int(row[0])

    def refused(self, user: str, password: str) -> bool:
        try:
            self.login(user, password)
        except psycopg.OperationalError as exc:
            return "password authentication failed" in str(exc)
        return False

    def get(self, path: str) -> tuple[int, str]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}{path}", timeout=10) as resp:
            return resp.status, resp.read().decode()


@pytest.fixture(scope="module")
def served(pg_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("reload")
    rules = root / "rules"
    rules.mkdir()
    (rules / "rules.yaml").write_text(RULES)
    port, http = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGPROXY_")}
    env["PGPROXY_UPSTREAM"] = pg_dsn
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgproxy", "serve", "--listen", f"127.0.0.1:{port}",
         "--rules", str(rules), "--audit", str(root / "audit.duckdb"),
         "--audit-on-full", "spill", "--audit-flush-seconds", "0.5",
         "--http", f"127.0.0.1:{http}", "--drain-seconds", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    s = Served(proc, port, http, rules)
    threading.Thread(target=s.pump, daemon=True).start()
    try:
        s.wait_for("listening on", timeout=60)
        yield s
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@dataclass
class Steps:
    """What each step observed."""

    refused_before: bool
    valid_reload_log: str
    logs_in_after_valid: int
    failed_reload_log: str
    logs_in_after_invalid: int
    old_agent_after_invalid: int
    removal_reload_log: str
    refused_after_removal: bool
    still_serving: bool


@pytest.fixture(scope="module")
def steps(served: Served) -> Steps:
    extra = served.rules / "more-agents.yaml"
    refused_before = served.refused("reload-bot", "n3w-agent")
    extra.write_text(NEW_AGENT)
    valid = served.reload("rules reloaded")
    logs_in = served.login("reload-bot", "n3w-agent")
    extra.write_text(BROKEN)
    failed = served.reload("rules reload failed")
    logs_in_after_invalid = served.login("reload-bot", "n3w-agent")
    old_agent = served.login("triage-bot", "s3cret")
    extra.unlink()
    removal = served.reload("rules reloaded")
    refused_after = served.refused("reload-bot", "n3w-agent")
    return Steps(
        refused_before=refused_before,
        valid_reload_log=valid,
        logs_in_after_valid=logs_in,
        failed_reload_log=failed,
        logs_in_after_invalid=logs_in_after_invalid,
        old_agent_after_invalid=old_agent,
        removal_reload_log=removal,
        refused_after_removal=refused_after,
        still_serving=served.proc.poll() is None,
    )


def test_a_valid_reload_admits_the_new_agent(steps: Steps) -> None:
    assert steps.refused_before, "the agent must not exist before the reload"
    assert steps.logs_in_after_valid == 42
    assert steps.still_serving


def test_an_invalid_reload_keeps_the_previous_rules(steps: Steps) -> None:
    assert steps.logs_in_after_invalid == 42
    assert steps.old_agent_after_invalid == 42
    # the log says why, with file:line
    assert "keeping the previous rules" in steps.failed_reload_log
    assert re.search(r"more-agents\.yaml:4\b", steps.failed_reload_log), steps.failed_reload_log
    assert "colour" in steps.failed_reload_log


def test_a_later_valid_reload_still_applies(steps: Steps) -> None:
    assert steps.refused_after_removal


def test_health_and_metrics_answer(served: Served, steps: Steps) -> None:
    status, body = served.get("/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, metrics = served.get("/metrics")
    assert status == 200
    failures = re.search(r"^pgproxy_auth_failures_total (\d+)", metrics, re.M)
    assert failures and int(failures.group(1)) >= 2  # before the reload and after the removal
    connections = re.search(r"^pgproxy_connections_total (\d+)", metrics, re.M)
    assert connections and int(connections.group(1)) >= 5


def _audit_sql(served: Served, sql: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        [sys.executable, "-m", "pgproxy", "audit", "sql", "--http", f"127.0.0.1:{served.http}",
         "--format", "json", sql],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert isinstance(rows, list)
    return rows


def test_policy_events_record_every_reload(served: Served, steps: Steps) -> None:
    deadline = time.monotonic() + 15
    while True:  # ordinary audit records are written within the 1 s flush interval
        events = _audit_sql(served, "SELECT event, detail FROM policy_events ORDER BY seq")
        if len(events) >= 4 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert [e["event"] for e in events] == ["loaded", "reloaded", "reload_failed", "reloaded"]
    assert events[1]["detail"].startswith("2 ") and events[3]["detail"].startswith("1 ")  # agents
    assert "colour" in events[2]["detail"]
