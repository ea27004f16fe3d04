"""The relay's fast lane end to end: psycopg through the real proxy and policy to Postgres.

The shapes the lane takes (an unnamed Parse with its Bind/Describe/Execute/Sync, the
Bind/Describe/Execute/Sync of a prepared statement, a simple Query) and one the server fails
are sent by a real driver; the client must get the right rows or error, and the audit must
record each statement with the right decision, class, row count and SQLSTATE.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import errors

from pgproxy.audit.records import MemorySink, StatementRecord
from pgproxy.policy.seam import Action, Verdict
from pgproxy.protocol.relay import Relay
from tests.integration._util import wait_until
from tests.integration.conftest import AGENT, AGENT_PASSWORD, ProxyThread, policy_proxy

DB = "pgproxy_lane_test"
RULES = f"""
agents:
  - name: {AGENT}
    password: "{AGENT_PASSWORD}"
    owner: carol@example.org
approvals:
  hold: [ddl, privilege]
"""


@pytest.fixture(scope="module")
def lane_db(pg_cluster: object, pg_dsn: str) -> str:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DB}")
        conn.execute(f"CREATE DATABASE {DB}")
    dsn = pg_dsn.rsplit("/", 1)[0] + f"/{DB}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE scratch (id int PRIMARY KEY, note text)")
        conn.execute("INSERT INTO scratch VALUES (1, 'one'), (2, 'two'), (3, 'three')")
    return dsn


@pytest.fixture(scope="module")
def lane_proxy(
    lane_db: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ProxyThread, MemorySink]]:
    rules_dir: Path = tmp_path_factory.mktemp("lane-rules")
    (rules_dir / "rules.yaml").write_text(RULES)
    audit = MemorySink()
    thread = policy_proxy(lane_db, rules_dir, audit=audit)
    try:
        yield thread, audit
    finally:
        thread.stop()


def test_lane_shapes_from_psycopg_are_answered_and_audited(
    lane_proxy: tuple[ProxyThread, MemorySink], monkeypatch: pytest.MonkeyPatch
) -> None:
    thread, audit = lane_proxy
    taken: list[tuple[int, Verdict, int]] = []
    fast_result = Relay.fast_result

    def counting(self: Relay, data: bytes) -> tuple[int, Verdict, int] | None:
        done = fast_result(self, data)
        if done is not None:
            taken.append(done)
        return done

    monkeypatch.setattr(Relay, "fast_result", counting)
    dsn = f"postgresql://{AGENT}:{AGENT_PASSWORD}@{thread.host}:{thread.port}/{DB}"
    before = len(audit.records)
    with psycopg.connect(dsn, autocommit=True) as conn:
        # Parse of the unnamed statement, Bind, Describe, Execute, Sync
        by_id = "SELECT id, note FROM scratch WHERE id = %s"
        assert conn.execute(by_id, (2,)).fetchall() == [(2, "two")]
        # prepared: Parse of a named statement and Sync, then Bind/Describe/Execute/Sync
        from_id = "SELECT id, note FROM scratch WHERE id >= %s ORDER BY id"
        assert conn.execute(from_id, (2,), prepare=True).fetchall() == [(2, "two"), (3, "three")]
        assert conn.execute(from_id, (1,), prepare=True).fetchall() == [
            (1, "one"),
            (2, "two"),
            (3, "three"),
        ]
        # no rows to describe (NoData)
        cur = conn.execute("UPDATE scratch SET note = %s WHERE id = %s", ("uno", 1))
        assert cur.rowcount == 1
        # a simple Query (client-side binding)
        simple = psycopg.ClientCursor(conn)
        assert simple.execute("SELECT count(*) FROM scratch").fetchall() == [(3,)]
        # the server fails it: the client gets the error, the audit its SQLSTATE
        with pytest.raises(errors.DivisionByZero):
            conn.execute("SELECT id / %s FROM scratch WHERE id = 1", (0,))
        with pytest.raises(errors.DivisionByZero):
            conn.execute(from_id.replace("id >=", "id / 0 >="), (1,), prepare=True)
        assert conn.execute(by_id, (1,)).fetchall() == [(1, "uno")]  # the session goes on

    expected = [
        ("select", 1, ""),
        ("select", 2, ""),
        ("select", 3, ""),
        ("update", 0, ""),
        ("select", 1, ""),
        ("select", 0, "22012"),
        ("select", 0, "22012"),
        ("select", 1, ""),
    ]

    def records() -> list[StatementRecord]:
        return [r for r in audit.records[before:] if isinstance(r, StatementRecord)]

    assert wait_until(lambda: len(records()) >= len(expected))
    got = records()
    assert [(r.statement_class, r.rows, r.sqlstate) for r in got] == expected
    assert all(r.decision == Action.ALLOW.value and r.agent == AGENT for r in got)
    assert all("scratch" in r.sql_redacted for r in got)
    assert len({r.statement_id for r in got}) == len(got)
    # the lane carried some of them (a read may split an answer, so not necessarily all)
    assert taken
    assert all(verdict.action is Action.ALLOW for _sid, verdict, _rows in taken)
