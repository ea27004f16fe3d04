"""Reviewer notification: the message, the SMTP/log/webhook notifiers, and the retrying outbox.

A held request becomes one outbox row per eligible reviewer (written by the store in the same
transaction as the request). ``Outbox`` delivers due rows through a ``Notifier`` and, on failure,
pushes the row back with exponential backoff — an SMTP outage delays a notification, it never
loses it, and rows survive a restart because they live in the store.

SMTP URLs: ``smtp://`` (plain, no upgrade), ``smtp+starttls://`` (STARTTLS *required*: a server
that does not offer it fails the attempt, nothing is sent in clear), ``smtps://`` (implicit TLS);
optional ``user:pass@`` (percent-encoded) and ``?timeout=SECONDS``. Without a URL the message is
logged instead: subject and link only, never the statement.

The email shows the statement to reviewers (authorized humans; that is the point of review) but
never bound parameter values, which this module never receives.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from enum import StrEnum
from typing import Protocol
from urllib.parse import parse_qs, unquote, urlsplit

import aiohttp
import aiosmtplib
import pglast

from pgproxy.approvals.store import ApprovalStore, OutboxItem

__all__ = [
    "Backoff",
    "FanoutNotifier",
    "LogNotifier",
    "Notification",
    "Notifier",
    "Outbox",
    "SmtpNotifier",
    "SmtpSecurity",
    "SmtpSettings",
    "WebhookNotifier",
    "make_notifier",
    "pretty_sql",
    "render_email",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Notification:
    """Everything one reviewer's message says about one held request."""

    approval_id: str
    recipient: str
    agent: str
    owner: str | None
    database: str
    sql: str
    statement_class: str
    hold_class: str
    reasons: tuple[str, ...]
    relations: tuple[str, ...]
    estimated_rows: int | None
    masking: tuple[str, ...]
    requested_at: datetime
    expires_at: datetime
    status: str
    quorum: int
    #: ``{public_url}/approvals/{approval_id}?t={token}``: personal to ``recipient``
    link: str

    @property
    def subject(self) -> str:
        what = f"{self.hold_class} by {self.agent} on {self.database}"
        if self.status != "pending":
            return f"[pgproxy] Approval request {self.approval_id} ({self.status}): {what}"
        return f"[pgproxy] Approval needed: {what} ({self.approval_id})"


class Notifier(Protocol):
    """Delivers one notification; returns its message id, raises on failure (it is retried)."""

    async def send(self, note: Notification) -> str: ...


def pretty_sql(sql: str) -> str:
    """The statement as pglast pretty-prints it, or as written if it does not parse."""
    try:
        return str(pglast.prettify(sql))
    except Exception:
        return sql


def _facts(note: Notification) -> list[tuple[str, str]]:
    rows = "unknown" if note.estimated_rows is None else f"{note.estimated_rows:,}"
    return [
        ("Request", note.approval_id),
        ("Status", note.status),
        ("Agent", note.agent),
        ("Owner", note.owner or "(none)"),
        ("Database", note.database),
        ("Held as", note.hold_class),
        ("Statement class", note.statement_class),
        ("Reasons", "; ".join(note.reasons) or "(none)"),
        ("Objects touched", ", ".join(note.relations) or "(none)"),
        ("Estimated rows", rows),
        ("Masking in effect", "; ".join(note.masking) or "(none)"),
        ("Approvals needed", str(note.quorum)),
        ("Requested", note.requested_at.isoformat(timespec="seconds")),
        ("Expires", note.expires_at.isoformat(timespec="seconds")),
    ]


def render_text(note: Notification) -> str:
    lines = [f"An AI agent's statement is held for your review ({note.approval_id}).", ""]
    lines += [f"{k + ':':<19} {v}" for k, v in _facts(note)]
    lines += ["", "Statement (bound parameter values are never shown):", ""]
    lines += ["    " + line for line in pretty_sql(note.sql).splitlines()]
    lines += [
        "",
        "Review, approve or deny (this link is personal; do not forward it):",
        note.link,
        "",
        "If nobody decides before the expiry time, the statement is not run.",
    ]
    return "\n".join(lines) + "\n"


def render_html(note: Notification) -> str:
    e = html.escape
    facts = "\n".join(
        f"<tr><th align='left'>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in _facts(note)
    )
    return (
        "<!doctype html><html><body>"
        f"<p>An AI agent's statement is held for your review ({e(note.approval_id)}).</p>"
        f"<table>{facts}</table>"
        "<p>Statement (bound parameter values are never shown):</p>"
        f"<pre>{e(pretty_sql(note.sql))}</pre>"
        f'<p><a href="{e(note.link, quote=True)}">Review, approve or deny</a>'
        " (this link is personal; do not forward it).</p>"
        "<p>If nobody decides before the expiry time, the statement is not run.</p>"
        "</body></html>"
    )


def render_email(note: Notification, mail_from: str) -> EmailMessage:
    """The multipart/alternative message (plain text + HTML) with a fresh Message-ID."""
    msg = EmailMessage()
    msg["From"] = mail_from
    msg["To"] = note.recipient
    msg["Subject"] = note.subject
    msg["Date"] = format_datetime(note.requested_at)
    domain = mail_from.rpartition("@")[2].strip("<> ") or "localhost"
    msg["Message-ID"] = make_msgid(idstring=note.approval_id, domain=domain)
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(render_text(note))
    msg.add_alternative(render_html(note), subtype="html")
    return msg


class SmtpSecurity(StrEnum):
    PLAIN = "smtp"
    STARTTLS = "smtp+starttls"
    TLS = "smtps"


_DEFAULT_PORTS = {SmtpSecurity.PLAIN: 25, SmtpSecurity.STARTTLS: 587, SmtpSecurity.TLS: 465}


@dataclass(frozen=True, slots=True)
class SmtpSettings:
    host: str
    port: int
    security: SmtpSecurity
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout: float = 30.0

    @classmethod
    def parse(cls, url: str) -> SmtpSettings:
        """Parse an ``smtp://``, ``smtp+starttls://`` or ``smtps://`` URL; ValueError if bad."""
        parts = urlsplit(url)
        try:
            security = SmtpSecurity(parts.scheme.lower())
        except ValueError:
            raise ValueError(
                f"unsupported SMTP URL scheme {parts.scheme!r}: "
                "use smtp://, smtp+starttls:// or smtps://"
            ) from None
        if not parts.hostname:
            raise ValueError("SMTP URL has no host")
        timeout = 30.0
        query = parse_qs(parts.query)
        for key in query:
            if key != "timeout":
                raise ValueError(f"unknown SMTP URL parameter {key!r}")
        if "timeout" in query:
            timeout = float(query["timeout"][-1])
            if timeout <= 0:
                raise ValueError("SMTP timeout must be positive")
        return cls(
            host=parts.hostname,
            port=parts.port or _DEFAULT_PORTS[security],
            security=security,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password is not None else None,
            timeout=timeout,
        )


class SmtpNotifier:
    """Sends each notification as one email through aiosmtplib."""

    def __init__(
        self,
        settings: SmtpSettings,
        mail_from: str,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.settings = settings
        self.mail_from = mail_from
        # an ssl.SSLContext (tests pass one trusting their own CA); None = system trust store
        self._tls_context = tls_context

    async def send(self, note: Notification) -> str:
        s = self.settings
        msg = render_email(note, self.mail_from)
        await aiosmtplib.send(
            msg,
            hostname=s.host,
            port=s.port,
            username=s.username,
            password=s.password,
            use_tls=s.security is SmtpSecurity.TLS,
            # True = required (aiosmtplib raises if the server does not offer STARTTLS);
            # False = never upgrade. None (opportunistic) is never used.
            start_tls=s.security is SmtpSecurity.STARTTLS,
            timeout=s.timeout,
            tls_context=self._tls_context,
        )
        return str(msg["Message-ID"])


class LogNotifier:
    """No SMTP configured: log subject and link (never the statement) at INFO."""

    def __init__(self, mail_from: str = "pgproxy@localhost") -> None:
        self.mail_from = mail_from
        self.sent: list[tuple[str, str, str]] = []

    async def send(self, note: Notification) -> str:
        domain = self.mail_from.rpartition("@")[2] or "localhost"
        message_id = make_msgid(idstring=note.approval_id, domain=domain)
        log.info("approval email to %s: %s <%s>", note.recipient, note.subject, note.link)
        self.sent.append((note.recipient, note.subject, note.link))
        return message_id


class WebhookNotifier:
    """A Slack-compatible incoming webhook: POST ``{"text": ...}``.

    The text names the request, agent, database and class but carries neither the statement
    nor the personal link (a channel is not the reviewer); reviewers act from their email.
    """

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        self.url = url
        self.timeout = timeout

    async def send(self, note: Notification) -> str:
        text = (
            f"pgproxy: {note.hold_class} by {note.agent} on {note.database} is held for "
            f"review ({note.approval_id}, {note.status}); {note.recipient} has been sent a "
            f"review link. Expires {note.expires_at.isoformat(timespec='seconds')}."
        )
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.post(self.url, json={"text": text}) as resp,
        ):
            if resp.status >= 300:
                raise RuntimeError(f"webhook answered HTTP {resp.status}")
        return f"webhook:{note.approval_id}:{note.recipient}"


class FanoutNotifier:
    """The primary notifier decides success; the others are best effort (errors logged)."""

    def __init__(self, primary: Notifier, *others: Notifier) -> None:
        self.primary = primary
        self.others = others

    async def send(self, note: Notification) -> str:
        message_id = await self.primary.send(note)
        for other in self.others:
            try:
                await other.send(note)
            except Exception as exc:
                log.warning("secondary notifier failed for %s: %s", note.approval_id, exc)
        return message_id


def make_notifier(
    smtp_url: str | None,
    mail_from: str = "pgproxy@localhost",
    webhook_url: str | None = None,
) -> Notifier:
    """The notifier for the ``--smtp`` option (None = log) plus an optional webhook."""
    primary: Notifier
    primary = (
        LogNotifier(mail_from)
        if smtp_url is None
        else SmtpNotifier(SmtpSettings.parse(smtp_url), mail_from)
    )
    if webhook_url:
        return FanoutNotifier(primary, WebhookNotifier(webhook_url))
    return primary


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delay before retry ``attempts`` (1-based): base * factor**(attempts-1), capped."""

    base: float = 5.0
    factor: float = 2.0
    cap: float = 600.0

    def delay(self, attempts: int) -> float:
        return float(min(self.cap, self.base * self.factor ** max(0, attempts - 1)))


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


Compose = Callable[[OutboxItem], Awaitable[Notification]]
OnSent = Callable[[OutboxItem, Notification, str], Awaitable[None]]


class Outbox:
    """Delivers due outbox rows one by one; failures are rescheduled, never dropped."""

    def __init__(
        self,
        store: ApprovalStore,
        notifier: Notifier,
        compose: Compose,
        on_sent: OnSent,
        clock: Callable[[], float],
        backoff: Backoff = Backoff(),
        poll_seconds: float = 5.0,
    ) -> None:
        self.store = store
        self.notifier = notifier
        self._compose = compose
        self._on_sent = on_sent
        self._clock = clock
        self.backoff = backoff
        self.poll_seconds = poll_seconds
        self._wake = asyncio.Event()
        self._stopping = False

    def stop(self) -> None:
        """Ask ``run`` to return after the delivery in progress."""
        self._stopping = True
        self._wake.set()

    def kick(self) -> None:
        """Look for due rows now (called after a request is queued)."""
        self._wake.set()

    async def deliver_due(self) -> int:
        """One pass over the due rows; returns how many were delivered."""
        delivered = 0
        items: Sequence[OutboxItem] = await self.store.due_outbox(self._clock())
        for item in items:
            if self._stopping:
                break
            try:
                note = await self._compose(item)
                message_id = await self.notifier.send(note)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if _being_cancelled():
                    # a client library turned our cancellation into its own error: honour it
                    raise asyncio.CancelledError from exc
                attempts = item.attempts + 1
                delay = self.backoff.delay(attempts)
                error = f"{type(exc).__name__}: {exc}"
                log.warning(
                    "notification for %s to %s failed (attempt %d, retry in %.0fs): %s",
                    item.approval_id,
                    item.recipient,
                    attempts,
                    delay,
                    error,
                )
                await self.store.outbox_failed(item.item_id, self._clock() + delay, error)
                continue
            await self.store.outbox_sent(item.item_id, self._clock(), message_id)
            delivered += 1
            await self._on_sent(item, note, message_id)
        return delivered

    async def run(self) -> None:
        """Deliver forever: after each pass, sleep until the next due row, a kick, or the poll."""
        while not self._stopping:
            self._wake.clear()
            try:
                await self.deliver_due()
            except asyncio.CancelledError:
                raise
            except Exception:
                if _being_cancelled():
                    raise
                log.exception("approval outbox pass failed")
            nxt = await self.store.next_outbox_due()
            wait = self.poll_seconds
            if nxt is not None:
                # a small floor so a store that keeps failing cannot spin the loop
                wait = max(0.01, min(wait, nxt - self._clock()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=wait)
