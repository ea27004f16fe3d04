"""The DataRow masking loop: the compiled ``_rowmask`` and its Python twin agree byte for byte.

Hypothesis builds runs of DataRows (NULLs, empty values, rows with fewer or more cells than
their column count, rows cut short or with a corrupted length word, other messages in between)
and plans mixing every action (NULL, constants, callables that return bytes, None, a str or
raise, year-only dates), and asserts that both loops return the same result or raise the same
error, having written the same bytes. The native year-of-date cases are checked against the
real ``year_only`` rewriter they stand in for.
"""

from __future__ import annotations

import datetime as dt
import os
import struct
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgproxy.policy.operators import MaskCatalog
from pgproxy.policy.pgbinary import Oid
from pgproxy.policy.seam import NULL_CELL, ConstantRewriter, DateYear, FieldInfo, RowPlan
from pgproxy.protocol import rowmask
from pgproxy.protocol.errors import PeerProtocolError
from pgproxy.protocol.framing import FrameBuffer
from pgproxy.rules import Rules

try:
    from pgproxy.protocol import _rowmask
except ImportError:  # pragma: no cover - the REQUIRE_EXT test below reports it in CI
    _rowmask = None  # type: ignore[assignment]

needs_ext = pytest.mark.skipif(_rowmask is None, reason="pgproxy.protocol._rowmask is not built")
PROPS = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_the_compiled_loop_is_there_when_required() -> None:
    if os.environ.get("PGPROXY_REQUIRE_EXT") != "1":
        pytest.skip("PGPROXY_REQUIRE_EXT=1 not set")
    assert _rowmask is not None, "pgproxy.protocol._rowmask did not build (pip install -e .)"
    assert rowmask.COMPILED


# ------------------------------------------------------------------ building blocks


def data_row(cells: list[bytes | None], ncols: int | None = None) -> bytes:
    body = struct.pack("!H", len(cells) if ncols is None else ncols)
    for c in cells:
        body += b"\xff\xff\xff\xff" if c is None else struct.pack("!i", len(c)) + c
    return b"D" + struct.pack("!I", len(body) + 4) + body


def upper(value: bytes | None, fmt: int) -> bytes | None:
    return None if value is None else value.upper() + str(fmt).encode()


def keep(value: bytes | None, fmt: int) -> bytes | None:
    return value


def from_null(value: bytes | None, fmt: int) -> bytes | None:
    return b"was-null" if value is None else None


def broken(value: bytes | None, fmt: int) -> bytes | None:
    raise ValueError("rewriter bug")


def not_bytes(value: bytes | None, fmt: int) -> bytes | None:
    return "text"  # type: ignore[return-value]


CATALOG = MaskCatalog(Rules(), reference_year=2026)


def year_only(fmt: int, tag: str = "dob") -> DateYear:
    rw = CATALOG.rewriter(tag, FieldInfo("d", 1, 1, int(Oid.DATE), 4, -1, fmt))
    assert isinstance(rw, DateYear)
    return rw


REWRITERS: list[Callable[[bytes | None, int], bytes | None]] = [
    NULL_CELL,
    ConstantRewriter(lambda fmt: b"<NAME>"),
    ConstantRewriter(lambda fmt: b"" if fmt else b"x"),
    ConstantRewriter(lambda fmt: b"\x00abc"),
    upper,
    keep,
    from_null,
    broken,
    not_bytes,
    year_only(0),
    year_only(1, tag="date"),
]

#: values equal to the constants above, and dates at the edges of what Python's date holds
SPECIAL = [b"<NAME>", b"x", b"\x00abc", b"", b"1935-02-28", b"2024-02-29", b"0000-01-01"]
EDGE_DAYS = [-730120, -730119, 2921939, 2921940, -(2**31), 2**31 - 1, 0, -1]

values = st.one_of(
    st.none(),
    st.sampled_from(SPECIAL),
    st.binary(max_size=12),
    st.dates().map(lambda d: d.isoformat().encode()),
    st.one_of(st.sampled_from(EDGE_DAYS), st.integers(-(2**31), 2**31 - 1)).map(
        lambda n: struct.pack("!i", n)
    ),
)


@st.composite
def runs(draw: st.DrawFn) -> tuple[bytes, list[tuple[int, int, int]]]:
    """A chunk of messages, mostly DataRows, some malformed, and its frames."""
    chunk = b""
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["row"] * 6 + ["odd-count", "cut", "corrupt", "other"]))
        cells = draw(st.lists(values, max_size=6))
        if kind == "other":
            msg = b"C\x00\x00\x00\x0dSELECT 1\x00"
        elif kind == "odd-count":
            msg = data_row(cells, draw(st.integers(0, 8)))
        else:
            msg = data_row(cells)
            if kind == "cut":
                keep_len = draw(st.integers(5, len(msg)))
                msg = msg[:keep_len]
                msg = msg[:1] + struct.pack("!I", len(msg) - 1) + msg[5:]
            elif kind == "corrupt" and len(msg) > 7:
                at = draw(st.integers(7, len(msg) - 1))
                msg = msg[:at] + bytes([draw(st.integers(0, 255))]) + msg[at + 1 :]
        chunk += msg
    got, frames = FrameBuffer().feed(chunk)
    assert got == chunk
    return chunk, frames


@st.composite
def plans(draw: st.DrawFn) -> tuple[RowPlan, tuple[int, ...]]:
    ordinals = draw(st.sets(st.integers(0, 7), max_size=5))
    rewriters = {o: draw(st.sampled_from(REWRITERS)) for o in ordinals}
    formats = tuple(draw(st.lists(st.sampled_from([0, 1, 0, 1, 2]), max_size=8)))
    return RowPlan(rewriters), formats


def run(
    loop: rowmask.RewriteRows,
    chunk: bytes,
    frames: list[tuple[int, int, int]],
    first: int,
    room: int,
    actions: tuple[rowmask.Action, ...],
) -> tuple[object, bytes]:
    out = bytearray(b"prefix")
    try:
        result: object = loop(out, chunk, frames, first, room, actions)
    except PeerProtocolError as exc:
        result = ("error", exc.message, exc.sqlstate)
    return result, bytes(out)


# ------------------------------------------------------------------ properties


@needs_ext
@PROPS
@given(runs(), plans(), st.integers(0, 3), st.integers(0, 8))
def test_compiled_and_python_loops_agree(
    messages: tuple[bytes, list[tuple[int, int, int]]],
    plan_formats: tuple[RowPlan, tuple[int, ...]],
    first: int,
    room: int,
) -> None:
    chunk, frames = messages
    plan, formats = plan_formats
    actions = rowmask.compile_actions(plan, formats)
    assert _rowmask is not None
    python = run(rowmask._rewrite_rows_py, chunk, frames, first, room, actions)
    compiled = run(_rowmask.rewrite_rows, chunk, frames, first, room, actions)
    assert compiled == python


@PROPS
@given(runs(), plans())
def test_the_loop_equals_calling_each_rewriter(
    messages: tuple[bytes, list[tuple[int, int, int]]],
    plan_formats: tuple[RowPlan, tuple[int, ...]],
) -> None:
    """Well-formed rows: each masked cell is what its rewriter says (NULL when it fails), and
    every other cell is untouched."""
    chunk, frames = messages
    plan, formats = plan_formats
    out = bytearray()
    try:
        nxt, rows, _cells = rowmask.rewrite_rows(out, chunk, frames, 0, 99, plan, formats)
    except PeerProtocolError:
        return
    got = FrameBuffer().feed(bytes(out))[1]
    assert len(got) == rows
    for (_, start, end), (_, gstart, gend) in zip(frames[:nxt], got, strict=True):
        original, new = split(chunk[start:end]), split(bytes(out)[gstart:gend])
        if original is None:
            continue  # a row whose cells do not parse (the walk did not reach the bad part)
        assert len(new or []) == len(original)
        for i, value in enumerate(original):
            rewrite = plan.rewriters.get(i)
            if rewrite is None or i >= struct.unpack_from("!H", chunk, start + 5)[0]:
                assert new is not None and new[i] == value
                continue
            fmt = formats[i] if i < len(formats) else 0
            try:
                expected = rewrite(value, fmt)
            except Exception:
                expected = None
            if not isinstance(expected, bytes):
                expected = None
            assert new is not None and new[i] == expected


def split(msg: bytes) -> list[bytes | None] | None:
    """The cells of a DataRow, or None if they do not parse whole."""
    pos, cells = 7, []
    while pos < len(msg):
        if len(msg) - pos < 4:
            return None
        (n,) = struct.unpack_from("!i", msg, pos)
        if n < -1 or pos + 4 + max(n, 0) > len(msg):
            return None
        cells.append(None if n < 0 else msg[pos + 4 : pos + 4 + n])
        pos += 4 + max(n, 0)
    return cells


date_values = st.one_of(
    st.binary(max_size=11),
    st.text("0123456789-", min_size=10, max_size=10).map(str.encode),
    st.dates().map(lambda d: d.isoformat().encode()),
    st.one_of(st.sampled_from(EDGE_DAYS), st.integers(-(2**31), 2**31 - 1)).map(
        lambda n: struct.pack("!i", n)
    ),
    st.sampled_from([b"infinity", b"-infinity", b"\x7f\xff\xff\xff", b"\x80\x00\x00\x00"]),
)


@needs_ext
@PROPS
@given(date_values, st.sampled_from([0, 1]), st.sampled_from(["dob", "date"]))
def test_native_year_of_date_equals_the_year_only_rewriter(
    value: bytes, fmt: int, tag: str
) -> None:
    rw = year_only(fmt, tag)
    plan = RowPlan({0: rw})
    actions = rowmask.compile_actions(plan, (fmt,))
    assert actions[0][1] == (rowmask.DATE_TEXT if fmt == 0 else rowmask.DATE_BIN)
    assert _rowmask is not None
    chunk = data_row([value])
    frames = FrameBuffer().feed(chunk)[1]
    out = bytearray()
    _rowmask.rewrite_rows(out, chunk, frames, 0, 1, actions)
    assert out == data_row([rw(value, fmt)])


# ------------------------------------------------------------------ examples


def test_constant_and_null_actions_need_no_call() -> None:
    plan = RowPlan({1: ConstantRewriter(lambda fmt: b"<NAME>"), 2: NULL_CELL})
    actions = rowmask.compile_actions(plan, (0, 0, 0))
    assert [a[1] for a in actions] == [rowmask.CONST, rowmask.NULL]
    chunk = data_row([b"1", b"Jane", b"123-45-6789"]) + data_row([b"2", None, b"x"])
    out = bytearray()
    result = rowmask.rewrite_rows(out, chunk, FrameBuffer().feed(chunk)[1], 0, 9, plan, (0, 0, 0))
    assert result == (2, 2, 4)
    assert bytes(out) == data_row([b"1", b"<NAME>", None]) + data_row([b"2", None, None])


def test_the_run_stops_at_room_and_at_other_messages() -> None:
    plan = RowPlan({0: NULL_CELL})
    rows = [data_row([str(i).encode()]) for i in range(3)]
    chunk = rows[0] + rows[1] + b"C\x00\x00\x00\x0dSELECT 2\x00" + rows[2]
    frames = FrameBuffer().feed(chunk)[1]
    out = bytearray()
    assert rowmask.rewrite_rows(out, chunk, frames, 0, 1, plan, ()) == (1, 1, 1)
    assert rowmask.rewrite_rows(out, chunk, frames, 1, 5, plan, ()) == (2, 1, 1)
    assert bytes(out) == data_row([None]) * 2


@pytest.mark.parametrize("loop", ["python", "compiled"])
def test_malformed_row_raises_after_writing_the_rows_before_it(loop: str) -> None:
    if loop == "compiled" and _rowmask is None:
        pytest.skip("pgproxy.protocol._rowmask is not built")
    fn = rowmask._rewrite_rows_py if loop == "python" else _rowmask.rewrite_rows
    good = data_row([b"a", b"b"])
    bad = good[:-1]
    bad = bad[:1] + struct.pack("!I", len(bad) - 1) + bad[5:]
    chunk = good + bad
    actions = rowmask.compile_actions(RowPlan({1: NULL_CELL}), ())
    out = bytearray()
    with pytest.raises(PeerProtocolError, match="invalid value length"):
        fn(out, chunk, FrameBuffer().feed(chunk)[1], 0, 9, actions)
    assert bytes(out) == data_row([b"a", None])


def test_year_of_date_binary_round_trip() -> None:
    days = (dt.date(1967, 3, 14) - dt.date(2000, 1, 1)).days
    plan = RowPlan({0: year_only(1)})
    chunk = data_row([struct.pack("!i", days)])
    out = bytearray()
    rowmask.rewrite_rows(out, chunk, FrameBuffer().feed(chunk)[1], 0, 1, plan, (1,))
    jan1 = (dt.date(1967, 1, 1) - dt.date(2000, 1, 1)).days
    assert bytes(out) == data_row([struct.pack("!i", jan1)])
