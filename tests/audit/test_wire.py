"""The pipe's record encoding: the writer process's fast canonical serialization must equal the
generic ``chain.canonical(table, seq, schema.row_values(record))`` that ``verify`` recomputes,
for any record, and a record the fast path cannot take must end exactly as the generic path
would (same text, or rejected for the same reason)."""

from __future__ import annotations

import io
import marshal
import math
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgproxy.audit import chain, schema, wire
from pgproxy.audit.records import (
    ApprovalEvent,
    AuditRecord,
    PolicyEvent,
    SessionEnded,
    SessionStarted,
    StatementRecord,
)
from pgproxy.audit.writer import Writer

from .conftest import T0, stmt

# unicode of every kind: quotes, backslashes, control chars, non-BMP, lone surrogates
texts = st.one_of(
    st.text(),
    st.text(alphabet=st.sampled_from('a"\\\x00\x1f\x7f\u2028é😀\ud800/'), max_size=8),
    st.sampled_from(
        ["", "triage-bot", "SELECT 1", "ALLOW"]
    ),  # repeats exercise the writer's shape memory
)
str_tuples = st.one_of(st.tuples(), st.lists(texts, max_size=4).map(tuple))
timestamps = st.one_of(
    st.datetimes(),
    st.datetimes(timezones=st.just(UTC)),
    st.datetimes(
        min_value=datetime(2, 1, 1),
        max_value=datetime(9998, 12, 31),
        timezones=st.builds(
            timezone, st.timedeltas(min_value=timedelta(hours=-23), max_value=timedelta(hours=23))
        ),
    ),
)
ints = st.one_of(st.integers(), st.integers(min_value=2**62, max_value=2**80), st.booleans())
floats = st.one_of(st.floats(), st.just(math.nan), st.just(math.inf), st.integers())

statements = st.builds(
    StatementRecord,
    statement_id=texts, session_id=texts, ts=timestamps, agent=texts, statement_class=texts,
    fingerprint=texts, sql_redacted=texts, decision=texts, reasons=str_tuples,
    relations=str_tuples, columns=str_tuples, tags=str_tuples, masked_columns=str_tuples,
    rows=ints, duration_ms=floats, sqlstate=texts, approval_id=texts,
)  # fmt: skip
others = st.one_of(
    st.builds(SessionStarted, texts, texts, texts, texts, texts, timestamps, texts, st.booleans()),
    st.builds(SessionEnded, texts, timestamps, ints, ints, texts),
    st.builds(
        ApprovalEvent,
        *(texts, timestamps, texts, texts, texts, texts, texts),
        st.dictionaries(texts, texts, max_size=3),
    ),
    st.builds(PolicyEvent, timestamps, texts, texts),
)


def generic(record: AuditRecord, seq: int) -> tuple[str, str] | str:
    """What the single-process writer did: the canonical row, or the rejection's name."""
    try:
        table, values = schema.row_values(record)
        return table, chain.canonical(table, seq, values)
    except Exception as exc:
        return f"{type(record).__name__}: {type(exc).__name__}"


def fast(record: AuditRecord, seq: int) -> tuple[str, str] | str:
    """The proxy's encoding, through marshal, then the writer process's serialization."""
    _, payload = marshal.loads(wire.encode_batch(1, [record])[wire.HEADER.size :])
    try:
        return wire.canonical_row(payload[0], seq)
    except wire.RejectedRecord as exc:
        return exc.detail
    except Exception as exc:
        return f"{wire.record_type_name(payload[0])}: {type(exc).__name__}"


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(statements, st.integers(min_value=1, max_value=2**62))
def test_statement_fast_path_equals_generic(record: StatementRecord, seq: int) -> None:
    assert fast(record, seq) == generic(record, seq)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(others, st.integers(min_value=1, max_value=2**40))
def test_other_records_equal_generic(record: AuditRecord, seq: int) -> None:
    assert fast(record, seq) == generic(record, seq)


class _Str(str):
    pass


def test_malformed_and_exotic_fields_end_as_the_generic_path_does() -> None:
    cases: list[Any] = [
        stmt("a", rows="many"),  # ValueError in the generic path: rejected
        stmt("a", duration_ms="slow"),
        stmt("a", ts=None),  # AttributeError: rejected
        stmt("a", ts="2026-01-01"),
        stmt("a", reasons="not a tuple"),  # a JSON string, not a list: kept as the generic text
        stmt("a", reasons=["a list"]),
        stmt(None),  # type: ignore[arg-type]  # null
        stmt(7),  # type: ignore[arg-type]
        stmt("a", agent=_Str("subclass")),  # not marshal-able: encoded generically
        stmt("a", tags=(object(),)),  # not JSON-able: rejected
        stmt("a", columns=(("nested",),)),
        ApprovalEvent("ap", T0, "created", detail={"k": 1}),  # type: ignore[dict-item]
        SessionEnded("s", T0, 2**70, -(2**70)),
    ]
    for i, record in enumerate(cases, start=1):
        assert fast(record, i) == generic(record, i), record


def test_a_batch_keeps_order_seqs_and_the_chain(tmp_path: Path) -> None:
    """``Writer.prepare`` chains a decoded batch exactly as verify recomputes it; a rejected
    record keeps its seq as an ``audit_record_rejected`` policy event."""
    records: list[AuditRecord] = [
        stmt("one"),
        stmt("bad\ud800"),  # UnicodeEncodeError when hashed
        PolicyEvent(T0, "loaded", "x"),
        stmt("two", rows=3),
    ]
    w = Writer((str(tmp_path / "unused.duckdb"), None, 10, None, 0.1, 1.0), io.BytesIO())
    _, encoded = marshal.loads(wire.encode_batch(9, records)[wire.HEADER.size :])
    batch = w.prepare(9, encoded)
    prev = chain.GENESIS
    for seq, (row, rec) in enumerate(zip(batch.rows, records, strict=True), start=1):
        table, got_seq, got_prev, got_hash, canon = row
        assert (got_seq, got_prev) == (seq, prev)
        assert got_hash == chain.row_hash(prev, canon)
        if seq == 2:
            assert table == schema.POLICY_EVENT.name
            assert '"audit_record_rejected","StatementRecord: UnicodeEncodeError"' in canon
        else:
            assert (table, canon) == generic(rec, seq)
        prev = got_hash
    assert (w.seq, w.head) == (4, prev)


utc_statements = st.builds(
    StatementRecord,
    statement_id=texts, session_id=texts, ts=st.datetimes(timezones=st.just(UTC)),
    agent=texts, statement_class=texts, fingerprint=texts, sql_redacted=texts, decision=texts,
    reasons=str_tuples, relations=str_tuples, columns=str_tuples, tags=str_tuples,
    masked_columns=str_tuples, rows=st.integers(), duration_ms=st.floats(allow_nan=False),
    sqlstate=texts,
    approval_id=texts,
)  # fmt: skip


@settings(max_examples=300)
@given(utc_statements)
def test_an_encoded_statement_decodes_to_the_same_record(record: StatementRecord) -> None:
    """The fast lane hands the sink encoded statements; spill files and in-memory sinks turn
    them back into the record, which must be the one encoded (and encode to the same bytes)."""
    encoded = wire.encode_record(record)
    assert encoded[0] == wire.K_STATEMENT
    assert wire.decode_statement(encoded) == record
    assert wire.encode_record(encoded) is encoded

    def sent(item: Any) -> Any:
        return marshal.loads(wire.encode_batch(3, [item])[wire.HEADER.size :])

    assert sent(encoded) == sent(record)


def test_decode_refuses_what_is_not_an_encoded_statement() -> None:
    import pytest

    for bad in [(), (wire.K_VALUES, "log_policy_event", []), (wire.K_STATEMENT, "x")]:
        with pytest.raises(ValueError, match="not an encoded statement"):
            wire.decode_statement(bad)


def test_memory_sink_keeps_encoded_statements_as_records() -> None:
    from pgproxy.audit.records import MemorySink

    sink = MemorySink()
    record = stmt("st-1", rows=2)
    assert sink.offer_encoded(wire.encode_record(record))
    assert sink.records == [record]
