"""SMTP URL forms, TLS delivery against a real aiosmtpd, the log and webhook notifiers."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import logging
import ssl
from pathlib import Path

import pytest
from aiohttp import web

from pgproxy.approvals.mail import (
    Backoff,
    LogNotifier,
    Notification,
    SmtpSecurity,
    SmtpSettings,
    WebhookNotifier,
    make_notifier,
)

from .conftest import HarnessFactory, SmtpServer, free_port, hold_request, link_of


def test_smtp_url_forms() -> None:
    s = SmtpSettings.parse("smtp://mail.example.org")
    assert (s.host, s.port, s.security, s.username, s.password) == (
        "mail.example.org",
        25,
        SmtpSecurity.PLAIN,
        None,
        None,
    )
    s = SmtpSettings.parse("smtp+starttls://u%40x:p%3Ass@mail.example.org?timeout=7.5")
    assert (s.port, s.security, s.username, s.password, s.timeout) == (
        587,
        SmtpSecurity.STARTTLS,
        "u@x",
        "p:ss",
        7.5,
    )
    s = SmtpSettings.parse("smtps://mail.example.org:2465")
    assert (s.port, s.security) == (2465, SmtpSecurity.TLS)
    assert "p:ss" not in repr(SmtpSettings.parse("smtp://u:p:ss@h"))
    for bad in ("http://mail.example.org", "smtp://", "smtp://h?verify=0", "smtp://h?timeout=0"):
        with pytest.raises(ValueError):
            SmtpSettings.parse(bad)


def test_backoff_grows_and_caps() -> None:
    b = Backoff(base=1.0, factor=2.0, cap=5.0)
    assert [b.delay(n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]


def _note(link: str = "http://127.0.0.1:1/approvals/apr_1?t=tok") -> Notification:
    now = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    return Notification(
        approval_id="apr_1",
        recipient="alice@example.org",
        agent="triage-bot",
        owner="carol@example.org",
        database="clinic",
        sql="select secret_column_marker from public.patients",
        statement_class="select",
        hold_class="bulk_export",
        reasons=("more than 1000 rows from tagged tables",),
        relations=("public.patients",),
        estimated_rows=50000,
        masking=(),
        requested_at=now,
        expires_at=now + dt.timedelta(minutes=15),
        status="pending",
        quorum=1,
        link=link,
    )


async def test_no_smtp_url_logs_subject_and_link_never_the_sql(
    caplog: pytest.LogCaptureFixture,
) -> None:
    notifier = make_notifier(None)
    assert isinstance(notifier, LogNotifier)
    with caplog.at_level(logging.DEBUG, logger="pgproxy"):
        message_id = await notifier.send(_note())
    assert message_id.startswith("<") and "apr_1" in message_id
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "http://127.0.0.1:1/approvals/apr_1?t=tok" in logged
    assert "[pgproxy] Approval needed" in logged
    assert "secret_column_marker" not in logged


async def test_webhook_posts_text_without_statement_or_link() -> None:
    received: list[object] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        await WebhookNotifier(f"http://127.0.0.1:{port}/hook").send(_note())
        with pytest.raises(RuntimeError):
            await WebhookNotifier(f"http://127.0.0.1:{port}/missing").send(_note())
    finally:
        await runner.cleanup()
    assert len(received) == 1
    body = received[0]
    assert isinstance(body, dict) and set(body) == {"text"}
    assert "apr_1" in body["text"] and "triage-bot" in body["text"]
    assert "secret_column_marker" not in body["text"] and "t=tok" not in body["text"]


def _tls_pair(tmp: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A self-signed certificate for 127.0.0.1: (server context, client context trusting it)."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pgproxy test mail")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = tmp / "cert.pem"
    key_pem = tmp / "key.pem"
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_pem, key_pem)
    client = ssl.create_default_context(cafile=str(cert_pem))
    return server, client


@pytest.mark.parametrize("mode", ["starttls", "smtps"])
async def test_tls_delivery(harness: HarnessFactory, tmp_path: Path, mode: str) -> None:
    server_ctx, client_ctx = _tls_pair(tmp_path)
    if mode == "starttls":
        server = SmtpServer(free_port(), starttls_context=server_ctx)
        url = "smtp+starttls://127.0.0.1:{port}?timeout=5"
    else:
        server = SmtpServer(free_port(), implicit_tls=server_ctx)
        url = "smtps://127.0.0.1:{port}?timeout=5"
    await server.start()
    h = await harness(smtp=server, smtp_url=url.format(port=server.port), tls_context=client_ctx)
    pending = await h.service.submit(hold_request())
    msg = await server.mailbox.next()
    assert link_of(msg)[1] == pending.approval_id


async def test_tls_delivery_refuses_an_untrusted_certificate(
    harness: HarnessFactory, tmp_path: Path
) -> None:
    server_ctx, _ = _tls_pair(tmp_path)
    server = await SmtpServer(free_port(), implicit_tls=server_ctx).start()
    h = await harness(smtp=server, smtp_url=f"smtps://127.0.0.1:{server.port}?timeout=2")
    pending = await h.service.submit(hold_request())
    async with asyncio.timeout(10):
        while not all(i.attempts >= 1 for i in await h.service.store.outbox(pending.approval_id)):
            await asyncio.sleep(0.02)
    items = await h.service.store.outbox(pending.approval_id)
    assert all("certificate" in i.last_error.lower() for i in items), items
    assert server.mailbox.received == []
