"""The relay's fast lane: its shape checks agree with their twins, and it changes no outcome.

Two promises are checked. First, the compiled ``_fastlane`` and the Python reference functions
in ``fastlane.py`` give equal answers for any bytes (hypothesis: arbitrary bytes and valid
message streams with one mutation each). Second, a ``Relay`` driven the way the session drives
it (``fast_query`` before ``client_data``, ``fast_result`` before ``server_data`` while a lane
statement is open) sends exactly the bytes, records exactly the statements and ends in exactly
the state of a second ``Relay`` given every read through the general path alone: for a table of
conversations, for every split of an answer across reads, and for random interleavings of
requests, answers, asynchronous messages and hold decisions against a small simulated server.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pgproxy.policy.catalog import Catalog, Column, Relation
from pgproxy.policy.decide import PolicyEngine
from pgproxy.policy.operators import MaskCatalog
from pgproxy.policy.seam import Action, StatementContext, Verdict
from pgproxy.protocol import fastlane
from pgproxy.protocol import messages as m
from pgproxy.protocol.relay import (
    BLOCKED_SQL,
    HoldRequested,
    Relay,
    StatementAdmitted,
    StatementFinished,
    _Named,
    _Portal,
    _Statement,
)
from pgproxy.rules import Rules
from tests.protocol.helpers import BLOCK, HOLD, FakePolicy, RowLimit, summarize

try:
    from pgproxy.protocol import _fastlane
except ImportError:  # pragma: no cover - the REQUIRE_EXT test below reports it in CI
    _fastlane = None  # type: ignore[assignment]

needs_ext = pytest.mark.skipif(_fastlane is None, reason="pgproxy.protocol._fastlane is not built")
PROPS = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
RELAY_PROPS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def test_the_compiled_checks_are_there_when_required() -> None:
    if os.environ.get("PGPROXY_REQUIRE_EXT") != "1":
        pytest.skip("PGPROXY_REQUIRE_EXT=1 not set")
    assert _fastlane is not None, "pgproxy.protocol._fastlane did not build (pip install -e .)"
    assert fastlane.query_text is _fastlane.query_text
    assert fastlane.plain_result is _fastlane.plain_result
    assert fastlane.plain_execute is _fastlane.plain_execute


# ================================================================== the shape checks

N_FIELD = m.Field("n", type_oid=23, type_size=4)
RD_N = m.RowDescription((N_FIELD,)).encode()
IDLE, IN_TXN, FAILED = (m.ReadyForQuery(s).encode() for s in (b"I", b"T", b"E"))


def data_row(*cells: bytes | None) -> bytes:
    return m.DataRow(tuple(cells)).encode()


def complete(tag: str) -> bytes:
    return m.CommandComplete(tag).encode()


def pg_error(sqlstate: str, message: str) -> bytes:
    return m.ErrorResponse(m.error_fields(sqlstate, message)).encode()


def notice(message: str = "fake notice") -> bytes:
    return m.NoticeResponse(m.error_fields("00000", message, severity="NOTICE")).encode()


PARAM = m.ParameterStatus("application_name", "fake-app").encode()
NOTIFY = m.NotificationResponse(4242, "fake_channel", "fake payload").encode()
EMPTY = m.EmptyQueryResponse().encode()

#: the messages of answers, valid and otherwise, that the structured strategies combine
ANSWER_PARTS = [
    RD_N,
    data_row(b"1"),
    data_row(None),
    data_row(),
    complete("SELECT 1"),
    EMPTY,
    pg_error("22012", "division by zero"),
    notice(),
    PARAM,
    NOTIFY,
    b"H\x00\x00\x00\x07\x00\x00\x00",  # CopyOutResponse
    b"X\x00\x00\x00\x04",
    b"Z\x00\x00\x00\x06II",  # ReadyForQuery with a length other than 5
    b"Z\x00\x00\x00\x04",  # too short to hold its status
    IDLE,
    IN_TXN,
    FAILED,
]


def set_length(msg: bytes, length: int) -> bytes:
    return msg[:1] + struct.pack("!I", length & 0xFFFFFFFF) + msg[5:]


def mutate(draw: st.DrawFn, parts: list[bytes]) -> bytes:
    """``parts`` joined after at most two mutations (a length, a cut, a tag, a byte, extras)."""
    for _ in range(draw(st.integers(0, 2))):
        if not parts:
            break
        at = draw(st.integers(0, len(parts) - 1))
        msg = parts[at]
        if not msg:
            continue
        how = draw(
            st.sampled_from(["length", "length+1", "length-1", "extra", "cut", "tag", "byte"])
        )
        if how == "length":
            parts[at] = set_length(msg, draw(st.integers(0, 2**32 - 1)))
        elif how == "length+1":
            parts[at] = set_length(msg, len(msg))
        elif how == "length-1":
            parts[at] = set_length(msg, len(msg) - 2)
        elif how == "extra":
            parts.insert(at + 1, draw(st.binary(min_size=1, max_size=6)))
        elif how == "cut":
            parts[at] = msg[: draw(st.integers(0, len(msg) - 1))]
        elif how == "tag":
            parts[at] = bytes([draw(st.integers(0, 255))]) + msg[1:]
        else:
            i = draw(st.integers(0, len(msg) - 1))
            parts[at] = msg[:i] + bytes([draw(st.integers(0, 255))]) + msg[i + 1 :]
    return b"".join(parts)


@st.composite
def answers(draw: st.DrawFn) -> bytes:
    """An answer-shaped stream (usually ending in ReadyForQuery) with at most a few mutations."""
    parts = draw(st.lists(st.sampled_from(ANSWER_PARTS), max_size=8))
    if draw(st.booleans()):
        parts.append(draw(st.sampled_from([IDLE, IN_TXN, FAILED])))
    return mutate(draw, parts)


PARSE_COMPLETE = m.ParseComplete().encode()
BIND_COMPLETE = m.BindComplete().encode()
NO_DATA = m.NoData().encode()
CLOSE_COMPLETE = m.CloseComplete().encode()
SUSPENDED = m.PortalSuspended().encode()


@st.composite
def execute_answers(draw: st.DrawFn) -> bytes:
    """An answer to [Parse,] Bind, [Describe,] Execute, Sync: each part present or not, in
    order, sometimes with a stray extended-protocol message, then at most a few mutations."""
    parts: list[bytes] = []
    if draw(st.booleans()):
        parts.append(PARSE_COMPLETE)
    if draw(st.integers(0, 5)):
        parts.append(BIND_COMPLETE)
    parts += draw(st.lists(st.sampled_from([RD_N, NO_DATA]), max_size=2))
    parts += draw(
        st.lists(st.sampled_from([data_row(b"1"), data_row(None), data_row()]), max_size=3)
    )
    parts += draw(st.lists(st.sampled_from([complete("SELECT 1"), EMPTY]), max_size=2))
    if draw(st.integers(0, 3)) == 0:
        stray = [PARSE_COMPLETE, BIND_COMPLETE, NO_DATA, CLOSE_COMPLETE, SUSPENDED, *ANSWER_PARTS]
        parts.insert(draw(st.integers(0, len(parts))), draw(st.sampled_from(stray)))
    if draw(st.integers(0, 5)):
        parts.append(draw(st.sampled_from([IDLE, IN_TXN, FAILED])))
    return mutate(draw, parts)


@st.composite
def queries(draw: st.DrawFn) -> bytes:
    """A Query message, valid or with one mutation (length, NUL, UTF-8, extra bytes, tag)."""
    text = draw(st.text(max_size=12)).encode("utf-8", "surrogatepass")
    msg = b"Q" + struct.pack("!I", len(text) + 5) + text + b"\x00"
    how = draw(
        st.sampled_from(
            ["valid", "valid", "length", "nul", "no-nul", "utf8", "extra", "two", "tag", "cut"]
        )
    )
    if how == "length":
        msg = set_length(msg, draw(st.integers(0, 2**32 - 1)))
    elif how == "nul":
        at = draw(st.integers(5, len(msg) - 1))
        msg = msg[:at] + b"\x00" + msg[at:]
        msg = set_length(msg, len(msg) - 1)
    elif how == "no-nul":
        msg = set_length(msg[:-1] + b"x", len(msg) - 1)
    elif how == "utf8":
        bad = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf4\x90"]))
        at = draw(st.integers(5, len(msg) - 1))
        msg = msg[:at] + bad + msg[at:]
        msg = set_length(msg, len(msg) - 1)
    elif how == "extra":
        msg += draw(st.binary(min_size=1, max_size=4))
    elif how == "two":
        msg += msg
    elif how == "tag":
        msg = bytes([draw(st.integers(0, 255))]) + msg[1:]
    elif how == "cut":
        msg = msg[: draw(st.integers(0, len(msg) - 1))]
    return msg


max_sizes = st.one_of(st.just(1 << 30), st.integers(-2, 40), st.integers(-(2**62), 2**62))


def twins_agree(
    compiled: Callable[[bytes, int], object],
    python: Callable[[bytes, int], object],
    data: bytes,
    max_size: int,
) -> None:
    got, expected = compiled(data, max_size), python(data, max_size)
    assert got == expected
    assert type(got) is type(expected)


@needs_ext
@PROPS
@given(st.binary(max_size=64) | queries(), max_sizes)
def test_query_text_twins_agree(data: bytes, max_size: int) -> None:
    assert _fastlane is not None
    twins_agree(_fastlane.query_text, fastlane._query_text_py, data, max_size)


@needs_ext
@PROPS
@given(st.binary(max_size=64) | answers(), max_sizes)
def test_plain_result_twins_agree(data: bytes, max_size: int) -> None:
    assert _fastlane is not None
    twins_agree(_fastlane.plain_result, fastlane._plain_result_py, data, max_size)


@pytest.mark.parametrize("impl", ["python", "compiled"])
def test_query_text_examples(impl: str) -> None:
    if impl == "compiled" and _fastlane is None:
        pytest.skip("pgproxy.protocol._fastlane is not built")
    fn = fastlane._query_text_py if impl == "python" else _fastlane.query_text
    q = m.Query("SELECT 'é'").encode()
    assert fn(q, 1 << 30) == "SELECT 'é'"
    assert fn(m.Query("").encode(), 1 << 30) == ""
    assert fn(q, len(q) - 1) == "SELECT 'é'"  # the length word counts itself, not the tag
    assert fn(q, len(q) - 2) is None
    assert fn(q + q, 1 << 30) is None  # two Queries in one read
    assert fn(q[:-1], 1 << 30) is None  # cut short
    assert fn(b"Q\x00\x00\x00\x08a\x00b\x00", 1 << 30) is None  # NUL inside the text
    assert fn(b"Q\x00\x00\x00\x06\xff\x00", 1 << 30) is None  # invalid UTF-8
    assert fn(b"Q\x00\x00\x00\x08\xed\xa0\x80\x00", 1 << 30) is None  # a surrogate
    assert fn(b"P" + q[1:], 1 << 30) is None
    assert fn(b"Q\x00\x00\x00\x05", 1 << 30) is None  # no room for the NUL


@pytest.mark.parametrize("impl", ["python", "compiled"])
def test_plain_result_examples(impl: str) -> None:
    if impl == "compiled" and _fastlane is None:
        pytest.skip("pgproxy.protocol._fastlane is not built")
    fn = fastlane._plain_result_py if impl == "python" else _fastlane.plain_result
    select = RD_N + data_row(b"1") + data_row(None) + complete("SELECT 2")
    assert fn(select + IDLE, 1 << 30) == (2, ord("I"))
    assert fn(select + IN_TXN, 1 << 30) == (2, ord("T"))
    assert fn(complete("BEGIN") + IN_TXN, 1 << 30) == (0, ord("T"))
    assert fn(EMPTY + IDLE, 1 << 30) == (0, ord("I"))
    assert fn(IDLE, 1 << 30) == (0, ord("I"))
    assert fn(select + select + FAILED, 1 << 30) == (4, ord("E"))
    assert fn(b"Z\x00\x00\x00\x05?", 1 << 30) == (0, ord("?"))  # any status byte is reported
    assert fn(select, 1 << 30) is None  # not answered yet
    assert fn(select + IDLE + IDLE, 1 << 30) is None  # ReadyForQuery not last
    assert fn(select + IDLE[:-1], 1 << 30) is None
    assert fn(select + b"Z\x00\x00\x00\x06II", 1 << 30) is None
    assert fn(select + IDLE + b"\x00", 1 << 30) is None  # a byte after ReadyForQuery
    for other in (pg_error("22012", "division by zero"), notice(), PARAM, NOTIFY):
        assert fn(RD_N + other + complete("SELECT 0") + IDLE, 1 << 30) is None
    big = data_row(b"x" * 100)
    assert fn(big + IDLE, len(big) - 1) == (1, ord("I"))
    assert fn(big + IDLE, len(big) - 2) is None  # a message over the maximum size
    assert fn(b"D\x00\x00\x00\x03" + IDLE, 1 << 30) is None  # a length below 4
    assert fn(b"", 1 << 30) is None


@needs_ext
@PROPS
@given(st.binary(max_size=64) | execute_answers(), max_sizes, st.booleans(), st.booleans())
def test_plain_execute_twins_agree(
    data: bytes, max_size: int, parsed: bool, described: bool
) -> None:
    assert _fastlane is not None
    got = _fastlane.plain_execute(data, max_size, parsed, described)
    expected = fastlane._plain_execute_py(data, max_size, parsed, described)
    assert got == expected
    assert type(got) is type(expected)
    if expected is not None:
        assert all(type(x) is int for x in expected)
        event("accepted")


@pytest.mark.parametrize("impl", ["python", "compiled"])
def test_plain_execute_examples(impl: str) -> None:
    if impl == "compiled" and _fastlane is None:
        pytest.skip("pgproxy.protocol._fastlane is not built")
    fn = fastlane._plain_execute_py if impl == "python" else _fastlane.plain_execute
    big = 1 << 30
    rows = data_row(b"1") + data_row(None) + complete("SELECT 2")
    full = PARSE_COMPLETE + BIND_COMPLETE + RD_N + rows + IDLE
    body = (len(PARSE_COMPLETE + BIND_COMPLETE) + 5, len(PARSE_COMPLETE + BIND_COMPLETE + RD_N))
    assert fn(full, big, True, True) == (2, ord("I"), *body)
    assert full[body[0] : body[1]] == RD_N[5:]
    assert fn(full[5:], big, False, True) == (2, ord("I"), body[0] - 5, body[1] - 5)
    assert fn(BIND_COMPLETE + rows + IN_TXN, big, False, False) == (2, ord("T"), -1, -1)
    assert fn(BIND_COMPLETE + NO_DATA + complete("INSERT 0 1") + IDLE, big, False, True) == (
        0,
        ord("I"),
        -1,
        -1,
    )
    assert fn(PARSE_COMPLETE + BIND_COMPLETE + EMPTY + FAILED, big, True, False) == (
        0,
        ord("E"),
        -1,
        -1,
    )
    assert fn(BIND_COMPLETE + NO_DATA + EMPTY + IDLE, big, False, True) == (0, ord("I"), -1, -1)
    # each part where it must be, and only there
    assert fn(full, big, False, True) is None  # a ParseComplete nobody asked for
    assert fn(full[5:], big, True, True) is None  # the ParseComplete missing
    assert fn(full, big, True, False) is None  # a RowDescription without a Describe
    assert fn(BIND_COMPLETE + rows + IDLE, big, False, True) is None  # the Describe unanswered
    assert fn(BIND_COMPLETE + RD_N + RD_N + rows + IDLE, big, False, True) is None
    assert fn(BIND_COMPLETE + NO_DATA + NO_DATA + EMPTY + IDLE, big, False, True) is None
    assert fn(BIND_COMPLETE + IDLE, big, False, False) is None  # no completion
    assert fn(BIND_COMPLETE + complete("A") + complete("B") + IDLE, big, False, False) is None
    assert fn(BIND_COMPLETE + complete("A") + data_row(b"1") + IDLE, big, False, False) is None
    assert fn(BIND_COMPLETE + data_row(b"1") + SUSPENDED + IDLE, big, False, False) is None
    assert fn(BIND_COMPLETE + complete("A"), big, False, False) is None  # not answered yet
    assert fn(BIND_COMPLETE + complete("A") + IDLE + IDLE, big, False, False) is None
    assert fn(BIND_COMPLETE + complete("A") + IDLE + b"\x00", big, False, False) is None
    assert fn(BIND_COMPLETE + complete("A") + b"Z\x00\x00\x00\x06II", big, False, False) is None
    for other in (pg_error("22012", "division by zero"), notice(), PARAM, NOTIFY):
        for at in (0, 5, 5 + len(RD_N)):
            answer = BIND_COMPLETE + RD_N + rows + IDLE
            assert fn(answer[:at] + other + answer[at:], big, False, True) is None
    assert fn(b"", big, False, False) is None
    row = data_row(b"x" * 100)
    answer = BIND_COMPLETE + row + complete("SELECT 1") + IDLE
    assert fn(answer, len(row) - 1, False, False) == (1, ord("I"), -1, -1)
    assert fn(answer, len(row) - 2, False, False) is None  # a message over the maximum size
    assert fn(b"2\x00\x00\x00\x03" + complete("A") + IDLE, big, False, False) is None


# ================================================================== the relay, both ways

TEXT, INT4 = 25, 23
RULES = Rules.model_validate(
    {
        "agents": [{"name": "lane-bot", "password": "x", "owner": "owner@example.org"}],
        "tags": {"public.patients.ssn": "ssn", "public.patients.first_name": "name"},
        "approvals": {
            "approvers": ["privacy-office@example.org"],
            "hold": ["ddl", "privilege", "bulk_export"],
            "bulk_export_rows": 2,
        },
    }
)
CATALOG = Catalog.build(
    [
        Relation(
            1001,
            "public",
            "patients",
            "r",
            (Column(1, "id", INT4), Column(2, "first_name", TEXT), Column(3, "ssn", TEXT)),
        ),
        Relation(1003, "public", "scratch", "r", (Column(1, "id", INT4), Column(2, "note", TEXT))),
    ],
    [],
    RULES.tags,
)
MASKS = MaskCatalog(RULES)
SCRATCH_REL = CATALOG.relation("public", "scratch", ("public",))
assert SCRATCH_REL is not None
PATIENTS_REL = CATALOG.relation("public", "patients", ("public",))
assert PATIENTS_REL is not None
#: catalogs a ``Read("catalog", name)`` gives both relays' policies, as a DDL would: scratch
#: with one more column (the same statements are allowed, decided anew) or without scratch
CATALOGS = {
    b"more": Catalog.build(
        [PATIENTS_REL, replace(SCRATCH_REL, columns=(*SCRATCH_REL.columns, Column(3, "x", INT4)))],
        [],
        RULES.tags,
    ),
    b"gone": Catalog.build([PATIENTS_REL], [], RULES.tags),
}

# statements and what the real policy above decides for them
SCRATCH = "SELECT id, note FROM scratch"  # ALLOW, select, no result policy: the lane
TWO = "SELECT 1; SELECT 2"  # ALLOW, select;select: the lane
INSERT = "INSERT INTO scratch VALUES (1, 'a')"  # ALLOW, insert: the lane
BEGIN, COMMIT, ROLLBACK = "BEGIN", "COMMIT", "ROLLBACK"  # ALLOW, transaction: the lane
DIV0 = "SELECT 1/0"  # ALLOW, select: the lane (the server fails it)
SSN = "SELECT ssn FROM patients"  # MASK with a row limit of 2
IDS = "SELECT id FROM patients"  # ALLOW with a result policy (not the lane)
SLEEP = "SELECT pg_sleep(1)"  # BLOCK
DROP = "DROP TABLE scratch"  # HOLD (ddl)
EMPTY_SQL = ""  # ALLOW, class "empty" (not the lane)

SCRATCH_RD = m.RowDescription(
    (m.Field("id", 1003, 1, INT4, 4), m.Field("note", 1003, 2, TEXT))
).encode()
PATIENTS_RD = m.RowDescription((m.Field("ssn", 1001, 3, TEXT),)).encode()
IDS_RD = m.RowDescription((m.Field("id", 1001, 1, INT4, 4),)).encode()


def engine() -> PolicyEngine:
    return PolicyEngine(RULES, CATALOG, MASKS, "lane-bot")


def test_the_real_policy_decides_as_the_scenarios_assume() -> None:
    ctx = StatementContext("lane-bot", "clinic", "query")
    eng = engine()

    def lane(sql: str) -> bool:
        v = eng.statement(sql, ctx)
        return (
            v.action is Action.ALLOW
            and v.result is None
            and v.hold_class is None
            and set(v.statement_class.split(";"))
            <= {"select", "insert", "update", "delete", "merge", "transaction"}
        )

    for sql in (SCRATCH, TWO, INSERT, BEGIN, COMMIT, ROLLBACK, DIV0):
        assert lane(sql), sql
    for sql in (SSN, IDS, SLEEP, DROP, EMPTY_SQL):
        assert not lane(sql), sql
    ssn = eng.statement(SSN, ctx)
    assert ssn.action is Action.MASK and ssn.result is not None and ssn.result.max_rows == 2
    assert eng.statement(SLEEP, ctx).action is Action.BLOCK
    assert eng.statement(DROP, ctx).action is Action.HOLD


@dataclass
class Classes(FakePolicy):
    """A fake policy whose default verdict is an ALLOW of a class the lane carries."""

    default: Verdict = field(
        default_factory=lambda: Verdict(Action.ALLOW, ("fake: allowed",), "select")
    )

    def statement(self, sql: str, ctx: StatementContext) -> Verdict:
        self.asked.append((sql, ctx))
        return self.verdicts.get(sql, self.default)


LIMITED = Verdict(Action.ALLOW, ("fake: limited",), "select", result=RowLimit(1))  # type: ignore[arg-type]
FAKE_VERDICTS = {
    "SELECT limited": LIMITED,
    "SELECT blocked": replace(BLOCK, statement_class="select"),
    "SELECT held": replace(HOLD, statement_class="select"),
    "SELECT ddl": Verdict(Action.ALLOW, ("fake",), "ddl"),
    "SELECT hold-class": Verdict(Action.ALLOW, ("fake",), "select", hold_class="write"),
}


@dataclass
class Failing(Classes):
    """A fake policy that raises while deciding "SELECT raise" or revalidating "SELECT reraise"."""

    def statement(self, sql: str, ctx: StatementContext) -> Verdict:
        if sql == "SELECT raise":
            raise RuntimeError("a broken policy")
        return super().statement(sql, ctx)

    def revalidate(self, sql: str, verdict: Verdict, ctx: StatementContext) -> Verdict:
        if sql == "SELECT reraise":
            raise RuntimeError("a broken policy")
        return verdict


@dataclass
class Timed(Classes):
    """A fake policy whose every decision takes one second on its clock (given to the relay),
    however often the relay reads the clock: decision times compare across relays."""

    now: float = 0.0

    def clock(self) -> float:
        return self.now

    def statement(self, sql: str, ctx: StatementContext) -> Verdict:
        self.now += 1.0
        return super().statement(sql, ctx)


def timed_policy() -> Timed:
    return Timed(dict(FAKE_VERDICTS))


def fake_policy() -> Classes:
    return Classes(dict(FAKE_VERDICTS))


# ------------------------------------------------------------------ the two drivers


@dataclass(frozen=True)
class Read:
    #: "client", "server", "release" (approved), "deny" or "catalog" (``CATALOGS[data]``)
    side: str
    data: bytes = b""


@dataclass
class Trace:
    """What one driver saw, step by step, normalised so that both drivers compare."""

    to_server: list[bytes] = field(default_factory=list)
    to_client: list[bytes] = field(default_factory=list)
    events: list[list[tuple[object, ...]]] = field(default_factory=list)
    states: list[tuple[object, ...]] = field(default_factory=list)
    #: the requests in flight, or None while a lane statement is open (there are none then)
    pending: list[tuple[object, ...] | None] = field(default_factory=list)
    lane_queries: int = 0
    lane_results: int = 0
    #: lane statements that were extended-protocol exchanges, and those answered in the lane
    lane_exchanges: int = 0
    lane_exchange_results: int = 0


def _event(ev: object) -> tuple[object, ...]:
    if isinstance(ev, StatementAdmitted):
        return ("admitted", ev.statement_id, ev.verdict.action.value, ev.decision_seconds)
    if isinstance(ev, StatementFinished):
        return ("finished", ev.statement_id, ev.verdict.action.value, ev.rows, ev.sqlstate)
    if isinstance(ev, HoldRequested):
        return ("hold", ev.statement_id, ev.sql)
    return summarize(ev)  # type: ignore[arg-type]


class Driver:
    """One relay, fed either like the session feeds it (``lane``) or through the general path."""

    def __init__(self, policy: object, *, lane: bool, max_size: int = 1 << 30) -> None:
        self.relay = Relay(
            policy,  # type: ignore[arg-type]
            agent="lane-bot",
            database="clinic",
            max_message_size=max_size,
            clock=policy.clock if isinstance(policy, Timed) else None,
        )
        self.lane = lane
        self.trace = Trace()
        #: every verdict object seen in the relay's statements, in order of first sight
        self.verdicts: list[Verdict] = []

    def step(self, read: Read) -> tuple[bytes, bytes]:
        relay, trace = self.relay, self.trace
        up = down = b""
        events: list[tuple[object, ...]] = []
        handled = False
        if read.side == "client" and self.lane:
            got = relay.fast_query(read.data)
            if got is not None:
                sid, verdict, seconds = got
                up, handled = read.data, True
                events.append(("admitted", sid, verdict.action.value, seconds))
                trace.lane_queries += 1
                trace.lane_exchanges += read.data[:1] != b"Q"
        elif read.side == "server" and self.lane and relay.lane_open:
            extended = relay._lane is not None and relay._lane[2] is not None
            done = relay.fast_result(read.data)
            if done is not None:
                sid, verdict, rows = done
                down, handled = read.data, True
                events.append(("finished", sid, verdict.action.value, rows, ""))
                trace.lane_results += 1
                trace.lane_exchange_results += extended
        if not handled:
            if read.side == "client":
                relay.client_data(read.data)
            elif read.side == "server":
                relay.server_data(read.data)
            elif read.side == "catalog":
                relay.policy.catalog = CATALOGS[read.data]  # type: ignore[attr-defined]
            else:
                relay.release(read.side == "release", "denied by a fake reviewer")
            up, down = bytes(relay.to_server), bytes(relay.to_client)
            relay.to_server.clear()
            relay.to_client.clear()
            events += [_event(e) for e in relay.events]
            relay.events.clear()
        trace.to_server.append(up)
        trace.to_client.append(down)
        trace.events.append(events)
        state = (
            relay.transaction_status,
            replace(relay.stats),
            relay.closed,
            relay.holding,
            named_state(relay, self.verdicts),
        )
        trace.states.append(state)
        trace.pending.append(None if relay.lane_open else pending_state(relay))
        return up, down


def named_state(relay: Relay, verdicts: list[Verdict]) -> tuple[object, ...]:
    """The relay's prepared statements and portals as later messages see them: state, Sync
    segment, row shape, rows, what each refused entry stands for, and which verdict object
    each statement holds (numbered by first sight, so that identity compares across relays)."""

    def vid(v: Verdict) -> int:
        for i, known in enumerate(verdicts):
            if known is v:
                return i
        verdicts.append(v)
        return len(verdicts) - 1

    def chain(named: _Named | None) -> tuple[object, ...]:
        out: list[object] = []
        while named is not None:
            one: tuple[object, ...] = (named.state, named.segment, named.fields, named.fields_raw)
            stmt = named.statement if isinstance(named, _Portal) else named
            if isinstance(stmt, _Statement):
                # its text and verdict, and which names still hold the very statement object
                names = tuple(k for k, v in relay._statements.items() if v is stmt)
                one += (stmt.sql, vid(stmt.verdict), stmt.state, names)
            if isinstance(named, _Portal):
                one += (named.bind_raw, named.described, named.rows)
            out.append(one)
            named = named.prev
        return tuple(out)

    statements = tuple((k, chain(v)) for k, v in sorted(relay._statements.items()))
    portals = tuple((k, chain(v)) for k, v in sorted(relay._portals.items()))
    return statements, portals, relay._syncs


def pending_state(relay: Relay) -> tuple[object, ...]:
    out: list[object] = []
    for p in relay._pending:
        v = p.verdict
        verdict = None if v is None else (v.action, v.statement_class, v.reasons)
        out.append(
            (
                p.kind,
                verdict,
                p.statement_id,
                p.sql,
                p.rows,
                p.sqlstate,
                p.describe_kind,
                p.internal,
                p.replace_error,
                p.stopped,
                p.finished,
                p.base,
                None if p.portal is None else p.portal.bind_raw,
                None if p.statement is None else p.statement.sql,
                None if p.made is None else type(p.made).__name__,
            )
        )
    return tuple(out)


def both(
    policy: Callable[[], object], reads: Sequence[Read], max_size: int = 1 << 30
) -> tuple[Trace, Trace]:
    lane = Driver(policy(), lane=True, max_size=max_size)
    general = Driver(policy(), lane=False, max_size=max_size)
    for read in reads:
        lane.step(read)
        general.step(read)
    assert_same(lane.trace, general.trace)
    return lane.trace, general.trace


def assert_same(lane: Trace, general: Trace) -> None:
    for what in ("to_server", "to_client", "events", "states"):
        mine, theirs = getattr(lane, what), getattr(general, what)
        for n, (a, b) in enumerate(zip(mine, theirs, strict=True)):
            assert a == b, f"step {n}: {what} differs"
    for n, (a, b) in enumerate(zip(lane.pending, general.pending, strict=True)):
        assert a is None or a == b, f"step {n}: the requests in flight differ"


def q(sql: str) -> Read:
    return Read("client", m.Query(sql).encode())


def srv(*parts: bytes) -> Read:
    return Read("server", b"".join(parts))


def rows_answer(n: int, status: bytes = IDLE) -> bytes:
    return (
        SCRATCH_RD
        + b"".join(data_row(str(i).encode(), b"note") for i in range(n))
        + complete(f"SELECT {n}")
        + status
    )


def ssn_answer(n: int, status: bytes = IDLE) -> bytes:
    return (
        PATIENTS_RD
        + b"".join(data_row(f"123-45-{i:04}".encode()) for i in range(n))
        + complete(f"SELECT {n}")
        + status
    )


SYNTAX = pg_error("42601", 'syntax error at or near "pgproxy"')
ABORTED = pg_error("25P02", "current transaction is aborted")


@dataclass(frozen=True)
class Scenario:
    name: str
    reads: tuple[Read, ...]
    #: (lane queries, lane results) the session-like driver must have taken
    lane: tuple[int, int]
    policy: Callable[[], object] = engine
    max_size: int = 1 << 30


SCENARIOS = [
    Scenario("plain select in one read", (q(SCRATCH), srv(rows_answer(3))), (1, 1)),
    Scenario(
        "two lane statements in a row",
        (q(SCRATCH), srv(rows_answer(0)), q(INSERT), srv(complete("INSERT 0 1"), IDLE)),
        (2, 2),
    ),
    Scenario(
        "answer in two reads",
        (
            q(SCRATCH),
            srv(rows_answer(3)[:20]),
            srv(rows_answer(3)[20:]),
            q(SCRATCH),
            srv(rows_answer(1)),
        ),
        (2, 1),
    ),
    Scenario(
        "error in the middle of the result",
        (
            q(DIV0),
            srv(SCRATCH_RD, data_row(b"1", b"x"), pg_error("22012", "division by zero"), IDLE),
            q(SCRATCH),
            srv(rows_answer(1)),
        ),
        (2, 1),
    ),
    Scenario(
        "notice before and among the rows",
        (
            q(SCRATCH),
            srv(
                notice(),
                SCRATCH_RD,
                data_row(b"1", b"a"),
                notice("again"),
                data_row(b"2", b"b"),
                complete("SELECT 2"),
                IDLE,
            ),
        ),
        (1, 0),
    ),
    Scenario(
        "parameter status and notification in the same read as the answer",
        (
            q(SCRATCH),
            srv(rows_answer(2)[:-6], PARAM, NOTIFY, IDLE),
            q(SCRATCH),
            srv(NOTIFY, rows_answer(1)),
            q(SCRATCH),
            srv(rows_answer(1), PARAM),
        ),
        (3, 0),
    ),
    Scenario(
        "empty query (class empty: the general path)",
        (q(EMPTY_SQL), srv(EMPTY, IDLE), q(SCRATCH), srv(rows_answer(0))),
        (1, 1),
    ),
    Scenario(
        "empty query carried by the lane",
        (q(""), srv(EMPTY, IDLE), q("SELECT 1"), srv(rows_answer(1))),
        (2, 2),
        fake_policy,
    ),
    Scenario(
        "multi-statement query",
        (
            q(TWO),
            srv(
                RD_N,
                data_row(b"1"),
                complete("SELECT 1"),
                RD_N,
                data_row(b"2"),
                complete("SELECT 1"),
                IDLE,
            ),
        ),
        (1, 1),
    ),
    Scenario(
        "multi-statement query failing in its second statement",
        (q(TWO), srv(RD_N, data_row(b"1"), complete("SELECT 1"), pg_error("22012", "boom"), IDLE)),
        (1, 0),
    ),
    Scenario(
        "a second Query pipelined before the first is answered",
        (
            q(SCRATCH),
            q(INSERT),
            srv(rows_answer(2)),
            srv(complete("INSERT 0 1"), IDLE),
            q(SCRATCH),
            srv(rows_answer(1)),
        ),
        (2, 1),
    ),
    Scenario(
        "two Queries in one read",
        (
            Read("client", m.Query(SCRATCH).encode() + m.Query(INSERT).encode()),
            srv(rows_answer(1), complete("INSERT 0 1"), IDLE),
        ),
        (0, 0),
    ),
    Scenario(
        "a Query split across two client reads",
        (
            Read("client", m.Query(SCRATCH).encode()[:7]),
            Read("client", m.Query(SCRATCH).encode()[7:]),
            srv(rows_answer(1)),
            q(SCRATCH),
            srv(rows_answer(1)),
        ),
        (1, 1),
    ),
    Scenario(
        "BEGIN, statements, COMMIT",
        (
            q(BEGIN),
            srv(complete("BEGIN"), IN_TXN),
            q(INSERT),
            srv(complete("INSERT 0 1"), IN_TXN),
            q(SCRATCH),
            srv(rows_answer(1, IN_TXN)),
            q(COMMIT),
            srv(complete("COMMIT"), IDLE),
        ),
        (4, 4),
    ),
    Scenario(
        "a failed transaction, then ROLLBACK",
        (
            q(BEGIN),
            srv(complete("BEGIN"), IN_TXN),
            q(DIV0),
            srv(pg_error("22012", "division by zero"), FAILED),
            q(SCRATCH),
            srv(ABORTED, FAILED),
            q(COMMIT),
            srv(complete("ROLLBACK"), IDLE),
        ),
        (4, 2),
    ),
    Scenario(
        "a masked, row-limited statement (not the lane) after a lane statement",
        (
            q(SCRATCH),
            srv(rows_answer(1)),
            q(SSN),
            srv(ssn_answer(2)),
            q(SSN),
            srv(ssn_answer(3)),
            q(SCRATCH),
            srv(rows_answer(1)),
        ),
        (2, 2),
    ),
    Scenario(
        "a row-limited statement pipelined behind a lane statement",
        (
            q(SCRATCH),
            q(SSN),
            srv(rows_answer(1)),
            srv(ssn_answer(1)),
            q(SCRATCH),
            srv(rows_answer(1)),
        ),
        (2, 1),
    ),
    Scenario(
        "an allowed statement with a result policy is not the lane",
        (q(IDS), srv(IDS_RD, data_row(b"1"), complete("SELECT 1"), IDLE)),
        (0, 0),
    ),
    Scenario(
        "a blocked statement",
        (q(SLEEP), srv(SYNTAX, IDLE), q(SCRATCH), srv(rows_answer(1))),
        (1, 1),
    ),
    Scenario(
        "a held statement approved, then a lane statement",
        (
            q(DROP),
            Read("release"),
            srv(complete("DROP TABLE"), IDLE),
            q(SCRATCH),
            srv(rows_answer(1)),
        ),
        (1, 1),
    ),
    Scenario(
        "a held statement denied, with a statement sent while it was held",
        (
            q(DROP),
            q(SCRATCH),
            Read("deny"),
            srv(SYNTAX, IDLE),
            srv(rows_answer(1)),
            q(SCRATCH),
            srv(rows_answer(1)),
        ),
        (1, 1),
    ),
    Scenario(
        "a held statement approved, with a statement sent while it was held",
        (
            q(DROP),
            q(SCRATCH),
            Read("release"),
            srv(complete("DROP TABLE"), IDLE),
            srv(rows_answer(1)),
            q(SCRATCH),
            srv(rows_answer(1)),
        ),
        (1, 1),
    ),
    Scenario(
        "fake verdicts the lane must refuse",
        (
            q("SELECT limited"),
            srv(rows_answer(2)),
            q("SELECT blocked"),
            srv(SYNTAX, IDLE),
            q("SELECT held"),
            Read("release"),
            srv(rows_answer(1)),
            q("SELECT ddl"),
            srv(complete("SELECT 0"), IDLE),
            q("SELECT hold-class"),
            srv(rows_answer(0)),
            q("SELECT fine"),
            srv(rows_answer(1)),
        ),
        (1, 1),
        fake_policy,
    ),
    Scenario(
        "a lane statement answered with rows nobody asked for after it",
        (q(SCRATCH), srv(rows_answer(1), data_row(b"9", b"x"))),
        (1, 0),
    ),
    Scenario(
        "a server that changes a pinned setting inside the answer",
        (
            q(SCRATCH),
            srv(
                SCRATCH_RD,
                m.ParameterStatus("client_encoding", "LATIN1").encode(),
                complete("SELECT 0"),
                IDLE,
            ),
        ),
        (1, 0),
    ),
    Scenario(
        "a Query with invalid UTF-8",
        (Read("client", b"Q\x00\x00\x00\x07\xff\xfe\x00"),),
        (0, 0),
    ),
    Scenario(
        "a Query of exactly the maximum message size, and an answer within it",
        (Read("client", m.Query("SELECT " + "1" * 52).encode()), srv(rows_answer(1))),
        (1, 1),
        fake_policy,
        64,
    ),
    Scenario(
        "a Query over the maximum message size",
        (Read("client", m.Query("SELECT " + "1" * 53).encode()),),
        (0, 0),
        fake_policy,
        64,
    ),
    Scenario(
        "an answer with a message over the maximum size",
        (q(SCRATCH), srv(SCRATCH_RD, data_row(b"1", b"x" * 60), complete("SELECT 1"), IDLE)),
        (1, 0),
        fake_policy,
        64,
    ),
    Scenario(
        "a partial asynchronous message is buffered when the Query comes",
        (
            srv(notice()[:3]),
            q(SCRATCH),
            srv(notice()[3:], rows_answer(1)),
            q(SCRATCH),
            srv(rows_answer(1)),
        ),
        (1, 1),
    ),
    Scenario(
        "Terminate after a lane statement",
        (q(SCRATCH), srv(rows_answer(1)), Read("client", m.Terminate().encode())),
        (1, 1),
    ),
]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_the_lane_changes_no_outcome(scenario: Scenario) -> None:
    lane, _general = both(scenario.policy, scenario.reads, scenario.max_size)
    assert (lane.lane_queries, lane.lane_results) == scenario.lane


# ------------------------------------------------------------------ the extended protocol

BY_ID = "SELECT id, note FROM scratch WHERE id = $1"  # ALLOW, select: the lane
UPDATE = "UPDATE scratch SET note = $1 WHERE id = $2"  # ALLOW, update: the lane
DIV0_P = "SELECT $1::int / 0"  # ALLOW, select: the lane (the server fails it)
LONG_NAME = "a_statement_name_of_more_than_15_characters"


def ext(*msgs: m.Message) -> Read:
    return Read("client", b"".join(x.encode() for x in msgs))


def prepare(name: str, sql: str) -> Read:
    return ext(m.Parse(name, sql), m.Sync())


def bind(statement: str = "", *params: bytes | None, portal: str = "") -> m.Bind:
    formats = (0,) * len(params)
    return m.Bind(portal, statement, formats, params, (1,) if params else ())


def lane_messages(statement: str, described: bool, *params: bytes | None) -> list[m.Message]:
    """Bind to the unnamed portal, [Describe it,] Execute it with no row limit, Sync."""
    describe: list[m.Message] = [m.Describe(b"P", "")] if described else []
    return [bind(statement, *params), *describe, m.Execute("", 0), m.Sync()]


def lane_exec(statement: str, described: bool = True, *params: bytes | None) -> Read:
    return ext(*lane_messages(statement, described, *params))


def lane_parse_exec(sql: str, described: bool = True, *params: bytes | None) -> Read:
    return ext(m.Parse("", sql), *lane_messages("", described, *params))


def exec_answer(
    n: int,
    *,
    parsed: bool = False,
    described: bool = True,
    status: bytes = IDLE,
    rd: bytes = SCRATCH_RD,
) -> bytes:
    """The answer to [Parse,] Bind, [Describe,] Execute, Sync of a query returning ``n`` rows."""
    return (
        (PARSE_COMPLETE if parsed else b"")
        + BIND_COMPLETE
        + (rd if described else b"")
        + b"".join(data_row(str(i).encode(), b"note") for i in range(n))
        + complete(f"SELECT {n}")
        + status
    )


NO_STATEMENT = pg_error("26000", 'prepared statement "" does not exist')
NO_PORTAL = pg_error("34000", 'portal "" does not exist')


EXT_SCENARIOS = [
    Scenario(
        "B+D+E+S of a named prepared statement, twice",
        (
            prepare("s1", SCRATCH),
            srv(PARSE_COMPLETE, IDLE),
            lane_exec("s1"),
            srv(exec_answer(2)),
            lane_exec("s1"),
            srv(exec_answer(0)),
        ),
        (2, 2),
    ),
    Scenario(
        "B+E+S of a named prepared statement with a parameter",
        (
            prepare("s1", BY_ID),
            srv(PARSE_COMPLETE, IDLE),
            lane_exec("s1", False, b"1"),
            srv(exec_answer(1, described=False)),
            lane_exec("s1", False, None),
            srv(exec_answer(0, described=False)),
        ),
        (2, 2),
    ),
    Scenario(
        "a prepared statement with a name of more than 15 characters",
        (
            prepare(LONG_NAME, SCRATCH),
            srv(PARSE_COMPLETE, IDLE),
            lane_exec(LONG_NAME),
            srv(exec_answer(1)),
            prepare("x" * 70, SCRATCH),
            srv(PARSE_COMPLETE, IDLE),
            lane_exec("x" * 63 + "y"),  # the same name to the server (its first 63 bytes)
            srv(exec_answer(1)),
        ),
        (2, 2),
    ),
    Scenario(
        "P+B+D+E+S and P+B+E+S of the unnamed statement",
        (
            lane_parse_exec(BY_ID, True, b"1"),
            srv(exec_answer(1, parsed=True)),
            lane_parse_exec(UPDATE, False, b"a", b"1"),
            srv(PARSE_COMPLETE, BIND_COMPLETE, complete("UPDATE 1"), IDLE),
            lane_exec("", True, b"x", b"2"),  # the unnamed statement again
            srv(BIND_COMPLETE, NO_DATA, complete("UPDATE 0"), IDLE),
        ),
        (3, 3),
    ),
    Scenario(
        "NoData answers",
        (
            lane_parse_exec(INSERT),
            srv(PARSE_COMPLETE, BIND_COMPLETE, NO_DATA, complete("INSERT 0 1"), IDLE),
            prepare("ins", INSERT),
            srv(PARSE_COMPLETE, IDLE),
            lane_exec("ins"),
            srv(BIND_COMPLETE, NO_DATA, complete("INSERT 0 1"), IDLE),
            ext(m.Describe(b"P", ""), m.Sync()),
            srv(NO_DATA, IDLE),
        ),
        (2, 2),
    ),
    Scenario(
        "EmptyQueryResponse carried by the lane",
        (
            lane_parse_exec(""),
            srv(PARSE_COMPLETE, BIND_COMPLETE, NO_DATA, EMPTY, IDLE),
            lane_exec("", False),
            srv(BIND_COMPLETE, EMPTY, IDLE),
        ),
        (2, 2),
        fake_policy,
    ),
    Scenario(
        "an empty statement (class empty: the general path)",
        (
            lane_parse_exec(EMPTY_SQL),
            srv(PARSE_COMPLETE, BIND_COMPLETE, NO_DATA, EMPTY, IDLE),
            lane_exec(""),
            srv(BIND_COMPLETE, NO_DATA, EMPTY, IDLE),
        ),
        (0, 0),
    ),
    Scenario(
        "a Parse error, then the failed unnamed statement executed",
        (
            lane_parse_exec(SCRATCH),
            srv(pg_error("42P01", 'relation "scratch" does not exist'), IDLE),
            lane_exec(""),  # no unnamed statement: refused by the general path
            srv(NO_STATEMENT, IDLE),
            lane_parse_exec(SCRATCH),
            srv(exec_answer(1, parsed=True)),
        ),
        (2, 1),
    ),
    Scenario(
        "a Bind error, then the unnamed statement bound again",
        (
            lane_parse_exec(BY_ID, True, b"x"),
            srv(PARSE_COMPLETE, pg_error("22P02", "invalid input syntax for type integer"), IDLE),
            lane_exec("", True, b"1"),
            srv(exec_answer(1)),
            ext(m.Execute("", 0), m.Sync()),  # the portal of the failed Bind is gone
            srv(NO_PORTAL, IDLE),
        ),
        (2, 1),
    ),
    Scenario(
        "an Execute error, unnamed and named",
        (
            lane_parse_exec(DIV0_P, True, b"1"),
            srv(PARSE_COMPLETE, BIND_COMPLETE, RD_N, pg_error("22012", "division by zero"), IDLE),
            prepare("d", DIV0_P),
            srv(PARSE_COMPLETE, IDLE),
            lane_exec("d", False, b"1"),
            srv(BIND_COMPLETE, data_row(b"1"), pg_error("22012", "division by zero"), IDLE),
            lane_exec("d", True, b"2"),
            srv(BIND_COMPLETE, RD_N, pg_error("22012", "division by zero"), IDLE),
            lane_exec("s-never-prepared"),
            srv(NO_STATEMENT, IDLE),
        ),
        (3, 0),
    ),
    Scenario(
        "an error inside a transaction, then ROLLBACK",
        (
            q(BEGIN),
            srv(complete("BEGIN"), IN_TXN),
            lane_parse_exec(DIV0_P, False, b"1"),
            srv(PARSE_COMPLETE, BIND_COMPLETE, pg_error("22012", "division by zero"), FAILED),
            lane_parse_exec(SCRATCH),
            srv(ABORTED, FAILED),
            q(ROLLBACK),
            srv(complete("ROLLBACK"), IDLE),
        ),
        (4, 2),
    ),
    Scenario(
        "a notice after ParseComplete",
        (lane_parse_exec(SCRATCH), srv(PARSE_COMPLETE, notice(), exec_answer(1))),
        (1, 0),
    ),
    Scenario(
        "parameter status after BindComplete, and a notification among the rows",
        (
            prepare("s1", SCRATCH),
            srv(PARSE_COMPLETE, IDLE),
            lane_exec("s1"),
            srv(BIND_COMPLETE, PARAM, SCRATCH_RD, data_row(b"1", b"a"), complete("SELECT 1"), IDLE),
            lane_exec("s1"),
            srv(
                BIND_COMPLETE, SCRATCH_RD, data_row(b"1", b"a"), NOTIFY, complete("SELECT 1"), IDLE
            ),
            lane_exec("s1"),
            srv(exec_answer(1), NOTIFY),  # after the ReadyForQuery, in the same read
            lane_exec("s1"),
            srv(exec_answer(1)),
        ),
        (4, 1),
    ),
    Scenario(
        "a pinned setting changed inside an extended answer",
        (
            lane_parse_exec(SCRATCH),
            srv(
                PARSE_COMPLETE,
                BIND_COMPLETE,
                m.ParameterStatus("client_encoding", "LATIN1").encode(),
                SCRATCH_RD,
                complete("SELECT 0"),
                IDLE,
            ),
        ),
        (1, 0),
    ),
    Scenario(
        "an extended answer split across reads",
        (
            lane_parse_exec(SCRATCH),
            srv(exec_answer(2, parsed=True)[:3]),
            srv(exec_answer(2, parsed=True)[3:40]),
            srv(exec_answer(2, parsed=True)[40:]),
            lane_exec(""),
            srv(exec_answer(2)[:-6]),
            srv(exec_answer(2)[-6:]),
            lane_exec(""),
            srv(exec_answer(1)),
        ),
        (3, 1),
    ),
    Scenario(
        "a second exchange pipelined before the first is answered",
        (
            lane_parse_exec(SCRATCH),
            lane_parse_exec(INSERT, False),
            srv(exec_answer(2, parsed=True)),
            srv(PARSE_COMPLETE, BIND_COMPLETE, complete("INSERT 0 1"), IDLE),
            lane_exec("", False),
            srv(BIND_COMPLETE, complete("INSERT 0 1"), IDLE),
        ),
        (2, 1),
    ),
    Scenario(
        "two exchanges in one read",
        (
            Read("client", lane_parse_exec(SCRATCH).data + lane_exec("").data),
            srv(exec_answer(1, parsed=True), exec_answer(1)),
        ),
        (0, 0),
    ),
    Scenario(
        "a Query pipelined behind an extended exchange, and the other way round",
        (
            lane_exec("nothing"),
            q(SCRATCH),
            srv(NO_STATEMENT, IDLE),
            srv(rows_answer(1)),
            q(SCRATCH),
            lane_parse_exec(SCRATCH),
            srv(rows_answer(1)),
            srv(exec_answer(1, parsed=True)),
        ),
        (1, 0),
    ),
    Scenario(
        "the lane's portal executed again in a transaction, with and without a row limit",
        (
            q(BEGIN),
            srv(complete("BEGIN"), IN_TXN),
            lane_parse_exec(SCRATCH),
            srv(exec_answer(2, parsed=True, status=IN_TXN)),
            ext(m.Execute("", 0), m.Sync()),
            srv(complete("SELECT 0"), IN_TXN),
            ext(m.Execute("", 1), m.Sync()),
            srv(complete("SELECT 0"), IN_TXN),
            ext(m.Describe(b"P", ""), m.Sync()),
            srv(SCRATCH_RD, IN_TXN),
            q(COMMIT),
            srv(complete("COMMIT"), IDLE),
        ),
        (3, 3),
    ),
    Scenario(
        "the lane's undescribed portal described, then executed with a row limit",
        (
            q(BEGIN),
            srv(complete("BEGIN"), IN_TXN),
            prepare("s1", SCRATCH),
            srv(PARSE_COMPLETE, IN_TXN),
            ext(bind("s1"), m.Execute("", 1), m.Sync()),  # a row limit: not the lane
            srv(BIND_COMPLETE, data_row(b"1", b"a"), SUSPENDED, IN_TXN),
            lane_exec("s1", False),
            srv(exec_answer(3, described=False, status=IN_TXN)),
            ext(m.Describe(b"P", ""), m.Execute("", 2), m.Sync()),
            srv(SCRATCH_RD, complete("SELECT 0"), IN_TXN),
            q(COMMIT),
            srv(complete("COMMIT"), IDLE),
        ),
        (3, 3),
    ),
    Scenario(
        "a prepared statement whose Parse is unanswered",
        (
            prepare("s1", SCRATCH),
            lane_exec("s1"),
            srv(PARSE_COMPLETE, IDLE),
            srv(exec_answer(1)),
            lane_exec("s1"),
            srv(exec_answer(1)),
        ),
        (1, 1),
    ),
    Scenario(
        "a prepared statement whose Parse failed",
        (
            prepare("s1", SCRATCH),
            srv(pg_error("42P01", 'relation "scratch" does not exist'), IDLE),
            lane_exec("s1"),
            srv(NO_STATEMENT, IDLE),
        ),
        (0, 0),
    ),
    Scenario(
        "blocked, held and masked prepared statements",
        (
            prepare("b", SLEEP),
            srv(SYNTAX, IDLE),
            lane_exec("b"),
            srv(NO_STATEMENT, IDLE),
            prepare("h", DROP),
            srv(PARSE_COMPLETE, IDLE),
            lane_exec("h"),
            Read("deny"),
            srv(BIND_COMPLETE, NO_DATA, SYNTAX, IDLE),
            lane_exec("h"),
            Read("release"),
            srv(BIND_COMPLETE, NO_DATA, complete("DROP TABLE"), IDLE),
            prepare("m", SSN),
            srv(PARSE_COMPLETE, IDLE),
            lane_exec("m"),
            srv(BIND_COMPLETE, PATIENTS_RD, data_row(b"123-45-0001"), complete("SELECT 1")),
            srv(IDLE),
            lane_exec("m", False),
            srv(PATIENTS_RD, BIND_COMPLETE, data_row(b"123-45-0001"), complete("SELECT 1")),
            srv(IDLE),
            prepare("i", IDS),
            srv(PARSE_COMPLETE, IDLE),
            lane_exec("i"),
            srv(BIND_COMPLETE, IDS_RD, data_row(b"1"), complete("SELECT 1"), IDLE),
        ),
        (0, 0),
    ),
    Scenario(
        "fake verdicts the lane must refuse, prepared",
        (
            prepare("f", "SELECT limited"),
            srv(PARSE_COMPLETE, IDLE),
            lane_exec("f"),
            # a row limit: the Sync waits until the Execute is answered (after a Flush)
            srv(exec_answer(1)[:-6]),
            srv(IDLE),
            *(
                r
                for sql in ("SELECT ddl", "SELECT hold-class")
                for r in (
                    ext(m.Close(b"S", "f"), m.Parse("f", sql), m.Sync()),
                    srv(CLOSE_COMPLETE, PARSE_COMPLETE, IDLE),
                    lane_exec("f"),
                    srv(exec_answer(1)),
                )
            ),
            lane_parse_exec("SELECT limited"),
            srv(exec_answer(1, parsed=True)[:-6]),
            srv(IDLE),
            lane_parse_exec("SELECT fine"),
            srv(exec_answer(1, parsed=True)),
        ),
        (1, 1),
        fake_policy,
    ),
    Scenario(
        "named portals",
        (
            prepare("s1", SCRATCH),
            srv(PARSE_COMPLETE, IDLE),
            ext(bind("s1", portal="p1"), m.Describe(b"P", "p1"), m.Execute("p1", 0), m.Sync()),
            srv(exec_answer(1)),
            ext(bind("s1", portal="p1"), m.Describe(b"P", ""), m.Execute("", 0), m.Sync()),
            srv(BIND_COMPLETE, NO_PORTAL, IDLE),
            ext(m.Parse("", SCRATCH), bind(portal="p2"), m.Execute("p2", 0), m.Sync()),
            srv(exec_answer(1, parsed=True, described=False)),
            ext(m.Parse("s2", SCRATCH), *lane_messages("s2", True)),  # a named Parse
            srv(exec_answer(1, parsed=True)),
        ),
        (0, 0),
    ),
    Scenario(
        "a catalog change between Parse and Execute: allowed again, decided anew",
        (
            prepare("s1", SCRATCH),
            srv(PARSE_COMPLETE, IDLE),
            lane_exec("s1"),
            srv(exec_answer(1)),
            Read("catalog", b"more"),
            lane_exec("s1"),  # revalidate gives a new verdict: the general path records it
            srv(exec_answer(1)),
            lane_exec("s1"),  # the new verdict is the statement's now
            srv(exec_answer(1)),
            lane_parse_exec(SCRATCH),
            srv(exec_answer(1, parsed=True)),
        ),
        (3, 3),
    ),
    Scenario(
        "a catalog change between Parse and Execute: blocked now",
        (
            prepare("s1", SCRATCH),
            srv(PARSE_COMPLETE, IDLE),
            Read("catalog", b"gone"),
            lane_exec("s1"),
            srv(BIND_COMPLETE, SCRATCH_RD, SYNTAX, IDLE),
            lane_exec("s1", False),
            srv(BIND_COMPLETE, SYNTAX, IDLE),
            lane_parse_exec(SCRATCH),
            srv(SYNTAX, IDLE),
        ),
        (0, 0),
    ),
    Scenario(
        "an SQL PREPARE takes over a prepared statement's name",
        (
            prepare("s1", SCRATCH),
            srv(PARSE_COMPLETE, IDLE),
            lane_exec("s1"),
            srv(exec_answer(1)),
            q("DEALLOCATE s1"),
            srv(complete("DEALLOCATE"), IDLE),
            q("PREPARE s1 AS SELECT 1"),
            srv(complete("PREPARE"), IDLE),
            lane_exec("s1"),
            srv(BIND_COMPLETE, RD_N, SYNTAX, IDLE),
        ),
        (1, 1),
    ),
    Scenario(
        "a policy that fails while deciding or revalidating",
        (
            lane_parse_exec("SELECT raise"),
            srv(PARSE_COMPLETE, BIND_COMPLETE, RD_N, SYNTAX, IDLE),
            prepare("r", "SELECT reraise"),
            srv(PARSE_COMPLETE, IDLE),
            lane_exec("r"),
            srv(BIND_COMPLETE, RD_N, SYNTAX, IDLE),
            lane_parse_exec("SELECT fine"),
            srv(exec_answer(1, parsed=True)),
        ),
        (1, 1),
        lambda: Failing(dict(FAKE_VERDICTS)),
    ),
    Scenario(
        "Close of the unnamed statement and portal after a lane exchange",
        (
            lane_parse_exec(SCRATCH),
            srv(exec_answer(1, parsed=True)),
            ext(m.Close(b"P", ""), m.Sync()),
            srv(CLOSE_COMPLETE, IDLE),
            ext(m.Execute("", 0), m.Sync()),
            srv(NO_PORTAL, IDLE),
            lane_exec(""),
            srv(exec_answer(1)),
            ext(m.Close(b"S", ""), m.Sync()),
            srv(CLOSE_COMPLETE, IDLE),
            lane_exec(""),
            srv(NO_STATEMENT, IDLE),
            prepare("s1", SCRATCH),
            srv(PARSE_COMPLETE, IDLE),
            lane_exec("s1"),
            srv(exec_answer(1)),
            ext(m.Close(b"S", "s1"), m.Sync()),
            srv(CLOSE_COMPLETE, IDLE),
            lane_exec("s1"),
            srv(NO_STATEMENT, IDLE),
        ),
        (2, 2),
    ),
    Scenario(
        "a Parse and a Bind of exactly the maximum message size",
        (
            lane_parse_exec("SELECT " + "1" * 49, False),
            srv(PARSE_COMPLETE, BIND_COMPLETE, data_row(b"1"), complete("SELECT 1"), IDLE),
            lane_exec("", False, b"x" * 44),
            srv(BIND_COMPLETE, data_row(b"1"), complete("SELECT 1"), IDLE),
        ),
        (2, 2),
        fake_policy,
        64,
    ),
    Scenario(
        "a Parse over the maximum message size",
        (lane_parse_exec("SELECT " + "1" * 50, False),),
        (0, 0),
        fake_policy,
        64,
    ),
    Scenario(
        "a Bind over the maximum message size",
        (lane_exec("", False, b"x" * 45),),
        (0, 0),
        fake_policy,
        64,
    ),
    Scenario(
        "an extended answer with a message over the maximum size",
        (
            lane_parse_exec("SELECT 1", False),
            srv(PARSE_COMPLETE, BIND_COMPLETE, data_row(b"x" * 60), complete("SELECT 1"), IDLE),
        ),
        (1, 0),
        fake_policy,
        64,
    ),
]


TIMED_SCENARIOS = [
    Scenario(
        "decision times of Queries and unnamed Parses",
        (
            q("SELECT 1"),
            srv(rows_answer(1)),
            lane_parse_exec("SELECT 2"),
            srv(exec_answer(1, parsed=True)),
            q("SELECT limited"),
            srv(rows_answer(1)),
            lane_parse_exec("SELECT 3"),
            srv(pg_error("42601", "syntax"), IDLE),
        ),
        (3, 2),
        timed_policy,
    ),
]


@pytest.mark.parametrize("scenario", TIMED_SCENARIOS, ids=[s.name for s in TIMED_SCENARIOS])
def test_the_lane_reports_decision_times_as_the_general_path(scenario: Scenario) -> None:
    lane, _general = both(scenario.policy, scenario.reads, scenario.max_size)
    assert (lane.lane_queries, lane.lane_results) == scenario.lane


def test_the_lane_reports_a_prepared_statements_decision_time() -> None:
    reads = (
        prepare("s1", "SELECT 1"),
        srv(PARSE_COMPLETE, IDLE),
        lane_exec("s1"),
        srv(exec_answer(1)),
    )
    both(timed_policy, reads)


def test_the_lane_leaves_no_decision_time_behind() -> None:
    lane = Driver(timed_policy(), lane=True)
    general = Driver(timed_policy(), lane=False)
    reads = (
        q(BEGIN),
        srv(complete("BEGIN"), IN_TXN),
        prepare("s1", "SELECT 1"),
        srv(PARSE_COMPLETE, IN_TXN),
        lane_exec("s1"),
        srv(exec_answer(1, status=IN_TXN)),
        ext(m.Execute("", 0), m.Sync()),
        srv(complete("SELECT 0"), IN_TXN),
    )
    for read in reads:
        lane.step(read)
        general.step(read)
    # the Bind/Execute's own report aside, the later Execute must be reported alike
    assert lane.trace.events[-2] == general.trace.events[-2]


@pytest.mark.parametrize("scenario", EXT_SCENARIOS, ids=[s.name for s in EXT_SCENARIOS])
def test_the_lane_changes_no_extended_outcome(scenario: Scenario) -> None:
    lane, _general = both(scenario.policy, scenario.reads, scenario.max_size)
    assert (lane.lane_queries, lane.lane_results) == scenario.lane


def test_statements_the_lane_must_not_take() -> None:
    """A statement masked, blocked, held, row-limited, with a result policy or of another class:
    ``fast_query`` declines it and leaves the relay untouched."""
    for make, sql in [
        (engine, SSN),
        (engine, IDS),
        (engine, SLEEP),
        (engine, DROP),
        (engine, EMPTY_SQL),
        (engine, "PREPARE p AS SELECT 1"),
        (fake_policy, "SELECT limited"),
        (fake_policy, "SELECT blocked"),
        (fake_policy, "SELECT held"),
        (fake_policy, "SELECT ddl"),
        (fake_policy, "SELECT hold-class"),
    ]:
        relay = Relay(make(), agent="lane-bot", database="clinic")  # type: ignore[arg-type]
        assert relay.fast_query(m.Query(sql).encode()) is None, sql
        assert not relay.lane_open
        assert relay.stats.statements == 0 and relay.stats.bytes_from_client == 0


def test_extended_exchanges_the_lane_must_not_take() -> None:
    """Bind/Execute shapes and statements the lane declines: ``fast_query`` returns None and
    leaves the relay as it was (its statements, portals, Syncs and counters)."""
    relay = Relay(engine(), agent="lane-bot", database="clinic", max_message_size=200)
    prepared = {"s1": SCRATCH, "ssn": SSN, "ids": IDS, "drop": DROP, "sleep": SLEEP}
    relay.client_data(b"".join(m.Parse(n, sql).encode() for n, sql in prepared.items()))
    relay.client_data(m.Sync().encode())
    relay.server_data(PARSE_COMPLETE * 4 + SYNTAX + IDLE)
    relay.to_server.clear()  # written out, as the session does after each call
    relay.to_client.clear()
    assert relay._statements["s1"].state == 1 and relay._statements["sleep"].state == 2
    ok = lane_exec("s1").data
    declined = [
        lane_exec("ssn").data,  # masked
        lane_exec("ids").data,  # a result policy
        lane_exec("drop").data,  # held at Execute
        lane_exec("sleep").data,  # blocked
        lane_exec("unknown").data,
        ext(bind("s1", portal="p"), m.Execute("p", 0), m.Sync()).data,  # a named portal
        ext(bind("s1", portal="p"), m.Describe(b"P", ""), m.Execute("", 0), m.Sync()).data,
        ext(bind("s1"), m.Describe(b"P", "p"), m.Execute("", 0), m.Sync()).data,
        ext(bind("s1"), m.Describe(b"S", "s1"), m.Execute("", 0), m.Sync()).data,
        ext(bind("s1"), m.Execute("", 1), m.Sync()).data,  # a row limit
        ext(bind("s1"), m.Execute("", 0)).data,  # no Sync
        ext(bind("s1"), m.Execute("", 0), m.Flush(), m.Sync()).data,
        ext(bind("s1"), m.Execute("", 0), m.Sync(), m.Sync()).data,
        ext(bind("s1"), bind("s1"), m.Execute("", 0), m.Sync()).data,
        ext(m.Parse("", SCRATCH), m.Sync()).data,
        ext(m.Parse("", SCRATCH), bind("s1"), m.Execute("", 0), m.Sync()).data,
        ext(m.Parse("x", SCRATCH), *lane_messages("x", True)).data,  # a named Parse
        lane_parse_exec(SSN).data,
        lane_parse_exec(DROP).data,
        lane_parse_exec(EMPTY_SQL).data,
        lane_parse_exec("PREPARE p AS SELECT 1").data,
        lane_exec("s1", True, b"x" * 200).data,  # a Bind over the maximum message size
        lane_parse_exec("SELECT 1" + " " * 200).data,  # a Parse over it
        ok[:-1],
        ok + b"\x00",
        set_length(ok, len(ok) - 1),  # the Bind's length runs into the Describe
        b"B\x00\x00\x00\x08\x00\xff\x00" + ok[-21:],  # a statement name not UTF-8
        m.Describe(b"P", "").encode() + m.Execute("", 0).encode() + m.Sync().encode(),
    ]
    for data in declined:
        before = (named_state(relay, []), replace(relay.stats), bytes(relay.to_server))
        assert relay.fast_query(data) is None, data
        assert not relay.lane_open
        assert (named_state(relay, []), replace(relay.stats), bytes(relay.to_server)) == before
    assert relay.fast_query(ok) is not None  # and the lane is open to what it takes
    # a Parse still unanswered: nothing may take the lane until it is
    relay.server_data(exec_answer(1))
    relay.client_data(prepare("late", SCRATCH).data)
    assert relay.fast_query(lane_exec("late").data) is None
    assert relay.fast_query(ok) is None


def test_the_lane_is_closed_while_anything_else_is_going_on() -> None:
    query = m.Query(SCRATCH).encode()
    relay = Relay(engine(), agent="lane-bot", database="clinic")
    assert relay.fast_query(query) is not None
    assert relay.fast_query(query) is None  # one lane statement at a time
    relay.server_data(rows_answer(1))  # the general path takes it over
    assert not relay.lane_open and relay.fast_result(rows_answer(1)) is None
    relay.client_data(query[:3])  # a partial message is buffered
    assert relay.fast_query(query) is None
    relay.client_data(query[3:])
    relay.server_data(rows_answer(1)[:4])  # a partial answer is buffered
    assert relay.fast_query(query) is None
    relay.server_data(rows_answer(1)[4:])
    assert relay.fast_query(query) is None  # what the general path queued is not written yet
    relay.to_server.clear()
    assert relay.fast_query(query) is None
    relay.to_client.clear()
    assert relay.fast_query(query) is not None
    assert relay.fast_result(rows_answer(1)) is not None
    relay.client_data(m.Terminate().encode())
    assert relay.closed and relay.fast_query(query) is None


# ------------------------------------------------------------------ any split of an answer


@RELAY_PROPS
@given(
    st.sampled_from(
        [
            (SCRATCH, rows_answer(3)),
            (
                TWO,
                RD_N
                + data_row(b"1")
                + complete("SELECT 1")
                + RD_N
                + data_row(b"2")
                + complete("SELECT 1")
                + IDLE,
            ),
            (DIV0, SCRATCH_RD + data_row(b"1", b"x") + pg_error("22012", "x") + IDLE),
            (SCRATCH, notice() + rows_answer(2)[:-6] + PARAM + NOTIFY + IDLE),
            (SSN, ssn_answer(3)),
            (BEGIN, complete("BEGIN") + IN_TXN),
        ]
    ),
    st.lists(st.integers(0, 200), max_size=3),
)
def test_any_split_of_an_answer(case: tuple[str, bytes], cuts: list[int]) -> None:
    sql, answer = case
    points = sorted({c % (len(answer) + 1) for c in cuts})
    pieces = [answer[a:b] for a, b in zip([0, *points], [*points, len(answer)], strict=True)]
    reads = [q(sql), *(srv(p) for p in pieces), q(SCRATCH), srv(rows_answer(1))]
    lane, _ = both(engine, reads)
    assert lane.lane_queries >= 1  # the last SELECT always takes the lane


PREPARED = (prepare("s1", SCRATCH), srv(PARSE_COMPLETE, IDLE))


@RELAY_PROPS
@given(
    st.sampled_from(
        [
            ((), lane_parse_exec(SCRATCH), exec_answer(3, parsed=True)),
            ((), lane_parse_exec(INSERT, False), exec_answer(0, parsed=True, described=False)),
            (PREPARED, lane_exec("s1"), exec_answer(2)),
            (PREPARED, lane_exec("s1", False), exec_answer(2, described=False)),
            (
                (),
                lane_parse_exec(INSERT),
                PARSE_COMPLETE + BIND_COMPLETE + NO_DATA + complete("INSERT 0 1") + IDLE,
            ),
            (
                (),
                lane_parse_exec(DIV0_P, True, b"1"),
                PARSE_COMPLETE + BIND_COMPLETE + RD_N + pg_error("22012", "zero") + IDLE,
            ),
            ((), lane_parse_exec(SCRATCH), pg_error("42P01", "no scratch") + IDLE),
            (PREPARED, lane_exec("s1"), BIND_COMPLETE + notice() + exec_answer(1)[5:]),
            (PREPARED, lane_exec("s1"), exec_answer(1)[:-6] + NOTIFY + PARAM + IDLE),
        ]
    ),
    st.lists(st.integers(0, 200), max_size=3),
)
def test_any_split_of_an_extended_answer(
    case: tuple[tuple[Read, ...], Read, bytes], cuts: list[int]
) -> None:
    before, request, answer = case
    points = sorted({c % (len(answer) + 1) for c in cuts})
    pieces = [answer[a:b] for a, b in zip([0, *points], [*points, len(answer)], strict=True)]
    reads = [*before, request, *(srv(p) for p in pieces), lane_parse_exec(SCRATCH)]
    reads.append(srv(exec_answer(1, parsed=True)))
    lane, _ = both(engine, reads)
    assert lane.lane_queries >= 1  # the last exchange always takes the lane


# ------------------------------------------------------------------ random conversations


@dataclass
class SimPortal:
    """A portal of the simulated server: its statement, and once run, what is left to send."""

    sql: str
    run: bool = False
    rows: list[bytes] = field(default_factory=list)
    tail: bytes = b""


#: what the simulated server makes of a statement (besides BEGIN/COMMIT/ROLLBACK): its row
#: shape (None: no rows), rows, and how it ends (a completion, or an error for True)
RESULTS: dict[str, tuple[bytes | None, list[bytes], bytes, bool]] = {
    SCRATCH: (SCRATCH_RD, [data_row(b"0", b"note"), data_row(b"1", b"note")], b"", False),
    INSERT: (None, [], complete("INSERT 0 1"), False),
    DIV0: (SCRATCH_RD, [data_row(b"1", b"x")], pg_error("22012", "zero"), True),
    SSN: (PATIENTS_RD, [data_row(f"123-45-{i:04}".encode()) for i in range(3)], b"", False),
    IDS: (IDS_RD, [data_row(b"1")], b"", False),
    DROP: (None, [], notice("dropping") + complete("DROP TABLE"), False),
    EMPTY_SQL: (None, [], EMPTY, False),
}


class FakeServer:
    """Answers what the relay sends as a Postgres would: Queries, and Parse/Bind/Describe/
    Execute/Close/Sync with named and unnamed statements and portals, tracking transaction
    state and skipping to the next Sync after an error in an extended exchange. Its output is
    handed out in reads of the test's choosing."""

    def __init__(self) -> None:
        self.status = b"I"
        self.inbox = b""
        self.outbox = b""
        self.statements: dict[str, str] = {}
        self.portals: dict[str, SimPortal] = {}
        self.skipping = False

    def receive(self, data: bytes) -> None:
        self.inbox += data
        while len(self.inbox) >= 5:
            length = int.from_bytes(self.inbox[1:5])
            if len(self.inbox) < 1 + length:
                return
            msg, self.inbox = self.inbox[: 1 + length], self.inbox[1 + length :]
            tag, body = msg[:1], memoryview(msg)[5:]
            if tag == b"S":
                self.skipping = False
                if self.status == b"I":  # the implicit transaction ends, and its portals
                    self.portals.clear()
                self.outbox += self._ready()
            elif self.skipping or tag in (b"H", b"X"):
                continue  # an error earlier in the extended exchange: ignored until Sync
            elif tag == b"Q":
                self.outbox += self.answer(m.Query.decode(body).sql)
            elif tag in (b"P", b"B", b"D", b"E", b"C"):
                self.outbox += self.extended(m.decode_frontend(tag, body))
            else:
                raise AssertionError(f"the relay sent {msg[:1]!r}, not simulated")

    def _ready(self) -> bytes:
        return m.ReadyForQuery(self.status).encode()

    def _fail(self, error: bytes) -> bytes:
        if self.status == b"T":
            self.status = b"E"
        return error + self._ready()

    def _aborted(self, sql: str) -> bool:
        return self.status == b"E" and sql not in (COMMIT, ROLLBACK)

    def _transaction(self, sql: str) -> bytes | None:
        """Run BEGIN, COMMIT or ROLLBACK: their completion; None for other statements."""
        if sql == BEGIN:
            self.status = b"T"
            return complete("BEGIN")
        if sql in (COMMIT, ROLLBACK):
            tag = "ROLLBACK" if sql == ROLLBACK or self.status == b"E" else "COMMIT"
            self.status = b"I"
            return complete(tag)
        return None

    def answer(self, sql: str) -> bytes:
        if self._aborted(sql):
            return ABORTED + self._ready()
        if sql == BLOCKED_SQL:
            return self._fail(SYNTAX)
        done = self._transaction(sql)
        if done is not None:
            return done + self._ready()
        if sql == TWO:
            one = RD_N + data_row(b"1") + complete("SELECT 1")
            return one + one + self._ready()
        if sql not in RESULTS:
            raise AssertionError(f"no simulated answer for {sql!r}")
        rd, rows, tail, failed = RESULTS[sql]
        out = (rd or b"") + b"".join(rows)
        if failed:
            return out + self._fail(tail)
        return out + (tail or complete(f"SELECT {len(rows)}")) + self._ready()

    def _error(self, error: bytes) -> bytes:
        self.skipping = True
        if self.status == b"T":
            self.status = b"E"
        return error

    def extended(self, msg: m.Message) -> bytes:
        if isinstance(msg, m.Parse):
            if not msg.name:
                self.statements.pop("", None)  # dropped before the new one is parsed
            if msg.sql in (BLOCKED_SQL, TWO):
                return self._error(SYNTAX)
            if self._aborted(msg.sql):
                return self._error(ABORTED)
            if msg.name in self.statements:
                return self._error(pg_error("42P05", "prepared statement already exists"))
            self.statements[msg.name] = msg.sql
            return PARSE_COMPLETE
        if isinstance(msg, m.Bind):
            sql = self.statements.get(msg.statement)
            if sql is None:
                return self._error(NO_STATEMENT)
            if self._aborted(sql):
                return self._error(ABORTED)
            if msg.portal and msg.portal in self.portals:
                return self._error(pg_error("42P03", "cursor already exists"))
            self.portals[msg.portal] = SimPortal(sql)
            return BIND_COMPLETE
        if isinstance(msg, m.Describe):
            if msg.kind == b"S":
                sql = self.statements.get(msg.name)
                if sql is None:
                    return self._error(NO_STATEMENT)
                head = m.ParameterDescription(()).encode()
            else:
                portal = self.portals.get(msg.name)
                if portal is None:
                    return self._error(NO_PORTAL)
                sql, head = portal.sql, b""
            rd = RD_N if sql == TWO else RESULTS.get(sql, (None,))[0]
            return head + (rd or NO_DATA)
        if isinstance(msg, m.Execute):
            portal = self.portals.get(msg.portal)
            if portal is None:
                return self._error(NO_PORTAL)
            if self._aborted(portal.sql):
                return self._error(ABORTED)
            if not portal.run:
                portal.run = True
                done = self._transaction(portal.sql)
                if done is not None:
                    portal.tail = done
                else:
                    _rd, rows, tail, failed = RESULTS[portal.sql]
                    portal.rows = list(rows)
                    portal.tail = tail or complete(f"SELECT {len(rows)}")
                    if failed:
                        del self.portals[msg.portal]
                        return b"".join(rows) + self._error(tail)
            limit = msg.max_rows if msg.max_rows > 0 else len(portal.rows)
            sent, portal.rows = portal.rows[:limit], portal.rows[limit:]
            if portal.rows:
                return b"".join(sent) + SUSPENDED
            tail, portal.tail = portal.tail, complete("SELECT 0")  # run to completion
            return b"".join(sent) + tail
        if isinstance(msg, m.Close):
            (self.statements if msg.kind == b"S" else self.portals).pop(msg.name, None)
            return CLOSE_COMPLETE
        raise AssertionError(f"the relay sent {msg!r}, not simulated")


REQUESTS = [
    SCRATCH,
    SCRATCH,
    INSERT,
    TWO,
    BEGIN,
    COMMIT,
    ROLLBACK,
    DIV0,
    SSN,
    IDS,
    SLEEP,
    DROP,
    EMPTY_SQL,
]
ASYNC = [notice("async"), PARAM, NOTIFY]
#: named statements are prepared once each (a second Parse of a name is refused by the server)
NAMED = {"s_scratch": SCRATCH, "s_insert": INSERT, "s_div0": DIV0, "s_ssn": SSN, "s_drop": DROP}
EXT_REQUESTS = [
    *(prepare(name, sql).data for name, sql in NAMED.items()),
    prepare("s_sleep", SLEEP).data,
    *(lane_exec(name, described).data for name in NAMED for described in (True, False)),
    lane_exec("s_scratch").data,
    lane_exec("s_sleep").data,
    *(
        lane_parse_exec(sql, described).data
        for sql in (SCRATCH, INSERT, DIV0, SSN, IDS, EMPTY_SQL, BEGIN, COMMIT)
        for described in (True, False)
    ),
    lane_parse_exec(SCRATCH).data,
    # the unnamed portal again (inside a transaction it outlives its Sync), and Close
    ext(m.Execute("", 0), m.Sync()).data,
    ext(m.Execute("", 1), m.Sync()).data,
    ext(m.Describe(b"P", ""), m.Sync()).data,
    ext(m.Close(b"S", ""), m.Close(b"P", ""), m.Sync()).data,
]
ANY_REQUEST = [*(m.Query(sql).encode() for sql in REQUESTS), *EXT_REQUESTS]

client_action = st.one_of(
    st.tuples(st.just("query"), st.sampled_from(REQUESTS)),
    st.tuples(st.just("send"), st.sampled_from(EXT_REQUESTS)),
    st.tuples(st.just("send"), st.sampled_from(EXT_REQUESTS)),
    st.tuples(st.just("pipeline"), st.lists(st.sampled_from(ANY_REQUEST), min_size=2, max_size=3)),
    st.tuples(st.just("decide"), st.booleans()),
)
server_action = st.one_of(
    st.tuples(st.just("read all"), st.none()),
    st.tuples(st.just("read"), st.integers(1, 400)),
    st.tuples(st.just("async"), st.sampled_from(ASYNC)),
    st.tuples(st.just("decide"), st.booleans()),
)
#: rounds of one client action then a few server-side ones (reads of what the server has to
#: say, asynchronous messages, hold decisions), flattened
scripts = st.lists(
    st.tuples(client_action, st.lists(server_action, max_size=3)), min_size=2, max_size=12
).map(lambda rounds: [a for first, rest in rounds for a in (first, *rest)])


@settings(RELAY_PROPS, max_examples=1000)
@given(scripts)
def test_random_conversations(script: list[tuple[str, object]]) -> None:
    lane, general = Driver(engine(), lane=True), Driver(engine(), lane=False)
    server = FakeServer()

    def feed(read: Read) -> None:
        up, _ = lane.step(read)
        general.step(read)
        assert_same(lane.trace, general.trace)
        server.receive(up)

    for kind, arg in script:
        if lane.relay.closed:
            break
        if kind == "query":
            assert isinstance(arg, str)
            feed(q(arg))
        elif kind == "send":
            assert isinstance(arg, bytes)
            feed(Read("client", arg))
        elif kind == "pipeline":
            assert isinstance(arg, list)
            feed(Read("client", b"".join(arg)))
        elif kind == "async":
            assert isinstance(arg, bytes)
            server.outbox += arg
        elif kind == "decide":
            if lane.relay._held is not None:
                feed(Read("release" if arg else "deny"))
        elif server.outbox:
            size = len(server.outbox) if arg is None else arg
            assert isinstance(size, int)
            data, server.outbox = server.outbox[:size], server.outbox[size:]
            feed(Read("server", data))
    # let the conversation run out: every hold decided, every answer read
    for _ in range(20):
        if lane.relay.closed:
            break
        if lane.relay._held is not None:
            feed(Read("release"))
        elif server.outbox:
            data, server.outbox = server.outbox, b""
            feed(Read("server", data))
        else:
            break
    assert not server.outbox or lane.relay.closed
    t = lane.trace
    event(f"lane queries {min(t.lane_queries, 3)}, results {min(t.lane_results, 3)}")
    event(f"extended: {min(t.lane_exchanges, 3)}, answered {min(t.lane_exchange_results, 3)}")
