"""Masking runs of DataRows (protocol section 55.7, DataRow): the relay's hot loop for MASK.

``rewrite_rows`` takes the relay's framed chunk and rewrites consecutive DataRows of one result
in one call: the masked cells are replaced, every other byte is copied as is, and the new rows
are appended to the relay's output buffer. It stops at the first message that is not a DataRow
or after ``room`` rows (the row limit), and says where it stopped.

A row plan is first compiled (``compile_actions``) into one action per masked column, for that
result's formats: value-blind rewriters (replace, redact, nullify: ``ConstantRewriter``) become
their constant bytes or NULL, written without any call; year-only on a ``date`` column
(``DateYear``) is computed natively for ISO text and binary day numbers; any other rewriter is
called per cell. Fail closed: a rewriter that raises or returns something other than bytes
makes its cell NULL.

The loop exists twice: compiled in ``_rowmask.c`` (built by ``pip install``; used when
importable) and ``_rewrite_rows_py`` below, which is the reference and the fallback. Both give
the same bytes and raise the same ``PeerProtocolError`` for a malformed row (a length word that
does not fit, a value past the row's end); rows finished before the bad one are already written.
``PGPROXY_REQUIRE_EXT=1`` makes the test suite fail when the compiled module is missing.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence

from pgproxy.policy.seam import CellRewriter, ConstantRewriter, DateYear, RowPlan
from pgproxy.protocol.errors import PeerProtocolError

NULL, CONST, CALL, DATE_TEXT, DATE_BIN = range(5)

#: (ordinal, kind, constant, call, format, clamp year or -1)
Action = tuple[int, int, bytes | None, CellRewriter | None, int, int]
Frames = list[tuple[int, int, int]]
RewriteRows = Callable[
    [bytearray, bytes, Frames, int, int, tuple[Action, ...]], tuple[int, int, int]
]

SHORT = "DataRow is shorter than its fields"
INVALID = "DataRow has an invalid value length"
TOO_LONG = "DataRow is too long after masking"
#: Postgres' largest field; a longer rewriter output becomes NULL
MAX_CELL = 0x3FFFFFFF

_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_NULL = b"\xff\xff\xff\xff"
_T_DATA_ROW = ord("D")


def compile_actions(plan: RowPlan, formats: Sequence[int]) -> tuple[Action, ...]:
    """One action per rewritten column of ``plan``, for a result in ``formats``."""
    actions: list[Action] = []
    nformats = len(formats)
    for ordinal, rewrite in plan.ordered:
        fmt = formats[ordinal] if ordinal < nformats else 0
        if isinstance(rewrite, ConstantRewriter):
            out = rewrite.output(fmt)
            if out is None or len(out) > MAX_CELL:
                actions.append((ordinal, NULL, None, None, fmt, -1))
            else:
                actions.append((ordinal, CONST, out, None, fmt, -1))
            continue
        if isinstance(rewrite, DateYear) and fmt in (0, 1):
            clamp = rewrite.clamp_year
            if clamp is None or 0 <= clamp <= 9999:
                kind = DATE_TEXT if fmt == 0 else DATE_BIN
                year = -1 if clamp is None else clamp
                actions.append((ordinal, kind, None, rewrite.rewrite, fmt, year))
                continue
        actions.append((ordinal, CALL, None, rewrite, fmt, -1))
    return tuple(actions)


def _call(rewrite: CellRewriter, value: bytes | None, fmt: int) -> bytes:
    try:
        new = rewrite(value, fmt)
    except Exception:
        return _NULL  # fail closed: the cell becomes NULL
    if not isinstance(new, bytes) or len(new) > MAX_CELL:
        return _NULL
    return _I32.pack(len(new)) + new


def _rewrite_rows_py(
    out: bytearray,
    chunk: bytes,
    frames: Frames,
    first: int,
    room: int,
    actions: tuple[Action, ...],
) -> tuple[int, int, int]:
    """The reference for ``_rowmask.rewrite_rows``: same arguments, same bytes, same errors."""
    unpack = _I32.unpack_from
    i = max(first, 0)
    rows = cells = 0
    while rows < room and i < len(frames):
        tag, start, end = frames[i]
        if tag != _T_DATA_ROW:
            break
        if not 0 <= start <= end <= len(chunk):
            raise ValueError("frame outside the chunk")
        if end - start < 7:
            raise PeerProtocolError(SHORT)
        ncols = (chunk[start + 5] << 8) | chunk[start + 6]
        pos, seg, col = start + 7, start + 5, 0
        parts: list[bytes] = []
        for ordinal, kind, constant, call, fmt, _clamp in actions:
            if ordinal >= ncols:
                break
            while col < ordinal:
                if end - pos < 4:
                    raise PeerProtocolError(SHORT)
                (length,) = unpack(chunk, pos)
                if length < -1 or length > end - pos - 4:
                    raise PeerProtocolError(INVALID)
                pos += 4 + max(length, 0)
                col += 1
            if end - pos < 4:
                raise PeerProtocolError(SHORT)
            (length,) = unpack(chunk, pos)
            if length < -1 or length > end - pos - 4:
                raise PeerProtocolError(INVALID)
            nxt = pos + 4 + max(length, 0)
            value = None if length < 0 else chunk[pos + 4 : nxt]
            parts.append(chunk[seg:pos])
            if kind == NULL:
                parts.append(_NULL)
            elif kind == CONST:
                assert constant is not None
                same = value is None or value == constant
                parts.append(_NULL if same else _I32.pack(len(constant)) + constant)
            else:
                assert call is not None
                parts.append(_call(call, value, fmt))
            pos = seg = nxt
            col += 1
            cells += 1
        parts.append(chunk[seg:end])
        body = b"".join(parts)
        if len(body) + 4 > 0x7FFFFFFF:
            raise PeerProtocolError(TOO_LONG)
        out += b"D"
        out += _U32.pack(len(body) + 4)
        out += body
        rows += 1
        i += 1
    return i, rows, cells


_rewrite_rows: RewriteRows
try:
    from pgproxy.protocol._rowmask import rewrite_rows as _rewrite_rows
except ImportError:  # not built (no compiler at install time): the Python loop does the work
    _rewrite_rows = _rewrite_rows_py

#: the compiled loop is in use
COMPILED: bool = _rewrite_rows is not _rewrite_rows_py

_last: tuple[RowPlan, Sequence[int], tuple[Action, ...]] | None = None


def rewrite_rows(
    out: bytearray,
    chunk: bytes,
    frames: Frames,
    first: int,
    room: int,
    plan: RowPlan,
    formats: Sequence[int],
) -> tuple[int, int, int]:
    """Rewrite the DataRows ``frames[first:]`` of ``chunk`` by ``plan`` into ``out``: at most
    ``room`` rows, up to the first other message. Returns (index after the last row done,
    rows done, cells rewritten)."""
    global _last
    last = _last
    if last is not None and last[0] is plan and last[1] is formats:
        actions = last[2]
    else:
        actions = compile_actions(plan, formats)
        _last = (plan, formats, actions)
    return _rewrite_rows(out, chunk, frames, first, room, actions)
