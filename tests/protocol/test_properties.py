"""Hypothesis properties of the protocol package (h11's fuzz invariant, stated up front).

* every message class: encode → decode gives the message back, and re-encodes to the same bytes;
* any chunking of a stream, down to single bytes, yields the same frames as the whole stream;
* arbitrary bytes into FrameBuffer / decode_frontend / decode_backend / read_startup either parse
  or raise ``PeerProtocolError`` — nothing else, and never a hang (hypothesis' deadline);
* a Relay fed arbitrary bytes from either peer never lets an exception escape: it reports
  ``ProtocolViolation`` and sets ``closed``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgproxy.protocol import messages as m
from pgproxy.protocol.errors import PeerProtocolError
from pgproxy.protocol.framing import FrameBuffer
from pgproxy.protocol.relay import ProtocolViolation, Relay
from pgproxy.protocol.startup import read_startup
from tests.protocol import strategies as S
from tests.protocol.helpers import (
    BLOCK,
    HOLD,
    FakePolicy,
    MaskColumn,
    RowLimit,
    mask,
    reference_frames,
    relay_with,
    split_frames,
)

FUZZ = settings(max_examples=300, deadline=1000, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("cls", list(S.FRONTEND), ids=lambda c: c.__name__)
@given(data=st.data())
def test_frontend_round_trip(cls: type[m.Message], data: st.DataObject) -> None:
    msg = data.draw(S.FRONTEND[cls])
    wire = msg.encode()
    assert wire[:1] == cls.TAG
    assert int.from_bytes(wire[1:5], "big") == len(wire) - 1
    back = m.decode_frontend(wire[:1], wire[5:])
    assert back == msg
    assert type(back) is cls
    assert back.encode() == wire


@pytest.mark.parametrize("cls", list(S.BACKEND), ids=lambda c: c.__name__)
@given(data=st.data())
def test_backend_round_trip(cls: type[m.Message], data: st.DataObject) -> None:
    msg = data.draw(S.BACKEND[cls])
    wire = msg.encode()
    assert wire[:1] == cls.TAG
    assert int.from_bytes(wire[1:5], "big") == len(wire) - 1
    back = m.decode_backend(wire[:1], wire[5:])
    assert back == msg
    assert type(back) is cls
    assert back.encode() == wire


@given(S.STARTUP, st.binary(max_size=10))
def test_startup_round_trip(packet: object, trailing: bytes) -> None:
    wire = packet.encode()  # type: ignore[attr-defined]
    assert read_startup(wire + trailing) == (packet, len(wire))
    assert read_startup(wire[: len(wire) - 1]) == (None, 0)


# ------------------------------------------------------------------ chunking


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at every offset in ``cuts`` that falls inside it."""
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(data)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def feed_in_pieces(buf: FrameBuffer, data: bytes, cuts: list[int]) -> list[bytes]:
    out = []
    for piece in pieces(data, cuts):
        chunk, frames = buf.feed(piece)
        out += [chunk[s:e] for _, s, e in frames]
    return out


@given(
    st.lists(S.any_frontend | S.any_backend, max_size=15).map(
        lambda ms: b"".join(x.encode() for x in ms)
    ),
    st.lists(st.integers(0, 2000), max_size=30),
)
def test_any_chunking_yields_the_same_frames(stream: bytes, cuts: list[int]) -> None:
    whole_chunk, whole = FrameBuffer().feed(stream)
    expected = [whole_chunk[s:e] for _, s, e in whole]
    assert b"".join(expected) == stream
    assert feed_in_pieces(FrameBuffer(), stream, cuts) == expected
    assert feed_in_pieces(FrameBuffer(), stream, list(range(len(stream)))) == expected


@given(S.stream_of(S.any_backend, S.BACKEND_TAGS), st.lists(st.integers(0, 500), max_size=20))
def test_frame_tags_and_offsets_are_exact(stream: bytes, cuts: list[int]) -> None:
    buf = FrameBuffer()
    for piece in pieces(stream, cuts):
        try:
            chunk, frames = buf.feed(piece)
        except PeerProtocolError:
            return
        pos = 0
        for tag, s, e in frames:
            assert s == pos, "frames must tile the returned chunk"
            assert chunk[s] == tag
            assert int.from_bytes(chunk[s + 1 : s + 5], "big") == e - s - 1
            pos = e
        assert pos == len(chunk)


# ------------------------------------------------------------------ arbitrary bytes


@FUZZ
@given(
    st.binary(max_size=200) | S.stream_of(S.any_frontend, S.FRONTEND_TAGS),
    st.lists(st.integers(0, 200), max_size=20),
    st.sampled_from([1 << 30, 64]),
)
def test_framebuffer_parses_or_raises_like_the_reference(
    data: bytes, cuts: list[int], max_size: int
) -> None:
    expected, bad = reference_frames(data, max_size)
    got: list[bytes] = []
    raised = False
    buf = FrameBuffer(max_size)
    for piece in pieces(data, cuts):
        try:
            chunk, frames = buf.feed(piece)
        except PeerProtocolError:
            raised = True
            break
        got += [chunk[s:e] for _, s, e in frames]
    assert raised == bad
    assert got == expected[: len(got)]
    if not bad:
        assert got == expected
        assert len(buf) == len(data) - sum(map(len, expected))


def _parse_or_peer_error(decode: object, tag: bytes, body: bytes) -> None:
    try:
        msg = decode(tag, body)  # type: ignore[operator]
    except PeerProtocolError:
        return
    assert isinstance(msg, m.Message)
    assert msg.encode()[:1] == tag


def _mutations(messages: st.SearchStrategy[m.Message]) -> st.SearchStrategy[tuple[bytes, bytes]]:
    """(tag, body) of a valid message, then truncated, extended or with one byte changed."""

    def mutate(msg: m.Message, cut: int, extra: bytes, flip: int) -> tuple[bytes, bytes]:
        wire = msg.encode()
        body = bytearray(wire[5:])
        if body and flip >= 0:
            body[flip % len(body)] ^= 0xFF
        return wire[:1], bytes(body[: max(0, len(body) - cut)]) + extra

    return st.builds(
        mutate, messages, st.integers(0, 8), st.binary(max_size=6), st.integers(-1, 100)
    )


@FUZZ
@given(
    st.one_of(
        st.tuples(st.binary(min_size=1, max_size=1), st.binary(max_size=120)),
        _mutations(S.any_frontend),
    )
)
def test_decode_frontend_parses_or_raises_peer_error(tag_body: tuple[bytes, bytes]) -> None:
    _parse_or_peer_error(m.decode_frontend, *tag_body)


@FUZZ
@given(
    st.one_of(
        st.tuples(st.binary(min_size=1, max_size=1), st.binary(max_size=120)),
        _mutations(S.any_backend),
    )
)
def test_decode_backend_parses_or_raises_peer_error(tag_body: tuple[bytes, bytes]) -> None:
    _parse_or_peer_error(m.decode_backend, *tag_body)


_startup_codes = st.sampled_from([80877103, 80877104, 80877102, 3 << 16, (3 << 16) | 2, 2 << 16])


@FUZZ
@given(
    st.binary(max_size=64)
    | st.builds(
        lambda code, body, delta: (
            (8 + len(body) + delta).to_bytes(4, "big", signed=True) + code.to_bytes(4, "big") + body
        ),
        _startup_codes,
        st.binary(max_size=40),
        st.integers(-3, 3),
    )
)
def test_read_startup_parses_or_raises_peer_error(data: bytes) -> None:
    try:
        packet, used = read_startup(data)
    except PeerProtocolError:
        return
    if packet is None:
        assert used == 0
    else:
        assert 8 <= used <= len(data)
        assert packet.encode() == data[:used] or type(packet).__name__ == "StartupMessage"


# ------------------------------------------------------------------ the relay under fuzz

_MASKED = "SELECT masked"
_HELD = "SELECT held"
_BLOCKED = "SELECT blocked"
_LIMITED = "SELECT limited"


def _fuzz_policy() -> FakePolicy:
    return FakePolicy(
        {
            _MASKED: mask(MaskColumn(column=0)),
            _HELD: HOLD,
            _BLOCKED: BLOCK,
            _LIMITED: mask(RowLimit(1)),
        },
        {1: BLOCK},
    )


_sql = st.sampled_from(["SELECT 1", _MASKED, _HELD, _BLOCKED, _LIMITED, ""])
_requests = st.one_of(
    st.builds(m.Query, _sql),
    st.builds(m.Parse, st.sampled_from(["", "s1"]), _sql),
    st.builds(
        m.Bind,
        st.sampled_from(["", "p1"]),
        st.sampled_from(["", "s1"]),
        st.just(()),
        st.just(()),
        st.sampled_from([(), (0,), (1,)]),
    ),
    st.builds(m.Describe, st.sampled_from([b"S", b"P"]), st.sampled_from(["", "s1", "p1"])),
    st.builds(m.Execute, st.sampled_from(["", "p1"]), st.integers(0, 2)),
    st.just(m.Sync()),
    st.just(m.Flush()),
    st.builds(m.FunctionCall, st.integers(0, 2)),
    st.builds(m.CopyData, S.raw),
    st.just(m.CopyDone()),
)
_prelude = st.lists(_requests, max_size=8).map(lambda ms: b"".join(x.encode() for x in ms))


def _violations(relay: Relay) -> int:
    return sum(isinstance(e, ProtocolViolation) for e in relay.events)


def checked(relay: Relay, call: Callable[[], None]) -> None:
    """Run one relay call the way the server does (nothing more once it is closed). No exception
    may escape; a violation closes the session with a FATAL ErrorResponse as the last thing the
    client is sent."""
    if relay.closed:
        return
    before = _violations(relay)
    call()
    if _violations(relay) > before:
        assert relay.closed
        last = split_frames(bytes(relay.to_client))[-1]
        assert last[:1] == b"E"
        assert m.ErrorResponse.decode(last[5:]).get("S") == "FATAL"


def feed(relay: Relay, data: bytes, *, from_client: bool) -> None:
    checked(relay, lambda: (relay.client_data if from_client else relay.server_data)(data))


@FUZZ
@given(_prelude, S.stream_of(S.any_frontend, S.FRONTEND_TAGS), st.booleans())
def test_relay_survives_arbitrary_client_bytes(prelude: bytes, data: bytes, release: bool) -> None:
    relay = relay_with(_fuzz_policy())
    feed(relay, prelude, from_client=True)
    feed(relay, data, from_client=True)
    if relay.holding:
        checked(relay, lambda: relay.release(release, "fake reviewer said no"))


@FUZZ
@given(_prelude, st.lists(S.stream_of(S.any_backend, S.BACKEND_TAGS), min_size=1, max_size=3))
def test_relay_survives_arbitrary_server_bytes(prelude: bytes, replies: list[bytes]) -> None:
    relay = relay_with(_fuzz_policy())
    feed(relay, prelude, from_client=True)
    for data in replies:
        feed(relay, data, from_client=False)


@FUZZ
@given(
    st.lists(
        st.tuples(
            st.booleans(),
            st.one_of(
                _requests.map(lambda x: x.encode()),
                S.any_backend.map(lambda x: x.encode()),
                st.binary(max_size=30),
            ),
        ),
        max_size=25,
    ),
    st.booleans(),
)
def test_relay_survives_arbitrary_interleavings(
    steps: list[tuple[bool, bytes]], approve: bool
) -> None:
    relay = relay_with(_fuzz_policy())
    for from_client, data in steps:
        feed(relay, data, from_client=from_client)
        if relay.holding and approve:
            checked(relay, lambda: relay.release(True))


@FUZZ
@given(
    st.booleans(),
    st.lists(S.FIELD, min_size=1, max_size=3).map(tuple),
    st.lists(S.raw | S.any_backend.map(lambda x: x.body()), min_size=1, max_size=4),
)
def test_relay_survives_arbitrary_rows_under_a_mask(
    extended: bool, fields: tuple[m.Field, ...], bodies: list[bytes]
) -> None:
    """Rows that are rewritten are split into cells: malformed ones must be a protocol error."""
    relay = relay_with(_fuzz_policy())
    if extended:
        requests = [m.Parse("", _MASKED), m.Bind("", ""), m.Describe(b"P", ""), m.Execute("")]
        feed(relay, b"".join(x.encode() for x in [*requests, m.Sync()]), from_client=True)
        feed(relay, m.ParseComplete().encode() + m.BindComplete().encode(), from_client=False)
    else:
        feed(relay, m.Query(_MASKED).encode(), from_client=True)
    feed(relay, m.RowDescription(fields).encode(), from_client=False)
    for body in bodies:
        feed(relay, m.frame(b"D", body), from_client=False)
