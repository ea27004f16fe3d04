"""Real parts for the approval tests: an aiosmtpd mailbox, a SQLite store, the aiohttp app.

Everything binds to 127.0.0.1 on ports the OS picks. ``Harness`` wires one service to one
mailbox and one loopback web server; tests build as many as they need through ``harness``.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import re
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiosmtpd.smtp import SMTP, Envelope, Session

from pgproxy.approvals.mail import Backoff, Notifier, SmtpNotifier, SmtpSettings
from pgproxy.approvals.service import ApprovalService, HoldRequest
from pgproxy.approvals.store import SqliteApprovalStore
from pgproxy.approvals.web import make_app
from pgproxy.audit.records import ApprovalEvent, MemorySink
from pgproxy.rules import Agent, Approvals, Rules

LINK_RE = re.compile(r"(http://127\.0\.0\.1:\d+/approvals/(apr_[0-9a-f]+)\?t=([A-Za-z0-9_\-]+))")

#: a fake SSN-shaped parameter: must never appear in mail, store, audit or pages
SECRET_PARAM = b"000-12-3456"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Mailbox:
    """An aiosmtpd handler that keeps every message it accepts."""

    def __init__(self) -> None:
        self.messages: asyncio.Queue[EmailMessage] = asyncio.Queue()
        self.received: list[EmailMessage] = []
        self.mail_commands = 0

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        self.mail_commands += 1
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or envelope.content
        assert isinstance(raw, bytes)
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        self.received.append(msg)
        await self.messages.put(msg)
        return "250 OK"

    async def next(self, timeout: float = 10.0) -> EmailMessage:
        return await asyncio.wait_for(self.messages.get(), timeout)


class SmtpServer:
    """aiosmtpd served from the test's own event loop."""

    def __init__(
        self,
        port: int,
        *,
        starttls_context: ssl.SSLContext | None = None,
        implicit_tls: ssl.SSLContext | None = None,
    ) -> None:
        self.port = port
        self.mailbox = Mailbox()
        self._starttls = starttls_context
        self._implicit = implicit_tls
        self._server: asyncio.Server | None = None

    async def start(self) -> SmtpServer:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: SMTP(
                self.mailbox,
                hostname="mail.test",
                tls_context=self._starttls,
                require_starttls=self._starttls is not None,
            ),
            "127.0.0.1",
            self.port,
            ssl=self._implicit,
        )
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None


def part(msg: EmailMessage, subtype: str) -> str:
    body = msg.get_body(preferencelist=(subtype,))
    assert body is not None, f"no text/{subtype} part"
    assert isinstance(body, EmailMessage)
    return str(body.get_content())


def link_of(msg: EmailMessage) -> tuple[str, str, str]:
    """(url, approval_id, token) from the plain-text part of a real message."""
    m = LINK_RE.search(part(msg, "plain"))
    assert m is not None, "no review link in the message"
    return m.group(1), m.group(2), m.group(3)


def hold_request(
    agent: str = "triage-bot",
    sql: str = "DROP TABLE public.patients_archive",
    params: tuple[bytes | None, ...] = (),
    owner: str | None = "carol@example.org",
) -> HoldRequest:
    return HoldRequest(
        agent=agent,
        owner=owner,
        database="clinic",
        session_id="sess-1",
        statement_id="stmt-1",
        sql=sql,
        params=params,
        statement_class="ddl",
        hold_class="ddl",
        reasons=("DDL is held for approval",),
        relations=("public.patients_archive",),
        estimated_rows=None,
        masking=("ssn: replaced",),
    )


def make_rules(
    *,
    approvers: tuple[str, ...] = ("alice@example.org", "bob@example.org", "carol@example.org"),
    owner: str | None = "carol@example.org",
    quorum: int = 1,
    timeout: float = 60.0,
) -> Rules:
    return Rules(
        agents=(Agent(name="triage-bot", password="fake-pass", owner=owner),),
        approvals=Approvals(approvers=approvers, quorum=quorum, timeout_seconds=timeout),
    )


@dataclass
class Harness:
    service: ApprovalService
    audit: MemorySink
    store_path: Path
    base_url: str
    http: aiohttp.ClientSession
    smtp: SmtpServer | None
    _runner: web.AppRunner
    _closed: bool = field(default=False)

    @property
    def mailbox(self) -> Mailbox:
        assert self.smtp is not None
        return self.smtp.mailbox

    def events(
        self, kind: str | None = None, approval_id: str | None = None
    ) -> list[ApprovalEvent]:
        return [
            r
            for r in self.audit.records
            if isinstance(r, ApprovalEvent)
            and (kind is None or r.event == kind)
            and (approval_id is None or r.approval_id == approval_id)
        ]

    async def until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Poll ``predicate`` (cheap, in-memory) until true; fail after ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.01)

    async def get_form(self, url: str) -> dict[str, str]:
        async with self.http.get(url) as resp:
            assert resp.status == 200
            page = await resp.text()
        fields = dict(re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)">', page))
        assert set(fields) == {"t", "csrf"}, page
        return fields

    async def post(
        self, url: str, data: dict[str, str], headers: dict[str, str] | None = None
    ) -> tuple[int, str]:
        async with self.http.post(url, data=data, headers=headers or {}) as resp:
            return resp.status, await resp.text()

    async def close(self, withdraw_pending: bool = True) -> None:
        if self._closed:
            return
        self._closed = True
        await self.service.close(withdraw_pending=withdraw_pending)
        await self.http.close()
        await self._runner.cleanup()


HarnessFactory = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[HarnessFactory]:
    """Build services wired to a real mailbox and a real loopback web server."""
    made: list[Harness] = []
    servers: list[SmtpServer] = []

    async def build(
        *,
        rules: Rules | None = None,
        smtp: SmtpServer | bool | None = True,
        smtp_url: str | None = None,
        notifier: Notifier | None = None,
        store_name: str = "approvals.sqlite",
        clock: Callable[[], float] | None = None,
        api_tokens: dict[str, str] | None = None,
        tls_context: ssl.SSLContext | None = None,
        backoff: Backoff | None = None,
        start: bool = True,
        **service_kw: Any,
    ) -> Harness:
        server: SmtpServer | None
        if smtp is True:
            server = await SmtpServer(free_port()).start()
            servers.append(server)
        elif isinstance(smtp, SmtpServer):
            server = smtp
            servers.append(server)
        else:
            server = None
        if notifier is None:
            if smtp_url is None:
                assert server is not None
                smtp_url = f"smtp://127.0.0.1:{server.port}?timeout=5"
            notifier = SmtpNotifier(
                SmtpSettings.parse(smtp_url), "pgproxy@example.org", tls_context=tls_context
            )
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        base_url = f"http://127.0.0.1:{port}"
        store_path = tmp_path / store_name
        extra: dict[str, Any] = {"clock": clock} if clock is not None else {}
        service = ApprovalService(
            SqliteApprovalStore(store_path),
            rules or make_rules(),
            notifier,
            MemorySink(),
            base_url,
            backoff=backoff or Backoff(base=0.05, factor=2.0, cap=0.2),
            outbox_poll_seconds=0.2,
            expiry_poll_seconds=0.05,
            **extra,
            **service_kw,
        )
        audit = service.audit
        assert isinstance(audit, MemorySink)
        runner = web.AppRunner(make_app(service, api_tokens=api_tokens))
        await runner.setup()
        await web.SockSite(runner, sock).start()
        if start:
            await service.start()
        h = Harness(
            service=service,
            audit=audit,
            store_path=store_path,
            base_url=base_url,
            http=aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)),
            smtp=server,
            _runner=runner,
        )
        made.append(h)
        return h

    yield build
    for h in made:
        with contextlib.suppress(Exception):
            await h.close()
    for s in servers:
        await s.stop()
