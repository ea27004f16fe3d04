"""One agent connection, from the first startup byte to the last: the only code here that awaits.

Order of events: startup packets (SSLRequest ⇒ TLS when configured, GSSENCRequest ⇒ ``N``,
CancelRequest ⇒ forwarded to the right upstream backend), StartupMessage checks (protocol minor
version and ``_pq_`` options negotiated down, replication refused), agent authentication
(SCRAM-SHA-256; cleartext only over TLS and only when enabled), then the proxy's own upstream
connection with the real credentials, and finally the relay: both sockets are handed to small
``asyncio.Protocol`` objects that feed ``pgproxy.protocol.relay.Relay`` and write what it queued
from the transports' own callbacks, with backpressure (a full send buffer on one socket pauses
reading from the other).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, cast

import scramp

from pgproxy.audit.records import (
    EncodedStatement,
    SessionEnded,
    SessionStarted,
    StatementRecord,
)
from pgproxy.audit.wire import K_STATEMENT, decode_statement
from pgproxy.policy.seam import Action, SessionPolicy, Verdict
from pgproxy.protocol import codes
from pgproxy.protocol import messages as m
from pgproxy.protocol.errors import PeerProtocolError
from pgproxy.protocol.framing import FrameBuffer
from pgproxy.protocol.relay import (
    HoldRequested,
    ProtocolViolation,
    Relay,
    StatementAdmitted,
    StatementFinished,
)
from pgproxy.protocol.startup import (
    CancelRequest,
    GSSENCRequest,
    SSLRequest,
    StartupMessage,
    StartupPacket,
    read_startup,
)
from pgproxy.server import upstream as up
from pgproxy.server.audit_wire import AuditWireSession
from pgproxy.server.credentials import MECHANISM, CredentialStore, Identity, ScramServer
from pgproxy.server.holds import HoldContext, HoldOutcome

if TYPE_CHECKING:
    from pgproxy.server.proxy import Proxy

log = logging.getLogger("pgproxy.session")

READ_SIZE = 256 * 1024
#: startup parameters passed on to the upstream; anything else (notably ``options``, which can
#: set ``role`` or ``session_authorization``) is dropped.
FORWARDED_PARAMS = frozenset(
    {"application_name", "DateStyle", "TimeZone", "IntervalStyle", "extra_float_digits",
     "datestyle", "timezone", "intervalstyle"}
)  # fmt: skip
#: Settings the policy's parser and the masking rewriters depend on, forced for every session:
#: pglast reads string literals as standard SQL does, and rewriters read values as UTF-8. A
#: session where either changed would let the server see code where the policy saw a string.
#: search_path too: the policy resolves unqualified names in ``public`` (and refuses SET
#: search_path), so the server must not look in a "$user" schema first.
PINNED_PARAMS = {
    "client_encoding": "UTF8",
    "standard_conforming_strings": "on",
    "search_path": "public",
}
#: the audit's and the metrics' name of each decision (an enum's ``.value`` is a slow property)
_DECISION = {a: a.value for a in Action}
FALSE_VALUES = frozenset({"false", "off", "no", "0", ""})
MAX_DEFERRED = 64 * 1024 * 1024


class Disconnect(Exception):
    """End this connection; the message (if any) has already been sent."""


@dataclass
class SessionInfo:
    session_id: str
    agent: str
    database: str
    client_addr: str
    application_name: str
    tls: bool
    identity: Identity | None = None
    key: tuple[int, int] = (0, 0)


PolicyFactory = Callable[[SessionInfo], SessionPolicy]


@dataclass
class ClientSession:
    proxy: Proxy
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    info: SessionInfo = field(init=False)
    upstream: up.Upstream | None = None
    relay: Relay | None = None
    hold_task: asyncio.Task[HoldOutcome] | None = None
    #: start of each running statement, in microseconds since the epoch (``_now_us``)
    _stmt_started: dict[int, int] = field(default_factory=dict)
    _recorded: set[int] = field(default_factory=set)
    _approvals: dict[int, str] = field(default_factory=dict)
    #: ordinary records the audit queue had no room for, in order: awaited before anything else
    _unqueued: list[StatementRecord] = field(default_factory=list)
    _done: asyncio.Future[None] | None = None
    _settle_task: asyncio.Task[None] | None = None
    #: bytes that arrived while ``_settle`` waited: (from the client?, bytes)
    _backlog: list[tuple[bool, bytes]] = field(default_factory=list)
    _transports: tuple[asyncio.Transport, asyncio.Transport] = field(init=False)
    _paused: tuple[dict[str, bool], dict[str, bool]] = field(init=False)

    def __post_init__(self) -> None:
        peer = self.writer.get_extra_info("peername")
        addr = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "")
        self.info = SessionInfo(uuid.uuid4().hex, "", "", addr, "", False)

    # ------------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        try:
            startup = await self._startup()
            if startup is None:
                return
            await self._authenticate(startup)
            if self.info.identity is not None and self.info.identity.kind == "analyst":
                await self._serve_audit()
                return
            await self._connect_upstream(startup)
            await self._relay()
        except Disconnect:
            pass
        except PeerProtocolError as exc:
            if self.relay is None and self.info.agent and self.info.identity is None:
                # a login that broke the protocol is a failed login, and audited as one
                with contextlib.suppress(Exception):
                    await self._audit_auth(f"protocol violation ({exc.sqlstate})")
            await self._fatal(exc.sqlstate, exc.message)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError, ssl.SSLError):
            pass
        finally:
            await self._close()

    async def _close(self) -> None:
        if self.hold_task is not None and not self.hold_task.done():
            self.hold_task.cancel()
        if self.upstream is not None:
            self.upstream.close()
        self.proxy.unregister(self)
        with contextlib.suppress(Exception):
            self.writer.close()
        if self.relay is not None:
            await self.proxy.audit.emit(
                SessionEnded(
                    self.info.session_id,
                    datetime.now(UTC),
                    self.relay.stats.bytes_from_client,
                    self.relay.stats.bytes_to_client,
                )
            )

    async def _send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def _fatal(self, sqlstate: str, message: str) -> None:
        with contextlib.suppress(Exception):
            await self._send(m.error(sqlstate, message, severity="FATAL"))

    # -------------------------------------------------------------------------- startup

    async def _read_packet(self, buf: bytearray) -> StartupPacket:
        while True:
            pkt, used = read_startup(buf)
            if pkt is not None:
                del buf[:used]
                return pkt
            data = await asyncio.wait_for(
                self.reader.read(16384), self.proxy.config.startup_timeout
            )
            if not data:
                raise Disconnect
            buf += data

    async def _startup(self) -> StartupMessage | None:
        buf = bytearray()
        tls_ctx = self.proxy.config.tls_context
        while True:
            pkt = await self._read_packet(buf)
            if isinstance(pkt, SSLRequest):
                if self.info.tls or tls_ctx is None:
                    await self._send(b"N")
                    continue
                # bytes after SSLRequest, before the handshake, would be trusted as if encrypted
                if buf or len(getattr(self.reader, "_buffer", b"")):
                    raise Disconnect
                await self._send(b"S")
                await self.writer.start_tls(tls_ctx)
                self.info.tls = True
                continue
            if isinstance(pkt, GSSENCRequest):
                await self._send(b"N")
                continue
            if isinstance(pkt, CancelRequest):
                await self.proxy.cancel(pkt.pid, pkt.secret)
                return None
            if buf:
                raise PeerProtocolError("data after the startup packet before authentication")
            return pkt

    def _check_startup(self, startup: StartupMessage) -> None:
        repl = startup.params.get("replication")
        if repl is not None and repl.lower() not in FALSE_VALUES:
            raise PeerProtocolError(
                "replication connections are not allowed through pgproxy", sqlstate="28000"
            )
        if not startup.user:
            raise PeerProtocolError("no user name given in the startup packet", sqlstate="28000")

    # ------------------------------------------------------------------- authentication

    async def _authenticate(self, startup: StartupMessage) -> None:
        self._check_startup(startup)
        unsupported = tuple(k for k in startup.params if k.startswith("_pq_."))
        if startup.minor > 0 or unsupported:
            await self._send(m.NegotiateProtocolVersion(0, unsupported).encode())
        user = startup.user
        self.info.agent = user
        self.info.database = startup.database
        self.info.application_name = startup.params.get("application_name", "")
        store = self.proxy.credentials
        identity = store.get(user)
        ok = await self._password_exchange(store, user)
        if not ok or identity is None:
            self.proxy.metrics.auth_failures += 1
            reason = "unknown user" if identity is None else "wrong password"
            await self._audit_auth(reason)
            await self._fatal(
                codes.INVALID_PASSWORD, f'password authentication failed for user "{user}"'
            )
            raise Disconnect
        if identity.kind == "analyst" and self.info.database != "audit":
            await self._audit_auth("analyst asked for a database other than audit")
            await self._fatal(
                codes.INVALID_AUTHORIZATION_SPECIFICATION,
                f'"{user}" is an audit analyst and may only connect to the database "audit"',
            )
            raise Disconnect
        self.info.identity = identity

    async def _password_exchange(self, store: CredentialStore, user: str) -> bool:
        buf = bytearray()
        if self.info.tls and self.proxy.config.cleartext_over_tls:
            await self._send(m.Authentication(m.AUTH_CLEARTEXT).encode())
            msg = await self._read_password(buf)
            return store.check_password(user, msg.password())
        await self._send(m.auth_sasl([MECHANISM]))
        msg = await self._read_password(buf)
        mech, data = msg.sasl_initial()
        if mech != MECHANISM or data is None:
            raise PeerProtocolError(
                "expected a SCRAM-SHA-256 SASLInitialResponse", sqlstate="28000"
            )
        scram = ScramServer(store, user)
        try:
            server_first = scram.first(data.decode())
        except (scramp.ScramException, UnicodeDecodeError):
            return False
        await self._send(m.Authentication(m.AUTH_SASL_CONTINUE, server_first.encode()).encode())
        msg = await self._read_password(buf)
        try:
            server_final = scram.final(msg.data.decode())
        except (scramp.ScramException, UnicodeDecodeError):
            return False
        await self._send(m.Authentication(m.AUTH_SASL_FINAL, server_final.encode()).encode())
        return True

    async def _read_password(self, buf: bytearray) -> m.PasswordMessage:
        frames = FrameBuffer(1 << 16)
        while True:
            chunk, fr = frames.feed(bytes(buf))
            buf.clear()
            if fr:
                tag, start, end = fr[0]
                if tag != ord("p"):
                    raise PeerProtocolError("expected a password message", sqlstate="28000")
                if len(fr) > 1 or frames.take_rest():
                    raise PeerProtocolError("data after the password message", sqlstate="08P01")
                return m.PasswordMessage.decode(memoryview(chunk)[start + 5 : end])
            data = await asyncio.wait_for(
                self.reader.read(16384), self.proxy.config.startup_timeout
            )
            if not data:
                raise Disconnect
            buf += data

    async def _audit_auth(self, outcome: str) -> None:
        await self.proxy.audit.emit(
            SessionStarted(
                self.info.session_id,
                self.info.agent,
                self.info.client_addr,
                self.info.database,
                self.info.application_name,
                datetime.now(UTC),
                auth=outcome,
                tls=self.info.tls,
            )
        )

    # ------------------------------------------------------------------------- analysts

    async def _serve_audit(self) -> None:
        query = self.proxy.audit_query
        if query is None:
            await self._audit_auth("audit database not offered")
            await self._fatal(codes.FEATURE_NOT_SUPPORTED, "the audit database is not available")
            raise Disconnect
        await self._audit_auth("ok")
        self.info.key = self.proxy.register(self)
        await AuditWireSession(self.reader, self.writer, query).serve(self.info.key)

    # ------------------------------------------------------------------------- upstream

    async def _connect_upstream(self, startup: StartupMessage) -> None:
        extra = {k: v for k, v in startup.params.items() if k in FORWARDED_PARAMS}
        extra.update(PINNED_PARAMS)
        database = startup.params.get("database") or self.proxy.config.upstream.dbname
        try:
            self.upstream = await up.connect(self.proxy.config.upstream, database, extra)
        except up.UpstreamError as exc:
            log.warning(
                "upstream connection failed for session %s: %s", self.info.session_id, exc.sqlstate
            )
            await self._audit_auth(f"upstream refused: {exc.sqlstate}")
            await self._fatal(exc.sqlstate, exc.message)
            raise Disconnect from None
        self.info.database = database or self.info.database
        await self._audit_auth("ok")
        self.info.key = self.proxy.register(self)
        out = bytearray(m.Authentication(m.AUTH_OK).encode())
        for name, value in self.upstream.parameters.items():
            out += m.ParameterStatus(name, value).encode()
        out += m.BackendKeyData(*self.info.key).encode()
        out += m.ReadyForQuery(b"I").encode()
        await self._send(bytes(out))

    # ---------------------------------------------------------------------------- relay
    #
    # After the handshake both sockets get a small ``asyncio.Protocol`` (``_Side``) instead of
    # the stream reader: bytes go straight from the transport's callback into the sans-I/O
    # relay, and what it queued is written in the same callback. Only events that must wait
    # (a record that must be durable first, a full audit queue) leave the callback: the session
    # then stops reading from both sockets and writes nothing until a task has done the waiting,
    # so no answer reaches either peer before the record the rules require.

    async def _relay(self) -> None:
        assert self.upstream is not None
        policy = self.proxy.policy_factory(self.info)
        relay = self.relay = Relay(
            policy,
            agent=self.info.agent,
            database=self.info.database,
            max_message_size=self.proxy.config.max_message_size,
            clock=time.perf_counter,
        )
        relay.estimate_bulk = self.proxy.estimate is not None
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        client_t = cast(asyncio.Transport, self.writer.transport)
        server_t = cast(asyncio.Transport, self.upstream.writer.transport)
        self._transports = (client_t, server_t)
        self._paused = ({}, {})
        early = (_take_buffered(self.reader), _take_buffered(self.upstream.reader))
        client_t.set_protocol(_Side(self, client=True))
        server_t.set_protocol(_Side(self, client=False))
        if early[1]:
            self._server_bytes(early[1])
        if early[0]:
            self._client_bytes(early[0])
        if self.upstream.reader.at_eof():
            self._side_lost(client=False)
        if self.reader.at_eof():
            self._side_lost(client=True)
        for reasons, t in zip(self._paused, self._transports, strict=True):
            if not any(reasons.values()):  # the stream reader may have paused it
                with contextlib.suppress(Exception):
                    t.resume_reading()
        try:
            await self._done
        finally:
            task = self._settle_task
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    # --- called from the transports' callbacks ----------------------------------------------

    def _client_bytes(self, data: bytes) -> None:
        if self._settle_task is not None:
            self._backlog.append((True, data))
            return
        relay = self.relay
        assert relay is not None
        try:
            if not self._unqueued:
                lane = relay.fast_query(data)
                if lane is not None:  # sent as is, before any bookkeeping
                    self._transports[1].write(data)
                    sid, verdict, decision_seconds = lane
                    self._stmt_started[sid] = _now_us()
                    metrics = self.proxy.metrics
                    metrics.count_statement(_DECISION[verdict.action])
                    metrics.decision_seconds.observe(decision_seconds)
                    return
            relay.client_data(data)
            self._process()
            if relay.holding and len(relay._deferred) > MAX_DEFERRED:
                self._end_with(
                    codes.PROGRAM_LIMIT_EXCEEDED, "too much data sent while a statement is held"
                )
        except Exception as exc:
            self._finish(exc)

    def _server_bytes(self, data: bytes) -> None:
        if self._settle_task is not None:
            self._backlog.append((False, data))
            return
        relay = self.relay
        assert relay is not None
        try:
            if relay.lane_open:
                done = relay.fast_result(data)
                if done is not None:  # the whole plain answer: sent as is, then recorded
                    self._transports[0].write(data)
                    sid, verdict, rows = done
                    now = _now_us()
                    started = self._stmt_started.pop(sid, now)
                    self.proxy.metrics.query_seconds.observe((now - started) / 1e6)
                    # the record in the audit pipe's form: no dataclass, no datetime
                    encoded = self._encoded(sid, verdict, started, now, rows, "")
                    if not self.proxy.audit.offer_encoded(encoded):
                        self._unqueued.append(decode_statement(encoded))  # the queue is full
                        self._process()
                    return
            relay.server_data(data)
            self._process()
        except Exception as exc:
            self._finish(exc)

    def _side_lost(self, *, client: bool) -> None:
        if self._done is None or self._done.done():
            return
        if client:
            self._finish(None)
        else:
            self._end_with(codes.CONNECTION_FAILURE, "the database connection was lost")

    def _set_paused(self, *, client: bool, reason: str, paused: bool) -> None:
        """Reading from one socket stops while any reason to stop holds (backpressure from the
        other socket, events being waited on)."""
        reasons = self._paused[0 if client else 1]
        was = any(reasons.values())
        reasons[reason] = paused
        now = any(reasons.values())
        if was != now:
            transport = self._transports[0 if client else 1]
            with contextlib.suppress(Exception):
                if now:
                    transport.pause_reading()
                else:
                    transport.resume_reading()

    # --- acting on what the relay reported --------------------------------------------------

    def _process(self) -> None:
        """Handle the relay's events and write what it queued, without waiting when nothing
        has to be waited for; otherwise hand over to ``_settle`` and stop reading meanwhile."""
        relay = self.relay
        assert relay is not None
        if self._settle_task is not None:
            return
        if (relay.events or self._unqueued) and not self._events_now():
            self._set_paused(client=True, reason="settle", paused=True)
            self._set_paused(client=False, reason="settle", paused=True)
            self._settle_task = asyncio.get_running_loop().create_task(self._settle())
            return
        self._write_out()

    async def _settle(self) -> None:
        relay = self.relay
        assert relay is not None
        try:
            while True:
                await self._after_feed()
                if not self._backlog:
                    break
                is_client, data = self._backlog.pop(0)
                if is_client:
                    relay.client_data(data)
                else:
                    relay.server_data(data)
        except Exception as exc:
            self._finish(exc)
            return
        finally:
            self._settle_task = None
        self._set_paused(client=True, reason="settle", paused=False)
        self._set_paused(client=False, reason="settle", paused=False)

    def _write_out(self) -> None:
        relay = self.relay
        assert relay is not None
        client_t, server_t = self._transports
        if relay.to_client:
            client_t.write(bytes(relay.to_client))
            relay.to_client.clear()
        if relay.to_server:
            server_t.write(bytes(relay.to_server))
            relay.to_server.clear()
        if relay.closed:
            self._finish(None)

    def _finish(self, exc: BaseException | None) -> None:
        done = self._done
        if done is None or done.done():
            return
        if exc is None:
            done.set_result(None)
        else:
            done.set_exception(exc)

    def _end_with(self, sqlstate: str, message: str) -> None:
        """Tell the agent why the session ends, then end it."""
        with contextlib.suppress(Exception):
            self._transports[0].write(m.error(sqlstate, message, severity="FATAL"))
        self._finish(None)

    def _events_now(self) -> bool:
        """Handle the relay's events that need no waiting, in order. False when the rest
        (left in ``relay.events``) must be awaited by ``_after_feed``."""
        relay = self.relay
        assert relay is not None
        events = relay.events
        now = _now_us()
        done = 0
        for ev in events:
            if not self._event_now(ev, now):
                break
            done += 1
        del events[:done]
        return not events and not self._unqueued

    def _event_now(self, ev: object, now: int) -> bool:
        """``_on_event`` for the events that need no waiting; False (and nothing done) for
        the others."""
        metrics = self.proxy.metrics
        if isinstance(ev, StatementAdmitted):
            if ev.verdict.action is Action.BLOCK:
                return False
            self._stmt_started[ev.statement_id] = now
            metrics.count_statement(_DECISION[ev.verdict.action])
            metrics.decision_seconds.observe(ev.decision_seconds)
            return True
        if isinstance(ev, StatementFinished):
            sid = ev.statement_id
            v = ev.verdict
            recorded = sid in self._recorded
            if not recorded and (sid in self._approvals or not v.admits):
                return False
            started = self._stmt_started.pop(sid, now)
            metrics.masked_cells += ev.masked_cells
            metrics.query_seconds.observe((now - started) / 1e6)
            if v.admits and not ev.sqlstate and "ddl" in (v.statement_class, v.hold_class):
                self.proxy.after_ddl()
            if recorded:
                self._recorded.discard(sid)
                return True
            record = self._record(sid, v, started, now, ev.rows, ev.sqlstate)
            if self._unqueued or not self.proxy.audit.offer(record):
                self._unqueued.append(record)  # the audit queue is full: wait in _after_feed
            return True
        if isinstance(ev, HoldRequested):
            self.hold_task = asyncio.get_running_loop().create_task(self._hold(ev))
            return True
        if isinstance(ev, ProtocolViolation):
            log.warning(
                "session %s: protocol violation by the %s", self.info.session_id,
                "client" if ev.by_client else "database",
            )  # fmt: skip
        return True

    async def _after_feed(self) -> None:
        """Act on what the relay reported (waiting where needed), then write what it queued."""
        relay = self.relay
        assert relay is not None
        while True:
            while self._unqueued:
                await self.proxy.audit.emit(self._unqueued.pop(0))
            if not relay.events or self._events_now():
                if not self._unqueued:
                    break
                continue
            await self._on_event(relay.events.pop(0), _now_us())
        self._write_out()

    async def _on_event(self, ev: object, now: int) -> None:
        """The events ``_event_now`` leaves: records that must be durable, a full queue."""
        if isinstance(ev, StatementAdmitted):
            self._stmt_started[ev.statement_id] = now
            self.proxy.metrics.count_statement(_DECISION[ev.verdict.action])
            self.proxy.metrics.decision_seconds.observe(ev.decision_seconds)
            # a block is on disk before the agent can learn of it
            record = self._record(ev.statement_id, ev.verdict, now, now, 0, "42501")
            self._recorded.add(ev.statement_id)
            try:
                await self.proxy.audit.emit_durable(record)
            except Exception:
                log.error("session %s: could not record a block", self.info.session_id)
        elif isinstance(ev, StatementFinished):
            started = self._stmt_started.pop(ev.statement_id, now)
            v = ev.verdict
            self.proxy.metrics.masked_cells += ev.masked_cells
            self.proxy.metrics.query_seconds.observe((now - started) / 1e6)
            if v.admits and not ev.sqlstate and "ddl" in (v.statement_class, v.hold_class):
                self.proxy.after_ddl()
            record = self._record(ev.statement_id, v, started, now, ev.rows, ev.sqlstate)
            approval_id = self._approvals.pop(ev.statement_id, "")
            if approval_id:
                record = dataclasses.replace(record, approval_id=approval_id)
                await self.proxy.audit.emit_durable(record)
                await self.proxy.holds.executed(approval_id, ev.rows, ev.sqlstate)
            elif not v.admits:
                await self.proxy.audit.emit_durable(record)
            else:
                await self.proxy.audit.emit(record)

    def _statement_id(self, sid: int) -> str:
        """The audit's id of the relay's statement number ``sid`` in this session."""
        return f"{self.info.session_id}-{sid}"

    def _encoded(
        self, sid: int, v: Verdict, started: int, now: int, rows: int, sqlstate: str
    ) -> EncodedStatement:
        """The audit record of a statement that ran from ``started`` to ``now`` (µs), in
        the audit pipe's form (what the fast lane hands over)."""
        return (
            K_STATEMENT, self._statement_id(sid), self.info.session_id, started,
            self.info.agent, v.statement_class, v.fingerprint, v.sql_redacted,
            _DECISION[v.action], v.reasons, v.relations, v.columns, v.tags,
            _masked_columns(v) if v.masks else (), rows, (now - started) / 1000, sqlstate, "",
        )  # fmt: skip

    def _record(
        self, sid: int, v: Verdict, started: int, now: int, rows: int, sqlstate: str
    ) -> StatementRecord:
        """``_encoded`` as a ``StatementRecord``."""
        return decode_statement(self._encoded(sid, v, started, now, rows, sqlstate))

    async def _hold(self, ev: HoldRequested) -> HoldOutcome:
        relay = self.relay
        assert relay is not None and self.upstream is not None
        estimated: int | None = None
        if ev.estimate:
            limit = ev.verdict.result.max_rows if ev.verdict.result is not None else None
            estimated = await self._estimate(ev.sql)
            if estimated is None or limit is None or estimated <= limit:
                relay.release(True, run_as_decided=True)
                self._process_guarded()
                return HoldOutcome(True, "")
            ev = dataclasses.replace(
                ev,
                estimate=False,
                verdict=dataclasses.replace(
                    ev.verdict,
                    action=Action.HOLD,
                    hold_class="bulk_export",
                    reasons=(*ev.verdict.reasons, f"the planner estimates {estimated} rows"),
                ),
            )
        ctx = HoldContext(
            agent=self.info.agent,
            database=self.info.database,
            session_id=self.info.session_id,
            statement_id=self._statement_id(ev.statement_id),
            notice=self._notice,
            estimated_rows=estimated,
        )
        self.proxy.metrics.pending_holds += 1
        try:
            outcome = await self.proxy.holds.hold(ctx, ev)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("approval handling failed")
            outcome = HoldOutcome(
                False, "statement requires approval, and it could not be requested"
            )
        finally:
            self.proxy.metrics.pending_holds -= 1
        if outcome.approved and outcome.approval_id:
            self._approvals[ev.statement_id] = outcome.approval_id
        relay.release(
            outcome.approved, outcome.message, bulk=ev.verdict.hold_class == "bulk_export"
        )
        self._process_guarded()
        return outcome

    async def _estimate(self, sql: str) -> int | None:
        estimate = self.proxy.estimate
        if estimate is None:
            return None
        try:
            return await estimate(sql)
        except Exception:
            return None  # the row limit at run time still applies

    def _process_guarded(self) -> None:
        """``_process`` outside a transport callback: a failure ends the session."""
        try:
            self._process()
        except Exception as exc:
            self._finish(exc)

    def _notice(self, text: str) -> None:
        with contextlib.suppress(Exception):
            self.writer.write(m.notice(text))

    async def cancel_hold(self) -> bool:
        """A CancelRequest arrived while a statement is held: withdraw it."""
        task = self.hold_task
        if task is None or task.done():
            return False
        task.cancel()
        relay = self.relay
        assert relay is not None and self.upstream is not None
        relay.release(False, "the held statement was cancelled by the client")
        self._process_guarded()
        return True


def _now_us() -> int:
    """Wall-clock time in microseconds since the epoch: statement start and end times."""
    return time.time_ns() // 1000


def new_backend_key() -> tuple[int, int]:
    return secrets.randbelow(2**31 - 1) + 1, secrets.randbits(31)


def _masked_columns(v: Verdict) -> tuple[str, ...]:
    return tuple(f"{c.ordinal}:{c.column}:{c.tag}:{c.operator}" for c in v.masks)


def _take_buffered(reader: asyncio.StreamReader) -> bytes:
    """What a stream reader received but nobody read yet (before its transport changes hands)."""
    buffered = getattr(reader, "_buffer", None)
    if not buffered:
        return b""
    data = bytes(buffered)
    buffered.clear()
    return data


class _Side(asyncio.Protocol):
    """One socket of a relaying session: bytes in, flow control, loss."""

    __slots__ = ("_bytes", "_client", "_session")

    def __init__(self, session: ClientSession, *, client: bool) -> None:
        self._session = session
        self._client = client
        self._bytes = session._client_bytes if client else session._server_bytes

    def data_received(self, data: bytes) -> None:
        self._bytes(data)

    def eof_received(self) -> bool | None:
        self._session._side_lost(client=self._client)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._session._side_lost(client=self._client)

    def pause_writing(self) -> None:
        # this socket's send buffer is full: stop reading what would be written to it
        self._session._set_paused(client=not self._client, reason="backpressure", paused=True)

    def resume_writing(self) -> None:
        self._session._set_paused(client=not self._client, reason="backpressure", paused=False)
