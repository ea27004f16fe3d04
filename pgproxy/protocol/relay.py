"""The steady-state relay: one client, one upstream backend, one policy, no I/O.

After authentication every byte between the agent and Postgres passes through ``Relay``:
``client_data()`` / ``server_data()`` take bytes; ``to_server`` / ``to_client`` accumulate what
must be written; ``events`` says what happened (statements admitted and finished, holds
requested). The server drains all three after each call.

How a statement is stopped without desynchronising anyone: the client's message is replaced by
a *substitute* that Postgres rejects at once (a Query or Parse of text that is a syntax error,
also in place of an Execute), and the server's ErrorResponse for it is replaced by the policy's
error. So the upstream enters exactly the error state the client is told about —
aborted transaction, skip-until-Sync in the extended protocol — and both sides stay in step.

Responses are matched to requests through a queue of ``_Pending`` entries, one per request that
gets an answer (protocol section 55.2.3: responses come in request order, and after an error
the server discards extended-protocol messages up to Sync). Runs of messages nobody rewrites are
forwarded as their original bytes, one write per read batch.

Names are the server's: a prepared statement or portal is what the server's answer to its
Parse/Bind says it is (a refused one leaves the previous), keyed by the first 63 bytes as the
server keys it; SQL PREPARE/DECLARE share these names, so EXECUTE/FETCH/MOVE of a name runs only
when the server confirmed the definition the policy last decided for it, and an Execute of a
portal not bound through the policy never runs.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

from pgproxy.policy.seam import (
    PASS_ROWS,
    Action,
    CopyPlan,
    FieldInfo,
    ResultPolicy,
    RowPlan,
    SessionPolicy,
    StatementContext,
    Verdict,
)
from pgproxy.protocol import codes
from pgproxy.protocol import messages as m
from pgproxy.protocol.copyrows import rewrite_row
from pgproxy.protocol.errors import PeerProtocolError
from pgproxy.protocol.fastlane import plain_execute, plain_result, query_text
from pgproxy.protocol.framing import FrameBuffer, Frames
from pgproxy.protocol.rowmask import rewrite_rows

_INTERNAL = "statement blocked: internal policy error"

#: settings whose change would make the server read statements or values differently from the
#: policy (see ``pgproxy.server.session.PINNED_PARAMS``): a session that reports another value
#: is ended
PINNED_SETTINGS = {"client_encoding": "UTF8", "standard_conforming_strings": "ON"}

#: Text Postgres rejects at parse time; it never reaches the executor.
BLOCKED_SQL = "pgproxy: statement withheld by policy"

# request kinds awaiting a response
_QUERY, _PARSE, _BIND, _DESCRIBE, _EXECUTE, _CLOSE, _SYNC, _FUNCTION = range(8)
_ENDS_AT_READY = (_QUERY, _SYNC, _FUNCTION)

# tags as ints
T_AUTH, T_KEY = ord("R"), ord("K")
T_PARSE_COMPLETE, T_BIND_COMPLETE, T_CLOSE_COMPLETE = ord("1"), ord("2"), ord("3")
T_COMMAND_COMPLETE, T_DATA_ROW, T_ERROR, T_NOTICE = ord("C"), ord("D"), ord("E"), ord("N")
T_EMPTY, T_NO_DATA, T_SUSPENDED, T_READY = ord("I"), ord("n"), ord("s"), ord("Z")
T_PARAM_STATUS, T_PARAM_DESC, T_ROW_DESC = ord("S"), ord("t"), ord("T")
T_NOTIFY, T_FUNC_RESULT = ord("A"), ord("V")
T_COPY_IN, T_COPY_OUT, T_COPY_BOTH, T_COPY_DATA, T_COPY_DONE = (
    ord("G"), ord("H"), ord("W"), ord("d"), ord("c"),
)  # fmt: skip
F_QUERY, F_PARSE, F_BIND, F_DESCRIBE, F_EXECUTE = ord("Q"), ord("P"), ord("B"), ord("D"), ord("E")
F_CLOSE, F_SYNC, F_FLUSH, F_TERMINATE, F_FUNCTION = ord("C"), ord("S"), ord("H"), ord("X"), ord("F")
F_COPY_DATA, F_COPY_DONE, F_COPY_FAIL = ord("d"), ord("c"), ord("f")
_COMPLETIONS = frozenset((T_PARSE_COMPLETE, T_BIND_COMPLETE, T_CLOSE_COMPLETE, T_SUSPENDED))
_INTERNAL_TAGS = frozenset(
    (T_PARSE_COMPLETE, T_BIND_COMPLETE, T_CLOSE_COMPLETE, T_NO_DATA, T_COMMAND_COMPLETE, T_EMPTY,
     T_SUSPENDED, T_ROW_DESC)
)  # fmt: skip


# ------------------------------------------------------------------------------------ events


@dataclass(slots=True)  # not frozen: made per statement (treat as immutable)
class StatementAdmitted:
    """A statement was decided (whatever the decision) and its request sent upstream."""

    statement_id: int
    sql: str
    verdict: Verdict
    origin: str
    #: seconds the policy took to decide (0 when the relay was given no clock)
    decision_seconds: float = 0.0


@dataclass(slots=True)  # not frozen: made per statement (treat as immutable)
class StatementFinished:
    statement_id: int
    verdict: Verdict
    rows: int
    sqlstate: str
    masked_cells: int


@dataclass(frozen=True, slots=True)
class HoldRequested:
    """The relay stopped reading the client until ``release()`` is called."""

    statement_id: int
    sql: str
    params: tuple[bytes | None, ...]
    verdict: Verdict
    #: not an approval yet: the session should ask the planner how many rows this returns,
    #: then ``release(True, run_as_decided=True)`` or escalate to a bulk-export approval
    estimate: bool = False


@dataclass(frozen=True, slots=True)
class Terminated:
    """The client sent Terminate: close both connections once the buffers are written."""


@dataclass(frozen=True, slots=True)
class ProtocolViolation:
    """The peer broke the protocol; the error has been queued for the client; close."""

    message: str
    by_client: bool


Event = StatementAdmitted | StatementFinished | HoldRequested | Terminated | ProtocolViolation


# ------------------------------------------------------------------------------ bookkeeping


@dataclass(slots=True)
class _Described:
    """Something a Describe answers for: its RowDescription, decoded on first use (only
    results with a policy need the fields)."""

    fields: tuple[m.Field, ...] | None = field(default=None, kw_only=True)
    fields_raw: bytes | None = field(default=None, kw_only=True)

    def row_fields(self) -> tuple[m.Field, ...] | None:
        if self.fields is None and self.fields_raw is not None:
            self.fields = m.RowDescription.decode(self.fields_raw).fields
        return self.fields


# what the server made of a Parse or Bind
_SENT, _MADE, _REFUSED = range(3)


@dataclass(slots=True)
class _Named(_Described):
    """A prepared statement or portal as the server has it. Its Parse/Bind may be refused
    (the name exists already, an aborted transaction, an error earlier in the pipeline): then
    the server still has ``prev`` under that name, so a refused entry stands for ``prev``."""

    prev: _Named | None = field(default=None, kw_only=True)
    state: int = field(default=_SENT, kw_only=True)
    #: Syncs sent before its Parse/Bind: in the same Sync segment, a refusal skips what follows
    segment: int = field(default=0, kw_only=True)


@dataclass(slots=True)
class _Statement(_Named):
    sql: str
    verdict: Verdict


@dataclass(slots=True)
class _Portal(_Named):
    statement: _Statement | None
    #: the Bind body, decoded on first use (parameters matter only to holds)
    bind_raw: bytes
    described: bool = False
    #: rows earlier Executes of this portal returned (a row limit counts across them)
    rows: int = 0
    _bind: m.Bind | None = None

    @property
    def bind(self) -> m.Bind:
        if self._bind is None:
            self._bind = m.Bind.decode(self.bind_raw)
        return self._bind


@dataclass(slots=True)
class _Pending:
    kind: int
    verdict: Verdict | None = None
    statement_id: int = 0
    #: the statement text (QUERY and EXECUTE), to recognise a retry after a row-limit stop
    sql: str = ""
    #: our error to send in place of the server's (the request was a substitute)
    replace_error: bytes | None = None
    #: responses are for pgproxy's own bookkeeping and must not reach the client
    internal: bool = False
    statement: _Statement | None = None
    portal: _Portal | None = None
    describe_kind: bytes = b""
    # result streaming state
    plan: RowPlan | None = None
    index: int = 0
    rows: int = 0
    masked: int = 0
    #: format code of each result column (0 text, 1 binary), told to cell rewriters
    formats: tuple[int, ...] = ()
    sqlstate: str = ""
    #: COPY TO STDOUT rows are rewritten by this plan; ``copy_header`` skips one header row
    copy: CopyPlan | None = None
    copy_header: bool = False
    #: a result was cut short by policy: drop the rest of this request's output
    stopped: bool = False
    finished: bool = False
    #: cut short by pgproxy (a row limit, a plan), not by an error of the server's
    cut: bool = False
    #: a row-limited Query that pgproxy put inside its own BEGIN (see ``_send_query``)
    wrapped: bool = False
    #: internal, but its errors are the client's (the COMMIT that ends a wrapped Query)
    client_errors: bool = False
    #: internal, and its ReadyForQuery is not the client's (the BEGIN before a wrapped Query)
    quiet_ready: bool = False
    #: the statement or portal its Parse/Bind makes, if the server does not refuse it
    made: _Named | None = None
    #: SQL PREPARE/DECLARE names it defines, with the generation decided (see ``_sql_gen``)
    defines: tuple[tuple[tuple[bytes, str], int], ...] = ()
    #: rows the same portal or SQL cursors returned before: a row limit counts across them
    base: int = 0
    #: SQL cursors it fetches from (their rows are counted in ``_cursor_rows``)
    cursors: tuple[str, ...] = ()


@dataclass(slots=True)
class _Held:
    frame_bytes: bytes
    tag: int
    statement_id: int
    verdict: Verdict
    portal: _Portal | None


@dataclass
class RelayStats:
    bytes_from_client: int = 0
    bytes_to_client: int = 0
    statements: int = 0
    masked_cells: int = 0


def _field_info(f: m.Field, fmt: int) -> FieldInfo:
    return FieldInfo(f.name, f.table_oid, f.attnum, f.type_oid, f.type_size, f.type_mod, fmt)


class Relay:
    """One agent session's message stream after authentication. See the module docstring."""

    def __init__(
        self,
        policy: SessionPolicy,
        *,
        agent: str,
        database: str,
        max_message_size: int = 1 << 30,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.policy = policy
        self._clock = clock
        self._decided_in = 0.0
        self.agent = agent
        self.database = database
        self.to_client = bytearray()
        self.to_server = bytearray()
        self.events: list[Event] = []
        self.stats = RelayStats()
        self.transaction_status = b"I"
        self.closed = False
        self._client = FrameBuffer(max_message_size)
        self._server = FrameBuffer(max_message_size)
        self._pending: deque[_Pending] = deque()
        self._statements: dict[str, _Statement] = {}
        self._portals: dict[str, _Portal] = {}
        #: Syncs sent upstream (see ``_Named.segment``)
        self._syncs = 0
        # SQL PREPARE/DECLARE names, keyed (b"S" or b"P", name). The policy remembers what such
        # a statement defines when it decides it, whether or not the server then runs it; so
        # EXECUTE/FETCH/MOVE of a name passes only when the last definition the policy decided
        # is the one the server made. A generation counts decisions (and protocol messages)
        # touching a name; ``_sql_trusted`` holds the generation the server confirmed.
        self._sql_gen: dict[tuple[bytes, str], int] = {}
        self._sql_trusted: dict[tuple[bytes, str], int] = {}
        self._sql_inflight: dict[tuple[bytes, str], _Pending] = {}
        #: rows each SQL cursor returned so far (FETCH after FETCH counts toward a row limit)
        self._cursor_rows: dict[str, int] = {}
        self._ids = itertools.count(1)
        self._held: _Held | None = None
        #: client bytes that arrived while a statement was held
        self._deferred = bytearray()
        #: the client must not see the server's answers again before the next Sync
        self._client_skip_to_sync = False
        #: ask for a planner estimate before running row-limited simple queries
        self.estimate_bulk = False
        #: statements whose result was stopped at the row limit: running one again asks
        self._over_limit: set[str] = set()
        #: a row-limited Execute whose outcome later client messages wait for
        self._gate: _Pending | None = None
        self._ungate = False
        #: a stop told the client of an error the server never had: fail before the next Sync
        self._poison_before_sync = False
        #: statements the planner estimated under the limit (bounded)
        self._estimated: dict[str, None] = {}
        self.max_message_size = max_message_size
        self._query_ctx = self._ctx("query")
        self._execute_ctx = self._ctx("execute")
        #: the fast lane's statement in flight: (statement id, verdict, the unnamed portal it
        #: bound or None for a Query, whether its Parse came with it); see ``fast_query``
        self._lane: tuple[int, Verdict, _Portal | None, bool] | None = None

    # ----------------------------------------------------------------------- client side

    @property
    def holding(self) -> bool:
        """Client bytes are being kept back (a held statement, or a row-limited Execute)."""
        return self._held is not None or self._gate is not None

    def client_data(self, data: bytes) -> None:
        """Bytes from the agent."""
        if self._lane is not None:
            self._adopt_lane()
        self.stats.bytes_from_client += len(data)
        if self._held is not None or self._gate is not None:
            self._deferred += data
            return
        try:
            chunk, frames = self._client.feed(data)
            self._client_frames(chunk, frames, 0)
        except PeerProtocolError as exc:
            self._violation(exc.message, exc.sqlstate, by_client=True)

    def _client_frames(self, chunk: bytes, frames: list[tuple[int, int, int]], first: int) -> None:
        out = self.to_server
        run_start = -1  # start of a run of frames forwarded unchanged
        for i in range(first, len(frames)):
            tag, start, end = frames[i]
            if self._gate is not None:
                # a row-limited Execute runs alone: what follows waits for its outcome
                if run_start >= 0:
                    out += chunk[run_start:start]
                self._defer(chunk, frames, i)
                return
            if self._client_skip_to_sync and tag != F_SYNC:
                if run_start >= 0:
                    out += chunk[run_start:start]
                    run_start = -1
                continue
            if tag in (F_BIND, F_DESCRIBE, F_CLOSE, F_FLUSH, F_COPY_DATA, F_COPY_DONE, F_COPY_FAIL):
                # forwarded as is; Bind/Describe/Close need bookkeeping
                if tag == F_BIND:
                    if not self._on_bind(chunk, start, end):
                        if run_start >= 0:
                            out += chunk[run_start:start]
                        self._wait_for_answers(chunk, frames, i)
                        return
                elif tag == F_DESCRIBE:
                    self._on_describe(chunk, start, end)
                elif tag == F_CLOSE:
                    self._on_close(chunk, start, end)
                if run_start < 0:
                    run_start = start
                continue
            # everything else may be replaced: flush the unchanged run first
            if run_start >= 0:
                out += chunk[run_start:start]
                run_start = -1
            if tag == F_SYNC:
                self._client_skip_to_sync = False
                if self._poison_before_sync:
                    # the client was told of an error the server never had: give it one, so
                    # the server skips to this Sync and aborts the transaction as the client
                    # now believes it did
                    self._poison_before_sync = False
                    self._withhold()
                    self._pending.append(_Pending(_PARSE, internal=True))
                self._pending.append(_Pending(_SYNC))
                self._syncs += 1
                out += chunk[start:end]
            elif tag == F_QUERY:
                sent = self._on_query(chunk, start, end)
                if sent is None:  # seen again once what is in flight has completed
                    self._defer(chunk, frames, i)
                    return
                if not sent:
                    self._defer(chunk, frames, i + 1)
                    return
            elif tag == F_PARSE:
                self._on_parse(chunk, start, end)
            elif tag == F_EXECUTE:
                sent = self._on_execute(chunk, start, end)
                if sent is None:
                    self._wait_for_answers(chunk, frames, i)
                    return
                if not sent:
                    self._defer(chunk, frames, i + 1)
                    return
            elif tag == F_FUNCTION:
                self._on_function(chunk, start, end)
            elif tag == F_TERMINATE:
                out += chunk[start:end]
                self.events.append(Terminated())
                self.closed = True
                return
            else:
                raise PeerProtocolError(f"unexpected message type {chr(tag)!r} from the client")
        if run_start >= 0:
            out += chunk[run_start : frames[-1][2]]

    def _defer(self, chunk: bytes, frames: list[tuple[int, int, int]], nxt: int) -> None:
        """A statement is held: keep every later client byte until it is released."""
        if nxt < len(frames):
            self._deferred[:0] = chunk[frames[nxt][1] :]
        self._deferred += self._client.take_rest()

    def _withhold(self) -> None:
        """Send the substitute that fails at once; it drops the unnamed statement upstream."""
        self.to_server += _WITHHELD
        self._statements.pop("", None)

    def _wait_for_answers(self, chunk: bytes, frames: list[tuple[int, int, int]], i: int) -> None:
        """``frames[i]`` names something whose Parse/Bind is still unanswered in an earlier Sync
        segment: see it again once everything in flight is answered."""
        self._gate = self._pending[-1]
        self.to_server += _FLUSH
        self._defer(chunk, frames, i)

    def _ctx(self, origin: str, name: str = "", types: tuple[int, ...] = ()) -> StatementContext:
        return StatementContext(self.agent, self.database, origin, name, types)

    def _decide(self, sql: str, ctx: StatementContext) -> Verdict:
        clock = self._clock
        t0 = clock() if clock is not None else 0.0
        try:
            verdict = self.policy.statement(sql, ctx)
            if clock is not None:
                self._decided_in = clock() - t0
            if _names_sql(verdict.statement_class):
                for defines, kind, name in _sql_name_ops(sql) or ():
                    if defines:  # the policy now holds this definition for the name
                        self._touch_name(kind, name)
            return verdict
        except Exception:  # fail closed: a policy crash is a block
            return Verdict(
                Action.BLOCK,
                ("internal policy error",),
                message="statement blocked: internal policy error",
            )

    def _touch_name(self, kind: bytes, name: str) -> None:
        key = (kind, name)
        self._sql_gen[key] = self._sql_gen.get(key, 0) + 1
        self._sql_trusted.pop(key, None)

    def _names_ok(self, sql: str, verdict: Verdict) -> bool | None:
        """Whether each EXECUTE/FETCH/MOVE in ``sql`` names what the policy decided for it;
        None: a definition of the name is still in flight, ask again once it is answered."""
        if verdict.action is Action.BLOCK or not _names_sql(verdict.statement_class):
            return True
        ops = _sql_name_ops(sql)
        if ops is None:
            return False
        here: set[tuple[bytes, str]] = set()
        for defines, kind, name in ops:
            key = (kind, name)
            if defines:
                here.add(key)
            elif key not in here:
                if key in self._sql_inflight:
                    return None
                if self._sql_trusted.get(key, -1) != self._sql_gen.get(key, 0):
                    return False
        return True

    def _note_defines(self, sql: str, verdict: Verdict, pending: _Pending) -> None:
        """An SQL PREPARE/DECLARE is sent: trusted once it succeeds (``_finish``). The name is
        the server's now, so whatever the extended protocol had under it is forgotten. A FETCH
        starts its row count where the cursor's earlier FETCHes left it."""
        if not _names_sql(verdict.statement_class):
            return
        defs = []
        cursors: list[str] = []
        for defines, kind, name in _sql_name_ops(sql) or ():
            if not defines and kind == b"P" and name not in cursors:
                cursors.append(name)
                pending.base += self._cursor_rows.get(name, 0)
            if defines:
                if kind == b"P":
                    self._cursor_rows.pop(name, None)
                key = (kind, name)
                defs.append((key, self._sql_gen.get(key, 0)))
                self._sql_inflight[key] = pending
                if kind == b"S":
                    self._statements.pop(name, None)
                else:
                    self._portals.pop(name, None)
        pending.defines = tuple(defs)
        pending.cursors = tuple(cursors)

    def _admit(self, sql: str, verdict: Verdict, origin: str) -> int:
        sid = next(self._ids)
        self.stats.statements += 1
        self.events.append(StatementAdmitted(sid, sql, verdict, origin, self._decided_in))
        self._decided_in = 0.0
        return sid

    def _bulk(self, sql: str, verdict: Verdict) -> Verdict:
        """A row-limited statement stopped at the limit before now is a bulk-export request."""
        if sql in self._over_limit and verdict.admits and _row_limit(verdict) is not None:
            self._over_limit.discard(sql)
            return replace(
                verdict,
                action=Action.HOLD,
                hold_class="bulk_export",
                reasons=(*verdict.reasons, "its result passed the bulk-export row limit before"),
            )
        return verdict

    def _on_query(self, chunk: bytes, start: int, end: int) -> bool | None:
        """Send (True) or hold (False) a Query; None: wait until nothing is in flight."""
        sql = _query_text(chunk, start, end)
        verdict = self._bulk(sql, self._decide(sql, self._ctx("query")))
        names = self._names_ok(sql, verdict)
        if names is None:
            self._gate = self._pending[-1]
            self.to_server += _FLUSH
            return None
        if not names:
            verdict = _refused(verdict, _UNKNOWN_NAME)
        if self._pending and _row_limit(verdict) is not None:
            # a row-limited Query needs the transaction state it will run in (_send_query);
            # Flush: what is in flight may be extended-protocol messages without a Sync yet
            self._gate = self._pending[-1]
            self.to_server += _FLUSH
            return None
        if _row_limit(verdict) is not None and _limited_query_mixes(verdict.statement_class):
            verdict = _refused(verdict, _MIXED_LIMITED)
        sid = self._admit(sql, verdict, "query")
        estimate = (
            self.estimate_bulk
            and verdict.admits
            and verdict.statement_class == "select"
            and _row_limit(verdict) is not None
            and sql not in self._estimated
        )
        if verdict.action is Action.HOLD or estimate:
            self._held = _Held(chunk[start:end], F_QUERY, sid, verdict, None)
            self.events.append(HoldRequested(sid, sql, (), verdict, estimate=estimate))
            return False
        self._send_query(chunk[start:end], sid, verdict)
        return True

    def _send_query(self, raw: bytes, sid: int, verdict: Verdict) -> None:
        if verdict.admits and _row_limit(verdict) is None:
            self.to_server += raw
            self._pending.append(_Pending(_QUERY, verdict, sid))
            if _names_sql(verdict.statement_class):
                sql = m.Query.decode(memoryview(raw)[5:]).sql
                self._note_defines(sql, verdict, self._pending[-1])
        elif verdict.admits:
            # A row-limited Query may be cut short while the server goes on with it. Postgres
            # would have aborted it, and the client believes it did: so it runs alone (later
            # client messages wait), and when it may change data it runs in our own
            # transaction, rolled back after a stop (``_after_query``). Inside the client's
            # transaction, a stop fails that transaction instead.
            pending = _Pending(_QUERY, verdict, sid, sql=m.Query.decode(memoryview(raw)[5:]).sql)
            if self.transaction_status == b"I" and verdict.statement_class != "select":
                self.to_server += _BEGIN
                self._pending.append(_Pending(_QUERY, internal=True, quiet_ready=True))
                pending.wrapped = True
            self.to_server += raw
            self._pending.append(pending)
            self._gate = pending
            self._note_defines(pending.sql, verdict, pending)
        else:
            self.to_server += m.Query(BLOCKED_SQL).encode()
            self._pending.append(
                _Pending(_QUERY, verdict, sid, replace_error=_policy_error(verdict))
            )

    def _on_parse(self, chunk: bytes, start: int, end: int) -> None:
        msg = m.Parse.decode(memoryview(chunk)[start + 5 : end])
        key = _server_name(msg.name)
        if key:
            self._touch_name(b"S", key)  # no longer what an SQL PREPARE made it, if it was
        verdict = self._decide(msg.sql, self._ctx("parse", msg.name, msg.param_types))
        # a Parse drops the unnamed statement before it parses: refused, it leaves none
        prev = _before(self._statements.get(key)) if key else None
        stmt = _Statement(msg.sql, verdict, prev=prev, segment=self._syncs)
        self._statements[key] = stmt
        if verdict.action is Action.BLOCK:
            # refused for certain: a named statement that existed is still there
            stmt.state = _REFUSED
            sid = self._admit(msg.sql, verdict, "parse")
            self.to_server += m.Parse(msg.name, BLOCKED_SQL, msg.param_types).encode()
            self._pending.append(
                _Pending(_PARSE, verdict, sid, replace_error=_policy_error(verdict), statement=stmt)
            )
            self.events.append(StatementFinished(sid, verdict, 0, codes.INSUFFICIENT_PRIVILEGE, 0))
            return
        # admitted and held statements are both prepared upstream: preparing runs nothing.
        # A held one is stopped at Execute, where its parameters are known.
        self.to_server += chunk[start:end]
        self._pending.append(_Pending(_PARSE, verdict, statement=stmt, made=stmt))

    def _on_bind(self, chunk: bytes, start: int, end: int) -> bool:
        """Record a Bind; False: its statement's Parse is unanswered in an earlier Sync
        segment, so which statement the server binds is not known yet."""
        body = chunk[start + 5 : end]
        first = body.find(b"\x00")
        second = body.find(b"\x00", first + 1)
        if first < 0 or second < 0:
            raise PeerProtocolError("Bind names are not NUL-terminated")
        try:
            portal, statement = body[:first].decode(), body[first + 1 : second].decode()
        except UnicodeDecodeError:
            raise PeerProtocolError("Bind names are not valid UTF-8") from None
        if len(portal) > 15:
            portal = _server_name(portal)
        if len(statement) > 15:
            statement = _server_name(statement)
        stmt = self._statements.get(statement)
        if stmt is not None and stmt.state != _MADE:
            if stmt.state == _SENT:
                if stmt.segment != self._syncs:
                    return False
            elif stmt.verdict.action is not Action.BLOCK:
                stmt = _made(stmt)  # a blocked one stays: its Execute is refused in its name
        prev = self._portals.get(portal)
        if portal:
            self._touch_name(b"P", portal)
            if prev is not None and prev.state == _REFUSED:
                prev = _made(prev)
        else:
            # a refused unnamed Bind may leave the old unnamed portal: we forget it (whoever
            # executes it then is refused), which keeps no chain of unnamed portals either
            prev = None
        bound = _Portal(stmt, body, prev=prev, segment=self._syncs)
        self._portals[portal] = bound
        self._pending.append(_Pending(_BIND, made=bound))
        return True

    def _on_close(self, chunk: bytes, start: int, end: int) -> None:
        msg = m.Close.decode(memoryview(chunk)[start + 5 : end])
        key = _server_name(msg.name)
        # forgotten at once: if the server skips this Close, the name is unknown to us while
        # it still exists upstream, and using it is refused (fail closed)
        if msg.kind == b"S":
            self._statements.pop(key, None)
        else:
            self._portals.pop(key, None)
        if key:
            self._touch_name(b"S" if msg.kind == b"S" else b"P", key)
        self._pending.append(_Pending(_CLOSE))

    def _on_describe(self, chunk: bytes, start: int, end: int) -> None:
        msg = m.Describe.decode(memoryview(chunk)[start + 5 : end])
        p = _Pending(_DESCRIBE, describe_kind=msg.kind)
        key = _server_name(msg.name)
        if msg.kind == b"S":
            p.statement = _made(self._statements.get(key))
        else:
            p.portal = _made(self._portals.get(key))
            if p.portal is not None:
                p.portal.described = True
        self._pending.append(p)

    def _on_execute(self, chunk: bytes, start: int, end: int) -> bool | None:
        """Send (True) or hold (False) an Execute; None: its portal's Bind is unanswered in an
        earlier Sync segment, so see it again once what is in flight is answered."""
        if end - start == 10 and chunk[start + 5] == 0:
            name = ""  # the unnamed portal, as most drivers send it
        else:
            name = _server_name(m.Execute.decode(memoryview(chunk)[start + 5 : end]).portal)
        portal = self._portals.get(name)
        if portal is not None and portal.state != _MADE:
            if portal.state == _SENT:
                if portal.segment != self._syncs:
                    return None
            else:
                portal = _made(portal)
        stmt = portal.statement if portal is not None else None
        if portal is None or stmt is None or stmt.verdict.action is Action.BLOCK:
            # not prepared and bound through the policy (an SQL PREPARE or DECLARE shares these
            # names; a blocked Parse left whatever the name meant before): never run upstream
            self._withhold()
            if stmt is not None:  # its Parse was blocked, and recorded as such
                self._pending.append(_Pending(_EXECUTE, replace_error=_policy_error(stmt.verdict)))
                return True
            sid = self._admit("", _UNBOUND, "execute")
            self._pending.append(
                _Pending(_EXECUTE, _UNBOUND, sid, replace_error=_policy_error(_UNBOUND))
            )
            return True
        if _names_sql(stmt.verdict.statement_class):
            # decided again: the policy's definitions of SQL names may have changed since Parse
            checked = self._decide(stmt.sql, self._ctx("execute"))
            names = self._names_ok(stmt.sql, checked)
            if names is None:
                return None
            if not names:
                checked = _refused(checked, _UNKNOWN_NAME)
        else:
            try:
                checked = self.policy.revalidate(stmt.sql, stmt.verdict, self._ctx("execute"))
            except Exception:
                checked = Verdict(Action.BLOCK, ("internal policy error",), message=_INTERNAL)
        if checked is not stmt.verdict:
            stmt.verdict = checked
        verdict = self._bulk(stmt.sql, checked)
        sid = self._admit(stmt.sql, verdict, "execute")
        if verdict.action is Action.HOLD:
            self._held = _Held(chunk[start:end], F_EXECUTE, sid, verdict, portal)
            self.events.append(HoldRequested(sid, stmt.sql, portal.bind.params, verdict))
            return False
        self._send_execute(chunk[start:end], sid, verdict, portal)
        return True

    def _send_execute(self, raw: bytes, sid: int, verdict: Verdict, portal: _Portal) -> None:
        if not verdict.admits:
            self._withhold()
            self._pending.append(
                _Pending(
                    _EXECUTE, verdict, sid, replace_error=_policy_error(verdict), portal=portal
                )
            )
            return
        if verdict.result is not None and portal.row_fields() is None and not portal.described:
            # rows need a plan and the client never asked for the row shape: ask ourselves
            name = m.Execute.decode(memoryview(raw)[5:]).portal
            self.to_server += m.Describe(b"P", name).encode()
            self._pending.append(
                _Pending(_DESCRIBE, describe_kind=b"P", portal=portal, internal=True)
            )
            portal.described = True
        self.to_server += raw
        sql = portal.statement.sql if portal.statement is not None else ""
        pending = _Pending(_EXECUTE, verdict, sid, portal=portal, sql=sql, base=portal.rows)
        self._pending.append(pending)
        self._note_defines(sql, verdict, pending)
        if _row_limit(verdict) is not None:
            # its rows may be stopped at the limit; nothing pipelined behind it may run before
            # that is known, so send no more until it completes (Flush: the server sends its
            # result without waiting for a Sync)
            self.to_server += m.Flush().encode()
            self._gate = pending

    def _on_function(self, chunk: bytes, start: int, end: int) -> None:
        msg = m.FunctionCall.decode(memoryview(chunk)[start + 5 : end])
        ctx = self._ctx("function")
        try:
            verdict = self.policy.function_call(msg.function_oid, ctx)
        except Exception:
            verdict = Verdict(
                Action.BLOCK, ("internal policy error",), message="function call blocked"
            )
        if verdict.action is Action.HOLD:  # no review flow for raw function calls
            verdict = Verdict(
                Action.BLOCK, verdict.reasons, "function_call", message="function call blocked"
            )
        sid = self._admit(f"<function call {msg.function_oid}>", verdict, "function")
        if verdict.admits:
            self.to_server += chunk[start:end]
            self._pending.append(_Pending(_FUNCTION, verdict, sid))
        else:
            # a FunctionCall and a Query both end in ErrorResponse + ReadyForQuery
            self.to_server += m.Query(BLOCKED_SQL).encode()
            self._pending.append(
                _Pending(_FUNCTION, verdict, sid, replace_error=_policy_error(verdict))
            )

    def release(
        self, approved: bool, message: str = "", *, run_as_decided: bool = False, bulk: bool = False
    ) -> None:
        """Resume after a hold: run the held statement once, or fail it with ``message``.

        ``run_as_decided``: the hold was only for a row estimate, which was under the limit.
        ``bulk``: a reviewer approved it as a bulk export, so the row limit no longer applies.
        """
        held = self._held
        if held is None:
            return
        self._held = None
        verdict = held.verdict
        result = verdict.result
        if (bulk or verdict.hold_class == "bulk_export") and result is not None:
            result = _Unlimited(result)
        if approved and run_as_decided:
            if len(self._estimated) >= 256:
                self._estimated.pop(next(iter(self._estimated)))
            self._estimated[_held_sql(held)] = None
            admitted = verdict
        elif approved:
            admitted = Verdict(
                Action.ALLOW if verdict.result is None else Action.MASK,
                (*verdict.reasons, "approved"),
                verdict.statement_class,
                result=result,
                fingerprint=verdict.fingerprint,
                sql_redacted=verdict.sql_redacted,
                relations=verdict.relations,
                columns=verdict.columns,
                tags=verdict.tags,
                masks=verdict.masks,
                hold_class=verdict.hold_class,
            )
        else:
            admitted = Verdict(
                Action.BLOCK,
                verdict.reasons,
                verdict.statement_class,
                message=message or "statement was not approved",
                hold_class=verdict.hold_class,
                fingerprint=verdict.fingerprint,
                sql_redacted=verdict.sql_redacted,
            )
        if held.tag == F_QUERY:
            self._send_query(held.frame_bytes, held.statement_id, admitted)
        else:
            assert held.portal is not None
            self._send_execute(held.frame_bytes, held.statement_id, admitted, held.portal)
        deferred = bytes(self._deferred)
        self._deferred.clear()
        if deferred:
            self.client_data_resume(deferred)

    def client_data_resume(self, data: bytes) -> None:
        try:
            chunk, frames = self._client.feed(data)
            self._client_frames(chunk, frames, 0)
        except PeerProtocolError as exc:
            self._violation(exc.message, exc.sqlstate, by_client=True)

    # --------------------------------------------------------------------------- fast lane

    @property
    def lane_open(self) -> bool:
        """A fast-lane statement is waiting for its answer (give it to ``fast_result``)."""
        return self._lane is not None

    def fast_query(self, data: bytes) -> tuple[int, Verdict, float] | None:
        """The commonest exchanges in one step (see ``pgproxy.protocol.fastlane``).

        When nothing else is going on and ``data`` is exactly one Query, or one [Parse of the
        unnamed statement,] Bind to the unnamed portal, [Describe portal,] Execute (no row
        limit) and Sync, that the policy lets through as is (no result policy, no hold, no
        SQL-level names, no DDL): account for it as the general path would and return
        (statement id, verdict, decision seconds). The caller sends ``data`` upstream itself
        and gets no events for it; ``fast_result`` ends it. None: nothing was done, give the
        bytes to ``client_data``. The caller must have written out ``to_server`` and
        ``to_client`` (the lane stays closed until it has)."""
        if (
            self._lane is not None
            or self._pending
            or self._held is not None
            or self._gate is not None
            or self._client_skip_to_sync
            or self._poison_before_sync
            or self._ungate
            or self.closed
            or self._deferred
            or self.to_server
            or self.to_client
            or self._client.buffered
            or self._server.buffered
            or not data
        ):
            return None
        if data[0] == F_QUERY:
            return self._fast_simple(data)
        if data[0] == F_BIND:
            return self._fast_execute(data, 0, None, 0.0)
        if data[0] == F_PARSE:
            return self._fast_parse_execute(data)
        return None

    def _fast_simple(self, data: bytes) -> tuple[int, Verdict, float] | None:
        sql = query_text(data, self.max_message_size)
        if sql is None:
            return None
        clock = self._clock
        t0 = clock() if clock is not None else 0.0
        try:
            verdict = self.policy.statement(sql, self._query_ctx)
        except Exception:  # the general path decides again and fails closed
            return None
        if not _lane_verdict(verdict):
            return None
        sid = self._lane_open(data, verdict, None, False)
        return sid, verdict, (clock() - t0 if clock is not None else 0.0)

    def _fast_parse_execute(self, data: bytes) -> tuple[int, Verdict, float] | None:
        """A Parse of the unnamed statement followed by the Bind/[Describe]/Execute/Sync of
        ``_fast_execute`` (what most drivers send for a statement with parameters)."""
        length = int.from_bytes(data[1:5])
        end = 1 + length
        if length < 4 or length > self.max_message_size or end >= len(data) or data[5] != 0:
            return None  # a named statement is prepared once: the general path
        try:
            msg = m.Parse.decode(memoryview(data)[5:end])
        except PeerProtocolError:
            return None
        clock = self._clock
        t0 = clock() if clock is not None else 0.0
        try:
            verdict = self.policy.statement(msg.sql, self._ctx("parse", "", msg.param_types))
        except Exception:
            return None
        if not _lane_verdict(verdict):
            return None
        stmt = _Statement(msg.sql, verdict, segment=self._syncs)
        decided_in = clock() - t0 if clock is not None else 0.0
        return self._fast_execute(data, end, stmt, decided_in)

    def _fast_execute(
        self, data: bytes, start: int, parsed: _Statement | None, decided_in: float
    ) -> tuple[int, Verdict, float] | None:
        """``data[start:]`` is a Bind of a prepared statement (``parsed``: the one the Parse
        before it makes) to the unnamed portal, [Describe portal,] Execute with no row limit
        and Sync."""
        n = len(data)
        if data[start] != F_BIND:
            return None
        if data.endswith(_LANE_DESCRIBE_EXECUTE_SYNC):
            bind_end, described = n - len(_LANE_DESCRIBE_EXECUTE_SYNC), True
        elif data.endswith(_LANE_EXECUTE_SYNC):
            bind_end, described = n - len(_LANE_EXECUTE_SYNC), False
        else:
            return None
        length = int.from_bytes(data[start + 1 : start + 5])
        if length != bind_end - start - 1 or length < 4 or length > self.max_message_size:
            return None
        body = data[start + 5 : bind_end]
        second = body.find(b"\x00", 1)
        if not body or body[0] != 0 or second < 0:  # a named portal: the general path
            return None
        try:
            name = body[1:second].decode()
        except UnicodeDecodeError:
            return None
        if parsed is not None:
            if name:
                return None
            stmt = parsed
        else:
            decided_in = self._decided_in  # the general path reports the last decision's time
            found = self._statements.get(_server_name(name) if len(name) > 15 else name)
            if found is None or found.state != _MADE or not _lane_verdict(found.verdict):
                return None
            stmt = found
        try:
            checked = self.policy.revalidate(stmt.sql, stmt.verdict, self._execute_ctx)
        except Exception:
            return None
        if checked is not stmt.verdict:  # decided again: the general path records that
            return None
        if parsed is not None:
            self._statements[""] = parsed
        portal = _Portal(stmt, body, segment=self._syncs, described=described)
        self._portals[""] = portal
        self._syncs += 1
        return self._lane_open(data, checked, portal, parsed is not None), checked, decided_in

    def _lane_open(
        self, data: bytes, verdict: Verdict, portal: _Portal | None, parsed: bool
    ) -> int:
        sid = next(self._ids)
        self._decided_in = 0.0  # reported with this statement, as ``_admit`` does
        stats = self.stats
        stats.statements += 1
        stats.bytes_from_client += len(data)
        self._lane = (sid, verdict, portal, parsed)
        return sid

    def fast_result(self, data: bytes) -> tuple[int, Verdict, int] | None:
        """The fast lane's statement is answered: when ``data`` is exactly its whole plain
        answer, end it and return (statement id, verdict, rows); the caller sends ``data`` to
        the client itself. None: the statement joined the general path, which must be given
        ``data`` (``server_data``)."""
        lane = self._lane
        if lane is None:
            return None
        sid, verdict, portal, parsed = lane
        if portal is None:
            answer = plain_result(data, self.max_message_size)
            if answer is None:
                self._adopt_lane()
                return None
            rows, status = answer
        else:
            executed = plain_execute(data, self.max_message_size, parsed, portal.described)
            if executed is None:
                self._adopt_lane()
                return None
            rows, status, body_start, body_end = executed
            # what ParseComplete, BindComplete, the Describe's answer and CommandComplete tell
            # the general path
            if parsed and portal.statement is not None:
                portal.statement.state = _MADE
            portal.state = _MADE
            if portal.described:
                if body_start >= 0:
                    portal.fields, portal.fields_raw = None, data[body_start:body_end]
                else:
                    portal.fields = ()
            portal.rows += rows
        self._lane = None
        self.transaction_status = _STATUS.get(status) or bytes((status,))
        self.stats.bytes_to_client += len(data)
        return sid, verdict, rows

    def _adopt_lane(self) -> None:
        """Something other than the plain answer came: the general path takes the statement
        over, with the requests in flight it would have queued for the client's messages."""
        lane = self._lane
        assert lane is not None
        self._lane = None
        sid, verdict, portal, parsed = lane
        pending = self._pending
        if portal is None:
            pending.append(_Pending(_QUERY, verdict, sid))
            return
        if parsed:
            stmt = portal.statement
            pending.append(_Pending(_PARSE, verdict, statement=stmt, made=stmt))
        pending.append(_Pending(_BIND, made=portal))
        if portal.described:
            pending.append(_Pending(_DESCRIBE, describe_kind=b"P", portal=portal))
        sql = portal.statement.sql if portal.statement is not None else ""
        pending.append(_Pending(_EXECUTE, verdict, sid, portal=portal, sql=sql))
        pending.append(_Pending(_SYNC))

    # ----------------------------------------------------------------------- server side

    def server_data(self, data: bytes) -> None:
        """Bytes from Postgres (may queue client messages that were waiting into to_server)."""
        if self._lane is not None:
            self._adopt_lane()
        try:
            chunk, frames = self._server.feed(data)
            if frames:
                self._server_frames(chunk, frames)
        except PeerProtocolError as exc:
            self._violation(f"upstream: {exc.message}", exc.sqlstate, by_client=False)
            return
        if self._ungate and self._held is None:
            self._ungate = False
            deferred = bytes(self._deferred)
            self._deferred.clear()
            if deferred:
                self.client_data_resume(deferred)

    def _server_frames(self, chunk: bytes, frames: list[tuple[int, int, int]]) -> None:
        out = self.to_client
        before = len(out)
        pending = self._pending
        run_start = -1
        i, n = 0, len(frames)
        while i < n:
            tag, start, end = frames[i]
            i += 1
            head = pending[0] if pending else None
            if tag in (T_DATA_ROW, T_COPY_DATA):
                if head is None:  # rows nobody asked for must not pass unchecked
                    raise PeerProtocolError(f"unsolicited message {chr(tag)!r} from the server")
                if head.stopped or head.internal:
                    if run_start >= 0:
                        out += chunk[run_start:start]
                        run_start = -1
                    continue
                if head is not None:
                    head.rows += 1
                    plan = head.plan
                    if tag == T_COPY_DATA:
                        if head.copy is not None:
                            if run_start >= 0:
                                out += chunk[run_start:start]
                                run_start = -1
                            self._rewrite_copy(head, head.copy, chunk, start, end)
                            continue
                        plan = None
                    elif plan is None and head.kind == _EXECUTE:
                        plan = head.plan = self._execute_plan(head)
                    if plan is not None and tag == T_DATA_ROW and (plan.rewriters or plan.block):
                        if run_start >= 0:
                            out += chunk[run_start:start]
                            run_start = -1
                        i = self._rewrite_rows(head, plan, chunk, frames, i - 1)
                        continue
                    if head.verdict is not None and head.verdict.result is not None:
                        limit = head.verdict.result.max_rows
                        if limit is not None and head.rows + head.base > limit:
                            if run_start >= 0:
                                out += chunk[run_start:start]
                                run_start = -1
                            self._stop(head, _row_limit_error(limit), over_limit=True)
                            continue
                if run_start < 0:
                    run_start = start
                continue
            if head is not None and not (head.stopped or head.internal):
                # the usual answers, needing only bookkeeping: forwarded in the run
                handled = True
                if tag in (T_COMMAND_COMPLETE, T_EMPTY):
                    if head.kind == _QUERY:
                        head.index += 1
                        head.plan = None
                    else:
                        self._finish(pending.popleft())
                elif tag in _COMPLETIONS:
                    self._finish(pending.popleft())
                else:
                    handled = (
                        tag == T_ROW_DESC
                        and head.kind == _QUERY
                        and (head.verdict is None or head.verdict.result is None)
                    )
                if handled:
                    if run_start < 0:
                        run_start = start
                    continue
            if run_start >= 0:
                out += chunk[run_start:start]
                run_start = -1
            self._server_message(tag, chunk, start, end, head)
        if run_start >= 0:
            out += chunk[run_start : frames[-1][2]]
        self.stats.bytes_to_client += len(out) - before

    def _server_message(
        self, tag: int, chunk: bytes, start: int, end: int, head: _Pending | None
    ) -> None:
        raw = chunk[start:end]
        body = memoryview(chunk)[start + 5 : end]
        out = self.to_client
        pending = self._pending
        if tag == T_READY:
            ready = raw[5:6]
            self.transaction_status = ready
            ended = None
            while pending:
                ended = pending.popleft()
                self._finish(ended)
                if ended.kind in _ENDS_AT_READY:
                    break
            query = ended is not None and ended.kind == _QUERY and ended.verdict is not None
            if query and ended is not None and not self._after_query(ended, ready):
                return
            if ended is None or not ended.quiet_ready:
                out += raw
            return
        if tag == T_PARAM_STATUS:
            status = m.ParameterStatus.decode(body)
            pinned = PINNED_SETTINGS.get(status.name)
            if pinned is not None and status.value.upper() != pinned:
                raise PeerProtocolError(
                    f"the session's {status.name} changed to {status.value!r}; pgproxy requires "
                    f"{pinned} and ends the session"
                )
            out += raw
            return
        if tag == T_NOTIFY:
            self._on_notification(raw, body)
            return
        if tag == T_NOTICE:
            self._on_notice(raw, body, head)
            return
        if head is None:
            raise PeerProtocolError(f"unsolicited message {chr(tag)!r} from the server")
        if tag == T_ERROR:
            self._on_error(raw, body, head)
            return
        if head.stopped or head.internal:
            if tag in (T_COMMAND_COMPLETE, T_EMPTY) and head.kind == _QUERY:
                head.index += 1
                head.plan = None
            elif tag in _INTERNAL_TAGS:
                self._on_internal(tag, body, head)
            return
        if tag == T_ROW_DESC:
            self._on_row_description(raw, body, head)
        elif tag in (T_COMMAND_COMPLETE, T_EMPTY):
            out += raw
            if head.kind == _QUERY:
                head.index += 1
                head.plan = None
            else:
                self._finish(pending.popleft())
        elif tag in (T_PARSE_COMPLETE, T_BIND_COMPLETE, T_CLOSE_COMPLETE, T_SUSPENDED):
            out += raw
            self._finish(pending.popleft())
        elif tag == T_NO_DATA:
            out += raw
            p = pending.popleft()
            if p.portal is not None:
                p.portal.fields = ()
            elif p.statement is not None:
                p.statement.fields = ()
        elif tag == T_COPY_OUT:
            self._on_copy_out(raw, head)
        elif tag in (T_PARAM_DESC, T_COPY_IN, T_COPY_BOTH, T_COPY_DONE, T_FUNC_RESULT):
            out += raw
        elif tag in (T_AUTH, T_KEY):
            raise PeerProtocolError("authentication message from the server after startup")
        else:
            raise PeerProtocolError(f"unexpected message type {chr(tag)!r} from the server")

    def _after_query(self, query: _Pending, status: bytes) -> bool:
        """A row-limited Query completed: end the transaction pgproxy wrapped it in, or fail
        the client's transaction after a stop. False: its ReadyForQuery is not the client's
        (the one of our follow-up is), and later client messages wait for that follow-up."""
        if query.wrapped:
            # the client's implicit transaction: committed unless it failed or was cut short
            failed = query.stopped or status != b"T"
            self.to_server += _ROLLBACK if failed else _COMMIT
            follow = _Pending(_QUERY, query.verdict, internal=True, client_errors=not failed)
        elif query.cut and status == b"T":
            # inside the client's transaction block: the client now believes it failed
            self.to_server += m.Query(BLOCKED_SQL).encode()
            follow = _Pending(_QUERY, internal=True)
        else:
            return True
        self._pending.append(follow)
        self._gate = follow
        self._ungate = False
        return False

    def _on_internal(self, tag: int, body: memoryview, head: _Pending) -> None:
        """Responses to pgproxy's own requests, or to a stopped result: consumed, not sent."""
        if tag == T_ROW_DESC:
            fields = m.RowDescription.decode(body).fields
            if head.kind == _DESCRIBE:
                if head.portal is not None:
                    head.portal.fields = fields
                self._finish(self._pending.popleft())
            return
        if head.kind == _DESCRIBE and tag == T_NO_DATA:
            if head.portal is not None:
                head.portal.fields = ()
            self._finish(self._pending.popleft())
            return
        if head.kind not in _ENDS_AT_READY:
            self._finish(self._pending.popleft())

    def _on_row_description(self, raw: bytes, body: memoryview, head: _Pending) -> None:
        if head.kind == _DESCRIBE:
            self.to_client += raw
            target = head.portal if head.portal is not None else head.statement
            if target is not None:
                target.fields, target.fields_raw = None, bytes(body)
            self._finish(self._pending.popleft())
            return
        # a simple-query result set starts; its shape matters only to a result policy
        if head.kind == _QUERY and head.verdict is not None and head.verdict.result is not None:
            rd = m.RowDescription.decode(body)
            plan = self._plan(
                head.verdict, [_field_info(f, f.format) for f in rd.fields], head.index
            )
            head.plan = plan
            head.formats = tuple(f.format for f in rd.fields)
            if plan.block:
                self._stop(head, _plan_error(plan.block))
                return
        self.to_client += raw

    def _plan(self, verdict: Verdict, fields: Sequence[FieldInfo], index: int) -> RowPlan:
        assert verdict.result is not None
        try:
            return verdict.result.plan(fields, index)
        except Exception:
            return RowPlan(block="result withheld: internal policy error")

    def _execute_plan(self, head: _Pending) -> RowPlan:
        """The row plan of an Execute's portal, built on its first row."""
        verdict, portal = head.verdict, head.portal
        if verdict is None or verdict.result is None or portal is None:
            return PASS_ROWS
        fields = portal.row_fields()
        if fields is None and portal.statement is not None:
            fields = portal.statement.row_fields()
        if fields is None:
            return RowPlan(block="result withheld: row description unknown")
        bind = portal.bind
        infos = [_field_info(f, bind.result_format(i)) for i, f in enumerate(fields)]
        head.formats = tuple(i.format for i in infos)
        return self._plan(verdict, infos, 0)

    def _on_copy_out(self, raw: bytes, head: _Pending) -> None:
        verdict = head.verdict
        if verdict is not None and verdict.result is not None:
            try:
                cp = verdict.result.copy_plan(head.index)
            except Exception:
                cp = CopyPlan(RowPlan(block="result withheld: internal policy error"))
            out = m.CopyOutResponse.decode(memoryview(raw)[5:])
            block = cp.rows.block
            if not block and cp.rows.rewriters:
                if out.overall_format == 1:
                    block = "binary COPY cannot be masked"
                elif cp.columns is not None and len(out.column_formats) != cp.columns:
                    block = "the COPY does not have the columns the policy analysed"
            if block:
                self._stop(head, _plan_error(block))
                return
            if cp.rows.rewriters:
                head.copy = cp
                head.copy_header = cp.header
        self.to_client += raw

    def _rewrite_copy(
        self, head: _Pending, cp: CopyPlan, chunk: bytes, start: int, end: int
    ) -> None:
        limit = head.verdict.result.max_rows if head.verdict and head.verdict.result else None
        if limit is not None and head.rows + head.base > limit:
            self._stop(head, _row_limit_error(limit), over_limit=True)
            return
        if head.copy_header:
            head.copy_header = False
            self.to_client += chunk[start:end]
            return
        try:
            new, n = rewrite_row(chunk[start + 5 : end], cp.format, cp.rows.rewriters)
        except (ValueError, UnicodeDecodeError):
            self._stop(head, _plan_error("a COPY row could not be parsed for masking"))
            return
        head.masked += n
        self.to_client += m.CopyData(new).encode()

    def _rewrite_rows(
        self, head: _Pending, plan: RowPlan, chunk: bytes, frames: Frames, i: int
    ) -> int:
        """Rewrite the run of DataRows that starts at ``frames[i]`` (already counted in
        ``head.rows``), up to the row limit; return the index of the first frame not consumed."""
        if plan.block:
            self._stop(head, _plan_error(plan.block))
            return i + 1
        room = len(frames)
        limit = head.verdict.result.max_rows if head.verdict and head.verdict.result else None
        if limit is not None:
            limit -= head.base
            if head.rows > limit:
                self._stop(head, _row_limit_error(limit), over_limit=True)
                return i + 1
            room = limit - head.rows + 1
        nxt, rows, cells = rewrite_rows(self.to_client, chunk, frames, i, room, plan, head.formats)
        head.rows += rows - 1
        head.masked += cells
        return nxt

    def _stop(self, head: _Pending, error: bytes, *, over_limit: bool = False) -> None:
        """Cut a result short with ``error``; drop what remains of it."""
        if over_limit and head.sql:
            self._over_limit.add(head.sql)
        head.stopped = True
        head.cut = True
        head.sqlstate = codes.INSUFFICIENT_PRIVILEGE
        self.to_client += error
        if head.kind != _QUERY:
            # the client now expects skip-until-Sync: hide later answers, drop later requests
            for p in self._pending:
                if p.kind == _SYNC:
                    break
                p.stopped = True
            if not any(p.kind == _SYNC for p in self._pending):
                self._client_skip_to_sync = True
                self._poison_before_sync = True

    def _on_error(self, raw: bytes, body: memoryview, head: _Pending) -> None:
        if head.replace_error is not None:
            self.to_client += head.replace_error
            head.sqlstate = codes.INSUFFICIENT_PRIVILEGE
        elif head.client_errors:
            err = m.ErrorResponse.decode(body)
            head.sqlstate = err.sqlstate
            self.to_client += self._scrubbed(err, raw, head.verdict)
        elif head.stopped or head.internal:
            err = m.ErrorResponse.decode(body)
            head.sqlstate = err.sqlstate
            if head.internal and not head.stopped:
                # our own Describe failed: the client's Execute will fail the same way
                pass
        else:
            err = m.ErrorResponse.decode(body)
            head.sqlstate = err.sqlstate
            self.to_client += self._scrubbed(err, raw, head.verdict)
        if not head.sqlstate:
            head.sqlstate = "XX000"  # an error all the same (see ``_finish``)
        if head.kind not in _ENDS_AT_READY:
            # extended protocol: the server now skips to Sync
            while self._pending and self._pending[0].kind != _SYNC:
                p = self._pending.popleft()
                if not p.sqlstate:
                    p.sqlstate = head.sqlstate
                self._finish(p)
        else:
            head.stopped = True

    def _scrubbed(
        self, msg: m.ErrorResponse | m.NoticeResponse, raw: bytes, verdict: Verdict | None
    ) -> bytes:
        fields = dict(msg.fields)
        if verdict is not None and "transaction" in verdict.statement_class:
            # COMMIT and SET CONSTRAINTS run the checks deferred from earlier statements: their
            # errors name other statements' values (a duplicated key), so they are scrubbed as
            # a statement the policy did not see
            verdict = None
        try:
            new = self.policy.scrub_error(fields, verdict)
        except Exception:
            new = {
                "S": fields.get("S", "ERROR"),
                "V": fields.get("V", "ERROR"),
                "C": fields.get("C", "XX000"),
                "M": "error withheld by policy",
            }
        if new == fields:
            return raw
        return type(msg)(tuple(new.items())).encode()

    def _on_notice(self, raw: bytes, body: memoryview, head: _Pending | None) -> None:
        msg = m.NoticeResponse.decode(body)
        verdict = head.verdict if head is not None else None
        self.to_client += self._scrubbed(msg, raw, verdict)

    def _on_notification(self, raw: bytes, body: memoryview) -> None:
        msg = m.NotificationResponse.decode(body)
        try:
            payload = self.policy.notification(msg.channel, msg.payload)
        except Exception:
            payload = None
        if payload is None:
            return
        self.to_client += (
            raw
            if payload == msg.payload
            else m.NotificationResponse(msg.pid, msg.channel, payload).encode()
        )

    def _finish(self, p: _Pending) -> None:
        named = p.made
        if named is not None and named.state == _SENT:
            # answered by ParseComplete/BindComplete, or skipped or failed with an error
            if p.sqlstate:
                named.state = _REFUSED
            else:
                named.state = _MADE
                named.prev = None
        if p.defines:
            made = not (p.sqlstate or p.stopped)
            for key, gen in p.defines:
                if self._sql_inflight.get(key) is p:
                    del self._sql_inflight[key]
                if made and self._sql_gen.get(key, 0) == gen:
                    self._sql_trusted[key] = gen
                else:
                    self._sql_trusted.pop(key, None)
            p.defines = ()
        if p.rows and not p.finished:
            if p.kind == _EXECUTE and p.portal is not None:
                p.portal.rows += p.rows
            for name in p.cursors:
                self._cursor_rows[name] = self._cursor_rows.get(name, 0) + p.rows
        if p is self._gate:
            self._gate = None
            self._ungate = True
        if p.finished or p.statement_id == 0 or p.verdict is None:
            p.finished = True
            return
        p.finished = True
        self.stats.masked_cells += p.masked
        self.events.append(
            StatementFinished(p.statement_id, p.verdict, p.rows, p.sqlstate, p.masked)
        )

    # ------------------------------------------------------------------------- errors

    def _violation(self, message: str, sqlstate: str, *, by_client: bool) -> None:
        self.to_client += m.error(
            sqlstate, message if by_client else "upstream protocol violation", severity="FATAL"
        )
        self.events.append(ProtocolViolation(message, by_client))
        self.closed = True


def _query_text(chunk: bytes, start: int, end: int) -> str:
    """A Query message's SQL: the usual shape decoded directly, anything else by the decoder
    (which raises the protocol error)."""
    nul = chunk.find(b"\x00", start + 5, end)
    if nul == end - 1:
        try:
            return chunk[start + 5 : nul].decode()
        except UnicodeDecodeError:
            pass
    return m.Query.decode(memoryview(chunk)[start + 5 : end]).sql


_N = TypeVar("_N", bound=_Named)


def _server_name(name: str) -> str:
    """The name as the server keys it: statements and portals by their first 63 bytes
    (NAMEDATALEN - 1), so longer names that share them are one name. Lossless on those bytes."""
    if len(name) <= 15:  # at most 4 bytes a character: no longer than 63 bytes
        return name
    raw = name.encode()
    return raw[:63].decode("utf-8", "surrogateescape") if len(raw) > 63 else name


_UNKNOWN_NAME = (
    "EXECUTE/FETCH/MOVE of a name whose PREPARE/DECLARE the server did not confirm, or that "
    "the extended protocol used since: prepare or declare it again"
)


_NAMES_SQL: dict[str, bool] = {}


def _names_sql(statement_class: str) -> bool:
    """Whether a statement of this class may define or use SQL-level statement/cursor names
    (EXPLAIN and CREATE TABLE AS may wrap an EXECUTE)."""
    hit = _NAMES_SQL.get(statement_class)
    if hit is None:
        hit = any(
            k in statement_class
            for k in ("prepare", "declare", "execute", "fetch", "explain", "ddl")
        )
        if len(_NAMES_SQL) < 4096:
            _NAMES_SQL[statement_class] = hit
    return hit


def _sql_name_ops(sql: str) -> list[tuple[bool, bytes, str]] | None:
    """``(defines, kind, name)`` for each PREPARE/DECLARE (defines) and EXECUTE/FETCH/MOVE in
    ``sql``, in order; kind ``b"S"`` for statements, ``b"P"`` for cursors. None: unparseable."""
    from pgproxy.policy.classify import ClassifyError, StatementClass, classify

    try:
        parsed = classify(sql)
    except ClassifyError:
        return None
    out: list[tuple[bool, bytes, str]] = []
    for top in parsed:
        c = top
        while c.inner is not None and c.klass not in (
            StatementClass.PREPARE,
            StatementClass.DECLARE,
        ):
            c = c.inner  # EXPLAIN EXECUTE, CREATE TABLE … AS EXECUTE
        if c.klass is StatementClass.PREPARE:
            out.append((True, b"S", c.node.name or ""))
        elif c.klass is StatementClass.DECLARE:
            out.append((True, b"P", c.node.portalname or ""))
        elif c.klass is StatementClass.EXECUTE:
            out.append((False, b"S", c.node.name or ""))
        elif c.klass is StatementClass.FETCH:
            out.append((False, b"P", c.node.portalname or ""))
    return out


def _before(named: _N | None) -> _N | None:
    """The ``prev`` of a new Parse/Bind of a name: what the server will have if it refuses."""
    return named if named is not None and named.state == _SENT else _made(named)


def _made(named: _N | None) -> _N | None:
    """What the server has under a name: a refused Parse/Bind left the previous entry."""
    while named is not None and named.state == _REFUSED:
        named = named.prev  # type: ignore[assignment]
    return named


#: in place of an Execute the policy refuses: an unnamed Parse that fails at once (a portal
#: name would not do, since SQL DECLARE can create any name)
_WITHHELD = m.Parse("", BLOCKED_SQL).encode()
_UNBOUND = Verdict(
    Action.BLOCK,
    ("the portal or statement was not prepared through the extended protocol",),
    message="statement blocked: execute only what was prepared with Parse and Bind",
)


#: statement classes the fast lane may carry: their general path, when allowed with no result
#: policy, is "forward as is, record when answered" (DDL, COPY and SQL-level names need more)
_FAST_CLASSES = frozenset({"select", "insert", "update", "delete", "merge", "transaction"})
_FAST_CLASS: dict[str, bool] = {}
_STATUS = {ord("I"): b"I", ord("T"): b"T", ord("E"): b"E"}


def _lane_verdict(verdict: Verdict) -> bool:
    """Whether the general path would forward the statement and its answer as they are."""
    return (
        verdict.action is Action.ALLOW
        and verdict.result is None
        and verdict.hold_class is None
        and _fast_class(verdict.statement_class)
    )


#: what follows the Bind in the fast lane's extended exchange: [Describe portal "",] Execute
#: "" with no row limit, Sync
_LANE_EXECUTE_SYNC = m.Execute("", 0).encode() + m.Sync().encode()
_LANE_DESCRIBE_EXECUTE_SYNC = m.Describe(b"P", "").encode() + _LANE_EXECUTE_SYNC


def _fast_class(statement_class: str) -> bool:
    """Whether every statement of a (``;``-joined) class is one the fast lane may carry."""
    hit = _FAST_CLASS.get(statement_class)
    if hit is None:
        hit = _FAST_CLASSES.issuperset(statement_class.split(";")) and not _names_sql(
            statement_class
        )
        if len(_FAST_CLASS) < 4096:
            _FAST_CLASS[statement_class] = hit
    return hit


def _row_limit(verdict: Verdict) -> int | None:
    return verdict.result.max_rows if verdict.result is not None else None


_FLUSH = m.Flush().encode()
_BEGIN = m.Query("BEGIN").encode()
_COMMIT = m.Query("COMMIT").encode()
_ROLLBACK = m.Query("ROLLBACK").encode()
#: statement classes a row-limited Query cannot be combined with: they would end or escape the
#: transaction pgproxy runs it in, or wait for client data that waits for the Query
_NOT_WITH_A_ROW_LIMIT = frozenset({"transaction", "copy_from", "copy_to"})
_MIXED_LIMITED = (
    "a statement with a bulk-export row limit cannot share a query string with transaction "
    "control or COPY: send it on its own"
)


def _limited_query_mixes(statement_class: str) -> bool:
    classes = statement_class.split(";")
    return len(classes) > 1 and any(k in _NOT_WITH_A_ROW_LIMIT for k in classes)


def _refused(verdict: Verdict, message: str) -> Verdict:
    return Verdict(
        Action.BLOCK,
        (*verdict.reasons, message),
        verdict.statement_class,
        message=message,
        hold_class=verdict.hold_class,
        fingerprint=verdict.fingerprint,
        sql_redacted=verdict.sql_redacted,
    )


def _held_sql(held: _Held) -> str:
    if held.tag == F_QUERY:
        return m.Query.decode(memoryview(held.frame_bytes)[5:]).sql
    return held.portal.statement.sql if held.portal and held.portal.statement else ""


class _Unlimited:
    """A result policy whose row limit a reviewer lifted (an approved bulk export)."""

    def __init__(self, inner: ResultPolicy) -> None:
        self._inner = inner

    def plan(self, fields: Sequence[FieldInfo], index: int = 0) -> RowPlan:
        return self._inner.plan(fields, index)

    def copy_plan(self, index: int = 0) -> CopyPlan:
        return self._inner.copy_plan(index)

    @property
    def scrub_diagnostics(self) -> bool:
        return self._inner.scrub_diagnostics

    @property
    def max_rows(self) -> int | None:
        return None


def _policy_error(verdict: Verdict) -> bytes:
    msg = verdict.message or "statement blocked by policy"
    return m.error(codes.INSUFFICIENT_PRIVILEGE, msg, hint="; ".join(verdict.reasons)[:500])


def _plan_error(reason: str) -> bytes:
    return m.error(codes.INSUFFICIENT_PRIVILEGE, reason)


def _row_limit_error(limit: int) -> bytes:
    return m.error(
        codes.INSUFFICIENT_PRIVILEGE,
        f"result stopped: more than {limit} rows of protected data (bulk export)",
        hint="Narrow the query, or run it again to request an approval for a bulk export.",
    )
