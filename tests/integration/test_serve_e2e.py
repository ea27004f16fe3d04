"""``pgproxy serve`` as a user runs it: a subprocess configured only as the contract says.

A real Postgres, a real SMTP server (aiosmtpd) receiving the approval mail, a real driver whose
DDL is held inside its live session until a reviewer approves (or denies) through the emailed
link, then the audit read back and verified with the CLI after SIGTERM.
"""

from __future__ import annotations

import email
import email.policy
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiosmtpd.controller import Controller

from pgproxy.pgcluster import free_port

DB = "pgproxy_e2e"
LINK = re.compile(r"(http://[^\s]+/approvals/([\w-]+)\?t=([\w\-]+))")

RULES = """
agents:
  - name: triage-bot
    password: "s3cret"
    owner: carol@example.org
    approvers: [alice@example.org, bob@example.org]
analysts:
  - name: auditor
    password: "an0ther"
tags:
  public.patients.ssn: ssn
approvals:
  hold: [ddl, privilege]
  quorum: 1
  timeout_seconds: 120
"""


class _Inbox:
    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []
        self.cond = threading.Condition()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        with self.cond:
            self.messages.append(msg)
            self.cond.notify_all()
        return "250 OK"

    def wait_for(self, approval_count: int, timeout: float = 30) -> list[EmailMessage]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.messages) < approval_count:
                left = deadline - time.monotonic()
                assert left > 0, f"only {len(self.messages)} messages arrived"
                self.cond.wait(left)
            return list(self.messages)


def _link(msg: EmailMessage) -> tuple[str, str, str]:
    body = msg.get_body(preferencelist=("plain",))
    assert isinstance(body, EmailMessage)
    found = LINK.search(str(body.get_content()))
    assert found, "no review link in the mail"
    return found.group(1), found.group(2), found.group(3)


@dataclass
class Served:
    proc: subprocess.Popen[str]
    port: int
    http: int
    audit: Path
    inbox: _Inbox
    upstream: str
    output: list[str] = field(default_factory=list)

    def agent_dsn(self) -> str:
        return f"postgresql://triage-bot:s3cret@127.0.0.1:{self.port}/{DB}"

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http}{path}"


def _pgproxy(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgproxy", *args], capture_output=True, text=True, timeout=60, **kw
    )


@pytest.fixture(scope="module")
def served(pg_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DB}")
        conn.execute(f"CREATE DATABASE {DB}")
    upstream = pg_dsn.rsplit("/", 1)[0] + f"/{DB}"
    with psycopg.connect(upstream, autocommit=True) as conn:
        conn.execute("CREATE TABLE patients (id int PRIMARY KEY, ssn text)")
        conn.execute("INSERT INTO patients VALUES (1, '900-44-1111')")
    root = tmp_path_factory.mktemp("serve")
    (root / "rules").mkdir()
    (root / "rules" / "rules.yaml").write_text(RULES)
    inbox = _Inbox()
    smtp_port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=smtp_port)
    controller.start()
    port, http = free_port(), free_port()
    audit = root / "audit.duckdb"
    env = {**os.environ, "PGPROXY_UPSTREAM": upstream}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgproxy", "serve", "--listen", f"127.0.0.1:{port}",
         "--rules", str(root / "rules"), "--audit", str(audit), "--http", f"127.0.0.1:{http}",
         "--smtp", f"smtp://127.0.0.1:{smtp_port}", "--mail-from", "pgproxy@example.org"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    served = Served(proc, port, http, audit, inbox, upstream)
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    for line in proc.stdout:
        served.output.append(line)
        if "listening on" in line:
            break
        assert time.monotonic() < deadline, "".join(served.output)
    else:
        pytest.fail("pgproxy serve exited early:\n" + "".join(served.output))
    threading.Thread(target=lambda: served.output.extend(proc.stdout or []), daemon=True).start()
    try:
        yield served
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        controller.stop()


class _Agent(threading.Thread):
    """Runs one statement through the proxy in a thread: it blocks while held."""

    def __init__(self, dsn: str, sql: str) -> None:
        super().__init__(daemon=True)
        self.dsn, self.sql = dsn, sql
        self.error: psycopg.Error | None = None
        self.notices: list[str] = []
        self.started = threading.Event()

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.add_notice_handler(lambda d: self.notices.append(d.message_primary or ""))
            self.started.set()
            try:
                conn.execute(self.sql)
            except psycopg.Error as exc:
                self.error = exc


def _form(url: str) -> tuple[str, dict[str, str]]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        page = resp.read().decode()
    return page, dict(re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)">', page))


def _post(url: str, data: dict[str, str]) -> tuple[int, str]:
    req = urllib.request.Request(url, data=urllib.parse.urlencode(data).encode(), method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _table_exists(upstream: str, name: str) -> bool:
    with psycopg.connect(upstream) as conn:
        return conn.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone() == (True,)


def test_held_ddl_runs_once_after_approval(served: Served) -> None:
    already = len(served.inbox.messages)
    agent = _Agent(served.agent_dsn(), "CREATE TABLE approved_by_mail (id int)")
    agent.start()
    mails = served.inbox.wait_for(already + 2)[already:]
    assert {m["To"] for m in mails} == {"alice@example.org", "bob@example.org"}
    url, approval_id, _token = _link(mails[0])
    assert agent.is_alive(), "the agent's call must wait while the statement is held"
    # mail scanners fetch links: GET twice and HEAD change nothing
    page1, fields = _form(url)
    _form(url)
    urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=10).close()
    assert "CREATE TABLE approved_by_mail" in page1
    assert not _table_exists(served.upstream, "approved_by_mail")
    assert agent.is_alive()
    status, _ = _post(url, {**fields, "decision": "approve"})
    assert status == 200
    agent.join(30)
    assert not agent.is_alive() and agent.error is None
    assert any(approval_id in n for n in agent.notices), agent.notices
    assert _table_exists(served.upstream, "approved_by_mail")
    # the same link again: already decided
    status, page = _post(url, {**fields, "decision": "approve"})
    assert status == 409 and "already" in page.lower()


def test_denied_statement_fails_with_the_reason(served: Served) -> None:
    already = len(served.inbox.messages)
    agent = _Agent(served.agent_dsn(), "DROP TABLE patients")
    agent.start()
    mails = served.inbox.wait_for(already + 2)[already:]
    url, approval_id, _ = _link(mails[0])
    _page, fields = _form(url)
    status, _ = _post(url, {**fields, "decision": "deny"})
    assert status != 200  # a deny needs a reason
    status, _ = _post(
        url, {**fields, "decision": "deny", "reason": "patients is the system of record"}
    )
    assert status == 200
    agent.join(30)
    assert isinstance(agent.error, psycopg.errors.InsufficientPrivilege)
    text = str(agent.error)
    assert approval_id in text and "patients is the system of record" in text
    assert _table_exists(served.upstream, "patients")


def test_masked_reads_and_metrics(served: Served) -> None:
    with psycopg.connect(served.agent_dsn()) as conn:
        rows = conn.execute("SELECT id, ssn FROM patients").fetchall()
    assert rows and all(r[1] != "900-44-1111" for r in rows)
    with urllib.request.urlopen(served.url("/metrics"), timeout=10) as resp:
        metrics = resp.read().decode()
    assert re.search(r'pgproxy_statements_total\{decision="MASK"\} [1-9]', metrics)
    with urllib.request.urlopen(served.url("/healthz"), timeout=10) as resp:
        assert resp.status == 200


def test_analyst_reads_the_audit_while_serving(served: Served) -> None:
    time.sleep(1.5)  # ordinary records are durable within the 1 s flush interval
    out = _pgproxy("audit", "sql", "--http", f"127.0.0.1:{served.http}", "--format", "csv",
                   "SELECT status, count(*) AS n FROM approvals GROUP BY status ORDER BY status")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "executed" in out.stdout and "denied" in out.stdout  # approved, then run once
    out = _pgproxy("audit", "verify", "--http", f"127.0.0.1:{served.http}")
    assert out.returncode == 0 and "ok" in out.stdout, out.stdout + out.stderr
    dsn = f"postgresql://auditor:an0ther@127.0.0.1:{served.port}/audit"
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT decision, sql_redacted FROM statements").fetchall()
    assert rows and not any("900-44-1111" in (r[1] or "") for r in rows)
    with pytest.raises(psycopg.Error):
        psycopg.connect(f"postgresql://auditor:an0ther@127.0.0.1:{served.port}/{DB}")


def test_sigterm_flushes_and_the_audit_verifies(served: Served) -> None:
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(40) == 0
    out = _pgproxy("audit", "verify", "--audit", str(served.audit))
    assert out.returncode == 0, out.stdout + out.stderr
    out = _pgproxy("audit", "sql", "--audit", str(served.audit), "--format", "json",
                   "SELECT count(*) AS n FROM statements WHERE decision = 'MASK'")  # fmt: skip
    assert out.returncode == 0 and '"n": 0' not in out.stdout, out.stdout
