"""Agent authentication and the startup phase, with real drivers and raw sockets.

Failed logins must never cost an upstream connection: the proxy's upstream goes through a
``FaultyHop`` whose connection counter shows whether anything reached Postgres.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest

from pgproxy.pgcluster import _make_cert
from pgproxy.server.credentials import format_verifier, verifier_from_password
from tests.integration._util import (
    RawConn,
    agent_dsn,
    error_fields,
    message,
    proxy,
    startup_packet,
    upstream,
)
from tests.integration.conftest import AGENT, AGENT_PASSWORD, ProxyThread, RunningProxy
from tests.integration.faulty_hop import FaultyHop

VERIFIER_AGENT = "hashed-bot"
VERIFIER_PASSWORD = "fake-verifier-pw"


@pytest.fixture(scope="module")
def verifier_rules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("verifier-rules")
    verifier = format_verifier(verifier_from_password(VERIFIER_PASSWORD))
    (d / "rules.yaml").write_text(
        f"""
agents:
  - name: {AGENT}
    password: "{AGENT_PASSWORD}"
  - name: {VERIFIER_AGENT}
    password: "{verifier}"
analysts:
  - name: auditor
    password: "an0ther"
"""
    )
    return d


@pytest.fixture(scope="module")
def hopped(pg_dsn: str, verifier_rules: Path) -> Iterator[tuple[ProxyThread, FaultyHop]]:
    """A proxy whose upstream connections all pass through (and are counted by) a hop."""
    base = upstream(pg_dsn)
    with (
        FaultyHop(base.host, base.port) as hop,
        proxy(pg_dsn, verifier_rules, upstream=upstream(pg_dsn, host=hop.host, port=hop.port)) as p,
    ):
        yield p, hop


def _connect_error(dsn: str) -> psycopg.OperationalError:
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(dsn, connect_timeout=10).close()
    return info.value


async def _asyncpg_error(dsn: str, **kw: object) -> asyncpg.PostgresError:
    """libpq does not expose a startup error's SQLSTATE; asyncpg does."""
    with pytest.raises(asyncpg.PostgresError) as info:
        await (await asyncpg.connect(dsn, timeout=10, **kw)).close()
    return info.value


def test_scram_login_with_plain_password(running_proxy: RunningProxy) -> None:
    with psycopg.connect(running_proxy.dsn()) as c:
        assert c.execute("select current_setting('application_name') is not null").fetchone()


def test_scram_login_with_verifier(hopped: tuple[ProxyThread, FaultyHop]) -> None:
    p, _hop = hopped
    with psycopg.connect(agent_dsn(p.host, p.port, VERIFIER_AGENT, VERIFIER_PASSWORD)) as c:
        assert c.execute("select 1").fetchone() == (1,)


async def test_scram_login_asyncpg(hopped: tuple[ProxyThread, FaultyHop]) -> None:
    p, _hop = hopped
    conn = await asyncpg.connect(agent_dsn(p.host, p.port, VERIFIER_AGENT, VERIFIER_PASSWORD))
    try:
        assert await conn.fetchval("select 2") == 2
    finally:
        await conn.close()


@pytest.mark.parametrize(
    ("user", "password"),
    [
        (AGENT, "wrong-password"),
        (VERIFIER_AGENT, AGENT_PASSWORD),
        ("no-such-agent", "whatever"),
        ("auditor", "wrong"),
    ],
)
async def test_failed_login_never_reaches_upstream(
    hopped: tuple[ProxyThread, FaultyHop], user: str, password: str
) -> None:
    p, hop = hopped
    before = hop.connections_total
    dsn = agent_dsn(p.host, p.port, user, password)
    err = _connect_error(dsn)
    assert f'password authentication failed for user "{user}"' in str(err)
    aerr = await _asyncpg_error(dsn)
    assert aerr.sqlstate == "28P01"
    assert hop.connections_total == before
    # the counter does count: a good login goes through the hop
    with psycopg.connect(agent_dsn(p.host, p.port)) as c:
        c.execute("select 1")
    assert hop.connections_total == before + 1


async def test_analyst_cannot_use_the_data_path(hopped: tuple[ProxyThread, FaultyHop]) -> None:
    p, hop = hopped
    before = hop.connections_total
    err = await _asyncpg_error(agent_dsn(p.host, p.port, "auditor", "an0ther"))
    assert err.sqlstate == "28000"
    assert "audit" in str(err)
    assert hop.connections_total == before


async def test_replication_refused(hopped: tuple[ProxyThread, FaultyHop]) -> None:
    p, hop = hopped
    before = hop.connections_total
    err = _connect_error(agent_dsn(p.host, p.port) + "?replication=database")
    assert "replication connections are not allowed" in str(err)
    aerr = await _asyncpg_error(
        agent_dsn(p.host, p.port), server_settings={"replication": "database"}
    )
    assert aerr.sqlstate == "28000"
    assert hop.connections_total == before


def test_protocol_2_startup_refused(running_proxy: RunningProxy) -> None:
    # a version-2 startup packet: fixed 296 bytes, database/user/options/unused/tty fields
    body = (
        struct.pack("!i", 2 << 16) + b"postgres".ljust(64, b"\0") + AGENT.encode().ljust(32, b"\0")
    )
    body += b"\0" * (64 * 3)
    raw = RawConn(running_proxy.host, running_proxy.port)
    try:
        raw.send(struct.pack("!i", len(body) + 4) + body)
        tag, err = raw.read_message()
        assert tag == b"E"
        fields = error_fields(err)
        assert fields["C"] == "0A000" and "protocol" in fields["M"]
        assert raw.closed_by_peer()
    finally:
        raw.close()


@pytest.mark.parametrize(
    ("minor", "extra", "unsupported"),
    [(2, {}, []), (0, {"_pq_.fake_option": "on"}, ["_pq_.fake_option"]),
     (2, {"_pq_.a": "1", "_pq_.b": "2"}, ["_pq_.a", "_pq_.b"])],
)  # fmt: skip
def test_negotiate_protocol_version(
    running_proxy: RunningProxy, minor: int, extra: dict[str, str], unsupported: list[str]
) -> None:
    raw = RawConn(running_proxy.host, running_proxy.port)
    try:
        raw.send(startup_packet({"user": AGENT, "database": "postgres", **extra}, minor=minor))
        tag, body = raw.read_message()
        assert tag == b"v"
        newest, count = struct.unpack("!ii", body[:8])
        assert newest == 0
        names = [n.decode() for n in body[8:].split(b"\0") if n]
        assert count == len(unsupported) and names == unsupported
        msgs = raw.login()
        assert (b"K", msgs[-2][1]) == msgs[-2] and msgs[-1] == (b"Z", b"I")
        result = raw.query("select 'negotiated'")
        assert result[1][0] == b"D" and b"negotiated" in result[1][1]
    finally:
        raw.close()


def test_gssenc_request_answered_n(running_proxy: RunningProxy) -> None:
    raw = RawConn(running_proxy.host, running_proxy.port)
    try:
        raw.send(struct.pack("!ii", 8, 80877104))
        assert raw.read_byte() == b"N"
        raw.send(startup_packet({"user": AGENT, "database": "postgres"}))
        assert raw.login()[-1] == (b"Z", b"I")
        assert raw.query("select 1")[-1] == (b"Z", b"I")
    finally:
        raw.close()


def test_ssl_request_without_tls_answered_n(running_proxy: RunningProxy) -> None:
    raw = RawConn(running_proxy.host, running_proxy.port)
    try:
        raw.send(struct.pack("!ii", 8, 80877103))
        assert raw.read_byte() == b"N"
        raw.send(startup_packet({"user": AGENT, "database": "postgres"}))
        assert raw.login()[-1] == (b"Z", b"I")
    finally:
        raw.close()
    # and libpq falls back to plain text when it only prefers TLS
    with psycopg.connect(running_proxy.dsn() + "?sslmode=prefer") as c:
        assert c.pgconn.ssl_in_use is False


def test_bytes_after_ssl_request_dropped(pg_dsn: str, rules_dir: Path, tmp_path: Path) -> None:
    import ssl

    cert, key = _make_cert(tmp_path)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    with proxy(pg_dsn, rules_dir, tls_context=ctx) as p:
        raw = RawConn(p.host, p.port)
        try:
            # a startup packet injected before the handshake must not be trusted as encrypted
            raw.send(struct.pack("!ii", 8, 80877103) + startup_packet({"user": AGENT}))
            assert raw.closed_by_peer()
            assert raw.buf == b""  # not even an 'S'
        finally:
            raw.close()


def test_message_larger_than_max_message_size(pg_dsn: str, rules_dir: Path) -> None:
    with proxy(pg_dsn, rules_dir, max_message_size=64 * 1024) as p:
        with psycopg.connect(agent_dsn(p.host, p.port)) as c:
            assert c.execute("select %s::text", ("x" * 1000,)).fetchone() == ("x" * 1000,)
            with pytest.raises(psycopg.OperationalError) as info:
                c.execute("select %s::text", ("x" * 100_000,))
            assert info.value.sqlstate == "54000"
            assert "exceeds the maximum message size" in str(info.value)
        # the proxy goes on serving others
        with psycopg.connect(agent_dsn(p.host, p.port)) as c:
            assert c.execute("select 1").fetchone() == (1,)


def test_garbage_after_auth(running_proxy: RunningProxy) -> None:
    with psycopg.connect(running_proxy.dsn(), autocommit=True) as bystander:
        raw = RawConn(running_proxy.host, running_proxy.port)
        try:
            raw.send(startup_packet({"user": AGENT, "database": "postgres"}))
            raw.login()
            raw.send(message(b"\xfe", b"this is not a frontend message"))
            tag, body = raw.read_message()
            assert tag == b"E"
            assert error_fields(body)["C"] == "08P01"
            assert raw.closed_by_peer()
        finally:
            raw.close()
        raw = RawConn(running_proxy.host, running_proxy.port)
        try:
            raw.send(startup_packet({"user": AGENT, "database": "postgres"}))
            raw.login()
            raw.send(b"Q\x00\x00\x00\x02")  # length below the minimum of 4
            tag, body = raw.read_message()
            assert tag == b"E" and error_fields(body)["C"] == "08P01"
        finally:
            raw.close()
        assert bystander.execute("select 'unaffected'").fetchone() == ("unaffected",)


def test_garbage_instead_of_startup(running_proxy: RunningProxy) -> None:
    raw = RawConn(running_proxy.host, running_proxy.port)
    try:
        raw.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert raw.closed_by_peer()
    finally:
        raw.close()
    with psycopg.connect(running_proxy.dsn()) as c:
        assert c.execute("select 1").fetchone() == (1,)
