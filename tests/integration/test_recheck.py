"""A prepared statement is decided at Parse and checked again when it runs: a rules change that
tags a column (a new catalog) between Parse and Execute masks what the old decision passed."""

from __future__ import annotations

import asyncio
from pathlib import Path

import psycopg

from pgproxy.rules import load_rules
from pgproxy.server.policy_hub import PolicyHub
from pgproxy.server.proxy import Proxy, ProxyConfig
from pgproxy.server.upstream import parse_dsn
from tests.integration.conftest import ProxyThread

DB = "pgproxy_recheck_test"
BASE = 'agents: [{name: triage-bot, password: "s3cret"}]\n'


def test_prepared_statement_is_rechecked_after_the_catalog_changes(
    pg_dsn: str, tmp_path: Path
) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DB}")
        conn.execute(f"CREATE DATABASE {DB}")
    upstream = pg_dsn.rsplit("/", 1)[0] + f"/{DB}"
    with psycopg.connect(upstream, autocommit=True) as conn:
        conn.execute("CREATE TABLE contacts (id int, phone text)")
        conn.execute("INSERT INTO contacts VALUES (1, '555-0199-4242')")
    (tmp_path / "r.yaml").write_text(BASE)
    hub = PolicyHub(load_rules(tmp_path), upstream)
    proxy = Proxy(ProxyConfig(upstream=parse_dsn(upstream), port=0), hub.rules,
                  policy_factory=hub.session_policy)  # fmt: skip
    proxy.closers.append(hub.close)
    thread = ProxyThread(proxy)
    try:
        assert asyncio.run_coroutine_threadsafe(hub.refresh(), thread.loop).result(30)
        dsn = f"postgresql://triage-bot:s3cret@{thread.host}:{thread.port}/{DB}"
        with psycopg.connect(dsn) as conn:
            query = "SELECT phone FROM contacts WHERE id = %s"
            assert conn.execute(query, (1,), prepare=True).fetchone() == ("555-0199-4242",)
            # the privacy office tags the column; the rules are reloaded
            (tmp_path / "r.yaml").write_text(BASE + "tags: {public.contacts.phone: phone}\n")
            rules = load_rules(tmp_path)

            async def reload() -> None:
                hub.update_rules(rules)
                await hub.wait_refreshed()

            asyncio.run_coroutine_threadsafe(reload(), thread.loop).result(30)
            (value,) = conn.execute(query, (1,), prepare=True).fetchone() or (None,)
        assert value != "555-0199-4242"  # the same prepared statement, now masked
    finally:
        thread.stop()
