"""The demo's mail: an in-process SMTP sink (aiosmtpd) and the ``/mail`` pages that show it.

``pgproxy demo`` points ``--smtp`` at ``start_smtp_sink``'s server (127.0.0.1, a free port, in
the proxy's own event loop), so approval emails are real SMTP deliveries that land in a
``Mailbox`` in memory instead of leaving the machine. ``mail_routes`` mounts read-only pages on
the proxy's HTTP port: ``GET /mail`` lists the messages, ``GET /mail/{n}`` shows one -- the plain
text part with its http(s) links made clickable, the HTML part as escaped source. Every value
is HTML-escaped, pages carry a CSP that allows no script, no frame and no form, and there is no
route that changes anything (aiohttp answers 405 to any other method).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email
import email.policy
import hashlib
import html
import logging
import re
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from string import Template
from typing import Any

from aiohttp import web
from aiosmtpd.smtp import SMTP

__all__ = [
    "MailMessage",
    "Mailbox",
    "MailboxHandler",
    "SmtpSink",
    "linkify",
    "mail_routes",
    "start_smtp_sink",
]

MAX_MESSAGES = 500
MAX_MESSAGE_BYTES = 1 << 20

_URL = re.compile(r"https?://[^\s<>\"']+")
_TRAILING = ".,;:!?)]}'\""

_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}"
    "table{border-collapse:collapse;width:100%}td,th{text-align:left;padding:.3rem .6rem;"
    "border-bottom:1px solid #ddd;vertical-align:top}"
    "pre{background:#f4f4f4;padding:1rem;overflow:auto;white-space:pre-wrap}"
)
_CSS_HASH = base64.b64encode(hashlib.sha256(_CSS.encode()).digest()).decode()
HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": (
        f"default-src 'none'; style-src 'sha256-{_CSS_HASH}'; form-action 'none'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
}

_PAGE = Template(
    """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="robots" content="noindex,nofollow">$refresh
<title>$title</title><style>$css</style></head>
<body>
<h1>$title</h1>
$body
</body></html>
"""
)


@dataclass(frozen=True, slots=True)
class MailMessage:
    """One delivered message, as the pages show it."""

    number: int
    received_at: datetime
    sender: str
    recipients: tuple[str, ...]
    subject: str
    text: str | None
    html: str | None


class Mailbox:
    """The newest ``capacity`` messages, numbered from 1; safe to use from any thread."""

    def __init__(self, capacity: int = MAX_MESSAGES) -> None:
        self._messages: deque[MailMessage] = deque(maxlen=capacity)
        self._lock = threading.Lock()
        self._next = 1

    def add(
        self, raw: bytes, sender: str, recipients: Sequence[str], received_at: datetime
    ) -> MailMessage:
        """Parse ``raw`` (RFC 5322 bytes) and keep it."""
        subject, text, html_part = _parts(raw)
        with self._lock:
            msg = MailMessage(
                self._next, received_at, sender, tuple(recipients), subject, text, html_part
            )
            self._next += 1
            self._messages.append(msg)
        return msg

    def messages(self) -> list[MailMessage]:
        """Newest first."""
        with self._lock:
            return list(reversed(self._messages))

    def get(self, number: int) -> MailMessage | None:
        with self._lock:
            return next((m for m in self._messages if m.number == number), None)


def _parts(raw: bytes) -> tuple[str, str | None, str | None]:
    """Subject, plain text and HTML of a message; undecodable parts become None."""
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    if not isinstance(parsed, EmailMessage):  # pragma: no cover - policy.default guarantees it
        return "(unreadable message)", None, None
    subject = str(parsed.get("Subject", "") or "(no subject)")

    def content(kind: str) -> str | None:
        try:
            part = parsed.get_body(preferencelist=(kind,))
            return None if part is None else str(part.get_content())
        except (LookupError, ValueError, TypeError):
            return None

    return subject, content("plain"), content("html")


class MailboxHandler:
    """aiosmtpd handler: every accepted DATA lands in the mailbox."""

    def __init__(self, mailbox: Mailbox) -> None:
        self.mailbox = mailbox

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        raw = envelope.original_content or envelope.content
        if isinstance(raw, str):
            raw = raw.encode("utf-8", "replace")
        self.mailbox.add(
            bytes(raw), str(envelope.mail_from), list(envelope.rcpt_tos), datetime.now(UTC)
        )
        return "250 Message accepted for delivery"


@dataclass(slots=True)
class SmtpSink:
    """A running sink; ``url`` is what ``--smtp`` takes."""

    server: asyncio.AbstractServer
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"smtp://{self.host}:{self.port}"

    async def close(self) -> None:
        self.server.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.server.wait_closed(), timeout=2)


async def start_smtp_sink(mailbox: Mailbox, host: str = "127.0.0.1", port: int = 0) -> SmtpSink:
    """Serve SMTP into ``mailbox`` in the running loop; port 0 picks a free port."""
    handler = MailboxHandler(mailbox)
    # aiosmtpd logs every SMTP command at INFO: too chatty for a terminal demo
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(
            handler,
            hostname="pgproxy-demo.invalid",
            data_size_limit=MAX_MESSAGE_BYTES,
            enable_SMTPUTF8=True,
        ),
        host,
        port,
    )
    bound = server.sockets[0].getsockname()
    return SmtpSink(server, host, int(bound[1]))


def linkify(text: str) -> str:
    """``text`` HTML-escaped, with each http(s) URL turned into a link to itself."""
    out: list[str] = []
    pos = 0
    for found in _URL.finditer(text):
        url = found.group(0).rstrip(_TRAILING)
        end = found.start() + len(url)
        out.append(html.escape(text[pos : found.start()]))
        out.append(f'<a href="{html.escape(url, quote=True)}">{html.escape(url)}</a>')
        pos = end
    out.append(html.escape(text[pos:]))
    return "".join(out)


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _page(title: str, body: str, refresh: bool = False, status: int = 200) -> web.Response:
    text = _PAGE.substitute(
        title=_e(title),
        css=_CSS,
        body=body,
        refresh='\n<meta http-equiv="refresh" content="5">' if refresh else "",
    )
    return web.Response(text=text, status=status, content_type="text/html", headers=HEADERS)


def _when(ts: datetime) -> str:
    return ts.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _list_page(mailbox: Mailbox) -> web.Response:
    rows = [
        f"<tr><td>{m.number}</td><td>{_e(_when(m.received_at))}</td>"
        f"<td>{_e(', '.join(m.recipients))}</td>"
        f'<td><a href="/mail/{m.number}">{_e(m.subject)}</a></td></tr>'
        for m in mailbox.messages()
    ]
    if rows:
        body = (
            "<table><tr><th>#</th><th>Received</th><th>To</th><th>Subject</th></tr>"
            + "".join(rows)
            + "</table>"
        )
    else:
        body = "<p id='empty'>No mail yet. Held statements send their approval emails here.</p>"
    note = (
        "<p>The demo's SMTP sink: every email pgproxy sent while the demo runs "
        "(newest first; this page refreshes itself).</p>"
    )
    return _page("Demo mailbox", note + body, refresh=True)


def _message_page(m: MailMessage) -> web.Response:
    facts = [
        ("From", m.sender),
        ("To", ", ".join(m.recipients)),
        ("Received", _when(m.received_at)),
        ("Subject", m.subject),
    ]
    body = ["<p><a href='/mail'>&larr; all mail</a></p><table>"]
    body += [f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in facts]
    body.append("</table>")
    if m.text is not None:
        body.append(f'<h2>Message</h2><pre id="text">{linkify(m.text)}</pre>')
    if m.html is not None:
        body.append(
            "<details><summary>HTML part (shown as source)</summary>"
            f'<pre id="html">{_e(m.html)}</pre></details>'
        )
    if m.text is None and m.html is None:
        body.append("<p>This message has no readable text.</p>")
    return _page(f"Mail #{m.number}", "".join(body))


def mail_routes(mailbox: Mailbox) -> web.RouteTableDef:
    """``GET /mail`` and ``GET /mail/{number}`` (HEAD too); nothing else."""
    routes = web.RouteTableDef()

    @routes.get("/mail")
    async def index(_request: web.Request) -> web.Response:
        return _list_page(mailbox)

    @routes.get("/mail/{number}")
    async def show(request: web.Request) -> web.Response:
        raw = request.match_info["number"]
        msg = mailbox.get(int(raw)) if raw.isdigit() and len(raw) < 10 else None
        if msg is None:
            return _page("Not found", "<p>No such message.</p>", status=404)
        return _message_page(msg)

    return routes
