"""Tamper evidence: ``verify`` passes an untouched audit and names the first bad row of each
kind of tampering (edit, delete, truncate, chain rewritten without the key)."""

from __future__ import annotations

import heapq
import json
from pathlib import Path
from typing import Any

import duckdb
import pytest

from pgproxy.audit import chain, schema
from pgproxy.audit.sink import DuckDBSink
from pgproxy.audit.verify import verify

from .conftest import KEY, sample_records, stmt


@pytest.fixture
async def audit(tmp_path: Path) -> Path:
    path = tmp_path / "audit.duckdb"
    sink = DuckDBSink(path, signing_key=KEY, checkpoint_every=5, flush_interval=0.05)
    await sink.start()
    for rec in [*sample_records(), *(stmt(f"extra-{i}") for i in range(12))]:
        await sink.emit_durable(rec)  # one batch each: a checkpoint every 5 rows
    await sink.close()
    return path


def _field(path: Path, column: str, statement_id: str) -> Any:
    with duckdb.connect(str(path)) as conn:
        row = conn.execute(
            f"SELECT {column} FROM log_statement WHERE statement_id = ?", [statement_id]
        ).fetchone()
    assert row is not None
    return row[0]


def _seq_of(path: Path, statement_id: str) -> int:
    return int(_field(path, "seq", statement_id))


def _edit_statement(path: Path, statement_id: str, decision: str) -> None:
    """Change one statement's decision the way a forger would: a shape row of its own."""
    with duckdb.connect(str(path)) as conn:
        conn.execute(
            "INSERT INTO log_statement_shape SELECT (SELECT max(shape_id) + 1 FROM "
            "log_statement_shape), * EXCLUDE (shape_id) REPLACE (? AS decision) "
            "FROM log_statement_shape WHERE shape_id = (SELECT shape_id FROM log_statement_row "
            "WHERE statement_id = ?)",
            [decision, statement_id],
        )
        conn.execute(
            "UPDATE log_statement_row SET shape_id = (SELECT max(shape_id) FROM "
            "log_statement_shape) WHERE statement_id = ?",
            [statement_id],
        )


def _checkpoint_seqs(path: Path) -> list[int]:
    return [cp.seq for _, cp in chain.read_checkpoints(chain.checkpoints_path(path))]


def test_untouched_audit_verifies(audit: Path) -> None:
    result = verify(audit, KEY)
    assert result.ok, result.first_bad
    assert result.rows == len(sample_records()) + 12
    assert result.checkpoints >= 5  # start, every 5 rows, close


def test_wrong_key_fails(audit: Path) -> None:
    result = verify(audit, b"another key")
    assert not result.ok
    assert "HMAC" in (result.first_bad or "")


def test_edited_row_is_named(audit: Path) -> None:
    seq = _seq_of(audit, "st-3")
    _edit_statement(audit, "st-3", "ALLOW")
    assert _field(audit, "decision", "st-3") == "ALLOW"
    result = verify(audit, KEY)
    assert not result.ok
    assert (result.bad_seq, result.bad_table) == (seq, "log_statement")
    assert f"seq {seq} (log_statement)" in (result.first_bad or "")
    assert "edited" in (result.first_bad or "")


def test_an_edited_shared_shape_names_its_first_statement(audit: Path) -> None:
    """Statements keep their repeated fields in one shape row: editing it breaks the chain
    at the first statement that uses it."""
    with duckdb.connect(str(audit)) as conn:
        first = conn.execute(
            "SELECT min(seq), count(*) FROM log_statement_row WHERE shape_id = "
            "(SELECT shape_id FROM log_statement_row WHERE statement_id = 'extra-3')"
        ).fetchone()
        assert first is not None and first[1] >= 2  # the extras share one shape
        conn.execute(
            "UPDATE log_statement_shape SET sql_redacted = 'SELECT 1' WHERE shape_id = "
            "(SELECT shape_id FROM log_statement_row WHERE statement_id = 'extra-3')"
        )
    result = verify(audit, KEY)
    assert not result.ok
    assert (result.bad_seq, result.bad_table) == (first[0], "log_statement")
    assert "edited" in (result.first_bad or "")


def test_a_statement_without_its_shape_is_missing(audit: Path) -> None:
    seq = _seq_of(audit, "st-3")
    with duckdb.connect(str(audit)) as conn:
        conn.execute(
            "DELETE FROM log_statement_shape WHERE shape_id = "
            "(SELECT shape_id FROM log_statement_row WHERE statement_id = 'st-3')"
        )
    result = verify(audit, KEY)
    assert not result.ok
    assert result.bad_seq is not None and result.bad_seq > seq
    assert "missing" in (result.first_bad or "")


def test_deleted_row_is_detected(audit: Path) -> None:
    seq = _seq_of(audit, "st-3")
    with duckdb.connect(str(audit)) as conn:
        conn.execute("DELETE FROM log_statement_row WHERE statement_id = 'st-3'")
    result = verify(audit, KEY)
    assert not result.ok
    assert result.bad_seq == seq + 1
    assert f"rows {seq}..{seq} are missing" in (result.first_bad or "")


def test_truncation_below_last_checkpoint_is_detected(audit: Path) -> None:
    last_cp = max(_checkpoint_seqs(audit))
    keep = last_cp - 2
    with duckdb.connect(str(audit)) as conn:
        for t in schema.TABLES:
            conn.execute(f"DELETE FROM {schema.chain_table(t.name)} WHERE seq > ?", [keep])
    result = verify(audit, KEY)
    assert not result.ok
    assert "truncated" in (result.first_bad or "")
    assert result.bad_seq == keep + 1


def _rewrite_chain_from(path: Path, from_seq: int) -> dict[int, str]:
    """What an attacker without the key can do: recompute every hash from ``from_seq`` on."""
    with duckdb.connect(str(path)) as conn:
        streams = []
        for t in schema.TABLES:
            rows = conn.execute(t.select_sql()).fetchall()
            streams.append([(r[0], t.name, *r[1:]) for r in rows])
        prev = chain.GENESIS
        new_hashes: dict[int, str] = {}
        for seq, table, _prev, row_hash, *values in heapq.merge(*streams, key=lambda r: r[0]):
            if seq >= from_seq:
                canon = chain.canonical(table, seq, schema.db_values(tuple(values)))
                row_hash = chain.row_hash(prev, canon)
                conn.execute(
                    f"UPDATE {schema.chain_table(table)} SET prev_hash = ?, row_hash = ? "
                    "WHERE seq = ?",
                    [prev, row_hash, seq],
                )
                new_hashes[seq] = row_hash
            prev = row_hash
    return new_hashes


def test_consistent_rewrite_without_key_is_detected(audit: Path) -> None:
    seq = _seq_of(audit, "st-3")
    _edit_statement(audit, "st-3", "ALLOW")
    _rewrite_chain_from(audit, seq)
    first_cp_after = min(s for s in _checkpoint_seqs(audit) if s >= seq)
    result = verify(audit, KEY)
    assert not result.ok
    assert result.bad_seq == first_cp_after
    assert "chain rewritten" in (result.first_bad or "")


def test_rewritten_checkpoints_without_key_fail_hmac(audit: Path) -> None:
    seq = _seq_of(audit, "st-3")
    _edit_statement(audit, "st-3", "ALLOW")
    new_hashes = _rewrite_chain_from(audit, seq)
    cp_file = chain.checkpoints_path(audit)
    lines = []
    for _, cp in chain.read_checkpoints(cp_file):
        obj: dict[str, Any] = json.loads(cp.to_line())
        if cp.seq in new_hashes:
            obj["row_hash"] = new_hashes[cp.seq]
            obj["hmac"] = chain.sign(b"attacker guess", cp.seq, obj["row_hash"], cp.ts)
        lines.append(json.dumps(obj) + "\n")
    cp_file.write_text("".join(lines))
    result = verify(audit, KEY)
    assert not result.ok
    assert "bad HMAC" in (result.first_bad or "")
    assert result.bad_seq is not None and result.bad_seq >= seq


def test_missing_checkpoint_file_fails(audit: Path) -> None:
    chain.checkpoints_path(audit).unlink()
    result = verify(audit, KEY)
    assert not result.ok
    assert "missing" in (result.first_bad or "")


def test_torn_last_checkpoint_line_is_ignored(audit: Path) -> None:
    with chain.checkpoints_path(audit).open("a") as fh:
        fh.write('{"seq": 99999, "row_ha')  # a crash in the middle of a write
    assert verify(audit, KEY).ok


def test_without_key_chain_still_checked(audit: Path) -> None:
    assert verify(audit, None).ok
    with duckdb.connect(str(audit)) as conn:
        conn.execute("UPDATE log_session_start SET client_addr = '10.0.0.9' WHERE seq = 2")
    result = verify(audit, None)
    assert not result.ok and result.bad_seq == 2 and not result.signed


async def test_restart_continues_the_chain(audit: Path) -> None:
    sink = DuckDBSink(audit, signing_key=KEY)
    await sink.start()
    await sink.emit_durable(stmt("after-restart"))
    await sink.close()
    result = verify(audit, KEY)
    assert result.ok, result.first_bad
    assert result.rows == len(sample_records()) + 13


async def test_start_refuses_a_truncated_audit(audit: Path) -> None:
    from pgproxy.audit.sink import AuditUnavailable

    last_cp = max(_checkpoint_seqs(audit))
    with duckdb.connect(str(audit)) as conn:
        for t in schema.TABLES:
            conn.execute(f"DELETE FROM {schema.chain_table(t.name)} WHERE seq > ?", [last_cp - 1])
    sink = DuckDBSink(audit, signing_key=KEY)
    with pytest.raises(AuditUnavailable, match="truncated"):
        await sink.start()
