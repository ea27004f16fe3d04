"""Checks an audit file's tamper evidence: recomputes the hash chain, checks the signed
checkpoints, and names the first bad row.

Detects: an edited row (its ``row_hash`` no longer matches its contents), a deleted row (a gap
in ``seq`` / a ``prev_hash`` that names no row), truncation (a checkpoint names a seq the tables
no longer reach), a chain rewritten consistently without the key (a row no longer matches its
signed checkpoint, or the checkpoint's HMAC is wrong) and a missing checkpoint file. Rows after
the last checkpoint are covered by the chain only: deleting them all is not detectable.
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import duckdb

from pgproxy.audit import chain, schema
from pgproxy.audit.query import AuditQueryError

_CHUNK = 10_000


@dataclass(frozen=True, slots=True)
class VerifyResult:
    ok: bool
    rows: int
    #: What is wrong, naming the first bad row as "seq N (table)"; None when ok.
    first_bad: str | None
    bad_seq: int | None = None
    bad_table: str | None = None
    checkpoints: int = 0
    #: False when no key was given: checkpoints were compared but their HMACs not checked.
    signed: bool = True


@dataclass(frozen=True, slots=True)
class _Problem:
    seq: int
    table: str | None
    message: str


def _rows(conn: duckdb.DuckDBPyConnection, table: schema.Table) -> Iterator[tuple[Any, ...]]:
    cur = conn.cursor()
    try:
        cur.execute(table.select_sql())
        while chunk := cur.fetchmany(_CHUNK):
            for row in chunk:
                yield (row[0], table.name, *row[1:])
    finally:
        cur.close()


def verify(path: str | os.PathLike[str], signing_key: bytes | None) -> VerifyResult:
    """Verify the audit at ``path`` (opened read-only) against ``<path>.checkpoints``."""
    import duckdb

    p = os.fspath(path)
    if not os.path.exists(p):
        raise AuditQueryError(f"no audit file at {p}")
    try:
        conn = duckdb.connect(p, read_only=True)
    except duckdb.Error as exc:
        raise AuditQueryError(f"cannot open audit file {p}: {exc}") from None
    try:
        return _verify(conn, p, signing_key)
    finally:
        conn.close()


def verify_connection(
    conn: duckdb.DuckDBPyConnection, path: str, key: bytes | None
) -> VerifyResult:
    """``verify`` on an open connection (the live sink's, while ``serve`` holds the file)."""
    return _verify(conn, path, key)


def _verify(conn: duckdb.DuckDBPyConnection, path: str, key: bytes | None) -> VerifyResult:
    present = {
        r[0]
        for r in conn.execute(
            "SELECT table_name FROM duckdb_tables() UNION ALL SELECT view_name FROM duckdb_views()"
        ).fetchall()
    }
    missing = [t.name for t in schema.TABLES if t.name not in present]
    if missing:
        return VerifyResult(False, 0, f"not a pgproxy audit: table {missing[0]} is missing")
    total = 0
    for t in schema.TABLES:
        found = conn.execute(f"SELECT count(*) FROM {t.name}").fetchone()
        total += int(found[0]) if found else 0

    problems: list[_Problem] = []
    cps: list[tuple[int, chain.Checkpoint]] = []
    cp_path = chain.checkpoints_path(path)
    if cp_path.exists():
        try:
            cps = list(chain.read_checkpoints(cp_path))
        except chain.BadCheckpointLine as exc:
            problems.append(_Problem(0, None, f"{cp_path.name}: {exc}"))
    elif total:
        problems.append(_Problem(0, None, f"checkpoint file {cp_path.name} is missing"))
    want = {cp.seq for _, cp in cps}
    seen: dict[int, tuple[str, str]] = {0: (chain.GENESIS, "")}

    expected, prev, last_seq = 1, chain.GENESIS, 0
    merged = heapq.merge(*(_rows(conn, t) for t in schema.TABLES), key=lambda r: r[0])
    for seq, table, prev_hash, row_hash, *values in merged:
        if seq != expected:
            why = (
                f"rows {expected}..{seq - 1} are missing (deleted)"
                if seq > expected
                else f"seq {seq} appears twice"
            )
            problems.append(_Problem(seq, table, f"seq {seq} ({table}): {why}"))
            break
        if prev_hash != prev:
            problems.append(
                _Problem(
                    seq, table, f"seq {seq} ({table}): prev_hash does not chain to seq {seq - 1}"
                )
            )
            break
        canon = chain.canonical(table, seq, schema.db_values(tuple(values)))
        if chain.row_hash(prev_hash, canon) != row_hash:
            problems.append(
                _Problem(seq, table, f"seq {seq} ({table}): row edited, its hash does not match")
            )
            break
        if seq in want:
            seen[seq] = (row_hash, table)
        prev, last_seq, expected = row_hash, seq, expected + 1

    scanned_to = problems[-1].seq - 1 if problems and problems[-1].seq else last_seq
    for line_no, cp in cps:
        where = f"checkpoint line {line_no} (seq {cp.seq})"
        at = seen.get(cp.seq)
        table = at[1] if at and at[1] else None
        name = f"seq {cp.seq} ({table})" if table else f"seq {cp.seq}"
        if key is not None and not cp.valid(key):
            problems.append(
                _Problem(cp.seq, table, f"{name}: {where} has a bad HMAC (rewritten or wrong key)")
            )
        elif cp.seq > scanned_to and not problems:
            problems.append(
                _Problem(
                    last_seq + 1,
                    None,
                    f"seq {last_seq + 1}: truncated, the audit ends at seq {last_seq} but "
                    f"{where} was signed",
                )
            )
        elif at is not None and at[0] != cp.row_hash:
            problems.append(
                _Problem(
                    cp.seq, table, f"{name}: does not match the signed {where}: chain rewritten"
                )
            )
    if problems:
        first = min(problems, key=lambda pr: pr.seq)
        return VerifyResult(
            False, total, first.message, first.seq or None, first.table, len(cps), key is not None
        )
    return VerifyResult(True, total, None, None, None, len(cps), key is not None)
