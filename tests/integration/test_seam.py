"""The policy seam seen from real drivers: a BLOCK verdict and a cell rewrite, end to end.

A small ``SessionPolicy`` written here blocks every statement that names a marker table and
rewrites two output columns (one text, one int4, each format-aware). The tests assert what
psycopg (text and binary, simple and extended protocol) and asyncpg (binary) receive, and, via
a direct superuser connection, that the upstream never executed what was blocked.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from pathlib import Path

import asyncpg
import psycopg
import pytest
from psycopg import errors

from pgproxy.policy.seam import (
    PASS_ROWS,
    Action,
    CellRewriter,
    CopyPlan,
    FieldInfo,
    RowPlan,
    StatementContext,
    Verdict,
)
from tests.integration._util import agent_dsn, superuser, unique
from tests.integration.conftest import ProxyThread, start_proxy

MARKER = "forbidden_marker_table"
MASKED_TEXT = "secret_note"
MASKED_INT = "secret_code"
TEXT_REPLACEMENT = "<redacted>"
INT_REPLACEMENT = -1


def rewrite_text(value: bytes | None, fmt: int) -> bytes | None:
    # text and binary representations of a text value are the same UTF-8 bytes
    return None if value is None else TEXT_REPLACEMENT.encode()


def rewrite_int(value: bytes | None, fmt: int) -> bytes | None:
    if value is None:
        return None
    return struct.pack("!i", INT_REPLACEMENT) if fmt == 1 else str(INT_REPLACEMENT).encode()


class RewriteResult:
    """Rewrites the two marker columns wherever they appear in a result."""

    def plan(self, fields: Sequence[FieldInfo], index: int = 0) -> RowPlan:
        rewriters: dict[int, CellRewriter] = {}
        for i, f in enumerate(fields):
            if f.name == MASKED_TEXT:
                rewriters[i] = rewrite_text
            elif f.name == MASKED_INT:
                rewriters[i] = rewrite_int
        return RowPlan(rewriters=rewriters) if rewriters else PASS_ROWS

    def copy_plan(self, index: int = 0) -> CopyPlan:
        # COPY announces no column names: the tests' COPY puts the secret note second
        return CopyPlan(RowPlan(rewriters={1: rewrite_text}))

    @property
    def scrub_diagnostics(self) -> bool:
        return False

    @property
    def max_rows(self) -> int | None:
        return None


class MarkerPolicy:
    """BLOCK anything naming the marker table; otherwise MASK (rewrite the marker columns)."""

    def statement(self, sql: str, ctx: StatementContext) -> Verdict:
        if MARKER in sql:
            return Verdict(
                Action.BLOCK,
                ("names the marker table",),
                "test",
                message=f"access to {MARKER} is not allowed",
            )
        return Verdict(Action.MASK, ("test rewrite",), "test", result=RewriteResult())

    def revalidate(self, sql: str, verdict: Verdict, ctx: StatementContext) -> Verdict:
        return verdict

    def function_call(self, function_oid: int, ctx: StatementContext) -> Verdict:
        return Verdict(Action.BLOCK, ("no function calls",), "function_call", message="blocked")

    def notification(self, channel: str, payload: str) -> str | None:
        return payload

    def scrub_error(self, fields: dict[str, str], verdict: Verdict | None) -> dict[str, str]:
        return fields


@pytest.fixture(scope="module")
def seam_proxy(pg_dsn: str, rules_dir: Path) -> Iterator[ProxyThread]:
    with superuser(pg_dsn) as su:
        su.execute(f"drop table if exists {MARKER}")
        su.execute(f"create table {MARKER} (id int)")
        su.execute(f"grant all on {MARKER} to public")
    thread, _audit = start_proxy(pg_dsn, rules_dir, policy_factory=lambda info: MarkerPolicy())
    try:
        yield thread
    finally:
        thread.stop()
        with superuser(pg_dsn) as su:
            su.execute(f"drop table if exists {MARKER}")


def _dsn(p: ProxyThread) -> str:
    return agent_dsn(p.host, p.port)


def marker_rows(pg_dsn: str) -> int:
    with superuser(pg_dsn) as su:
        row = su.execute(f"select count(*) from {MARKER}").fetchone()
    assert row is not None
    return int(row[0])


SELECT = f"select 7 as id, 'Fake Note' as {MASKED_TEXT}, 12345 as {MASKED_INT}, 'kept' as other"
EXPECTED = (7, TEXT_REPLACEMENT, INT_REPLACEMENT, "kept")


def test_block_simple_query_then_session_works(seam_proxy: ProxyThread, pg_dsn: str) -> None:
    with psycopg.connect(_dsn(seam_proxy), autocommit=True) as c:
        cur = psycopg.ClientCursor(c)  # simple Query protocol
        with pytest.raises(errors.InsufficientPrivilege) as info:
            cur.execute(f"insert into {MARKER} values (1)")
        assert info.value.sqlstate == "42501"
        assert f"access to {MARKER} is not allowed" in str(info.value)
        assert cur.execute("select 'still here'").fetchone() == ("still here",)
    assert marker_rows(pg_dsn) == 0


def test_block_extended_query(seam_proxy: ProxyThread, pg_dsn: str) -> None:
    with psycopg.connect(_dsn(seam_proxy), autocommit=True) as c:
        with pytest.raises(errors.InsufficientPrivilege):
            c.execute(f"insert into {MARKER} values (%s)", (1,))
        with pytest.raises(errors.InsufficientPrivilege):
            c.execute(f"insert into {MARKER} values (%s)", (2,), prepare=True)
        assert c.execute("select %s::int", (5,)).fetchone() == (5,)
    assert marker_rows(pg_dsn) == 0


def test_block_inside_transaction_aborts_it(seam_proxy: ProxyThread, pg_dsn: str) -> None:
    table = unique("t_seam_tx")
    with psycopg.connect(_dsn(seam_proxy)) as c:
        c.execute(f"create table {table} (v int)")
        c.commit()
        c.execute(f"insert into {table} values (1)")
        with pytest.raises(errors.InsufficientPrivilege):
            c.execute(f"delete from {MARKER}")
        assert c.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        with pytest.raises(errors.InFailedSqlTransaction):
            c.execute("select 1")
        c.rollback()
        # the rollback took the earlier insert with it, as Postgres would have
        assert c.execute(f"select count(*) from {table}").fetchone() == (0,)
        c.execute(f"drop table {table}")
        c.commit()


def test_block_in_pipeline(seam_proxy: ProxyThread, pg_dsn: str) -> None:
    with psycopg.connect(_dsn(seam_proxy), autocommit=True) as c:
        with pytest.raises(errors.InsufficientPrivilege), c.pipeline() as p:
            ok = c.execute("select 1")
            c.execute(f"insert into {MARKER} values (%s)", (3,))
            c.execute("select 2")
            p.sync()
        assert ok.fetchone() == (1,)
        assert c.execute("select 3").fetchone() == (3,)
    assert marker_rows(pg_dsn) == 0


def test_rewrite_text_results_simple_protocol(seam_proxy: ProxyThread) -> None:
    with psycopg.connect(_dsn(seam_proxy), autocommit=True) as c:
        assert psycopg.ClientCursor(c).execute(SELECT).fetchone() == EXPECTED


def test_rewrite_text_results_extended_protocol(seam_proxy: ProxyThread) -> None:
    with psycopg.connect(_dsn(seam_proxy), autocommit=True) as c:
        assert c.execute(SELECT + " where %s", (True,)).fetchone() == EXPECTED


def test_rewrite_binary_results(seam_proxy: ProxyThread) -> None:
    with psycopg.connect(_dsn(seam_proxy), autocommit=True) as c, c.cursor(binary=True) as cur:
        row = cur.execute(SELECT + " where %s", (True,)).fetchone()
        assert cur.pgresult is not None and cur.pgresult.fformat(2) == 1
        assert row == EXPECTED


def test_rewrite_copy_to_stdout(seam_proxy: ProxyThread) -> None:
    q = "copy (select g, 'Fake Note ' || g, g from generate_series(1, 3) g) to stdout"
    out = bytearray()
    with psycopg.connect(_dsn(seam_proxy), autocommit=True) as c, c.cursor().copy(q) as copy:
        while data := copy.read():
            out += data
    assert bytes(out).decode().splitlines() == [f"{g}\t{TEXT_REPLACEMENT}\t{g}" for g in (1, 2, 3)]


def test_rewrite_nulls_stay_null(seam_proxy: ProxyThread) -> None:
    q = f"select null::text as {MASKED_TEXT}, null::int as {MASKED_INT}"
    with psycopg.connect(_dsn(seam_proxy), autocommit=True) as c:
        assert c.execute(q).fetchone() == (None, None)


async def test_asyncpg_block_and_binary_rewrite(seam_proxy: ProxyThread, pg_dsn: str) -> None:
    conn = await asyncpg.connect(_dsn(seam_proxy))
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(f"insert into {MARKER} values ($1)", 4)
        row = await conn.fetchrow(SELECT)  # asyncpg asks for binary results
        assert row is not None and tuple(row) == EXPECTED
        rows = await conn.fetch(
            f"select g as id, 'Note ' || g as {MASKED_TEXT}, g as {MASKED_INT} "
            "from generate_series(1, 50) g"
        )
        assert [tuple(r) for r in rows] == [
            (g, TEXT_REPLACEMENT, INT_REPLACEMENT) for g in range(1, 51)
        ]
        assert await conn.fetchval("select $1::int", 9) == 9
    finally:
        await conn.close()
    assert marker_rows(pg_dsn) == 0
