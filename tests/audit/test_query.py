"""Read-only analyst queries: the guard, running on a file, rendering, and the contract views."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import duckdb
import pytest

from pgproxy.audit.query import (
    AuditQueryError,
    QueryRejected,
    QueryResult,
    check_read_only,
    format_result,
    run_query,
)
from pgproxy.audit.sink import DuckDBSink

from .conftest import KEY, sample_records

CONTRACT = {
    "sessions": "session_id agent client_addr database application_name started_at ended_at",
    "statements": "statement_id session_id ts agent statement_class fingerprint sql_redacted "
    "decision masked_columns rows duration_ms sqlstate",
    "approvals": "approval_id statement_id agent requested_at status decided_at decided_by "
    "reason expires_at",
}
EXTRA = {
    "sessions": "auth_outcome tls bytes_from_client bytes_to_client",
    "statements": "reasons relations columns tags approval_id",
    "approval_events": "approval_id ts event actor reason detail",
    "policy_events": "ts event detail",
}


@pytest.fixture(scope="module")
def populated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import asyncio

    path = tmp_path_factory.mktemp("q") / "audit.duckdb"

    async def fill() -> None:
        async with DuckDBSink(path, signing_key=KEY) as sink:
            for rec in sample_records():
                await sink.emit(rec)

    asyncio.run(fill())
    return path


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 1",
        "  with x as (select 1 as a) select * from x",
        "SHOW TABLES",
        "DESCRIBE statements",
        "EXPLAIN SELECT * FROM statements",
        "FROM sessions",
        "SELECT 1;",
    ],
)
def test_read_queries_pass_the_guard(sql: str) -> None:
    check_read_only(sql)


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO log_statement SELECT * FROM log_statement",
        "DELETE FROM log_statement",
        "UPDATE log_statement SET decision = 'ALLOW'",
        "DROP TABLE log_statement",
        "CREATE TABLE x AS SELECT 1",
        "SELECT 1; DELETE FROM log_statement",
        "COPY log_statement TO 'out.csv'",
        "ATTACH 'other.duckdb'",
        "SET enable_external_access = true",
        "PRAGMA database_list",
        "EXPLAIN ANALYZE DELETE FROM log_statement",
        "CALL pragma_version()",
        "INSTALL httpfs",
        "",
        "SELEC 1",
    ],
)
def test_writes_and_other_statements_are_rejected(sql: str) -> None:
    with pytest.raises(QueryRejected):
        check_read_only(sql)


def test_run_query_on_file(populated: Path) -> None:
    result = run_query(
        populated, "SELECT agent, count(*) AS n FROM statements GROUP BY 1 ORDER BY 1"
    )
    assert result.columns == ("agent", "n")
    assert result.rows == (("billing-bot", 2), ("triage-bot", 2))


def test_run_query_rejects_writes_and_leaves_file_unchanged(populated: Path) -> None:
    before = run_query(populated, "SELECT count(*) FROM statements").rows
    with pytest.raises(QueryRejected):
        run_query(populated, "DELETE FROM log_statement")
    assert run_query(populated, "SELECT count(*) FROM statements").rows == before


def test_run_query_cannot_read_other_files(populated: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.csv"
    secret.write_text("a\nfake-secret\n")
    with pytest.raises(AuditQueryError, match="disabled"):
        run_query(populated, f"SELECT * FROM read_csv('{secret}')")


def test_sql_error_is_audit_query_error(populated: Path) -> None:
    with pytest.raises(AuditQueryError, match="no_such_table"):
        run_query(populated, "SELECT * FROM no_such_table")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(AuditQueryError, match="no audit file"):
        run_query(tmp_path / "nope.duckdb", "SELECT 1")


def test_max_rows_truncates(populated: Path) -> None:
    result = run_query(populated, "SELECT * FROM range(10)", max_rows=3)
    assert len(result.rows) == 3 and result.truncated


@pytest.mark.parametrize("view", sorted(CONTRACT | EXTRA))
def test_views_have_contract_columns(populated: Path, view: str) -> None:
    with duckdb.connect(str(populated), read_only=True) as conn:
        cols = {r[0] for r in conn.execute(f"DESCRIBE {view}").fetchall()}
    wanted = set(CONTRACT.get(view, "").split()) | set(EXTRA.get(view, "").split())
    assert wanted <= cols, wanted - cols


def test_approvals_view_derives_status_from_events(populated: Path) -> None:
    rows = run_query(
        populated,
        "SELECT approval_id, statement_id, status, decided_by, reason, "
        "expires_at - requested_at AS window FROM approvals ORDER BY approval_id",
    ).rows
    assert [r[:5] for r in rows] == [
        ("ap-1", "st-2", "denied", "alice@example.org", "no DDL on billing tables"),
        ("ap-2", "st-4", "pending", None, None),
        ("ap-3", "st-9", "executed", "bob@example.org", None),
    ]
    assert [r[5].total_seconds() for r in rows] == [3600, 3600, 7200]


def test_sessions_view_joins_start_and_end(populated: Path) -> None:
    rows = run_query(
        populated,
        "SELECT session_id, ended_at IS NOT NULL, auth_ok, tls, bytes_to_client "
        "FROM sessions ORDER BY session_id",
    ).rows
    assert rows == (
        ("sess-1", True, True, True, 5400),
        ("sess-2", False, True, False, None),
        ("sess-3", True, False, False, 120),
    )


RESULT = QueryResult(("id", "tags", "note"), ((1, ["a", "b"], 'x, "y"'), (2, [], None)))


def test_format_table() -> None:
    text = format_result(RESULT, "table")
    lines = text.splitlines()
    assert lines[0].split(" | ") == ["id", "tags  ", "note"]
    assert lines[2].startswith('1  | [a, b] | x, "y"')
    assert lines[-1] == "(2 rows)"


def test_format_csv_roundtrips() -> None:
    rows = list(csv.reader(io.StringIO(format_result(RESULT, "csv"))))
    assert rows == [["id", "tags", "note"], ["1", "[a, b]", 'x, "y"'], ["2", "[]", ""]]


def test_format_json() -> None:
    assert json.loads(format_result(RESULT, "json")) == [
        {"id": 1, "tags": ["a", "b"], "note": 'x, "y"'},
        {"id": 2, "tags": [], "note": None},
    ]
