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
import sqlite3
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from aiohttp import web

from pgproxy.approvals.mail import make_notifier
from pgproxy.approvals.service import ApprovalService
from pgproxy.approvals.store import SqliteApprovalStore
from pgproxy.approvals.web import approval_routes
from pgproxy.audit.export import run_periodic_export
from pgproxy.audit.http import audit_routes
from pgproxy.audit.keys import AuditKeyError, resolve_key
from pgproxy.audit.query import AuditQueryError, QueryRejected
from pgproxy.audit.records import PolicyEvent
from pgproxy.audit.sink import AuditUnavailable, DuckDBSink
from pgproxy.config import ConfigError, Settings, reviewer_tokens
from pgproxy.rules import Rules, RulesError, load_rules
from pgproxy.server.audit_wire import AuditQuery, AuditQueryFailed, Result
from pgproxy.server.holds import ApprovalHolds
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
    audit: DuckDBSink
    hub: PolicyHub
    approvals: ApprovalService
    http_runner: web.AppRunner | None = None
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _background: set[asyncio.Future[None]] = field(default_factory=set)

    def reload(self) -> bool:
        try:
            rules = load_rules(self.settings.rules)
        except RulesError as exc:
            log.error("rules reload failed, keeping the previous rules: %s", exc)
            self._policy_event("reload_failed", exc.reason[:200])
            return False
        self._policy_event("reloaded", f"{len(rules.agents)} agents")
        self.rules = rules
        self.proxy.update_rules(rules)
        self.hub.update_rules(rules)
        self.approvals.update_rules(rules)
        log.info("rules reloaded from %s", self.settings.rules)
        return True

    def _policy_event(self, event: str, detail: str) -> None:
        task = asyncio.ensure_future(self.audit.emit(PolicyEvent(datetime.now(UTC), event, detail)))
        self._background.add(task)
        task.add_done_callback(self._background.discard)


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
    try:
        key = resolve_key(settings.audit_key, settings.audit, create=True)
    except AuditKeyError as exc:
        raise ConfigError(str(exc)) from None
    sink = DuckDBSink(
        settings.audit,
        signing_key=key,
        flush_interval=settings.audit_flush_seconds,
        on_full="spill" if settings.audit_on_full == "spill" else "wait",
        spill_dir=f"{settings.audit}.spill" if settings.audit_on_full == "spill" else None,
        export_dir=settings.audit_export,
    )
    try:
        await sink.start()
    except AuditUnavailable as exc:
        raise ConfigError(f"--audit {settings.audit}: {exc}") from None
    hub = PolicyHub(rules, settings.upstream, _pseudonym_key(settings))
    if not await hub.refresh():
        log.error("starting without a catalog: statements are blocked until it can be read")
    store = SqliteApprovalStore(settings.approvals_path)
    notifier = make_notifier(settings.smtp, settings.mail_from, settings.webhook_url)
    approvals = ApprovalService(store, rules, notifier, sink, settings.base_url)
    try:
        await approvals.start()
    except (OSError, sqlite3.Error) as exc:
        await sink.close()
        raise ConfigError(f"--approvals-db {settings.approvals_path}: {exc}") from None
    proxy = Proxy(config, rules, audit=sink, policy_factory=hub.session_policy)
    proxy.holds = ApprovalHolds(approvals, lambda: proxy.rules)
    proxy.after_ddl = hub.schedule_refresh
    proxy.estimate = hub.estimate_rows
    proxy.closers.append(hub.close)
    proxy.audit_query = _audit_query(sink)
    await sink.emit(PolicyEvent(datetime.now(UTC), "loaded", f"{len(rules.agents)} agents"))
    return Runtime(settings, rules, proxy, sink, hub, approvals)


def _audit_query(sink: DuckDBSink) -> AuditQuery:
    async def query(sql: str) -> Result:
        try:
            result = await sink.query(sql, max_rows=100_000)
        except QueryRejected as exc:
            raise AuditQueryFailed(str(exc), "42501") from None
        except AuditQueryError as exc:
            raise AuditQueryFailed(str(exc), "42000") from None
        except AuditUnavailable as exc:
            raise AuditQueryFailed(str(exc), "57P03") from None
        return Result(result.columns, result.rows)

    return query


async def run(
    settings: Settings,
    ready: Callable[[Runtime], None] | None = None,
    extra_routes: Sequence[web.RouteTableDef] = (),
) -> int:
    """Serve until a stop signal; returns the exit code. ``extra_routes`` are mounted on the
    HTTP application too (the demo's mailbox uses this)."""
    runtime = await build(settings)
    host, port = await runtime.proxy.start()
    sink = runtime.audit
    app = make_app(
        runtime.proxy,
        health=lambda: {"audit": "degraded" if sink.degraded else "ok"},
        extra_metrics=lambda: {
            "pgproxy_audit_degraded": float(sink.degraded),
            "pgproxy_audit_rows_written_total": float(sink.rows_written),
            "pgproxy_audit_queue_depth": float(sink.queue_depth),
        },
    )
    app.add_routes(audit_routes(sink))
    app.add_routes(approval_routes(runtime.approvals, reviewer_tokens(settings)))
    for routes in extra_routes:
        app.add_routes(routes)
    export_task = (
        asyncio.create_task(run_periodic_export(sink, settings.audit_export, 3600))
        if settings.audit_export
        else None
    )
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
    if export_task is not None:
        export_task.cancel()
    await runtime.approvals.close()
    await sink.close(timeout=30)
    return 0
