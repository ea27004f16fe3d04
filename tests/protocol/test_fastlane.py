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


@st.composite
def answers(draw: st.DrawFn) -> bytes:
    """An answer-shaped stream (usually ending in ReadyForQuery) with at most a few mutations."""
    parts = draw(st.lists(st.sampled_from(ANSWER_PARTS), max_size=8))
    if draw(st.booleans()):
        parts.append(draw(st.sampled_from([IDLE, IN_TXN, FAILED])))
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


def fake_policy() -> Classes:
    return Classes(dict(FAKE_VERDICTS))


# ------------------------------------------------------------------ the two drivers


@dataclass(frozen=True)
class Read:
    side: str  # "client", "server", "release" (approved) or "deny"
    data: bytes = b""


@dataclass
class Trace:
    """What one driver saw, step by step, normalised so that both drivers compare."""

    to_server: list[bytes] = field(default_factory=list)
    to_client: list[bytes] = field(default_factory=list)
    events: list[list[tuple[object, ...]]] = field(default_factory=list)
    states: list[tuple[object, ...]] = field(default_factory=list)
    lane_queries: int = 0
    lane_results: int = 0


def _event(ev: object) -> tuple[object, ...]:
    if isinstance(ev, StatementAdmitted):
        return ("admitted", ev.statement_id, ev.verdict.action.value)
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
        )
        self.lane = lane
        self.trace = Trace()

    def step(self, read: Read) -> tuple[bytes, bytes]:
        relay, trace = self.relay, self.trace
        up = down = b""
        events: list[tuple[object, ...]] = []
        handled = False
        if read.side == "client" and self.lane:
            got = relay.fast_query(read.data)
            if got is not None:
                sid, verdict, _seconds = got
                up, handled = read.data, True
                events.append(("admitted", sid, verdict.action.value))
                trace.lane_queries += 1
        elif read.side == "server" and self.lane and relay.lane_open:
            done = relay.fast_result(read.data)
            if done is not None:
                sid, verdict, rows = done
                down, handled = read.data, True
                events.append(("finished", sid, verdict.action.value, rows, ""))
                trace.lane_results += 1
        if not handled:
            if read.side == "client":
                relay.client_data(read.data)
            elif read.side == "server":
                relay.server_data(read.data)
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
        state = (relay.transaction_status, replace(relay.stats), relay.closed, relay.holding)
        trace.states.append(state)
        return up, down


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


# ------------------------------------------------------------------ random conversations


class FakeServer:
    """Answers the Queries the relay sends as a Postgres would, tracking transaction state;
    its output is handed out in reads of the test's choosing."""

    def __init__(self) -> None:
        self.status = b"I"
        self.inbox = b""
        self.outbox = b""

    def receive(self, data: bytes) -> None:
        self.inbox += data
        while len(self.inbox) >= 5:
            length = int.from_bytes(self.inbox[1:5])
            if len(self.inbox) < 1 + length:
                return
            msg, self.inbox = self.inbox[: 1 + length], self.inbox[1 + length :]
            if msg[:1] == b"Q":
                self.outbox += self.answer(m.Query.decode(memoryview(msg)[5:]).sql)
            elif msg[:1] not in (b"H", b"X"):
                raise AssertionError(f"the relay sent {msg[:1]!r}, not simulated")

    def _ready(self) -> bytes:
        return m.ReadyForQuery(self.status).encode()

    def _fail(self, error: bytes) -> bytes:
        if self.status == b"T":
            self.status = b"E"
        return error + self._ready()

    def answer(self, sql: str) -> bytes:
        if self.status == b"E" and sql not in (COMMIT, ROLLBACK):
            return ABORTED + self._ready()
        if sql == BLOCKED_SQL:
            return self._fail(SYNTAX)
        if sql == BEGIN:
            self.status = b"T"
            return complete("BEGIN") + self._ready()
        if sql in (COMMIT, ROLLBACK):
            tag = "ROLLBACK" if sql == ROLLBACK or self.status == b"E" else "COMMIT"
            self.status = b"I"
            return complete(tag) + self._ready()
        if sql == SCRATCH:
            return rows_answer(2, self._ready())
        if sql == INSERT:
            return complete("INSERT 0 1") + self._ready()
        if sql == TWO:
            one = RD_N + data_row(b"1") + complete("SELECT 1")
            return one + one + self._ready()
        if sql == DIV0:
            return SCRATCH_RD + data_row(b"1", b"x") + self._fail(pg_error("22012", "zero"))
        if sql == SSN:
            return ssn_answer(3, self._ready())
        if sql == IDS:
            return IDS_RD + data_row(b"1") + complete("SELECT 1") + self._ready()
        if sql == DROP:
            return notice("dropping") + complete("DROP TABLE") + self._ready()
        if sql == EMPTY_SQL:
            return EMPTY + self._ready()
        raise AssertionError(f"no simulated answer for {sql!r}")


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

client_action = st.one_of(
    st.tuples(st.just("query"), st.sampled_from(REQUESTS)),
    st.tuples(st.just("query"), st.sampled_from(REQUESTS)),
    st.tuples(st.just("pipeline"), st.lists(st.sampled_from(REQUESTS), min_size=2, max_size=3)),
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
        elif kind == "pipeline":
            assert isinstance(arg, list)
            feed(Read("client", b"".join(m.Query(s).encode() for s in arg)))
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
    event(
        f"lane queries {min(lane.trace.lane_queries, 3)}, results {min(lane.trace.lane_results, 3)}"
    )
