"""pg8000 (pure Python, extended protocol, text and binary parameters) through the proxy."""

from __future__ import annotations

import datetime as dt
import decimal

import pg8000.dbapi  # type: ignore[import-untyped]
import pg8000.native  # type: ignore[import-untyped]
import pytest

from tests.integration._util import unique
from tests.integration.conftest import RunningProxy


def _native(p: RunningProxy) -> pg8000.native.Connection:
    return pg8000.native.Connection(
        user="triage-bot", password="s3cret", host=p.host, port=p.port, database="postgres"
    )


def test_native_queries(running_proxy: RunningProxy) -> None:
    con = _native(running_proxy)
    try:
        assert con.run("select 1 + 1") == [[2]]
        assert con.run("select :a::int * 3, :b::text", a=7, b="Fake Name") == [[21, "Fake Name"]]
        rows = con.run(
            "select :d::date, :n::numeric, :ts::timestamptz",
            d=dt.date(2001, 2, 3),
            n=decimal.Decimal("1.25"),
            ts=dt.datetime(2020, 1, 1, tzinfo=dt.UTC),
        )
        assert rows == [
            [dt.date(2001, 2, 3), decimal.Decimal("1.25"), dt.datetime(2020, 1, 1, tzinfo=dt.UTC)]
        ]
        assert [c["name"] for c in con.columns or []] == ["date", "numeric", "timestamptz"]
        ps = con.prepare("select :x::int + 1")
        assert [ps.run(x=i) for i in range(3)] == [[[1]], [[2]], [[3]]]
        ps.close()
        with pytest.raises(pg8000.native.DatabaseError) as info:
            con.run("select * from pgproxy_no_such_table")
        assert info.value.args[0]["C"] == "42P01"
        assert con.run("select 'recovered'") == [["recovered"]]
    finally:
        con.close()


def test_native_copy(running_proxy: RunningProxy) -> None:
    import io

    con = _native(running_proxy)
    name = unique("t_pg8000")
    try:
        con.run(f"create table {name} (id int, v text)")
        con.run(f"copy {name} from stdin", stream=io.StringIO("1\ta\n2\tb\n"))
        out = io.StringIO()
        con.run(f"copy (select * from {name} order by id) to stdout", stream=out)
        assert out.getvalue() == "1\ta\n2\tb\n"
    finally:
        con.run(f"drop table if exists {name}")
        con.close()


def test_dbapi(running_proxy: RunningProxy) -> None:
    name = unique("t_pg8000_dbapi")
    con = pg8000.dbapi.connect(
        user="triage-bot",
        password="s3cret",
        host=running_proxy.host,
        port=running_proxy.port,
        database="postgres",
    )
    try:
        cur = con.cursor()
        cur.execute(f"create table {name} (id int primary key, v text)")
        cur.executemany(f"insert into {name} values (%s, %s)", [(i, f"v{i}") for i in range(20)])
        con.commit()
        cur.execute(f"select count(*), min(v) from {name}")
        assert cur.fetchone() == [20, "v0"]
        with pytest.raises(pg8000.dbapi.DatabaseError) as info:
            cur.execute(f"insert into {name} values (%s, %s)", (1, "dup"))
        assert info.value.args[0]["C"] == "23505"
        con.rollback()
        cur.execute(f"select v from {name} where id = %s", (19,))
        assert cur.fetchall() == (["v19"],)
        cur.execute(f"drop table {name}")
        con.commit()
    finally:
        con.close()
