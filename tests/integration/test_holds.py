"""Held statements inside live sessions, with the real approval service behind the proxy:
cancel and disconnect withdraw the request, other sessions go on, and ``reply: error`` answers
at once and releases the identical statement once after approval."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgproxy.approvals.mail import LogNotifier
from pgproxy.approvals.service import ApprovalService
from pgproxy.approvals.store import ApprovalRecord, ApprovalStatus, SqliteApprovalStore
from pgproxy.audit.records import MemorySink
from pgproxy.rules import load_rules
from pgproxy.server.holds import ApprovalHolds
from pgproxy.server.policy_hub import PolicyHub
from pgproxy.server.proxy import Proxy, ProxyConfig
from pgproxy.server.upstream import parse_dsn
from tests.integration.conftest import ProxyThread

DB = "pgproxy_holds_test"
RULES = """
agents:
  - name: triage-bot
    password: "s3cret"
    owner: carol@example.org
    approvers: [alice@example.org]
approvals:
  hold: [ddl]
  timeout_seconds: 60
  reply: {reply}
"""


class Held:
    def __init__(self, thread: ProxyThread, service: ApprovalService) -> None:
        self.thread, self.service = thread, service

    def run(self, coro_fn: Callable[[], Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro_fn(), self.thread.loop).result(30)

    def requests(self, status: ApprovalStatus | None = None) -> list[ApprovalRecord]:
        return list(self.run(lambda: self.service.store.list_requests(status)))

    def wait_pending(self, n: int = 1, timeout: float = 15) -> list[ApprovalRecord]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pending = self.requests(ApprovalStatus.PENDING)
            if len(pending) >= n:
                return pending
            time.sleep(0.05)
        raise AssertionError("no pending approval appeared")

    def dsn(self) -> str:
        return f"postgresql://triage-bot:s3cret@{self.thread.host}:{self.thread.port}/{DB}"


@pytest.fixture(scope="module")
def holds_db(pg_cluster: object, pg_dsn: str) -> str:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DB}")
        conn.execute(f"CREATE DATABASE {DB}")
    return pg_dsn.rsplit("/", 1)[0] + f"/{DB}"


def _start(dsn: str, root: Path, reply: str) -> Held:
    (root / "rules").mkdir()
    (root / "rules" / "r.yaml").write_text(RULES.format(reply=reply))
    rules = load_rules(root / "rules")
    hub = PolicyHub(rules, dsn)
    audit = MemorySink()
    service = ApprovalService(
        SqliteApprovalStore(root / "approvals.sqlite"), rules, LogNotifier(), audit, "http://x"
    )
    proxy = Proxy(
        ProxyConfig(upstream=parse_dsn(dsn), port=0),
        rules,
        audit=audit,
        policy_factory=hub.session_policy,
        holds=ApprovalHolds(service, lambda: rules),
    )
    proxy.after_ddl = hub.schedule_refresh
    proxy.closers.append(hub.close)
    thread = ProxyThread(proxy)
    held = Held(thread, service)
    held.run(service.start)
    assert held.run(hub.refresh)
    return held


@pytest.fixture
def waiting(holds_db: str, tmp_path: Path) -> Iterator[Held]:
    h = _start(holds_db, tmp_path, "wait")
    yield h
    h.run(h.service.close)
    h.thread.stop()


@pytest.fixture
def replying(holds_db: str, tmp_path: Path) -> Iterator[Held]:
    h = _start(holds_db, tmp_path, "error")
    yield h
    h.run(h.service.close)
    h.thread.stop()


class Agent(threading.Thread):
    def __init__(self, dsn: str, sql: str) -> None:
        super().__init__(daemon=True)
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.sql = sql
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.conn.execute(self.sql)
        except BaseException as exc:
            self.error = exc


def test_cancel_while_held_withdraws(waiting: Held) -> None:
    agent = Agent(waiting.dsn(), "CREATE TABLE cancelled_one (id int)")
    agent.start()
    (pending,) = waiting.wait_pending()
    # another session is not blocked by the held one
    with psycopg.connect(waiting.dsn()) as other:
        assert other.execute("SELECT 5").fetchone() == (5,)
    agent.conn.cancel_safe()  # the non-blocking cancel: the proxy runs in this process
    agent.join(15)
    assert not agent.is_alive()
    assert isinstance(agent.error, psycopg.errors.InsufficientPrivilege)
    assert "cancelled" in str(agent.error)
    # the session is usable after the cancelled hold
    assert agent.conn.execute("SELECT 6").fetchone() == (6,)
    agent.conn.close()
    deadline = time.monotonic() + 10
    while (
        waiting.run(lambda: waiting.service.store.get(pending.approval_id)).status
        is ApprovalStatus.PENDING
    ):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    rec = waiting.run(lambda: waiting.service.store.get(pending.approval_id))
    assert rec.status is ApprovalStatus.WITHDRAWN


def test_disconnect_while_held_withdraws(waiting: Held) -> None:
    agent = Agent(waiting.dsn(), "CREATE TABLE gone_one (id int)")
    agent.start()
    (pending,) = waiting.wait_pending()
    agent.conn.pgconn.finish()  # the client vanishes without a word
    deadline = time.monotonic() + 10
    while True:
        rec = waiting.run(lambda: waiting.service.store.get(pending.approval_id))
        if rec.status is not ApprovalStatus.PENDING:
            break
        assert time.monotonic() < deadline, "the request was not withdrawn"
        time.sleep(0.05)
    assert rec.status is ApprovalStatus.WITHDRAWN


def test_reply_error_releases_the_identical_statement_once(replying: Held) -> None:
    sql = "CREATE TABLE released_once (id int)"
    with psycopg.connect(replying.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as first:
            conn.execute(sql)
        (pending,) = replying.requests(ApprovalStatus.PENDING)
        assert pending.approval_id in str(first.value)
        result = replying.run(
            lambda: replying.service.decide(pending.approval_id, "alice@example.org", "approve", "")
        )
        assert result.accepted, result
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(sql.replace("released_once", "something_else"))  # not what was approved
        conn.execute(sql)  # the identical statement runs
        assert conn.execute("SELECT to_regclass('released_once') IS NOT NULL").fetchone() == (True,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DROP TABLE released_once")  # a different statement: held anew
        with pytest.raises(psycopg.Error):
            conn.execute(sql)  # single use: a second run is a new request
