"""Connections to the real database with the credentials only pgproxy holds.

Parses the upstream DSN (URL or ``key=value`` form), connects with TLS per ``sslmode`` (disable,
allow, prefer, require, verify-ca, verify-full), sends a StartupMessage, and authenticates with
whatever the server asks for: trust, cleartext password, MD5, or SCRAM-SHA-256 (via scramp).
The agent never sees any of this: the proxy hands it only the server's ParameterStatus values.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote, urlsplit

import scramp

from pgproxy.protocol import messages as m
from pgproxy.protocol.framing import FrameBuffer
from pgproxy.protocol.startup import CancelRequest, SSLRequest, StartupMessage

SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


class UpstreamError(Exception):
    """The upstream refused us or could not be reached. ``sqlstate``/``message`` are safe to show
    the agent: they never include upstream credentials."""

    def __init__(
        self, message: str, sqlstate: str = "08001", fatal_fields: Mapping[str, str] | None = None
    ):
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate
        self.fields = dict(fatal_fields or {})


@dataclass(frozen=True)
class UpstreamDSN:
    host: str = "127.0.0.1"
    port: int = 5432
    user: str = "postgres"
    password: str | None = None
    dbname: str | None = None
    sslmode: str = "prefer"
    sslrootcert: str | None = None
    sslcert: str | None = None
    sslkey: str | None = None
    connect_timeout: float = 10.0
    options: dict[str, str] = field(default_factory=dict)

    def redacted(self) -> str:
        """For logs: everything but the password."""
        db = self.dbname or ""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{db}?sslmode={self.sslmode}"


def parse_dsn(dsn: str) -> UpstreamDSN:
    """``postgresql://user:pw@host:port/db?sslmode=…`` or ``host=… port=… user=…``."""
    params: dict[str, str] = {}
    if "://" in dsn:
        u = urlsplit(dsn)
        if u.scheme not in ("postgresql", "postgres"):
            raise ValueError("upstream DSN must start with postgresql://")
        if u.hostname:
            params["host"] = unquote(u.hostname)
        if u.port:
            params["port"] = str(u.port)
        if u.username:
            params["user"] = unquote(u.username)
        if u.password is not None:
            params["password"] = unquote(u.password)
        if u.path and u.path != "/":
            params["dbname"] = unquote(u.path[1:])
        params.update(parse_qsl(u.query))
    else:
        for part in dsn.split():
            if "=" not in part:
                raise ValueError("upstream DSN: expected key=value pairs")
            k, v = part.split("=", 1)
            params[k] = v.strip("'")
    sslmode = params.pop("sslmode", "prefer")
    if sslmode not in SSLMODES:
        raise ValueError(f"upstream DSN: unknown sslmode {sslmode!r}")
    try:
        port = int(params.pop("port", "5432"))
    except ValueError:
        raise ValueError("upstream DSN: port must be a number") from None
    return UpstreamDSN(
        host=params.pop("host", "127.0.0.1"),
        port=port,
        user=params.pop("user", "postgres"),
        password=params.pop("password", None),
        dbname=params.pop("dbname", None),
        sslmode=sslmode,
        sslrootcert=params.pop("sslrootcert", None),
        sslcert=params.pop("sslcert", None),
        sslkey=params.pop("sslkey", None),
        connect_timeout=float(params.pop("connect_timeout", "10")),
        options=params,
    )


def _ssl_context(dsn: UpstreamDSN) -> ssl.SSLContext:
    if dsn.sslmode in ("verify-ca", "verify-full"):
        ctx = ssl.create_default_context(cafile=dsn.sslrootcert)
        ctx.check_hostname = dsn.sslmode == "verify-full"
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if dsn.sslcert:
        ctx.load_cert_chain(dsn.sslcert, dsn.sslkey)
    return ctx


@dataclass
class Upstream:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    parameters: dict[str, str]
    backend_key: m.BackendKeyData | None
    tls: bool

    def close(self) -> None:
        if not self.writer.is_closing():
            with contextlib.suppress(Exception):
                self.writer.write(m.Terminate().encode())
            self.writer.close()


async def _open(dsn: UpstreamDSN) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
    """TCP, then TLS when sslmode asks for it."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(dsn.host, dsn.port), dsn.connect_timeout
        )
    except (OSError, TimeoutError) as exc:
        raise UpstreamError(f"cannot reach the database: {type(exc).__name__}", "08001") from None
    if dsn.sslmode in ("disable", "allow"):
        return reader, writer, False
    writer.write(SSLRequest().encode())
    await writer.drain()
    answer = await reader.readexactly(1)
    if answer == b"S":
        try:
            await writer.start_tls(_ssl_context(dsn), server_hostname=dsn.host)
        except (ssl.SSLError, OSError) as exc:
            writer.close()
            raise UpstreamError(
                f"TLS to the database failed: {type(exc).__name__}", "08001"
            ) from None
        return reader, writer, True
    if answer != b"N":
        writer.close()
        raise UpstreamError("the database answered SSLRequest with garbage", "08P01")
    if dsn.sslmode == "prefer":
        return reader, writer, False
    writer.close()
    raise UpstreamError("the database does not support TLS but sslmode requires it", "08001")


async def connect(
    dsn: UpstreamDSN, database: str | None, extra_params: Mapping[str, str] | None = None
) -> Upstream:
    """Open and authenticate one upstream session; return once it is ReadyForQuery."""
    reader, writer, tls = await _open(dsn)
    try:
        params = {"user": dsn.user, "database": database or dsn.dbname or dsn.user}
        params.update(extra_params or {})
        writer.write(StartupMessage(3, 0, params).encode())
        await writer.drain()
        frames = FrameBuffer(1 << 24)
        parameters: dict[str, str] = {}
        key: m.BackendKeyData | None = None
        scram: scramp.ScramClient | None = None
        while True:
            data = await asyncio.wait_for(reader.read(65536), dsn.connect_timeout)
            if not data:
                raise UpstreamError("the database closed the connection during startup", "08006")
            chunk, fr = frames.feed(data)
            for tag, start, end in fr:
                msg = m.decode_backend(bytes([tag]), memoryview(chunk)[start + 5 : end])
                if isinstance(msg, m.ErrorResponse):
                    # Postgres' own startup errors (bad database, too many connections) are safe
                    # to pass on; authentication failures are ours to explain.
                    if msg.sqlstate in ("28P01", "28000"):
                        raise UpstreamError(
                            "pgproxy could not authenticate to the database "
                            "(check the upstream DSN)",
                            "08004",
                        )
                    raise UpstreamError(msg.message, msg.sqlstate or "08001", dict(msg.fields))
                if isinstance(msg, m.Authentication):
                    scram = _authenticate(msg, dsn, writer, scram)
                elif isinstance(msg, m.ParameterStatus):
                    parameters[msg.name] = msg.value
                elif isinstance(msg, m.BackendKeyData):
                    key = msg
                elif isinstance(msg, m.ReadyForQuery):
                    rest = frames.take_rest()
                    if rest or end != len(chunk):
                        raise UpstreamError("the database sent data after ReadyForQuery", "08P01")
                    return Upstream(reader, writer, parameters, key, tls)
                elif isinstance(msg, m.NoticeResponse | m.NegotiateProtocolVersion):
                    continue
                else:
                    raise UpstreamError(
                        "unexpected message from the database during startup", "08P01"
                    )
            await writer.drain()
    except BaseException:
        writer.close()
        raise


def _authenticate(
    msg: m.Authentication,
    dsn: UpstreamDSN,
    writer: asyncio.StreamWriter,
    scram: scramp.ScramClient | None,
) -> scramp.ScramClient | None:
    code = msg.code
    if code == m.AUTH_OK:
        return scram
    password = dsn.password
    if code in (m.AUTH_CLEARTEXT, m.AUTH_MD5, m.AUTH_SASL) and password is None:
        raise UpstreamError(
            "the database asks for a password and the upstream DSN has none", "08004"
        )
    assert password is not None or code not in (m.AUTH_CLEARTEXT, m.AUTH_MD5, m.AUTH_SASL)
    if code == m.AUTH_CLEARTEXT:
        if dsn.sslmode in ("disable", "allow", "prefer") and not writer.get_extra_info(
            "sslcontext"
        ):
            pass  # as libpq does: allowed, but only ever on the operator's own network
        writer.write(m.PasswordMessage((password or "").encode() + b"\x00").encode())
        return scram
    if code == m.AUTH_MD5:
        salt = msg.data[:4]
        inner = hashlib.md5((password or "").encode() + dsn.user.encode()).hexdigest()
        digest = "md5" + hashlib.md5(inner.encode() + salt).hexdigest()
        writer.write(m.PasswordMessage(digest.encode() + b"\x00").encode())
        return scram
    if code == m.AUTH_SASL:
        mechs = msg.mechanisms()
        if "SCRAM-SHA-256" not in mechs:
            raise UpstreamError("the database offers no SASL mechanism pgproxy supports", "08004")
        client = scramp.ScramClient(["SCRAM-SHA-256"], dsn.user, password or "")
        first = client.get_client_first()
        writer.write(m.sasl_initial_response("SCRAM-SHA-256", first.encode()))
        return client
    if code == m.AUTH_SASL_CONTINUE and scram is not None:
        scram.set_server_first(msg.data.decode())
        writer.write(m.PasswordMessage(scram.get_client_final().encode()).encode())
        return scram
    if code == m.AUTH_SASL_FINAL and scram is not None:
        try:
            scram.set_server_final(msg.data.decode())
        except scramp.ScramException:
            raise UpstreamError("the database failed SCRAM server verification", "08004") from None
        return scram
    raise UpstreamError(f"unsupported upstream authentication request {code}", "08004")


async def cancel(dsn: UpstreamDSN, key: m.BackendKeyData) -> None:
    """Send a CancelRequest for ``key`` on a fresh connection (TLS per sslmode)."""
    try:
        reader, writer, _ = await _open(dsn)
    except UpstreamError:
        return
    try:
        writer.write(CancelRequest(key.pid, key.secret).encode())
        await writer.drain()
        await asyncio.wait_for(reader.read(1), 5)
    except (OSError, TimeoutError):
        pass
    finally:
        writer.close()
