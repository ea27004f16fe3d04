"""The pipe between ``DuckDBSink`` (proxy process) and the audit writer process.

Frames are ``!IB`` (payload length, message type) followed by a ``marshal`` payload (a
``pickle`` one for replies carrying query results). Records cross as compact tuples, a whole
batch per frame: a ``StatementRecord`` is its fields with ``ts`` as integer microseconds since
the epoch (naive UTC), so the proxy never formats or hashes anything (the relay's fast lane
builds that tuple itself, ``EncodedStatement``); other record kinds (rare: sessions, approvals,
policy events) cross as ``schema.row_values`` output; a record the proxy cannot encode crosses
as a rejection marker. The writer process turns the tuples into each row's canonical
serialization (``canonical_row``; for statements ``statement_text`` around the shape's
``middle_text``), which must equal ``chain.canonical(table, seq, schema.row_values(record)[1])``
exactly: that is what ``pgproxy audit verify`` recomputes. This module imports no DuckDB.
"""

from __future__ import annotations

import json
import marshal
import struct
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from pgproxy.audit import chain, schema
from pgproxy.audit.records import AuditRecord, EncodedStatement, StatementRecord

HEADER: Final = struct.Struct("!IB")

# proxy -> writer
CONFIG: Final = 1  # (path, key, checkpoint_every, export_dir, retry_initial, retry_max)
BATCH: Final = 2  # (batch_id, [encoded record, ...])
QUERY: Final = 3  # (request_id, sql, max_rows)
VERIFY: Final = 4  # (request_id,)
EXPORT: Final = 5  # (request_id, out_dir)
TEST_FAULTS: Final = 6  # (fail_next, after_commit, hold): the fault-injection test hook
# writer -> proxy
HELLO: Final = 20  # (head_seq,)
FATAL: Final = 21  # (message,): the file cannot be opened; the writer exits
ACK: Final = 22  # (batch_id, last_seq): committed
FAIL: Final = 23  # (batch_id, error): a commit attempt failed, the writer retries
REPLY: Final = 24  # pickle of (request_id, ok, result or (kind, message))

# encoded record kinds
K_STATEMENT: Final = 0
K_VALUES: Final = 1
K_REJECTED: Final = 2

_EPOCH_AWARE: Final = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_NAIVE: Final = datetime(1970, 1, 1)
_US: Final = timedelta(microseconds=1)


def frame(kind: int, payload: bytes) -> bytes:
    return HEADER.pack(len(payload), kind) + payload


# --- proxy side ---------------------------------------------------------------------------


def _generic(record: AuditRecord) -> tuple[Any, ...]:
    try:
        table, values = schema.row_values(record)
        # a plain-typed copy (str subclasses, tuples...) that marshal accepts and that
        # serializes to the same canonical text
        plain = json.loads(chain.canonical(table, 0, values))[2:]
        return (K_VALUES, table, plain)
    except Exception as exc:
        return (K_REJECTED, type(record).__name__, type(exc).__name__)


def encode_record(r: AuditRecord | EncodedStatement) -> tuple[Any, ...]:
    """One record as a marshal-able tuple (cheap for ``StatementRecord``; a statement the
    fast lane encoded itself passes as it is)."""
    if type(r) is tuple:
        return r
    if type(r) is StatementRecord:
        try:
            ts = r.ts
            us = (ts - (_EPOCH_NAIVE if ts.tzinfo is None else _EPOCH_AWARE)) // _US
        except Exception:
            return _generic(r)
        return (
            K_STATEMENT, r.statement_id, r.session_id, us, r.agent, r.statement_class,
            r.fingerprint, r.sql_redacted, r.decision, r.reasons, r.relations, r.columns,
            r.tags, r.masked_columns, r.rows, r.duration_ms, r.sqlstate, r.approval_id,
        )  # fmt: skip
    return _generic(r)  # type: ignore[arg-type]  # not a tuple here


def decode_statement(t: EncodedStatement) -> StatementRecord:
    """The ``StatementRecord`` of a ``K_STATEMENT`` tuple (for the spill file and for sinks
    that keep records as they are)."""
    if len(t) != 18 or t[0] != K_STATEMENT:
        raise ValueError("not an encoded statement")
    return StatementRecord(
        t[1], t[2], _EPOCH_AWARE + t[3] * _US, t[4], t[5], t[6], t[7], t[8], t[9], t[10], t[11],
        t[12], t[13], t[14], t[15], t[16], t[17],
    )  # fmt: skip


def encode_batch(batch_id: int, records: list[AuditRecord | EncodedStatement]) -> bytes:
    """A ``BATCH`` frame for ``records``."""
    encoded = [encode_record(r) for r in records]
    try:
        payload = marshal.dumps((batch_id, encoded))
    except ValueError:  # an exotic value (a str subclass, an object): encode those generically
        for i, t in enumerate(encoded):
            try:
                marshal.dumps(t)
            except ValueError:
                r = records[i]
                encoded[i] = _generic(decode_statement(r) if isinstance(r, tuple) else r)
        payload = marshal.dumps((batch_id, encoded))
    return frame(BATCH, payload)


# --- writer side --------------------------------------------------------------------------

_q = json.encoder.c_encode_basestring or json.encoder.py_encode_basestring  # type: ignore[attr-defined]
_iso_cache: list[Any] = [None, ""]


def iso_from_us(us: int) -> str:
    """``utc_iso`` of the datetime ``us`` microseconds after the epoch (naive UTC), without a
    ``datetime`` per row: the seconds part is cached."""
    sec, frac = divmod(us, 1_000_000)
    cache = _iso_cache
    if cache[0] != sec:
        cache[1] = (_EPOCH_NAIVE + timedelta(seconds=sec)).isoformat()
        cache[0] = sec
    prefix: str = cache[1]
    return prefix if not frac else f"{prefix}.{frac:06d}"


def _strs(t: Any) -> str:
    if type(t) is not tuple and type(t) is not list:
        raise TypeError("not a sequence")
    return "[" + ",".join(map(_q, t)) + "]"


_STMT_HEAD: Final = '["' + schema.STATEMENT.name + '",'


def _statement_values(t: tuple[Any, ...]) -> list[Any]:
    return [
        t[1], t[2], iso_from_us(t[3]), t[4], t[5], t[6], t[7], t[8], t[9], t[10], t[11], t[12],
        t[13], schema._int(t[14]), schema._float(t[15]), t[16], t[17],
    ]  # fmt: skip


def middle_text(key: tuple[Any, ...]) -> str:
    """The canonical text of a statement's middle fields (``schema.STATEMENT_SHAPE_FIELDS``);
    TypeError when one is not a string or a sequence of strings as expected."""
    return (
        f"{_q(key[0])},{_q(key[1])},{_q(key[2])},{_q(key[3])},{_q(key[4])},{_strs(key[5])},"
        f"{_strs(key[6])},{_strs(key[7])},{_strs(key[8])},{_strs(key[9])}"
    )


def statement_text(t: tuple[Any, ...], seq: int, middle: str, rows: int, dur: float) -> str:
    """The canonical serialization of a ``K_STATEMENT`` record around its ``middle_text``,
    with ``rows`` and ``dur`` already normalized (``schema._int``, ``schema._float``)."""
    return (
        f'{_STMT_HEAD}{seq},{_q(t[1])},{_q(t[2])},"{iso_from_us(t[3])}",{middle},'
        f"{rows!r},{dur!r},{_q(t[16])},{_q(t[17])}]"
    )


def canonical_row(t: tuple[Any, ...], seq: int) -> tuple[str, str]:
    """(table, canonical serialization) of an encoded record; raises what the generic
    ``schema.row_values`` + ``chain.canonical`` would raise for a malformed record."""
    kind = t[0]
    if kind == K_STATEMENT:
        rows = schema._int(t[14])
        dur = schema._float(t[15])
        try:
            # the writer keeps each shape's middle text (``Writer.shapes``); this is the
            # reference it is tested against
            text = statement_text(t, seq, middle_text(t[4:14]), rows, dur)
        except TypeError:  # a field of an unexpected type: the generic encoder decides
            text = chain.canonical(schema.STATEMENT.name, seq, _statement_values(t))
        return schema.STATEMENT.name, text
    if kind == K_VALUES:
        return t[1], chain.canonical(t[1], seq, t[2])
    raise RejectedRecord(t[1], t[2])


def us_from_iso(text: str) -> int:
    """Microseconds since the epoch of a naive-UTC ISO timestamp (``utc_iso``'s form)."""
    return (datetime.fromisoformat(text) - _EPOCH_NAIVE) // _US


def statement_storage(values: list[Any]) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """How a statement encoded generically (``K_VALUES`` of ``log_statement``: its
    ``schema.row_values``) is stored: its per-statement fields (``schema.STATEMENT_ROW_FIELDS``,
    ``ts`` in microseconds) and its shape (``schema.STATEMENT_SHAPE_FIELDS``, checked by
    ``check_shape``). TypeError for a per-statement field the typed table cannot hold."""
    v = values
    if type(v[2]) is not str:
        raise TypeError("ts")
    row = (v[0], v[1], us_from_iso(v[2]), v[13], v[14], v[15], v[16])
    if not (
        type(row[0]) is str
        and type(row[1]) is str
        and type(row[3]) is int
        and type(row[4]) is float
        and type(row[5]) is str
        and type(row[6]) is str
    ):
        raise TypeError("a statement field of an unexpected type")
    return row, tuple(v[3:13])


def check_shape(shape: tuple[Any, ...]) -> tuple[Any, ...]:
    """``shape`` with its lists as tuples; TypeError unless it is five strings then five
    sequences of strings."""
    if len(shape) != 10 or any(type(x) is not str for x in shape[:5]):
        raise TypeError("a statement field of an unexpected type")
    lists = []
    for x in shape[5:]:
        if type(x) is not tuple and type(x) is not list:
            raise TypeError("a statement list that is not a list")
        if any(type(i) is not str for i in x):
            raise TypeError("a statement list item that is not a string")
        lists.append(tuple(x))
    return (*shape[:5], *lists)


class RejectedRecord(ValueError):
    """The proxy could not encode this record (``detail`` says which and why)."""

    def __init__(self, record_type: str, exc_name: str) -> None:
        super().__init__(f"{record_type}: {exc_name}")
        self.detail = f"{record_type}: {exc_name}"


def record_type_name(t: tuple[Any, ...]) -> str:
    if t[0] == K_STATEMENT:
        return "StatementRecord"
    if t[0] == K_VALUES:
        table = schema.TABLE_BY_NAME.get(t[1])
        return table.record.__name__ if table is not None else "record"
    return str(t[1])
