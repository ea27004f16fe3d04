"""Assembles a running pgproxy from ``Settings``: rules, proxy, HTTP, signals, shutdown.

``run(settings)`` is what ``pgproxy serve`` and ``pgproxy demo`` call. SIGTERM/SIGINT stop
accepting, drain sessions for ``drain_seconds`` and flush the audit; SIGHUP reloads the rules
after validating them (bad rules keep the old ones, and the reason is logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from pgproxy.audit.records import AuditSink, MemorySink
from pgproxy.config import ConfigError, Settings
from pgproxy.rules import Rules, RulesError, load_rules
from pgproxy.server.http import make_app
from pgproxy.server.policy_hub import PolicyHub
from pgproxy.server.proxy import Proxy, ProxyConfig
from pgproxy.server.upstream import parse_dsn

log = logging.getLogger("pgproxy")


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    if not settings.tls_cert or not settings.tls_key:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"--tls-cert/--tls-key: cannot load: {exc}") from None
    return ctx


def _pseudonym_key(settings: Settings) -> bytes | None:
    return settings.pseudonym_key.encode() if settings.pseudonym_key else None


@dataclass
class Runtime:
    settings: Settings
    rules: Rules
    proxy: Proxy
    audit: AuditSink
    hub: PolicyHub
    http_runner: web.AppRunner | None = None
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    def reload(self) -> bool:
        try:
            rules = load_rules(self.settings.rules)
        except RulesError as exc:
            log.error("rules reload failed, keeping the previous rules: %s", exc)
            return False
        self.rules = rules
        self.proxy.update_rules(rules)
        self.hub.update_rules(rules)
        log.info("rules reloaded from %s", self.settings.rules)
        return True


async def build(settings: Settings) -> Runtime:
    if not settings.upstream:
        raise ConfigError("--upstream is required (or PGPROXY_UPSTREAM, or 'upstream' in --config)")
    try:
        upstream = parse_dsn(settings.upstream)
    except ValueError as exc:
        raise ConfigError(f"--upstream: {exc}") from None
    rules = load_rules(settings.rules)
    host, port = settings.listen_addr
    config = ProxyConfig(
        upstream=upstream,
        host=host,
        port=port,
        tls_context=tls_context(settings),
        cleartext_over_tls=settings.cleartext_over_tls,
        max_message_size=settings.max_message_size,
    )
    audit: AuditSink = MemorySink()
    hub = PolicyHub(rules, settings.upstream, _pseudonym_key(settings))
    if not await hub.refresh():
        log.error("starting without a catalog: statements are blocked until it can be read")
    proxy = Proxy(config, rules, audit=audit, policy_factory=hub.session_policy)
    proxy.after_ddl = hub.schedule_refresh
    return Runtime(settings, rules, proxy, audit, hub)


async def run(settings: Settings, ready: Callable[[Runtime], None] | None = None) -> int:
    """Serve until a stop signal; returns the exit code."""
    runtime = await build(settings)
    host, port = await runtime.proxy.start()
    app = make_app(runtime.proxy)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    http_host, http_port = settings.http_addr
    site = web.TCPSite(runner, http_host, http_port)
    try:
        await site.start()
    except OSError as exc:
        await runtime.proxy.stop(0)
        raise ConfigError(f"--http {settings.http}: cannot listen: {exc.strerror}") from None
    runtime.http_runner = runner
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, runtime.stopping.set)
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGHUP, runtime.reload)
    print(f"pgproxy listening on {host}:{port} (http on {http_host}:{http_port})", flush=True)
    if ready is not None:
        ready(runtime)
    await runtime.stopping.wait()
    log.info("stopping: draining sessions for up to %ss", settings.drain_seconds)
    await runtime.proxy.stop(settings.drain_seconds)
    await runner.cleanup()
    return 0
