"""psycopg 3 through the proxy to the real test Postgres: every protocol feature it exercises."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import errors, sql

from tests.integration._proxy_process import proxy_process
from tests.integration._util import agent_dsn, unique
from tests.integration.conftest import RunningProxy


@pytest.fixture
def conn(running_proxy: RunningProxy) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    with psycopg.connect(running_proxy.dsn(), autocommit=True) as c:
        yield c


@pytest.fixture
def table(conn: psycopg.Connection[tuple[object, ...]]) -> Iterator[str]:
    name = unique("t_psycopg")
    conn.execute(f"create table {name} (id int primary key, name text, data bytea)")
    yield name
    conn.execute(f"drop table if exists {name}")


def test_text_and_binary_results(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    q = "select 42::int4, 'Ada Fake'::text, 1.5::numeric, '\\x00ff'::bytea, array[1,2,3]"
    text_row = conn.execute(q).fetchone()
    with conn.cursor(binary=True) as cur:
        binary_row = cur.execute(q).fetchone()
        assert cur.pgresult is not None and cur.pgresult.fformat(0) == 1
    assert text_row == binary_row == (42, "Ada Fake", 1.5, b"\x00\xff", [1, 2, 3])


def test_parameters_in_binary(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    with conn.cursor(binary=True) as cur:
        cur.execute("select %b::int8 + 1, %b::text || '!'", (2**40, "héllo"))
        assert cur.fetchone() == (2**40 + 1, "héllo!")


def test_pipeline_mode(conn: psycopg.Connection[tuple[object, ...]], table: str) -> None:
    with conn.pipeline():
        cursors = [
            conn.execute(
                f"insert into {table} (id, name) values (%s, %s) returning id", (i, f"n{i}")
            )
            for i in range(50)
        ]
        count = conn.execute(f"select count(*) from {table}")
    assert [c.fetchone() for c in cursors] == [(i,) for i in range(50)]
    assert count.fetchone() == (50,)


def test_pipeline_error_in_the_middle(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    with pytest.raises(errors.DivisionByZero), conn.pipeline() as p:
        first = conn.execute("select 1")
        conn.execute("select 1/0")
        p.sync()
    assert first.fetchone() == (1,)
    assert conn.execute("select 'ok'").fetchone() == ("ok",)


def test_copy_from_stdin_and_to_stdout(
    conn: psycopg.Connection[tuple[object, ...]], table: str
) -> None:
    with conn.cursor() as cur:
        with cur.copy(f"copy {table} (id, name) from stdin") as copy:
            for i in range(1000):
                copy.write_row((i, f"Fake Person {i}"))
        assert conn.execute(f"select count(*), max(name) from {table}").fetchone() == (
            1000,
            "Fake Person 999",
        )
        out = bytearray()
        with cur.copy(f"copy (select id, name from {table} order by id) to stdout") as copy:
            while data := copy.read():
                out += data
    lines = bytes(out).decode().splitlines()
    assert len(lines) == 1000
    assert lines[7] == "7\tFake Person 7"


def test_copy_from_stdin_error_recovers(
    conn: psycopg.Connection[tuple[object, ...]], table: str
) -> None:
    with pytest.raises(errors.InvalidTextRepresentation), conn.cursor() as cur:  # noqa: SIM117
        with cur.copy(f"copy {table} (id, name) from stdin") as copy:
            copy.write(b"1\tok\nnot-a-number\tbad\n")
    assert conn.execute(f"select count(*) from {table}").fetchone() == (0,)


def test_server_side_cursor(running_proxy: RunningProxy) -> None:
    with psycopg.connect(running_proxy.dsn()) as c, c.cursor(name="pgproxy_named") as cur:
        cur.itersize = 100
        cur.execute("select g, g * 2 from generate_series(1, 1000) g")
        assert cur.fetchmany(3) == [(1, 2), (2, 4), (3, 6)]
        total = sum(1 for _ in cur)
        assert total == 997


def test_cancel_long_query(pg_dsn: str, rules_dir: Path) -> None:
    # conn.cancel() is libpq's blocking PQcancel, called without releasing the GIL: the proxy
    # must live in another process, or the cancel would wait on a proxy thread it is starving.
    with (
        proxy_process(pg_dsn, rules_dir) as proc,
        psycopg.connect(agent_dsn(proc.host, proc.port), autocommit=True) as c,
    ):
        timer = threading.Timer(0.5, c.cancel)
        timer.start()
        started = time.monotonic()
        with pytest.raises(errors.QueryCanceled):
            c.execute("select pg_sleep(10)")
        assert time.monotonic() - started < 5
        timer.join()
        assert c.execute("select 1").fetchone() == (1,)


def test_cancel_safe(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    timer = threading.Timer(0.5, conn.cancel_safe)
    timer.start()
    with pytest.raises(errors.QueryCanceled):
        conn.execute("select pg_sleep(10)")
    timer.join()


def test_transactions(running_proxy: RunningProxy) -> None:
    name = unique("t_tx")
    with psycopg.connect(running_proxy.dsn()) as c:
        c.execute(f"create table {name} (v int)")
        c.commit()
        with c.transaction():
            c.execute(f"insert into {name} values (1)")
        try:
            with c.transaction():
                c.execute(f"insert into {name} values (2)")
                assert c.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
                raise RuntimeError("roll back")
        except RuntimeError:
            pass
        with c.transaction():
            c.execute(f"insert into {name} values (3)")
            with c.transaction():  # savepoint
                c.execute(f"insert into {name} values (4)")
            with pytest.raises(errors.UniqueViolation), c.transaction():
                c.execute(f"create unique index on {name} (v)")
                c.execute(f"insert into {name} values (3)")
        rows = c.execute(f"select v from {name} order by v").fetchall()
        assert rows == [(1,), (3,), (4,)]
        c.execute(f"drop table {name}")
        c.commit()


def test_error_then_recovery(running_proxy: RunningProxy) -> None:
    with psycopg.connect(running_proxy.dsn()) as c:
        with pytest.raises(errors.UndefinedTable) as info:
            c.execute("select * from no_such_table_pgproxy")
        assert info.value.sqlstate == "42P01"
        assert c.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        with pytest.raises(errors.InFailedSqlTransaction):
            c.execute("select 1")
        c.rollback()
        assert c.execute("select 2").fetchone() == (2,)
        with pytest.raises(errors.SyntaxError):
            c.execute("selec 1")
        c.rollback()
        assert c.execute("select %s::int", (3,)).fetchone() == (3,)


def test_prepared_statements(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    for i in range(5):
        row = conn.execute("select %s::int * 10, %s::text", (i, f"x{i}"), prepare=True).fetchone()
        assert row == (i * 10, f"x{i}")
    names = conn.execute("select count(*) from pg_prepared_statements").fetchone()
    assert names is not None and int(names[0]) >= 1  # type: ignore[call-overload]
    conn.prepare_threshold = 0
    for i in range(3):
        assert conn.execute("select %s::int + 1", (i,)).fetchone() == (i + 1,)


@pytest.mark.timeout(120)
def test_large_values(conn: psycopg.Connection[tuple[object, ...]], table: str) -> None:
    size = 64 * 1024 * 1024
    blob = bytes(range(256)) * (size // 256)
    text = "ő" * (size // 2)  # 64 MB of UTF-8
    conn.execute(f"insert into {table} (id, name, data) values (1, %s, %s)", (text, blob))
    row = conn.execute(f"select data, name from {table} where id = 1").fetchone()
    assert row is not None and row[0] == blob and row[1] == text
    with conn.cursor(binary=True) as cur:
        row = cur.execute(f"select data, length(name) from {table} where id = 1").fetchone()
    assert row is not None and row[0] == blob and row[1] == size // 2


def test_unicode(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    samples = ["Zoë Fakename", "名前テスト", "🧪🩺", "Ωμέγα", "a\u0301", "\u200b"]
    for s in samples:
        assert conn.execute("select %s::text, length(%s::text)", (s, s)).fetchone() == (s, len(s))
    assert conn.execute("select '🩺' || '✓'").fetchone() == ("🩺✓",)


def test_listen_notify(running_proxy: RunningProxy) -> None:
    channel = unique("chan")
    with (
        psycopg.connect(running_proxy.dsn(), autocommit=True) as listener,
        psycopg.connect(running_proxy.dsn(), autocommit=True) as talker,
    ):
        listener.execute(sql.SQL("listen {}").format(sql.Identifier(channel)))
        talker.execute("select pg_notify(%s, %s)", (channel, "payload-1"))
        talker.execute(sql.SQL("notify {}, 'payload-2'").format(sql.Identifier(channel)))
        got = []
        for n in listener.notifies(timeout=5, stop_after=2):
            got.append((n.channel, n.payload))
        assert got == [(channel, "payload-1"), (channel, "payload-2")]


def test_notice_response(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    notices: list[tuple[str | None, str | None]] = []
    conn.add_notice_handler(lambda d: notices.append((d.severity_nonlocalized, d.message_primary)))
    conn.execute("do $$ begin raise notice 'hello from %', 'plpgsql'; end $$")
    assert notices == [("NOTICE", "hello from plpgsql")]


def test_empty_query(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    cur = conn.execute(";")
    assert cur.pgresult is not None
    assert cur.pgresult.status == psycopg.pq.ExecStatus.EMPTY_QUERY
    assert conn.execute("select 'after'").fetchone() == ("after",)


def test_multi_statement_simple_query(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    cur = conn.cursor()
    cur.execute("select 1; select 'two', 2; select 3")
    results = [cur.fetchall()]
    while cur.nextset():
        results.append(cur.fetchall())
    assert results == [[(1,)], [("two", 2)], [(3,)]]
