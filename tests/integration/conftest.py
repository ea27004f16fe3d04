"""Fixtures for tests that drive real clients through a running proxy to a real Postgres."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pgproxy.audit.records import MemorySink
from pgproxy.rules import load_rules
from pgproxy.server.credentials import format_verifier, verifier_from_password
from pgproxy.server.proxy import Proxy, ProxyConfig
from pgproxy.server.upstream import parse_dsn

AGENT = "triage-bot"
AGENT_PASSWORD = "s3cret"

VERIFIER_AGENT = "verifier-bot"
VERIFIER_PASSWORD = "v3rifier"

RULES_YAML = f"""
agents:
  - name: triage-bot
    password: "s3cret"
    owner: carol@example.org
  - name: {VERIFIER_AGENT}
    password: "{format_verifier(verifier_from_password(VERIFIER_PASSWORD))}"
analysts:
  - name: auditor
    password: "an0ther"
approvals:
  hold: []
"""


@dataclass
class RunningProxy:
    proxy: Proxy
    host: str
    port: int
    loop: asyncio.AbstractEventLoop
    audit: MemorySink

    def dsn(
        self, user: str = AGENT, password: str = AGENT_PASSWORD, dbname: str = "postgres"
    ) -> str:
        return f"postgresql://{user}:{password}@{self.host}:{self.port}/{dbname}"

    def kwargs(
        self, user: str = AGENT, password: str = AGENT_PASSWORD, dbname: str = "postgres"
    ) -> dict[str, object]:
        return {
            "host": self.host,
            "port": self.port,
            "user": user,
            "password": password,
            "dbname": dbname,
        }


class ProxyThread:
    """A proxy on its own event loop in a background thread, so sync drivers can use it."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.host, self.port = asyncio.run_coroutine_threadsafe(proxy.start(), self.loop).result(30)

    def call(self, coro_fn: Callable[[], object]) -> object:
        async def run() -> object:
            return coro_fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(30)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.proxy.stop(2), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@pytest.fixture(scope="session")
def rules_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("rules")
    (d / "rules.yaml").write_text(RULES_YAML)
    return d


def start_proxy(pg_dsn: str, rules_dir: Path, **kw: object) -> tuple[ProxyThread, MemorySink]:
    audit = MemorySink()
    config = ProxyConfig(upstream=parse_dsn(pg_dsn), host="127.0.0.1", port=0)
    for k, v in kw.items():
        if hasattr(config, k):
            setattr(config, k, v)
    extra = {k: v for k, v in kw.items() if not hasattr(config, k)}
    proxy = Proxy(config, load_rules(rules_dir), audit=audit, **extra)  # type: ignore[arg-type]
    return ProxyThread(proxy), audit


@pytest.fixture(scope="session")
def running_proxy(pg_dsn: str, rules_dir: Path) -> Iterator[RunningProxy]:
    """An allow-all proxy in front of the test database."""
    thread, audit = start_proxy(pg_dsn, rules_dir)
    try:
        yield RunningProxy(thread.proxy, thread.host, thread.port, thread.loop, audit)
    finally:
        thread.stop()


def policy_proxy(upstream_dsn: str, rules_dir: Path, **proxy_kw: object) -> ProxyThread:
    """A started proxy with the real policy (catalog read from ``upstream_dsn``) on a thread."""
    from pgproxy.server.policy_hub import PolicyHub

    rules = load_rules(rules_dir)
    hub = PolicyHub(rules, upstream_dsn)
    proxy = Proxy(
        ProxyConfig(upstream=parse_dsn(upstream_dsn), port=0),
        rules,
        policy_factory=hub.session_policy,
        **proxy_kw,  # type: ignore[arg-type]
    )
    proxy.after_ddl = hub.schedule_refresh
    proxy.estimate = hub.estimate_rows  # as ``pgproxy serve`` wires it
    proxy.closers.append(hub.close)
    thread = ProxyThread(proxy)
    assert asyncio.run_coroutine_threadsafe(hub.refresh(), thread.loop).result(30)
    return thread
