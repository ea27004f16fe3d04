"""Read-only analyst queries on the audit, and their text/CSV/JSON rendering.

Three guards, any one of which is enough to keep a query from changing the audit: the text must
be exactly one statement whose DuckDB statement type is SELECT (which covers WITH, SHOW,
DESCRIBE, SUMMARIZE and FROM-first queries) or an EXPLAIN of one; it runs inside a
``READ ONLY`` transaction; and the file is opened ``read_only`` (offline) or is the live sink's
connection, which has external access disabled (no reading other files, no ATTACH).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Literal
from uuid import UUID

if TYPE_CHECKING:
    import duckdb

Format = Literal["table", "csv", "json"]

_EXPLAIN = re.compile(r"^\s*EXPLAIN\s+(?:ANALY[SZ]E\s+)?", re.IGNORECASE)


class QueryRejected(ValueError):
    """The text is not a single read-only query."""


class AuditQueryError(RuntimeError):
    """The query could not run (bad SQL, missing or busy audit file)."""


@dataclass(frozen=True, slots=True)
class QueryResult:
    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]
    truncated: bool = False


def check_read_only(sql: str, conn: duckdb.DuckDBPyConnection | None = None) -> None:
    """Raise ``QueryRejected`` unless ``sql`` is one SELECT/WITH/SHOW/DESCRIBE/EXPLAIN."""
    import duckdb

    parser = conn if conn is not None else duckdb.connect()
    try:
        statements = parser.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryRejected(f"cannot parse the query: {_first_line(exc)}") from None
    finally:
        if conn is None:
            parser.close()
    if len(statements) != 1:
        raise QueryRejected(f"expected exactly one statement, got {len(statements)}")
    stmt = statements[0]
    if stmt.type == duckdb.StatementType.SELECT:
        return
    if stmt.type == duckdb.StatementType.EXPLAIN:
        m = _EXPLAIN.match(stmt.query)
        if m is None:
            raise QueryRejected("EXPLAIN must come first in the query text")
        inner = stmt.query[m.end() :]
        check_read_only(inner, conn)
        return
    raise QueryRejected(
        f"only SELECT, WITH, SHOW, DESCRIBE and EXPLAIN queries are allowed, not {stmt.type.name}"
    )


def run_query(
    path_or_conn: str | os.PathLike[str] | duckdb.DuckDBPyConnection,
    sql: str,
    *,
    max_rows: int | None = None,
) -> QueryResult:
    """Run one read-only query on an audit file (opened read-only) or on a live connection
    (through a cursor, in a READ ONLY transaction)."""
    import duckdb

    if isinstance(path_or_conn, duckdb.DuckDBPyConnection):
        cur = path_or_conn.cursor()
    else:
        path = os.fspath(path_or_conn)
        if not os.path.exists(path):
            raise AuditQueryError(f"no audit file at {path}")
        try:
            cur = duckdb.connect(path, read_only=True, config={"enable_external_access": False})
        except duckdb.Error as exc:
            text = str(exc)
            if "lock" in text.lower():
                raise AuditQueryError(
                    f"audit file {path} is held by a running pgproxy; query it over HTTP "
                    "(pgproxy audit sql --http HOST:PORT)"
                ) from None
            raise AuditQueryError(f"cannot open audit file {path}: {_first_line(exc)}") from None
    try:
        check_read_only(sql, cur)
        cur.execute("BEGIN TRANSACTION READ ONLY")
        try:
            cur.execute(sql)
            columns = tuple(d[0] for d in (cur.description or ()))
            if max_rows is None:
                rows = cur.fetchall()
                truncated = False
            else:
                rows = cur.fetchmany(max_rows + 1)
                truncated = len(rows) > max_rows
                rows = rows[:max_rows]
        except duckdb.Error as exc:
            raise AuditQueryError(_first_line(exc)) from None
        finally:
            cur.execute("ROLLBACK")
        return QueryResult(columns, tuple(tuple(r) for r in rows), truncated)
    finally:
        cur.close()


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def jsonable(value: Any) -> Any:
    """A JSON-safe form of a DuckDB result value (timestamps as ISO text)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, Decimal | UUID):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return str(value)


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_text(v) for v in value) + "]"
    v = jsonable(value)
    return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)


def format_result(result: QueryResult, fmt: Format = "table") -> str:
    """Render as an aligned text table, CSV (with header) or a JSON array of objects."""
    if fmt == "json":
        objs = [dict(zip(result.columns, map(jsonable, row), strict=True)) for row in result.rows]
        return json.dumps(objs, ensure_ascii=False, indent=1) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(result.columns)
        for row in result.rows:
            w.writerow([_text(v) for v in row])
        return buf.getvalue()
    if fmt != "table":
        raise ValueError(f"unknown format {fmt!r}")
    cells = [[_text(v).replace("\n", "\\n") for v in row] for row in result.rows]
    widths = [len(c) for c in result.columns]
    for cell_row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, cell_row, strict=True)]
    lines = [
        " | ".join(c.ljust(w) for c, w in zip(result.columns, widths, strict=True)).rstrip(),
        "-+-".join("-" * w for w in widths),
    ]
    lines += [
        " | ".join(c.ljust(w) for c, w in zip(cell_row, widths, strict=True)).rstrip()
        for cell_row in cells
    ]
    n = len(result.rows)
    more = " (truncated)" if result.truncated else ""
    lines.append(f"({n} row{'s' if n != 1 else ''}{more})")
    return "\n".join(lines) + "\n"
