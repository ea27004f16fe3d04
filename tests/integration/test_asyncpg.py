"""asyncpg through the proxy: extended protocol, binary codecs, cancel by timeout, COPY, pools."""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import json
import time
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from tests.integration._util import unique
from tests.integration.conftest import RunningProxy


@pytest.fixture
async def conn(running_proxy: RunningProxy) -> AsyncIterator[asyncpg.Connection]:
    c = await asyncpg.connect(running_proxy.dsn())
    try:
        yield c
    finally:
        await c.close()


async def test_prepared_statement(conn: asyncpg.Connection) -> None:
    stmt = await conn.prepare("select $1::int * 2 as doubled, $2::text as label")
    assert [a.name for a in stmt.get_attributes()] == ["doubled", "label"]
    for i in range(5):
        row = await stmt.fetchrow(i, f"fake-{i}")
        assert row is not None and (row["doubled"], row["label"]) == (i * 2, f"fake-{i}")
    assert await stmt.fetchval(21, "x") == 42


async def test_binary_codecs(conn: asyncpg.Connection) -> None:
    values = (
        -(2**62),
        decimal.Decimal("12345678901234567890.000000000123"),
        dt.date(1999, 12, 31),
        dt.datetime(2024, 2, 29, 23, 59, 58, 123456, tzinfo=dt.UTC),
        uuid.UUID("00000000-0000-4000-8000-000000000abc"),
        {"patient": "Fake Person", "codes": [1, 2, 3], "nested": {"ok": True}},
        [[1, 2], [3, 4]],
        ["a", None, "ü"],
        b"\x00\x01\xfe\xff" * 1000,
        3.25,
        True,
        dt.timedelta(days=3, seconds=7),
    )
    row = await conn.fetchrow(
        "select $1::int8, $2::numeric, $3::date, $4::timestamptz, $5::uuid, $6::jsonb, "
        "$7::int4[], $8::text[], $9::bytea, $10::float8, $11::bool, $12::interval",
        values[0],
        values[1],
        values[2],
        values[3],
        values[4],
        json.dumps(values[5]),
        *values[6:],
    )
    assert row is not None
    got = tuple(row)
    assert got[:5] == values[:5]
    assert json.loads(got[5]) == values[5]
    assert got[6:] == values[6:]


async def test_timeout_cancels_long_query(conn: asyncpg.Connection) -> None:
    started = time.monotonic()
    with pytest.raises(asyncio.TimeoutError):
        await conn.execute("select pg_sleep(10)", timeout=0.5)
    assert time.monotonic() - started < 5
    # asyncpg cancels the query on timeout; the connection is usable at once
    assert await conn.fetchval("select 'still alive'") == "still alive"


async def test_copy_records_to_table(conn: asyncpg.Connection) -> None:
    name = unique("t_asyncpg_copy")
    await conn.execute(f"create table {name} (id int, name text, born date)")
    try:
        records = [(i, f"Fake {i}", dt.date(2000, 1, 1) + dt.timedelta(days=i)) for i in range(500)]
        result = await conn.copy_records_to_table(name, records=records)
        assert result == "COPY 500"
        rows = await conn.fetch(f"select id, name, born from {name} order by id")
        assert [tuple(r) for r in rows] == records
        buf = bytearray()

        async def sink(chunk: bytes) -> None:
            buf.extend(chunk)

        await conn.copy_from_query(f"select id from {name} where id < 3 order by id", output=sink)
        assert bytes(buf) == b"0\n1\n2\n"
    finally:
        await conn.execute(f"drop table {name}")


async def test_cursor_in_transaction(conn: asyncpg.Connection) -> None:
    async with conn.transaction():
        seen = [
            r[0] async for r in conn.cursor("select g from generate_series(1, 250) g", prefetch=40)
        ]
        assert seen == list(range(1, 251))
        cur = await conn.cursor("select g from generate_series(1, 100) g")
        assert [r[0] for r in await cur.fetch(5)] == [1, 2, 3, 4, 5]
        await cur.forward(10)
        row = await cur.fetchrow()
        assert row is not None and row[0] == 16


async def test_executemany(conn: asyncpg.Connection) -> None:
    name = unique("t_asyncpg_many")
    await conn.execute(f"create table {name} (id int primary key, v text)")
    try:
        await conn.executemany(
            f"insert into {name} values ($1, $2)", [(i, f"v{i}") for i in range(300)]
        )
        assert await conn.fetchval(f"select count(*) from {name}") == 300
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.executemany(f"insert into {name} values ($1, $2)", [(1000, "a"), (1, "b")])
        # executemany runs in an implicit transaction: the first row was rolled back
        assert await conn.fetchval(f"select count(*) from {name}") == 300
    finally:
        await conn.execute(f"drop table {name}")


async def test_listener(running_proxy: RunningProxy, conn: asyncpg.Connection) -> None:
    channel = unique("chan")
    got: asyncio.Queue[tuple[str, str]] = asyncio.Queue()

    def on_notify(_c: object, _pid: int, ch: str, payload: str) -> None:
        got.put_nowait((ch, payload))

    await conn.add_listener(channel, on_notify)
    other = await asyncpg.connect(running_proxy.dsn())
    try:
        await other.execute("select pg_notify($1, $2)", channel, "fake-payload")
        assert await asyncio.wait_for(got.get(), 5) == (channel, "fake-payload")
    finally:
        await other.close()
    await conn.remove_listener(channel, on_notify)


async def test_errors_and_recovery(conn: asyncpg.Connection) -> None:
    with pytest.raises(asyncpg.UndefinedTableError):
        await conn.fetch("select * from pgproxy_no_such_table")
    with pytest.raises(asyncpg.DivisionByZeroError):
        await conn.fetchval("select 1 / $1::int", 0)
    assert await conn.fetchval("select 1 / $1::int", 1) == 1


async def test_concurrent_pool(running_proxy: RunningProxy) -> None:
    async with asyncpg.create_pool(running_proxy.dsn(), min_size=2, max_size=10) as pool:

        async def work(i: int) -> int:
            async with pool.acquire() as c:
                await c.execute("select pg_sleep(0.01)")
                return int(await c.fetchval("select $1::int + 1000", i))

        results = await asyncio.gather(*(work(i) for i in range(100)))
    assert results == [i + 1000 for i in range(100)]
