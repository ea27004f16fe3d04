"""``POST /api/audit/sql`` on a live sink, and the ``query_over_http`` client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from pgproxy.audit.http import audit_routes, query_over_http
from pgproxy.audit.query import AuditQueryError, QueryRejected
from pgproxy.audit.sink import DuckDBSink

from .conftest import KEY, sample_records, stmt


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[tuple[DuckDBSink, TestClient]]:  # type: ignore[type-arg]
    sink = DuckDBSink(tmp_path / "a.duckdb", signing_key=KEY, flush_interval=30)
    await sink.start()
    for rec in sample_records():
        await sink.emit(rec)
    app = web.Application()
    app.add_routes(audit_routes(sink))
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        yield sink, client
    finally:
        await client.close()
        await sink.close()


async def test_query_runs_on_the_live_file(live: tuple[DuckDBSink, TestClient]) -> None:  # type: ignore[type-arg]
    sink, client = live
    await sink.emit_durable(stmt("st-live"))  # committed: the query sees it
    resp = await client.post(
        "/api/audit/sql",
        json={"sql": "SELECT statement_id, ts FROM statements ORDER BY ts, statement_id"},
    )
    assert resp.status == 200
    body = await resp.json()
    assert body["columns"] == ["statement_id", "ts"]
    assert ["st-live", "2026-03-01T09:30:00"] in body["rows"]
    assert body["truncated"] is False


@pytest.mark.parametrize(
    "sql", ["DELETE FROM log_statement", "SELECT 1; SELECT 2", "ATTACH 'x.duckdb'"]
)
async def test_writes_are_rejected(live: tuple[DuckDBSink, TestClient], sql: str) -> None:  # type: ignore[type-arg]
    sink, client = live
    resp = await client.post("/api/audit/sql", json={"sql": sql})
    assert resp.status == 400
    assert (await resp.json())["kind"] == "rejected"
    assert (await sink.query("SELECT count(*) FROM statements")).rows[0][0] >= 0


async def test_live_connection_cannot_read_other_files(
    live: tuple[DuckDBSink, TestClient],  # type: ignore[type-arg]
    tmp_path: Path,
) -> None:
    _, client = live
    (tmp_path / "rules.yaml").write_text("password: fake-secret\n")
    sql = f"SELECT * FROM read_text('{tmp_path / 'rules.yaml'}')"
    resp = await client.post("/api/audit/sql", json={"sql": sql})
    assert resp.status == 400
    body = await resp.json()
    assert body["kind"] == "error" and "fake-secret" not in body["error"]


async def test_bad_bodies(live: tuple[DuckDBSink, TestClient]) -> None:  # type: ignore[type-arg]
    _, client = live
    assert (await client.post("/api/audit/sql", data=b"not json")).status == 400
    assert (await client.post("/api/audit/sql", json={"query": "SELECT 1"})).status == 400
    assert (await client.post("/api/audit/sql", json=["SELECT 1"])).status == 400


async def test_client_function(live: tuple[DuckDBSink, TestClient]) -> None:  # type: ignore[type-arg]
    sink, client = live
    await sink.emit_durable(stmt("st-client"))
    base = f"127.0.0.1:{client.port}"
    result = await query_over_http(base, "SELECT count(*) AS n FROM statements")
    assert result.columns == ("n",)
    assert result.rows == ((5,),)
    with pytest.raises(QueryRejected):
        await query_over_http(f"http://{base}/", "DROP TABLE log_statement")
    with pytest.raises(AuditQueryError):
        await query_over_http(base, "SELECT * FROM nope")
