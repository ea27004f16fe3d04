"""Statements are stored split: per-statement fields in ``log_statement_row``, the repeated ones
once in ``log_statement_shape``, joined back by the ``log_statement`` view. What the writer
stores must be exactly what it hashed (``verify`` recomputes the chain from the view), shapes
are shared and stay consistent across batches, reopenings and a full shape memory, and a file
from before the split is converted in place with every value kept."""

from __future__ import annotations

import io
import marshal
from datetime import timedelta
from pathlib import Path
from typing import Any

import duckdb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgproxy.audit import chain, schema, wire
from pgproxy.audit import writer as writer_module
from pgproxy.audit.records import AuditRecord, PolicyEvent, StatementRecord
from pgproxy.audit.sink import DuckDBSink
from pgproxy.audit.verify import verify
from pgproxy.audit.writer import Writer

from .conftest import KEY, T0, sample_records, stmt
from .test_wire import statements


def _encoded(records: list[AuditRecord]) -> list[tuple[Any, ...]]:
    _, encoded = marshal.loads(wire.encode_batch(1, records)[wire.HEADER.size :])
    return list(encoded)


def _open_writer(path: Path, every: int = 1000) -> Writer:
    w = Writer((str(path), KEY, every, None, 0.1, 1.0), io.BytesIO())
    w.open()
    return w


def _write(w: Writer, records: list[AuditRecord], batch_id: int = 1) -> None:
    w.commit(w.prepare(batch_id, _encoded(records)), False)


def _statement_rows(path: Path) -> list[tuple[Any, ...]]:
    with duckdb.connect(str(path), read_only=True) as conn:
        return conn.execute(schema.STATEMENT.select_sql()).fetchall()


def _count(path: Path, sql: str) -> int:
    with duckdb.connect(str(path), read_only=True) as conn:
        found = conn.execute(sql).fetchone()
    assert found is not None
    return int(found[0])


def _generic_values(record: StatementRecord) -> list[Any]:
    """The values the chain hashes, with sequences as the lists DuckDB gives back."""
    return [list(v) if isinstance(v, tuple) else v for v in schema.row_values(record)[1]]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(statements, min_size=1, max_size=12))
def test_stored_statements_are_what_was_hashed(records: list[StatementRecord]) -> None:
    """Any statements (odd unicode, NULs, far dates, huge counts, NaN): the view gives back
    the values that were hashed, ``verify`` agrees, and a statement that cannot be stored is
    an ``audit_record_rejected`` event in its place."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "audit.duckdb"
        w = _open_writer(path)
        batch = w.prepare(1, _encoded(list(records)))
        w.commit(batch, False)
        w.shutdown()
        result = verify(path, KEY)
        assert result.ok, result.first_bad
        stored = {r[0]: r for r in _statement_rows(path)}
        for (table, seq, _prev, _hash, canon), record in zip(batch.rows, records, strict=True):
            if table == schema.STATEMENT.name:
                assert canon == chain.canonical(table, seq, schema.row_values(record)[1])
                assert schema.db_values(stored[seq][3:]) == _generic_values(record)
            else:
                assert seq not in stored
                assert '"audit_record_rejected"' in canon


def test_a_shape_is_stored_once_and_shared(tmp_path: Path) -> None:
    path = tmp_path / "audit.duckdb"
    w = _open_writer(path)
    records: list[AuditRecord] = []
    for i in range(40):
        shape = {"decision": "MASK", "tags": ("ssn",)} if i % 2 else {}
        records.append(stmt(f"st-{i}", ts=T0 + timedelta(microseconds=i), rows=i, **shape))
    _write(w, records[:25], 1)
    _write(w, records[25:], 2)
    w.shutdown()
    assert verify(path, KEY).ok
    assert _count(path, "SELECT count(*) FROM log_statement_shape") == 2
    assert _count(path, "SELECT count(*) FROM log_statement_row") == 40
    with duckdb.connect(str(path), read_only=True) as conn:
        got = conn.execute(
            "SELECT statement_id, decision, tags, rows FROM statements ORDER BY rows"
        ).fetchall()
    assert got == [
        (f"st-{i}", "MASK" if i % 2 else "ALLOW", ["ssn"] if i % 2 else [], i) for i in range(40)
    ]


def test_reopening_continues_shape_ids(tmp_path: Path) -> None:
    path = tmp_path / "audit.duckdb"
    w = _open_writer(path)
    _write(w, [stmt("a"), stmt("b", decision="DENY")])
    w.shutdown()
    w = _open_writer(path)  # a new process: its shape memory is empty
    _write(w, [stmt("c"), stmt("d", decision="HOLD"), stmt("e", decision="DENY")])
    w.shutdown()
    assert verify(path, KEY).ok
    assert _count(path, "SELECT count(DISTINCT shape_id) - count(*) FROM log_statement_shape") == 0
    with duckdb.connect(str(path), read_only=True) as conn:
        got = conn.execute("SELECT statement_id, decision FROM statements ORDER BY 1").fetchall()
    assert got == [("a", "ALLOW"), ("b", "DENY"), ("c", "ALLOW"), ("d", "HOLD"), ("e", "DENY")]


def test_a_full_shape_memory_starts_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writer_module, "_SHAPES_MAX", 2)
    path = tmp_path / "audit.duckdb"
    w = _open_writer(path)
    decisions = ["ALLOW", "MASK", "HOLD", "DENY"] * 3
    _write(w, [stmt(f"st-{i:02}", decision=d) for i, d in enumerate(decisions)])
    w.shutdown()
    assert verify(path, KEY).ok
    assert len(w.shapes) <= 2
    assert _count(path, "SELECT count(*) FROM log_statement_shape") > 4  # some stored twice
    with duckdb.connect(str(path), read_only=True) as conn:
        rows = conn.execute("SELECT decision FROM statements ORDER BY statement_id").fetchall()
    got = [r[0] for r in rows]
    assert got == decisions


class _Str(str):
    pass


def test_unstorable_and_generic_statements(tmp_path: Path) -> None:
    """A statement whose list field is not a list cannot be typed, one with a lone surrogate
    cannot be hashed: each is rejected in its place (its shape never stored) and the batch
    goes on. One the proxy encoded generically (a str subclass) is
    stored like any other."""
    path = tmp_path / "audit.duckdb"
    w = _open_writer(path)
    records: list[AuditRecord] = [
        stmt("ok-1"),
        stmt("bad", reasons="not a tuple"),  # type: ignore[arg-type]
        stmt("generic", agent=_Str("billing-bot")),
        PolicyEvent(T0, "loaded", "x"),
        stmt("bad-shape", decision="DENY\ud800"),  # a new shape that cannot be hashed
        stmt("ok-2", decision="DENY"),
    ]
    encoded = _encoded(records)
    assert encoded[2][0] == wire.K_VALUES  # not marshal-able as is
    batch = w.prepare(1, encoded)
    w.commit(batch, False)
    w.shutdown()
    assert verify(path, KEY).ok
    with duckdb.connect(str(path), read_only=True) as conn:
        got = conn.execute("SELECT statement_id, agent FROM statements ORDER BY ts, 1").fetchall()
        events = conn.execute("SELECT event, detail FROM policy_events ORDER BY seq").fetchall()
    assert got == [("generic", "billing-bot"), ("ok-1", "triage-bot"), ("ok-2", "triage-bot")]
    assert events == [
        ("audit_record_rejected", "StatementRecord: TypeError"),
        ("loaded", "x"),
        ("audit_record_rejected", "StatementRecord: UnicodeEncodeError"),
    ]


def _legacy_audit(path: Path, records: list[AuditRecord]) -> None:
    """An audit file as written before the split: ``log_statement`` a base table."""
    prev, seq = chain.GENESIS, 0
    with duckdb.connect(str(path)) as conn:
        for t in schema.TABLES:
            conn.execute(t.create_sql())  # the one-table layout of every kind
        for record in records:
            seq += 1
            table, values = schema.row_values(record)
            row_hash = chain.row_hash(prev, chain.canonical(table, seq, values))
            marks = ", ".join("?" * (len(values) + 3))
            conn.execute(f"INSERT INTO {table} VALUES ({marks})", [seq, prev, row_hash, *values])
            prev = row_hash
    cp = chain.make_checkpoint(KEY, seq, prev, "2026-03-01T00:00:00")
    chain.append_checkpoint(chain.checkpoints_path(path), cp)


async def test_a_file_from_before_the_split_is_converted(tmp_path: Path) -> None:
    path = tmp_path / "audit.duckdb"
    records = sample_records()
    _legacy_audit(path, records)
    assert verify(path, KEY).ok  # verify reads either layout
    before = _statement_rows(path)
    assert len(before) >= 3

    sink = DuckDBSink(path, signing_key=KEY, flush_interval=0.05)
    await sink.start()
    await sink.emit_durable(stmt("after-the-split", decision="MASK"))
    await sink.close()

    result = verify(path, KEY)
    assert result.ok, result.first_bad
    assert result.rows == len(records) + 1
    after = _statement_rows(path)
    assert after[: len(before)] == before
    assert after[-1][3] == "after-the-split"
    with duckdb.connect(str(path), read_only=True) as conn:
        tables = {r[0] for r in conn.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
        distinct = conn.execute(
            f"SELECT count(*) FROM (SELECT DISTINCT {', '.join(schema.STATEMENT_SHAPE_FIELDS)} "
            "FROM log_statement)"
        ).fetchone()
    assert set(schema.BASE_TABLES) <= tables and "log_statement" not in tables
    assert distinct is not None
    assert _count(path, "SELECT count(*) FROM log_statement_shape") == distinct[0]
