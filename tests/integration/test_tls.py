"""TLS between agents and the proxy (``ProxyConfig.tls_context``) with real drivers."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest

from pgproxy.pgcluster import _make_cert
from tests.integration._util import agent_dsn, proxy
from tests.integration.conftest import ProxyThread, RunningProxy


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _make_cert(tmp_path_factory.mktemp("agent-tls"))


def _server_context(cert: tuple[Path, Path]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*cert)
    return ctx


@pytest.fixture(scope="module")
def tls_proxy(pg_dsn: str, rules_dir: Path, cert: tuple[Path, Path]) -> Iterator[ProxyThread]:
    with proxy(pg_dsn, rules_dir, tls_context=_server_context(cert)) as p:
        yield p


@pytest.mark.parametrize("sslmode", ["require", "verify-ca", "verify-full"])
def test_psycopg_over_tls(tls_proxy: ProxyThread, cert: tuple[Path, Path], sslmode: str) -> None:
    dsn = agent_dsn(tls_proxy.host, tls_proxy.port) + f"?sslmode={sslmode}&sslrootcert={cert[0]}"
    with psycopg.connect(dsn) as c:
        assert c.pgconn.ssl_in_use is True
        assert c.execute("select %s::text", ("over tls",)).fetchone() == ("over tls",)
        with c.cursor(binary=True) as cur:
            big = b"\x01" * (4 * 1024 * 1024)
            assert cur.execute("select %s::bytea", (big,)).fetchone() == (big,)


def test_verify_full_rejects_an_unknown_ca(tls_proxy: ProxyThread, tmp_path: Path) -> None:
    other, _key = _make_cert(tmp_path)
    dsn = agent_dsn(tls_proxy.host, tls_proxy.port) + f"?sslmode=verify-full&sslrootcert={other}"
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(dsn, connect_timeout=10)
    assert "certificate verify failed" in str(info.value)


async def test_asyncpg_over_tls(tls_proxy: ProxyThread, cert: tuple[Path, Path]) -> None:
    ctx = ssl.create_default_context(cafile=str(cert[0]))
    conn = await asyncpg.connect(agent_dsn(tls_proxy.host, tls_proxy.port), ssl=ctx)
    try:
        assert await conn.fetchval("select $1::int + 1", 41) == 42
    finally:
        await conn.close()


def test_plain_client_still_accepted(tls_proxy: ProxyThread) -> None:
    with psycopg.connect(agent_dsn(tls_proxy.host, tls_proxy.port) + "?sslmode=disable") as c:
        assert c.pgconn.ssl_in_use is False
        assert c.execute("select 1").fetchone() == (1,)


def test_require_fails_without_tls_configured(running_proxy: RunningProxy) -> None:
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(running_proxy.dsn() + "?sslmode=require", connect_timeout=10)
    assert "does not support SSL" in str(info.value)


def test_cleartext_password_over_tls(pg_dsn: str, rules_dir: Path, cert: tuple[Path, Path]) -> None:
    with proxy(pg_dsn, rules_dir, tls_context=_server_context(cert), cleartext_over_tls=True) as p:
        base = agent_dsn(p.host, p.port) + f"?sslmode=verify-full&sslrootcert={cert[0]}"
        with psycopg.connect(base + "&require_auth=password") as c:
            assert c.execute("select 1").fetchone() == (1,)
        bad = agent_dsn(p.host, p.port, password="nope") + f"?sslmode=require&sslrootcert={cert[0]}"
        with pytest.raises(psycopg.OperationalError) as info:
            psycopg.connect(bad, connect_timeout=10)
        assert "password authentication failed" in str(info.value)
        # without TLS the same proxy still insists on SCRAM
        plain = agent_dsn(p.host, p.port) + "?sslmode=disable&require_auth=scram-sha-256"
        with psycopg.connect(plain) as c:
            assert c.execute("select 2").fetchone() == (2,)
