"""Bulk exports of tagged data: the planner estimate holds a big SELECT before it runs, the row
limit stops a stream that passes it, the same statement run again asks for an approval, and an
approved bulk export returns every row — still masked."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from pgproxy.protocol.relay import HoldRequested
from pgproxy.server.holds import HoldContext, HoldOutcome
from tests.integration._util import RawConn, message, startup_packet
from tests.integration.conftest import ProxyThread
from tests.integration.conftest import policy_proxy as start_policy_proxy

DB = "pgproxy_bulk_test"
ROWS = 40
LIMIT = 10
RULES = f"""
agents:
  - name: triage-bot
    password: "s3cret"
    approvers: [alice@example.org]
tags:
  public.people.ssn: ssn
approvals:
  hold: [bulk_export]
  bulk_export_rows: {LIMIT}
"""


class Reviewer:
    """Approves or denies every hold and remembers what it was asked."""

    def __init__(self) -> None:
        self.approve = True
        self.asked: list[tuple[str, int | None]] = []

    async def hold(self, ctx: HoldContext, held: HoldRequested) -> HoldOutcome:
        self.asked.append((held.verdict.hold_class or "", ctx.estimated_rows))
        if self.approve:
            return HoldOutcome(True, "", "apr-1")
        return HoldOutcome(False, "approval apr-2 denied: too much", "apr-2")

    async def executed(self, approval_id: str, rows: int, sqlstate: str) -> None:
        return None


@pytest.fixture(scope="module")
def bulk_db(pg_cluster: object, pg_dsn: str) -> str:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DB}")
        conn.execute(f"CREATE DATABASE {DB}")
    dsn = pg_dsn.rsplit("/", 1)[0] + f"/{DB}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE people (id int PRIMARY KEY, ssn text)")
        conn.execute(
            "INSERT INTO people SELECT i, '900-00-' || lpad(i::text, 4, '0') "
            f"FROM generate_series(1, {ROWS}) i"
        )
        conn.execute("ANALYZE people")
    return dsn


def _proxy(dsn: str, root: Path, reviewer: Reviewer, estimates: bool) -> ProxyThread:
    (root / "rules.yaml").write_text(RULES)
    thread = start_policy_proxy(dsn, root, holds=reviewer)
    if not estimates:
        thread.proxy.estimate = None
    return thread


@pytest.fixture
def reviewer() -> Reviewer:
    return Reviewer()


@pytest.fixture
def estimating(bulk_db: str, tmp_path: Path, reviewer: Reviewer) -> Iterator[ProxyThread]:
    t = _proxy(bulk_db, tmp_path, reviewer, estimates=True)
    yield t
    t.stop()


@pytest.fixture
def not_estimating(bulk_db: str, tmp_path: Path, reviewer: Reviewer) -> Iterator[ProxyThread]:
    t = _proxy(bulk_db, tmp_path, reviewer, estimates=False)
    yield t
    t.stop()


def _dsn(t: ProxyThread) -> str:
    return f"postgresql://triage-bot:s3cret@{t.host}:{t.port}/{DB}"


def test_planner_estimate_holds_and_approval_lifts_the_limit(
    estimating: ProxyThread, reviewer: Reviewer
) -> None:
    with psycopg.connect(_dsn(estimating), autocommit=True) as conn:
        small = conn.execute("SELECT id, ssn FROM people WHERE id <= 3").fetchall()
        assert len(small) == 3 and reviewer.asked == []  # under the limit: no review
        rows = conn.execute("SELECT id, ssn FROM people").fetchall()
    assert len(rows) == ROWS  # approved: every row
    assert all(r[1] != f"900-00-{r[0]:04d}" for r in rows)  # and still masked
    assert reviewer.asked[0][0] == "bulk_export"
    estimated = reviewer.asked[0][1]
    assert estimated is not None and estimated > LIMIT


def test_denied_bulk_export_fails_with_the_reason(
    estimating: ProxyThread, reviewer: Reviewer
) -> None:
    reviewer.approve = False
    with psycopg.connect(_dsn(estimating), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="too much"):
            conn.execute("SELECT ssn FROM people")
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_row_limit_stops_the_stream_and_a_retry_asks(
    not_estimating: ProxyThread, reviewer: Reviewer
) -> None:
    sql = "SELECT id, ssn FROM people ORDER BY id"
    with psycopg.connect(_dsn(not_estimating), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="bulk export"):
            conn.execute(sql).fetchall()
        assert reviewer.asked == []
        assert conn.execute("SELECT count(*) FROM people").fetchone() == (ROWS,)
        rows = conn.execute(sql).fetchall()  # the same statement again: reviewed, approved
    assert [h for h, _ in reviewer.asked] == ["bulk_export"]
    assert len(rows) == ROWS


def test_row_limit_in_the_extended_protocol(
    not_estimating: ProxyThread, reviewer: Reviewer
) -> None:
    with psycopg.connect(_dsn(not_estimating), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="bulk export"):
            conn.execute("SELECT ssn FROM people WHERE id > %s", (0,)).fetchall()
        # the session stays in step after the stop
        assert conn.execute("SELECT %s::int + 1", (1,)).fetchone() == (2,)
        rows = conn.execute("SELECT ssn FROM people WHERE id > %s", (0,)).fetchall()
    assert len(rows) == ROWS


def _count(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as direct:
        row = direct.execute("SELECT count(*) FROM people").fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.parametrize(
    "sql",
    [
        "DELETE FROM people WHERE id > 0 RETURNING ssn",
        "SELECT ssn FROM people; DELETE FROM people WHERE id > 0",
        "WITH gone AS (DELETE FROM people WHERE id > 0 RETURNING ssn) SELECT ssn FROM gone",
    ],
)
def test_a_stopped_query_changes_nothing(
    not_estimating: ProxyThread, reviewer: Reviewer, bulk_db: str, sql: str
) -> None:
    """The agent is told its statement failed at the row limit: as with any failed statement,
    nothing it did (nor anything after it in the same query string) may be committed."""
    with psycopg.connect(_dsn(not_estimating), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="bulk export"):
            cur = conn.execute(sql, prepare=False)
            while cur.nextset():
                pass
        assert conn.execute("SELECT 40 + 2").fetchone() == (42,)
    assert _count(bulk_db) == ROWS
    assert reviewer.asked == []


def test_a_stop_inside_a_transaction_fails_the_transaction(
    not_estimating: ProxyThread, bulk_db: str
) -> None:
    with psycopg.connect(_dsn(not_estimating)) as conn:
        conn.execute("INSERT INTO people (id) VALUES (1001)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="bulk export"):
            conn.execute("SELECT ssn FROM people", prepare=False).fetchall()
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.commit()  # of a failed transaction: a rollback, as Postgres would have it
    assert _count(bulk_db) == ROWS


def test_a_changing_query_under_the_limit_is_committed(
    not_estimating: ProxyThread, bulk_db: str
) -> None:
    with psycopg.connect(_dsn(not_estimating), autocommit=True) as conn:
        got = conn.execute(
            "INSERT INTO people (id) VALUES (2001), (2002) RETURNING ssn", prepare=False
        ).fetchall()
        assert got == [(None,), (None,)]
        conn.execute("DELETE FROM people WHERE id > 2000")
    assert _count(bulk_db) == ROWS


def _raw(t: ProxyThread) -> RawConn:
    raw = RawConn(t.host, t.port, timeout=20)
    raw.send(startup_packet({"user": "triage-bot", "database": DB}))
    raw.login("triage-bot", "s3cret")
    return raw


def _rows(msgs: list[tuple[bytes, bytes]]) -> int:
    return [tag for tag, _ in msgs].count(b"D")


def test_the_row_limit_counts_across_executes_of_a_suspended_portal(
    not_estimating: ProxyThread,
) -> None:
    raw = _raw(not_estimating)
    try:
        raw.query("BEGIN")
        sql = b"SELECT id, ssn FROM people ORDER BY id"
        raw.send(
            message(b"P", b"\x00" + sql + b"\x00\x00\x00")
            + message(b"B", b"lim\x00\x00" + struct.pack("!hhh", 0, 0, 0))
            + message(b"S", b"")
        )
        raw.read_until_ready()
        got = 0
        for _ in range(ROWS // LIMIT):
            raw.send(message(b"E", b"lim\x00" + struct.pack("!i", LIMIT)) + message(b"S", b""))
            got += _rows(raw.read_until_ready())
        assert got <= LIMIT
        raw.query("ROLLBACK")
    finally:
        raw.close()


def test_the_row_limit_counts_across_fetches_of_a_cursor(not_estimating: ProxyThread) -> None:
    raw = _raw(not_estimating)
    try:
        raw.query("BEGIN")
        raw.query("DECLARE limc CURSOR FOR SELECT id, ssn FROM people ORDER BY id")
        got = sum(_rows(raw.query(f"FETCH {LIMIT} FROM limc")) for _ in range(ROWS // LIMIT))
        assert got <= LIMIT
        raw.query("ROLLBACK")
    finally:
        raw.close()
