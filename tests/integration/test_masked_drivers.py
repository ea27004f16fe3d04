"""Masking never breaks a driver: every client library reads masked columns as values of the
column's own type.

A table with a text ``ssn``, a ``date`` dob and a ``timestamptz`` tagged ``date`` (all masked by
the real policy) next to untagged ``int4`` and ``numeric`` columns sits behind a proxy with the
real policy (catalog from the upstream, Safe Harbor operators). psycopg (text, binary, simple and
extended protocol), asyncpg (prepared, binary codecs), pg8000 (native API), node-postgres (text
parsers, raw text, binary) and pgbench (a custom script in each query mode) each run to
completion and see masked values: dates cut to January 1st of their year in their own type, the
SSN replaced, the untagged columns untouched.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pg8000.native  # type: ignore[import-untyped]
import psycopg
import pytest

from pgproxy.protocol import rowmask
from pgproxy.rules import load_rules
from pgproxy.server.policy_hub import PolicyHub
from pgproxy.server.proxy import Proxy, ProxyConfig
from pgproxy.server.upstream import parse_dsn
from tests.integration._util import NODE_DIR, node_with_pg
from tests.integration.capture import CaptureHop
from tests.integration.conftest import ProxyThread

DB = "pgproxy_masked_drivers"
AGENT, PASSWORD = "triage-bot", "s3cret"
UTC = dt.UTC

#: id, ssn, dob, visits (int4), balance (numeric), admitted (timestamptz)
ROWS = [
    (1, "900-41-7001", dt.date(1961, 4, 17), 3, Decimal("12.50"),
     dt.datetime(2021, 6, 15, 13, 45, 7, 123456, tzinfo=UTC)),
    (2, "900-41-7002", dt.date(1975, 9, 3), -7, Decimal("-98765.4321"),
     dt.datetime(2021, 1, 20, 23, 59, 59, tzinfo=UTC)),
    (3, "900-41-7003", dt.date(2004, 2, 29), 2147483647, Decimal("0.000001"),
     dt.datetime(1999, 12, 31, 23, 30, tzinfo=UTC)),
]  # fmt: skip
SELECT = "SELECT id, ssn, dob, visits, balance, admitted FROM patients ORDER BY id"
COLUMNS = ["id", "ssn", "dob", "visits", "balance", "admitted"]

RULES = f"""
agents:
  - name: {AGENT}
    password: "{PASSWORD}"
    approvers: [alice@example.org]
tags:
  public.patients.ssn: ssn
  public.patients.dob: dob
  public.patients.admitted: date
"""


def expected(row: tuple[Any, ...]) -> tuple[int, dt.date, int, Decimal, dt.datetime]:
    """What a driver must see for ``row``: dates at January 1st of their year (the timestamptz
    at midnight UTC), untagged columns unchanged. The SSN is checked apart."""
    rid, _ssn, dob, visits, balance, admitted = row
    return (
        rid,
        dt.date(dob.year, 1, 1),
        visits,
        balance,
        dt.datetime(admitted.year, 1, 1, tzinfo=UTC),
    )


def check_rows(rows: list[tuple[Any, ...]]) -> None:
    """Rows as a driver decoded them, in SELECT's column order."""
    assert len(rows) == len(ROWS)
    for got, row in zip(rows, ROWS, strict=True):
        rid, ssn, dob, visits, balance, admitted = got
        assert isinstance(ssn, str) and ssn and "900-" not in ssn and ssn != row[1]
        assert type(dob) is dt.date  # a date, not a datetime
        assert isinstance(admitted, dt.datetime) and admitted.tzinfo is not None  # aware
        assert isinstance(balance, Decimal) and isinstance(visits, int)
        assert (rid, dob, visits, balance, admitted) == expected(row)
    masked_ssns = {r[1] for r in rows}
    assert len(masked_ssns) == 1, "every SSN is masked to the same replacement"


def check_rows_subset(rows: list[tuple[Any, ...]], indexes: list[int]) -> None:
    assert [r[0] for r in rows] == [ROWS[i][0] for i in indexes]
    for got, i in zip(rows, indexes, strict=True):
        assert got[1] != ROWS[i][1]
        assert (got[0], got[2], got[3], got[4], got[5]) == expected(ROWS[i])


def originals() -> list[bytes]:
    """Text forms of the tagged originals: none may reach a driver."""
    out = []
    for _id, ssn, dob, _v, _b, admitted in ROWS:
        out += [ssn.encode(), dob.isoformat().encode(), admitted.strftime("%H:%M:%S").encode()]
        out.append(admitted.strftime("%Y-%m-%d %H").encode())
    return out


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def upstream(pg_dsn: str) -> str:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DB}")
        conn.execute(f"CREATE DATABASE {DB}")
        # text timestamptz cells are printed in the session's zone: make it UTC whatever
        # the server's default (the last test changes the session's zone on purpose)
        conn.execute(f"ALTER DATABASE {DB} SET TimeZone = 'UTC'")
    dsn = pg_dsn.rsplit("/", 1)[0] + f"/{DB}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE patients (id int4 PRIMARY KEY, ssn text, dob date, visits int4,"
            " balance numeric(14, 6), admitted timestamptz)"
        )
        for row in ROWS:
            conn.execute("INSERT INTO patients VALUES (%s, %s, %s, %s, %s, %s)", row)
        conn.execute("ANALYZE patients")
    return dsn


@pytest.fixture(scope="module")
def proxy(upstream: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyThread]:
    rules_dir: Path = tmp_path_factory.mktemp("masked-drivers-rules")
    (rules_dir / "rules.yaml").write_text(RULES)
    rules = load_rules(rules_dir)
    hub = PolicyHub(rules, upstream)
    p = Proxy(
        ProxyConfig(upstream=parse_dsn(upstream), port=0), rules, policy_factory=hub.session_policy
    )
    p.closers.append(hub.close)
    thread = ProxyThread(p)
    assert asyncio.run_coroutine_threadsafe(hub.refresh(), thread.loop).result(30)
    try:
        yield thread
    finally:
        thread.stop()


def dsn(host: str, port: int) -> str:
    return f"postgresql://{AGENT}:{PASSWORD}@{host}:{port}/{DB}"


# --------------------------------------------------------------------------- Python drivers


@pytest.mark.parametrize("prepare", [False, True], ids=["unprepared", "prepared"])
@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_psycopg(proxy: ProxyThread, binary: bool, prepare: bool) -> None:
    """Text without parameters goes by the simple protocol; binary results, parameters and
    prepared statements by the extended one (unnamed or named)."""
    with CaptureHop(proxy.host, proxy.port) as hop:
        with psycopg.connect(dsn(hop.host, hop.port)) as conn:
            cur = conn.cursor(binary=binary)
            for _ in range(2):
                check_rows(cur.execute(SELECT, prepare=prepare).fetchall())
            with_param = cur.execute(
                "SELECT id, ssn, dob, visits, balance, admitted FROM patients WHERE id = %s",
                (2,),
                prepare=prepare,
            ).fetchall()
            check_rows_subset(with_param, [1])
        received = hop.snapshot()
    assert not [o for o in originals() if o in received]


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_long_masked_result_goes_through_the_row_loop(proxy: ProxyThread, binary: bool) -> None:
    """900 masked rows in one result arrive in runs of many DataRows per read: the compiled
    loop (``rowmask``; the Python twin where it is not built) rewrites every one of them."""
    if os.environ.get("PGPROXY_REQUIRE_EXT") == "1":
        assert rowmask.COMPILED
    sql = (
        "SELECT p.id, p.ssn, p.dob, p.visits, p.balance, p.admitted"
        " FROM patients p CROSS JOIN generate_series(1, 300) g ORDER BY g, p.id"
    )
    with CaptureHop(proxy.host, proxy.port) as hop:
        with psycopg.connect(dsn(hop.host, hop.port)) as conn:
            rows = conn.cursor(binary=binary).execute(sql).fetchall()
        received = hop.snapshot()
    assert len(rows) == 300 * len(ROWS)
    for i in range(300):
        check_rows(rows[i * len(ROWS) : (i + 1) * len(ROWS)])
    assert not [o for o in originals() if o in received]


def test_asyncpg_prepared_binary(proxy: ProxyThread) -> None:
    async def run() -> tuple[list[asyncpg.Record], list[asyncpg.Record], list[str]]:
        conn = await asyncpg.connect(dsn(proxy.host, proxy.port))
        try:
            stmt = await conn.prepare(SELECT)
            types = [a.type.name for a in stmt.get_attributes()]
            rows = list(await stmt.fetch())
            one = list(await conn.fetch(SELECT.replace("ORDER BY", "WHERE id = $1 ORDER BY"), 3))
            return rows, one, types
        finally:
            await conn.close()

    rows, one, types = asyncio.run(run())
    assert types == ["int4", "text", "date", "int4", "numeric", "timestamptz"]
    check_rows([tuple(r.values()) for r in rows])
    check_rows_subset([tuple(r.values()) for r in one], [2])
    # asyncpg's binary codecs: an aware datetime in UTC, masked to the year
    assert all(r["admitted"].utcoffset() == dt.timedelta(0) for r in rows)


def test_pg8000_native(proxy: ProxyThread) -> None:
    conn = pg8000.native.Connection(
        AGENT, host=proxy.host, port=proxy.port, database=DB, password=PASSWORD, timeout=30
    )
    try:
        rows = [tuple(r) for r in conn.run(SELECT)]
        assert [c["name"] for c in conn.columns] == COLUMNS
        one = [
            tuple(r) for r in conn.run(SELECT.replace("ORDER BY", "WHERE id = :id ORDER BY"), id=1)
        ]
        stmt = conn.prepare(SELECT)
        try:
            again = [tuple(r) for r in stmt.run()]
        finally:
            stmt.close()
    finally:
        conn.close()
    check_rows(rows)
    check_rows(again)
    check_rows_subset(one, [0])


# --------------------------------------------------------------------------- node-postgres


NODE_SCRIPT = r"""
"use strict";
const { Client } = require("pg");
const SQL = process.argv[1];
async function main() {
  const out = {};
  const client = new Client();
  await client.connect();
  const parsed = await client.query(SQL);
  out.parsed = parsed.rows.map((r) => ({
    id: r.id, ssn: r.ssn, dob: r.dob instanceof Date ? r.dob.toISOString() : null,
    visits: r.visits, balance: r.balance,
    admitted: r.admitted instanceof Date ? r.admitted.toISOString() : null,
  }));
  const raw = (enc) => ({
    getTypeParser: () => (v) => (Buffer.isBuffer(v) ? v.toString(enc) : String(v)),
  });
  out.text = (await client.query({ text: SQL, types: raw("utf8"), rowMode: "array" })).rows;
  const named = { name: "masked", text: SQL, types: raw("utf8"), rowMode: "array" };
  out.prepared = [(await client.query(named)).rows, (await client.query(named)).rows];
  await client.end();
  const binary = new Client({ binary: true });
  await binary.connect();
  const bin = { text: SQL, types: raw("hex"), rowMode: "array" };
  out.binary = (await binary.query({ ...bin, queryMode: "extended" })).rows;
  out.binaryPrepared = (await binary.query({ ...bin, name: "masked_binary" })).rows;
  await binary.end();
  process.stdout.write(JSON.stringify(out) + "\n");
}
main().catch((err) => {
  process.stderr.write(String(err && err.stack ? err.stack : err) + "\n");
  process.exit(1);
});
"""


@pytest.fixture(scope="module")
def node_pg() -> str:
    return node_with_pg()


def _node(node: str, host: str, port: int, user: str, password: str, sql: str) -> dict[str, Any]:
    env = {
        **os.environ,
        "TZ": "UTC",  # pg parses a date at local midnight
        "PGHOST": host,
        "PGPORT": str(port),
        "PGUSER": user,
        "PGPASSWORD": password,
        "PGDATABASE": DB,
    }
    proc = subprocess.run(
        [node, "-e", NODE_SCRIPT, sql],
        cwd=NODE_DIR, capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


#: what the masks should give, computed by Postgres itself (the session runs in UTC)
TRUNCATED = (
    "SELECT id, ssn, date_trunc('year', dob)::date AS dob, visits, balance,"
    " date_trunc('year', admitted) AS admitted FROM patients ORDER BY id"
)


def _without_ssn(rows: list[list[str]]) -> list[list[str]]:
    return [[c for i, c in enumerate(r) if i != 1] for r in rows]


@pytest.mark.timeout(240)
def test_node_postgres(node_pg: str, proxy: ProxyThread, upstream: str) -> None:
    out = _node(node_pg, proxy.host, proxy.port, AGENT, PASSWORD, SELECT)
    direct = parse_dsn(upstream)
    ref = _node(node_pg, direct.host, direct.port, direct.user, direct.password or "", TRUNCATED)
    want = [expected(r) for r in ROWS]
    # default parsers: dates become JS Dates, numeric stays a string
    assert [p["id"] for p in out["parsed"]] == [w[0] for w in want]
    for p, w, row in zip(out["parsed"], want, ROWS, strict=True):
        assert p["ssn"] != row[1] and "900-" not in p["ssn"]
        assert p["dob"] == f"{w[1].isoformat()}T00:00:00.000Z"
        assert p["admitted"] == f"{w[4].year}-01-01T00:00:00.000Z"
        assert (p["visits"], Decimal(p["balance"])) == (w[2], w[3])
    for cells, w in zip(out["text"], want, strict=True):
        assert cells[2] == w[1].isoformat()
        assert cells[5] == f"{w[4].year}-01-01 00:00:00+00"
    # raw cells, text (simple and named-prepared) and binary (unnamed and named): exactly what
    # Postgres sends for the year-truncated values; the SSN replaced
    for mode in ("text", "prepared", "binary", "binaryPrepared"):
        got, reference = out[mode], ref[mode]
        if mode == "prepared":
            got, reference = got[0] + got[1], reference[0] + reference[1]
        assert _without_ssn(got) == _without_ssn(reference), mode
        assert all(r[1] and "900-" not in r[1] for r in got), mode


# --------------------------------------------------------------------------- pgbench

PGBENCH = shutil.which("pgbench")

PGBENCH_SCRIPT = """\\set id random(1, 3)
SELECT id, ssn, dob, visits, balance, admitted FROM patients WHERE id = :id;
SELECT ssn, dob, admitted FROM patients ORDER BY id;
"""


@pytest.mark.skipif(PGBENCH is None, reason="pgbench is not installed")
@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_pgbench_custom_script(proxy: ProxyThread, mode: str, tmp_path: Path) -> None:
    assert PGBENCH is not None
    script = tmp_path / "masked.sql"
    script.write_text(PGBENCH_SCRIPT)
    with CaptureHop(proxy.host, proxy.port) as hop:
        proc = subprocess.run(
            [PGBENCH, "-h", hop.host, "-p", str(hop.port), "-U", AGENT, "-n", "-M", mode,
             "-t", "50", "-f", str(script), DB],
            capture_output=True, text=True, timeout=120,
            env={**os.environ, "PGPASSWORD": PASSWORD},
        )  # fmt: skip
        received = hop.snapshot()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "number of failed transactions: 0" in proc.stdout
    assert "number of transactions actually processed: 50/50" in proc.stdout
    # what pgbench read: every masked value, no original
    for w in (expected(r) for r in ROWS):
        assert w[1].isoformat().encode() in received
        assert f"{w[4].year}-01-01 00:00:00+00".encode() in received
    assert not [o for o in originals() if o in received]


# --------------------------------------------------------------------------- time zones


def test_masked_timestamptz_does_not_depend_on_the_original_offset(proxy: ProxyThread) -> None:
    """Rows 1 (June) and 2 (January) of 2021, read in a DST zone: masked to the year, both
    must be the same instant, whatever the result format."""
    with psycopg.connect(dsn(proxy.host, proxy.port)) as conn:
        conn.execute("SET TimeZone = 'America/New_York'")
        sql = "SELECT admitted FROM patients WHERE id IN (1, 2) ORDER BY id"
        text = [r[0] for r in conn.execute(sql).fetchall()]
        binary = [r[0] for r in conn.cursor(binary=True).execute(sql).fetchall()]
    assert text[0] == text[1], text
    assert text == binary
