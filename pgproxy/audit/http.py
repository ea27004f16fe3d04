"""Analyst queries over HTTP while ``serve`` holds the audit file.

``POST /api/audit/sql`` with ``{"sql": "..."}`` answers ``{"columns": [...], "rows": [[...]],
"truncated": bool}``. The query runs in the live sink's writer process through a cursor (so it
is serialized with the writes and sees everything committed), under the same read-only guard as
``pgproxy audit sql`` on a file. Errors answer 400 (rejected or failed query) or 503 (audit not
running), with ``{"error": ..., "kind": "rejected" | "error" | "unavailable"}``. Binding the
server to loopback is the server's concern. ``query_over_http`` is the client side.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

import aiohttp
from aiohttp import web

from pgproxy.audit.query import AuditQueryError, QueryRejected, QueryResult, jsonable

if TYPE_CHECKING:
    from pgproxy.audit.sink import DuckDBSink

SQL_PATH: Final = "/api/audit/sql"
VERIFY_PATH: Final = "/api/audit/verify"
DEFAULT_MAX_ROWS: Final = 100_000


def _error(status: int, kind: str, message: str) -> web.Response:
    return web.json_response({"error": message, "kind": kind}, status=status)


def audit_routes(sink: DuckDBSink) -> web.RouteTableDef:
    """Routes to add to the server's aiohttp application (``app.add_routes(...)``)."""
    from pgproxy.audit.sink import AuditUnavailable

    routes = web.RouteTableDef()

    @routes.post(SQL_PATH)
    async def audit_sql(request: web.Request) -> web.Response:
        try:
            body: Any = await request.json()
        except ValueError:
            return _error(400, "rejected", 'expected a JSON body {"sql": "..."}')
        sql = body.get("sql") if isinstance(body, dict) else None
        if not isinstance(sql, str) or not sql.strip():
            return _error(400, "rejected", 'expected a JSON body {"sql": "..."}')
        max_rows = body.get("max_rows", DEFAULT_MAX_ROWS)
        if not isinstance(max_rows, int) or isinstance(max_rows, bool) or max_rows < 0:
            return _error(400, "rejected", "max_rows must be a non-negative integer")
        try:
            result = await sink.query(sql, max_rows=min(max_rows, DEFAULT_MAX_ROWS))
        except QueryRejected as exc:
            return _error(400, "rejected", str(exc))
        except AuditQueryError as exc:
            return _error(400, "error", str(exc))
        except AuditUnavailable as exc:
            return _error(503, "unavailable", str(exc))
        return web.json_response(
            {
                "columns": list(result.columns),
                "rows": [[jsonable(v) for v in row] for row in result.rows],
                "truncated": result.truncated,
            }
        )

    @routes.get(VERIFY_PATH)
    async def audit_verify(request: web.Request) -> web.Response:
        try:
            result = await sink.verify()
        except AuditUnavailable as exc:
            return _error(503, "unavailable", str(exc))
        return web.json_response(
            {"ok": result.ok, "rows": result.rows, "first_bad": result.first_bad,
             "checkpoints": result.checkpoints, "signed": result.signed}
        )  # fmt: skip

    return routes


async def verify_over_http(base_url: str, *, timeout: float = 120.0) -> dict[str, Any]:
    """``GET /api/audit/verify`` of a running pgproxy: the live file's tamper check."""
    url = base_url if "://" in base_url else f"http://{base_url}"
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    async with (
        aiohttp.ClientSession(timeout=client_timeout) as session,
        session.get(url.rstrip("/") + VERIFY_PATH) as resp,
    ):
        body: dict[str, Any] = await resp.json()
        if resp.status != 200:
            raise AuditQueryError(str(body.get("error", f"HTTP {resp.status}")))
        return body


async def query_over_http(base_url: str, sql: str, *, timeout: float = 60.0) -> QueryResult:
    """Run ``sql`` through a running pgproxy's ``POST /api/audit/sql``.

    ``base_url`` is ``http://HOST:PORT`` or just ``HOST:PORT``. Raises ``QueryRejected`` or
    ``AuditQueryError`` as ``run_query`` would."""
    url = base_url if "://" in base_url else f"http://{base_url}"
    url = url.rstrip("/") + SQL_PATH
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    try:
        async with (
            aiohttp.ClientSession(timeout=client_timeout) as session,
            session.post(url, json={"sql": sql}) as resp,
        ):
            try:
                body: Any = await resp.json()
            except (aiohttp.ContentTypeError, ValueError):
                raise AuditQueryError(f"{url} answered HTTP {resp.status}, not JSON") from None
            status = resp.status
    except aiohttp.ClientError as exc:
        raise AuditQueryError(f"cannot reach {url}: {exc}") from None
    if status != 200 or not isinstance(body, dict):
        message = body.get("error", f"HTTP {status}") if isinstance(body, dict) else str(status)
        if isinstance(body, dict) and body.get("kind") == "rejected":
            raise QueryRejected(str(message))
        raise AuditQueryError(str(message))
    return QueryResult(
        tuple(body["columns"]),
        tuple(tuple(r) for r in body["rows"]),
        bool(body.get("truncated", False)),
    )
