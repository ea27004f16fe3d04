"""The proxy's own login to Postgres: every auth method the test cluster offers (trust,
cleartext password, md5, SCRAM-SHA-256) under every sslmode, and failures that never leak the
upstream secret to the agent."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import psycopg
import pytest

from pgproxy.pgcluster import AUTH_ROLE_PASSWORD, SUPERUSER, SUPERUSER_PASSWORD, Cluster, _make_cert
from tests.integration._util import agent_dsn, proxy, upstream

ROLES = {
    "trust_user": None,
    "password_user": AUTH_ROLE_PASSWORD,
    "md5_user": AUTH_ROLE_PASSWORD,
    SUPERUSER: SUPERUSER_PASSWORD,
}
SSLMODES = ["disable", "require", "verify-ca", "verify-full"]
WRONG_SECRET = "wrong-upstream-secret-4711"


@pytest.fixture(scope="module")
def cluster(pg_cluster: Cluster | None) -> Cluster:
    if pg_cluster is None:
        pytest.skip("needs the throwaway test cluster (its roles and CA file)")
    return pg_cluster


@pytest.mark.parametrize("sslmode", SSLMODES)
@pytest.mark.parametrize("role", list(ROLES))
def test_upstream_login(
    cluster: Cluster, pg_dsn: str, rules_dir: Path, role: str, sslmode: str
) -> None:
    target = upstream(
        pg_dsn,
        user=role,
        password=ROLES[role],
        sslmode=sslmode,
        sslrootcert=str(cluster.ca_file) if sslmode.startswith("verify") else None,
    )
    with (
        proxy(pg_dsn, rules_dir, upstream=target) as p,
        psycopg.connect(agent_dsn(p.host, p.port)) as c,
    ):
        row = c.execute(
            "select current_user, coalesce((select ssl from pg_stat_ssl "
            "where pid = pg_backend_pid()), false)"
        ).fetchone()
        assert row == (role, sslmode != "disable")
        # the agent itself never talks TLS to the proxy here: that is a separate setting
        assert c.pgconn.ssl_in_use is False


@pytest.mark.parametrize("role", ["password_user", "md5_user", SUPERUSER])
async def test_wrong_upstream_password_is_not_leaked(
    cluster: Cluster, pg_dsn: str, rules_dir: Path, role: str
) -> None:
    target = upstream(pg_dsn, user=role, password=WRONG_SECRET, sslmode="require")
    with proxy(pg_dsn, rules_dir, upstream=target) as p:
        with pytest.raises(psycopg.OperationalError) as info:
            psycopg.connect(agent_dsn(p.host, p.port), connect_timeout=10)
        text = str(info.value)
        assert "could not authenticate to the database" in text
        assert WRONG_SECRET not in text and "wrong-upstream" not in text
        with pytest.raises(asyncpg.PostgresError) as ainfo:
            await asyncpg.connect(agent_dsn(p.host, p.port), timeout=10)
        err = ainfo.value
        assert err.sqlstate == "08004"
        details = " ".join(str(getattr(err, a, "") or "") for a in ("message", "detail", "hint"))
        assert WRONG_SECRET not in details


def test_missing_upstream_password(cluster: Cluster, pg_dsn: str, rules_dir: Path) -> None:
    target = upstream(pg_dsn, user="md5_user", password=None, sslmode="disable")
    with proxy(pg_dsn, rules_dir, upstream=target) as p:
        with pytest.raises(psycopg.OperationalError) as info:
            psycopg.connect(agent_dsn(p.host, p.port), connect_timeout=10)
        assert "upstream DSN has none" in str(info.value)


def test_verify_ca_with_the_wrong_ca(
    cluster: Cluster, pg_dsn: str, rules_dir: Path, tmp_path: Path
) -> None:
    other_ca, _key = _make_cert(tmp_path)
    target = upstream(pg_dsn, sslmode="verify-ca", sslrootcert=str(other_ca))
    with proxy(pg_dsn, rules_dir, upstream=target) as p:
        with pytest.raises(psycopg.OperationalError) as info:
            psycopg.connect(agent_dsn(p.host, p.port), connect_timeout=10)
        assert "TLS to the database failed" in str(info.value)
        assert SUPERUSER_PASSWORD not in str(info.value)


def test_verify_full_by_host_name(cluster: Cluster, pg_dsn: str, rules_dir: Path) -> None:
    # the certificate carries DNS:localhost as well as IP:127.0.0.1
    target = upstream(
        pg_dsn, host="localhost", sslmode="verify-full", sslrootcert=str(cluster.ca_file)
    )
    with (
        proxy(pg_dsn, rules_dir, upstream=target) as p,
        psycopg.connect(agent_dsn(p.host, p.port)) as c,
    ):
        assert c.execute("select 1").fetchone() == (1,)
