"""Test helpers for the sans-I/O protocol: golden vectors, a reference framer, relay playbooks.

A *playbook* is a table of steps run against one ``Relay`` with no sockets (after mitmproxy's
``tutils.Playbook`` and h11's helpers): each step feeds bytes from one side and states exactly
what must come out on both sides, and optionally which events were raised. ``SAME`` means "the
very bytes that went in" — the pass-through promise for messages nobody rewrites.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pgproxy.policy.seam import (
    Action,
    FieldInfo,
    RowPlan,
    StatementContext,
    Verdict,
)
from pgproxy.protocol import messages as m
from pgproxy.protocol.relay import (
    Event,
    HoldRequested,
    ProtocolViolation,
    Relay,
    StatementAdmitted,
    StatementFinished,
    Terminated,
)

VECTORS_DIR = Path(__file__).resolve().parent.parent / "vectors"

# ------------------------------------------------------------------------- golden vectors


@dataclass(frozen=True)
class Vector:
    name: str
    client: str
    statements: list[str]
    startup: list[tuple[str, bytes]]
    session: list[tuple[str, bytes]]
    frontend: list[str]
    backend: list[str]

    def stream(self, who: str, part: str = "session") -> bytes:
        chunks = self.session if part == "session" else self.startup
        return b"".join(d for w, d in chunks if w == who)


def load_vectors() -> list[Vector]:
    out: list[Vector] = []
    for path in sorted(VECTORS_DIR.glob("*.json")):
        doc = json.loads(path.read_text())
        out.append(
            Vector(
                doc["name"],
                doc["client"],
                doc["statements"],
                [(w, bytes.fromhex(h)) for w, h in doc["startup"]],
                [(w, bytes.fromhex(h)) for w, h in doc["session"]],
                doc["frontend"],
                doc["backend"],
            )
        )
    return out


# ------------------------------------------------------------------------- reference framing


def reference_frames(data: bytes, max_size: int = 1 << 30) -> tuple[list[bytes], bool]:
    """An independent, obvious framer: (whole messages, whether a bad length header was seen).

    A header is judged as soon as its 5 bytes exist, even when the body has not arrived yet.
    """
    out: list[bytes] = []
    pos = 0
    while len(data) - pos >= 5:
        length = int.from_bytes(data[pos + 1 : pos + 5], "big")
        if length < 4 or length > max_size:
            return out, True
        if pos + 1 + length > len(data):
            break
        out.append(data[pos : pos + 1 + length])
        pos += 1 + length
    return out, False


def split_frames(data: bytes) -> list[bytes]:
    frames, bad = reference_frames(data)
    assert not bad, "bad length header"
    assert sum(map(len, frames)) == len(data), "trailing partial message"
    return frames


def describe(data: bytes, *, backend: bool) -> list[str]:
    """Readable form of a stream, for assertion messages."""
    decode = m.decode_backend if backend else m.decode_frontend
    out = []
    for f in split_frames(data):
        try:
            out.append(repr(decode(f[:1], f[5:])))
        except Exception as exc:
            out.append(f"<undecodable {f[:1]!r}: {exc}>")
    return out


# ------------------------------------------------------------------------- fake policies


def masked(value: bytes | None, fmt: int) -> bytes | None:
    """A fake cell rewriter that says which format it was told the cell is in."""
    return None if value is None else f"masked-fmt{fmt}".encode()


@dataclass
class MaskColumn:
    """A ``ResultPolicy`` that rewrites one column and remembers the fields it was shown."""

    column: int = 1
    max_rows: int | None = None
    scrub_diagnostics: bool = False
    rewriter: Callable[[bytes | None, int], bytes | None] = masked
    seen: list[tuple[FieldInfo, ...]] = field(default_factory=list)
    indexes: list[int] = field(default_factory=list)

    def plan(self, fields: Sequence[FieldInfo], index: int = 0) -> RowPlan:
        self.seen.append(tuple(fields))
        self.indexes.append(index)
        return RowPlan(rewriters={self.column: self.rewriter})


@dataclass
class RowLimit:
    """A ``ResultPolicy`` that rewrites nothing but lets at most ``max_rows`` rows through."""

    max_rows: int | None
    scrub_diagnostics: bool = False

    def plan(self, fields: Sequence[FieldInfo], index: int = 0) -> RowPlan:
        return RowPlan()


ALLOW = Verdict(Action.ALLOW, ("fake: allowed",))
BLOCK = Verdict(Action.BLOCK, ("fake rule",), message="blocked: fake rule says no")
HOLD = Verdict(Action.HOLD, ("fake: needs review",), hold_class="ddl")


def mask(result: object, klass: str = "select") -> Verdict:
    return Verdict(Action.MASK, ("fake: masked",), klass, result=result)  # type: ignore[arg-type]


@dataclass
class FakePolicy:
    """A ``SessionPolicy`` answering from tables (by exact SQL text / function OID)."""

    verdicts: dict[str, Verdict] = field(default_factory=dict)
    functions: dict[int, Verdict] = field(default_factory=dict)
    asked: list[tuple[str, StatementContext]] = field(default_factory=list)

    def statement(self, sql: str, ctx: StatementContext) -> Verdict:
        self.asked.append((sql, ctx))
        return self.verdicts.get(sql, ALLOW)

    def revalidate(self, sql: str, verdict: Verdict, ctx: StatementContext) -> Verdict:
        return verdict

    def function_call(self, function_oid: int, ctx: StatementContext) -> Verdict:
        return self.functions.get(function_oid, ALLOW)

    def notification(self, channel: str, payload: str) -> str | None:
        return payload

    def scrub_error(self, fields: dict[str, str], verdict: Verdict | None) -> dict[str, str]:
        return fields


def relay_with(policy: object | None = None) -> Relay:
    return Relay(policy or FakePolicy(), agent="fake-agent", database="fakedb")  # type: ignore[arg-type]


# ------------------------------------------------------------------------- playbooks


class Same(enum.Enum):
    SAME = "the bytes that went in"


SAME = Same.SAME


@dataclass(frozen=True)
class Err:
    """Matches one ErrorResponse frame by SQLSTATE and a piece of its message."""

    sqlstate: str
    contains: str = ""


Expect = Sequence[m.Message | Err]


def wire(msgs: Iterable[m.Message]) -> bytes:
    return b"".join(x.encode() for x in msgs)


def summarize(ev: Event) -> tuple[object, ...]:
    """Events as short tuples, so a playbook can list them."""
    if isinstance(ev, StatementAdmitted):
        return ("admitted", ev.statement_id, ev.verdict.action.value)
    if isinstance(ev, StatementFinished):
        return ("finished", ev.statement_id, ev.rows, ev.sqlstate, ev.masked_cells)
    if isinstance(ev, HoldRequested):
        return ("hold", ev.statement_id, ev.sql)
    if isinstance(ev, Terminated):
        return ("terminated",)
    if isinstance(ev, ProtocolViolation):
        return ("violation", ev.by_client)
    raise AssertionError(f"unknown event {ev!r}")


@dataclass(frozen=True)
class Step:
    #: "client", "server" or "release"
    side: str
    data: bytes = b""
    upstream: Expect | Same = ()
    downstream: Expect | Same = ()
    events: Sequence[tuple[object, ...]] | None = None
    approved: bool = False
    message: str = ""


def client(
    *msgs: m.Message,
    upstream: Expect | Same = SAME,
    reply: Expect = (),
    events: Sequence[tuple[object, ...]] | None = None,
) -> Step:
    """The agent sends ``msgs``: Postgres gets ``upstream``, the agent gets ``reply`` at once."""
    return Step("client", wire(msgs), upstream, reply, events)


def server(
    *msgs: m.Message,
    downstream: Expect | Same = SAME,
    upstream: Expect = (),
    events: Sequence[tuple[object, ...]] | None = None,
) -> Step:
    """Postgres sends ``msgs``: the agent gets ``downstream``, Postgres gets ``upstream``."""
    return Step("server", wire(msgs), upstream, downstream, events)


def release(
    approved: bool,
    message: str = "",
    *,
    upstream: Expect = (),
    reply: Expect = (),
    events: Sequence[tuple[object, ...]] | None = None,
) -> Step:
    return Step("release", b"", upstream, reply, events, approved, message)


def _check(
    actual: bytes, expected: Expect | Same, sent: bytes, *, backend: bool, what: str
) -> None:
    if isinstance(expected, Same):
        if actual != sent:
            raise AssertionError(
                f"{what}: expected the original bytes\n  sent: {describe(sent, backend=backend)}"
                f"\n  got:  {describe(actual, backend=backend)}"
            )
        return
    frames = split_frames(actual)
    got = describe(actual, backend=backend)
    if len(frames) != len(expected):
        raise AssertionError(f"{what}: expected {list(expected)}\n  got: {got}")
    for frame, exp in zip(frames, expected, strict=True):
        if isinstance(exp, Err):
            ok = frame[:1] == b"E"
            if ok:
                err = m.ErrorResponse.decode(frame[5:])
                ok = err.sqlstate == exp.sqlstate and exp.contains in err.message
        else:
            ok = frame == exp.encode()
        if not ok:
            raise AssertionError(f"{what}: expected {list(expected)}\n  got: {got}")


def play(relay: Relay, steps: Sequence[Step]) -> Relay:
    """Run ``steps``; after each, both output buffers are checked and drained, as are events."""
    for n, step in enumerate(steps):
        if step.side == "client":
            relay.client_data(step.data)
            up_backend, down_sent = False, b""
            up_sent = step.data
        elif step.side == "server":
            relay.server_data(step.data)
            up_backend, up_sent, down_sent = False, b"", step.data
        else:
            relay.release(step.approved, step.message)
            up_backend, up_sent, down_sent = False, b"", b""
        where = f"step {n} ({step.side})"
        _check(
            bytes(relay.to_server),
            step.upstream,
            up_sent,
            backend=up_backend,
            what=f"{where}: to_server",
        )
        _check(
            bytes(relay.to_client),
            step.downstream,
            down_sent,
            backend=True,
            what=f"{where}: to_client",
        )
        relay.to_server.clear()
        relay.to_client.clear()
        events = [summarize(e) for e in relay.events]
        relay.events.clear()
        if step.events is not None:
            assert events == list(step.events), f"{where}: events {events}"
    return relay
