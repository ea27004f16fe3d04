"""The listener: accepts agents, keeps the cancel-key map, drains on shutdown.

A ``Proxy`` owns the listening socket, the map from the BackendKeyData it issued to the live
session (so a CancelRequest reaches the upstream backend that serves that same client, and only
while it does), the credentials derived from the rules, and the counters ``/metrics`` reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from pgproxy.audit.records import AuditSink, MemorySink
from pgproxy.rules import Rules
from pgproxy.server import upstream as up
from pgproxy.server.audit_wire import AuditQuery
from pgproxy.server.credentials import CredentialStore
from pgproxy.server.holds import DenyHolds, HoldHandler
from pgproxy.server.metrics import Metrics
from pgproxy.server.session import (
    ClientSession,
    PolicyFactory,
    new_backend_key,
)

log = logging.getLogger("pgproxy.proxy")


@dataclass
class ProxyConfig:
    upstream: up.UpstreamDSN
    host: str = "127.0.0.1"
    port: int = 6432
    tls_context: ssl.SSLContext | None = None
    cleartext_over_tls: bool = False
    max_message_size: int = 1 << 30
    startup_timeout: float = 30.0
    max_connections: int = 1000


class Proxy:
    def __init__(
        self,
        config: ProxyConfig,
        rules: Rules,
        *,
        policy_factory: PolicyFactory | None = None,
        audit: AuditSink | None = None,
        holds: HoldHandler | None = None,
    ) -> None:
        from pgproxy.policy.seam import AllowAll

        self.config = config
        self.rules = rules
        self.credentials = CredentialStore(rules)
        self.policy_factory: PolicyFactory = policy_factory or (lambda info: AllowAll())
        self.audit: AuditSink = audit or MemorySink()
        self.holds: HoldHandler = holds or DenyHolds()
        self.metrics = Metrics()
        #: runs analyst queries for the ``audit`` database over the wire (None: not offered)
        self.audit_query: AuditQuery | None = None
        #: the planner's row estimate for a SELECT (None: no early bulk-export check)
        self.estimate: Callable[[str], Awaitable[int | None]] | None = None
        #: awaited at the end of ``stop()`` (the policy hub's control connection, …)
        self.closers: list[Callable[[], Awaitable[None]]] = []
        #: called after a DDL statement completed through the proxy (the catalog changed)
        self.after_ddl: Callable[[], None] = lambda: None
        self.sessions: dict[tuple[int, int], ClientSession] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    def update_rules(self, rules: Rules) -> None:
        """Swap in validated rules; new sessions use them."""
        self.credentials = CredentialStore(rules)
        self.rules = rules

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        sock = self._server.sockets[0]
        host, port = sock.getsockname()[:2]
        return str(host), int(port)

    async def start(self) -> tuple[str, int]:
        self._server = await asyncio.start_server(
            self._accept, self.config.host, self.config.port, limit=1 << 20, backlog=1024
        )
        return self.address

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.metrics.connections_total += 1
        self.metrics.connections_active += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                import socket

                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await ClientSession(self, reader, writer).run()
        finally:
            self.metrics.connections_active -= 1
            self._tasks.discard(task)

    def register(self, session: ClientSession) -> tuple[int, int]:
        key = new_backend_key()
        while key in self.sessions:
            key = new_backend_key()
        self.sessions[key] = session
        return key

    def unregister(self, session: ClientSession) -> None:
        if self.sessions.get(session.info.key) is session:
            del self.sessions[session.info.key]

    async def cancel(self, pid: int, secret: int) -> None:
        """A CancelRequest: withdraw a held statement, or cancel the upstream query."""
        session = self.sessions.get((pid, secret))
        if session is None:
            return
        if await session.cancel_hold():
            return
        upstream = session.upstream
        if upstream is not None and upstream.backend_key is not None:
            await up.cancel(self.config.upstream, upstream.backend_key)

    async def stop(self, drain_timeout: float = 10.0) -> None:
        """Stop accepting, give live sessions ``drain_timeout`` seconds, then close them."""
        if self._server is not None:
            self._server.close()
        tasks = list(self._tasks)
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=drain_timeout)
            for t in pending:
                t.cancel()
            for t in pending:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
        if self._server is not None:
            await self._server.wait_closed()
        for close in self.closers:
            with contextlib.suppress(Exception):
                await close()
