"""The audit's DuckDB layout: one append-only table per record kind, and the analyst views.

Every logical table starts with ``seq, prev_hash, row_hash`` (the hash chain, see ``chain``)
and then the record's fields in a fixed order. ``row_values`` turns a record into that order
with plain JSON-able values (timestamps as naive-UTC ISO strings, tuples as lists); the same
values are the chain's canonical serialization and, for the rare kinds, the staging payload the
writer bulk-inserts from.

``log_statement``, one row per statement, is a view over two base tables: ``log_statement_row``
(the fields that change with every statement: ids, time, counts) and ``log_statement_shape``
(the ones that repeat: agent, class, fingerprint, redacted SQL, decision and the lists), joined
on ``shape_id``. Storing the repeated part once makes a statement about a third cheaper to
write; the hash chain still covers every field of the joined row, so editing a shape breaks the
chain of every statement that uses it. ``STATEMENT_MIGRATION_SQL`` converts a file from before
the split.

Views (the analysts' contract): ``sessions``, ``statements``, ``approvals``,
``approval_events``, ``policy_events``, plus ``audit_rows`` (every row's seq/table/hash).
All timestamps are UTC (``TIMESTAMP`` without zone).

Also here: the JSON codec for records (the spill file format).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any, Final

from pgproxy.audit.records import (
    ApprovalEvent,
    AuditRecord,
    PolicyEvent,
    SessionEnded,
    SessionStarted,
    StatementRecord,
)

_INT64_MAX: Final = 2**63 - 1
_INT64_MIN: Final = -(2**63)


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    sqltype: str  # VARCHAR, BIGINT, DOUBLE, BOOLEAN, TIMESTAMP, VARCHAR[]


@dataclass(frozen=True, slots=True)
class Table:
    name: str
    record: type
    columns: tuple[Column, ...]

    def create_sql(self) -> str:
        # No PRIMARY KEY on seq: the hash chain (``verify``) already proves seq unique and in
        # order, and an index would grow in the writer's memory with every row ever written.
        cols = ",\n  ".join(f"{c.name} {c.sqltype} NOT NULL" for c in self.columns)
        return (
            f"CREATE TABLE IF NOT EXISTS {self.name} (\n"
            "  seq BIGINT NOT NULL,\n  prev_hash VARCHAR NOT NULL,\n"
            f"  row_hash VARCHAR NOT NULL,\n  {cols}\n)"
        )

    def insert_from_stage_sql(self) -> str:
        """Bulk insert this table's rows from the ``audit_stage`` temp table (one JSON array
        per row: ``[table, seq, field...]``), parsing each payload once into a VARCHAR list
        (nested lists stay JSON text and are cast) — 3x faster than one JSON path per field."""
        exprs = []
        for i, c in enumerate(self.columns, start=3):  # DuckDB lists are 1-based
            if c.sqltype == "VARCHAR":
                exprs.append(f"v[{i}]")
            elif c.sqltype == "VARCHAR[]":
                exprs.append(f"v[{i}]::JSON::VARCHAR[]")
            else:
                exprs.append(f"v[{i}]::{c.sqltype}")
        return (
            f"INSERT INTO {self.name} SELECT seq, prev_hash, row_hash, {', '.join(exprs)} "
            """FROM (SELECT seq, prev_hash, row_hash, from_json(payload, '["VARCHAR"]') AS v """
            f"FROM audit_stage WHERE tbl = '{self.name}')"
        )

    def select_sql(self) -> str:
        names = ", ".join(c.name for c in self.columns)
        return f"SELECT seq, prev_hash, row_hash, {names} FROM {self.name} ORDER BY seq"


def _cols(spec: str) -> tuple[Column, ...]:
    out = []
    for part in spec.split(","):
        name, sqltype = part.split()
        out.append(Column(name, sqltype))
    return tuple(out)


SESSION_START: Final = Table(
    "log_session_start",
    SessionStarted,
    _cols(
        "session_id VARCHAR, agent VARCHAR, client_addr VARCHAR, database VARCHAR,"
        "application_name VARCHAR, started_at TIMESTAMP, auth VARCHAR, tls BOOLEAN"
    ),
)
SESSION_END: Final = Table(
    "log_session_end",
    SessionEnded,
    _cols(
        "session_id VARCHAR, ended_at TIMESTAMP, bytes_from_client BIGINT,"
        "bytes_to_client BIGINT, reason VARCHAR"
    ),
)
STATEMENT: Final = Table(
    "log_statement",
    StatementRecord,
    _cols(
        "statement_id VARCHAR, session_id VARCHAR, ts TIMESTAMP, agent VARCHAR,"
        "statement_class VARCHAR, fingerprint VARCHAR, sql_redacted VARCHAR, decision VARCHAR,"
        "reasons VARCHAR[], relations VARCHAR[], columns VARCHAR[], tags VARCHAR[],"
        "masked_columns VARCHAR[], rows BIGINT, duration_ms DOUBLE, sqlstate VARCHAR,"
        "approval_id VARCHAR"
    ),
)
APPROVAL_EVENT: Final = Table(
    "log_approval_event",
    ApprovalEvent,
    _cols(
        "approval_id VARCHAR, ts TIMESTAMP, event VARCHAR, statement_id VARCHAR, agent VARCHAR,"
        "actor VARCHAR, reason VARCHAR, detail VARCHAR"
    ),
)
POLICY_EVENT: Final = Table(
    "log_policy_event", PolicyEvent, _cols("ts TIMESTAMP, event VARCHAR, detail VARCHAR")
)

TABLES: Final[tuple[Table, ...]] = (
    SESSION_START,
    SESSION_END,
    STATEMENT,
    APPROVAL_EVENT,
    POLICY_EVENT,
)
TABLE_BY_NAME: Final[dict[str, Table]] = {t.name: t for t in TABLES}

# Sanity: the column lists above must name exactly the record's fields, in order.
for _t in TABLES:
    assert tuple(c.name for c in _t.columns) == tuple(f.name for f in fields(_t.record)), _t.name

#: fields of ``log_statement`` stored once per distinct combination, in ``log_statement_shape``
STATEMENT_SHAPE_FIELDS: Final = (
    "agent", "statement_class", "fingerprint", "sql_redacted", "decision",
    "reasons", "relations", "columns", "tags", "masked_columns",
)  # fmt: skip
#: the others, stored per statement in ``log_statement_row`` (``ts`` as ``ts_us``)
STATEMENT_ROW_FIELDS: Final = (
    "statement_id",
    "session_id",
    "ts",
    "rows",
    "duration_ms",
    "sqlstate",
    "approval_id",
)
assert set(STATEMENT_SHAPE_FIELDS) | set(STATEMENT_ROW_FIELDS) == {
    c.name for c in STATEMENT.columns
}


def _column_defs(names: tuple[str, ...]) -> str:
    types = {c.name: c.sqltype for c in STATEMENT.columns}
    return ", ".join(f"{n} {types[n]} NOT NULL" for n in names)


STATEMENT_SHAPE_SQL: Final = (
    "CREATE TABLE IF NOT EXISTS log_statement_shape (shape_id BIGINT NOT NULL, "
    f"{_column_defs(STATEMENT_SHAPE_FIELDS)})"
)
STATEMENT_ROW_SQL: Final = (
    "CREATE TABLE IF NOT EXISTS log_statement_row (seq BIGINT NOT NULL, "
    "prev_hash VARCHAR NOT NULL, row_hash VARCHAR NOT NULL, statement_id VARCHAR NOT NULL, "
    "session_id VARCHAR NOT NULL, ts_us BIGINT NOT NULL, shape_id BIGINT NOT NULL, "
    "rows BIGINT NOT NULL, duration_ms DOUBLE NOT NULL, sqlstate VARCHAR NOT NULL, "
    "approval_id VARCHAR NOT NULL)"
)
#: the logical table, columns in ``STATEMENT`` order (an inner join: a statement whose shape
#: row is gone drops out, and verify reports its seq missing)
STATEMENT_VIEW_SQL: Final = (
    "CREATE OR REPLACE VIEW log_statement AS SELECT r.seq, r.prev_hash, r.row_hash, "
    + ", ".join(
        "make_timestamp(r.ts_us) AS ts"
        if c.name == "ts"
        else f"{'r' if c.name in STATEMENT_ROW_FIELDS else 's'}.{c.name}"
        for c in STATEMENT.columns
    )
    + " FROM log_statement_row r JOIN log_statement_shape s USING (shape_id)"
)


def base_tables_sql() -> list[str]:
    """The DDL of every base table and of the ``log_statement`` view, in order."""
    out: list[str] = []
    for t in TABLES:
        if t is STATEMENT:
            out += [STATEMENT_SHAPE_SQL, STATEMENT_ROW_SQL, STATEMENT_VIEW_SQL]
        else:
            out.append(t.create_sql())
    return out


def chain_table(name: str) -> str:
    """The base table holding the chain columns (``seq``, hashes) of logical table ``name``."""
    return "log_statement_row" if name == STATEMENT.name else name


#: the base tables a complete audit file has
BASE_TABLES: Final = tuple(
    n for t in TABLES for n in (
        ("log_statement_shape", "log_statement_row") if t is STATEMENT else (t.name,)
    )
)  # fmt: skip

_SHAPE_COLS: Final = ", ".join(STATEMENT_SHAPE_FIELDS)
#: turns a ``log_statement`` base table (files written before the split) into the two tables
#: and the view, in the caller's transaction; every value is carried over as stored
STATEMENT_MIGRATION_SQL: Final[tuple[str, ...]] = (
    STATEMENT_SHAPE_SQL,
    STATEMENT_ROW_SQL,
    f"""INSERT INTO log_statement_shape
    SELECT row_number() OVER (ORDER BY first_seq), {_SHAPE_COLS}
    FROM (SELECT {_SHAPE_COLS}, min(seq) AS first_seq FROM log_statement
          GROUP BY ALL)""",
    f"""INSERT INTO log_statement_row
    SELECT l.seq, l.prev_hash, l.row_hash, l.statement_id, l.session_id, epoch_us(l.ts),
           s.shape_id, l.rows, l.duration_ms, l.sqlstate, l.approval_id
    FROM log_statement l JOIN log_statement_shape s
    ON {" AND ".join(f"l.{c} = s.{c}" for c in STATEMENT_SHAPE_FIELDS)}
    ORDER BY l.seq""",
    "DROP TABLE log_statement",
    STATEMENT_VIEW_SQL,
)

STAGE_SQL: Final = (
    "CREATE TEMP TABLE IF NOT EXISTS audit_stage "
    "(tbl VARCHAR, seq BIGINT, prev_hash VARCHAR, row_hash VARCHAR, payload VARCHAR)"
)

VIEWS_SQL: Final[tuple[str, ...]] = (
    """CREATE OR REPLACE VIEW audit_rows AS
    SELECT seq, 'log_session_start' AS tbl, prev_hash, row_hash FROM log_session_start
    UNION ALL SELECT seq, 'log_session_end', prev_hash, row_hash FROM log_session_end
    UNION ALL SELECT seq, 'log_statement', prev_hash, row_hash FROM log_statement_row
    UNION ALL SELECT seq, 'log_approval_event', prev_hash, row_hash FROM log_approval_event
    UNION ALL SELECT seq, 'log_policy_event', prev_hash, row_hash FROM log_policy_event""",
    """CREATE OR REPLACE VIEW sessions AS
    SELECT s.session_id, s.agent, s.client_addr, s.database, s.application_name,
           s.started_at, e.ended_at, s.auth AS auth_outcome, s.auth = 'ok' AS auth_ok, s.tls,
           e.bytes_from_client, e.bytes_to_client, e.reason AS end_reason
    FROM log_session_start s
    LEFT JOIN (SELECT * FROM log_session_end QUALIFY row_number() OVER
               (PARTITION BY session_id ORDER BY seq DESC) = 1) e USING (session_id)""",
    """CREATE OR REPLACE VIEW statements AS
    SELECT statement_id, session_id, ts, agent, statement_class, fingerprint, sql_redacted,
           decision, masked_columns, rows, duration_ms, sqlstate, reasons, relations, columns,
           tags, NULLIF(approval_id, '') AS approval_id
    FROM log_statement""",
    """CREATE OR REPLACE VIEW approval_events AS
    SELECT approval_id, ts, event, NULLIF(statement_id, '') AS statement_id,
           NULLIF(agent, '') AS agent, NULLIF(actor, '') AS actor, NULLIF(reason, '') AS reason,
           detail::JSON AS detail, seq
    FROM log_approval_event""",
    """CREATE OR REPLACE VIEW approvals AS
    WITH created AS (
        SELECT approval_id, arg_min(statement_id, seq) AS statement_id,
               arg_min(agent, seq) AS agent, min(ts) AS requested_at,
               max(TRY_CAST(detail->>'expires_at' AS TIMESTAMP)) AS expires_at
        FROM approval_events WHERE event = 'created' GROUP BY approval_id
    ), decided AS (
        SELECT approval_id, event AS status, ts AS decided_at, actor AS decided_by, reason
        FROM approval_events
        WHERE event IN ('approved', 'denied', 'expired', 'withdrawn')
        QUALIFY row_number() OVER (PARTITION BY approval_id ORDER BY seq) = 1
    ), executed AS (
        SELECT approval_id, min(ts) AS executed_at FROM approval_events
        WHERE event = 'executed' GROUP BY approval_id
    )
    SELECT c.approval_id, c.statement_id, c.agent, c.requested_at,
           CASE WHEN x.executed_at IS NOT NULL THEN 'executed'
                ELSE coalesce(d.status, 'pending') END AS status,
           d.decided_at, d.decided_by, d.reason, c.expires_at, x.executed_at
    FROM created c LEFT JOIN decided d USING (approval_id)
    LEFT JOIN executed x USING (approval_id)""",
    """CREATE OR REPLACE VIEW policy_events AS
    SELECT ts, event, detail, seq FROM log_policy_event""",
)


def utc_iso(ts: datetime) -> str:
    """Naive-UTC ISO text, the form DuckDB's TIMESTAMP gives back as a naive datetime."""
    tz = ts.tzinfo
    if tz is None:
        return ts.isoformat()
    if tz is not UTC:
        ts = ts.astimezone(UTC)
    return ts.isoformat()[:-6]  # drop "+00:00"


def _int(v: int) -> int:
    if type(v) is int and _INT64_MIN <= v <= _INT64_MAX:
        return v
    return min(max(int(v), _INT64_MIN), _INT64_MAX)


def _float(v: float) -> float:
    v = float(v)
    return v if math.isfinite(v) else -1.0  # JSON has no NaN/inf; -1 marks "not measured"


def _detail(d: dict[str, str]) -> str:
    return json.dumps({str(k): str(v) for k, v in d.items()}, sort_keys=True, ensure_ascii=False)


def _session_start(r: SessionStarted) -> list[Any]:
    return [
        r.session_id, r.agent, r.client_addr, r.database, r.application_name,
        utc_iso(r.started_at), r.auth, bool(r.tls),
    ]  # fmt: skip


def _session_end(r: SessionEnded) -> list[Any]:
    return [
        r.session_id, utc_iso(r.ended_at), _int(r.bytes_from_client),
        _int(r.bytes_to_client), r.reason,
    ]  # fmt: skip


def _statement(r: StatementRecord) -> list[Any]:
    return [
        r.statement_id, r.session_id, utc_iso(r.ts), r.agent, r.statement_class,
        r.fingerprint, r.sql_redacted, r.decision, r.reasons, r.relations,
        r.columns, r.tags, r.masked_columns, _int(r.rows),
        _float(r.duration_ms), r.sqlstate, r.approval_id,
    ]  # fmt: skip


def _approval(r: ApprovalEvent) -> list[Any]:
    return [
        r.approval_id, utc_iso(r.ts), r.event, r.statement_id, r.agent, r.actor, r.reason,
        _detail(r.detail),
    ]  # fmt: skip


def _policy(r: PolicyEvent) -> list[Any]:
    return [utc_iso(r.ts), r.event, r.detail]


_ROW_BUILDERS: Final[dict[type, tuple[str, Callable[[Any], list[Any]]]]] = {
    SessionStarted: (SESSION_START.name, _session_start),
    SessionEnded: (SESSION_END.name, _session_end),
    StatementRecord: (STATEMENT.name, _statement),
    ApprovalEvent: (APPROVAL_EVENT.name, _approval),
    PolicyEvent: (POLICY_EVENT.name, _policy),
}


def row_values(record: AuditRecord) -> tuple[str, list[Any]]:
    """The base table for ``record`` and its column values in table order, JSON-able
    (string tuples stay tuples: JSON encodes them as arrays)."""
    table, build = _ROW_BUILDERS[type(record)]
    return table, build(record)


def db_values(values: tuple[Any, ...]) -> list[Any]:
    """Values read back from a base table, in the form ``row_values`` produced them."""
    return [v.isoformat() if isinstance(v, datetime) else v for v in values]


# --- spill codec: records as one JSON object per line --------------------------------------

_KINDS: Final[dict[str, type]] = {
    "session_started": SessionStarted,
    "session_ended": SessionEnded,
    "statement": StatementRecord,
    "approval_event": ApprovalEvent,
    "policy_event": PolicyEvent,
}
_KIND_OF: Final[dict[type, str]] = {v: k for k, v in _KINDS.items()}


def record_to_json(record: AuditRecord) -> str:
    obj: dict[str, Any] = {"kind": _KIND_OF[type(record)]}
    for f in fields(record):
        v = getattr(record, f.name)
        obj[f.name] = v.isoformat() if isinstance(v, datetime) else v
    return json.dumps(obj, ensure_ascii=False)


def record_from_json(line: str) -> AuditRecord:
    obj = json.loads(line)
    cls = _KINDS[obj.pop("kind")]
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in obj:
            continue
        v = obj[f.name]
        if f.type == "datetime":
            v = datetime.fromisoformat(v)
        elif isinstance(v, list):
            v = tuple(v)
        kwargs[f.name] = v
    rec: AuditRecord = cls(**kwargs)
    return rec
