"""Recognising the relay's commonest exchanges in one step, answered in one read.

Most statements an agent sends are one Query message, or one [Parse]/Bind/[Describe]/Execute/
Sync, allowed as is, whose whole answer (ParseComplete, BindComplete, RowDescription, DataRows,
CommandComplete, ReadyForQuery) arrives in one read. ``Relay``'s fast lane
(``Relay.fast_query`` / ``Relay.fast_result``) handles such an exchange without framing each
message into its bookkeeping; the functions here say whether bytes have exactly that shape.
Anything else (a partial message, an error, a notice, a parameter change, a second request)
returns None, and the relay's general path takes the bytes instead.

Both exist twice: compiled in ``_fastlane.c`` (built by ``pip install``; used when importable)
and the ``_py`` functions below, which are the reference and the fallback. The tests check with
hypothesis that both give the same answer for any bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

_Q, _T, _D, _C, _I, _Z = (ord(c) for c in "QTDCIZ")
_PARSE_COMPLETE, _BIND_COMPLETE, _NO_DATA = (ord(c) for c in "12n")


def _query_text_py(data: bytes, max_size: int) -> str | None:
    """The SQL of ``data`` when it is exactly one well-formed Query message of at most
    ``max_size`` bytes (length word included) whose text is valid UTF-8; else None."""
    n = len(data)
    if n < 6 or data[0] != _Q or int.from_bytes(data[1:5]) != n - 1 or n - 1 > max_size:
        return None
    if data.find(b"\x00", 5) != n - 1:
        return None
    try:
        return data[5 : n - 1].decode()
    except UnicodeDecodeError:
        return None


def _messages(data: bytes, max_size: int) -> Iterator[tuple[int, int, int]]:
    """(tag, start, end) of each whole message in ``data``, in order; (-1, start, start) for
    one whose length is below 4, above ``max_size`` or past the end, and nothing after it."""
    n = len(data)
    pos = 0
    while n - pos >= 5:
        length = int.from_bytes(data[pos + 1 : pos + 5])
        end = pos + 1 + length
        if length < 4 or length > max_size or end > n:
            yield -1, pos, pos
            return
        yield data[pos], pos, end
        pos = end


def _plain_result_py(data: bytes, max_size: int) -> tuple[int, int] | None:
    """(DataRows, transaction status byte) when ``data`` is exactly a complete answer to a
    simple Query made only of RowDescription, DataRow, CommandComplete and EmptyQueryResponse
    messages, ending with its one ReadyForQuery; else None."""
    rows = 0
    for tag, start, end in _messages(data, max_size):
        if tag == _D:
            rows += 1
        elif tag == _Z:
            if end - start != 6 or end != len(data):
                return None
            return rows, data[start + 5]
        elif tag not in (_T, _C, _I):
            return None
    return None


def _plain_execute_py(
    data: bytes, max_size: int, parsed: bool, described: bool
) -> tuple[int, int, int, int] | None:
    """The answer to [Parse,] Bind, [Describe portal,] Execute (no row limit), Sync when
    ``data`` is exactly ParseComplete when ``parsed``, BindComplete, RowDescription or NoData
    when ``described``, DataRows, one CommandComplete or EmptyQueryResponse and one
    ReadyForQuery ending ``data``: (DataRows, status byte, start and end of the
    RowDescription's body in ``data``, or -1, -1)."""
    rows = 0
    # 0: ParseComplete, 1: BindComplete, 2: the Describe's answer, 3: rows until the
    # completion, 4: ReadyForQuery
    stage = 0 if parsed else 1
    body = (-1, -1)
    for tag, start, end in _messages(data, max_size):
        if tag < 0:
            return None
        if stage == 0:
            if tag != _PARSE_COMPLETE:
                return None
            stage = 1
        elif stage == 1:
            if tag != _BIND_COMPLETE:
                return None
            stage = 2 if described else 3
        elif stage == 2:
            if tag == _T:
                body = (start + 5, end)
            elif tag != _NO_DATA:
                return None
            stage = 3
        elif stage == 3:
            if tag == _D:
                rows += 1
            elif tag in (_C, _I):
                stage = 4
            else:
                return None
        else:
            if tag != _Z or end - start != 6 or end != len(data):
                return None
            return rows, data[start + 5], body[0], body[1]
    return None


query_text: Callable[[bytes, int], str | None]
plain_result: Callable[[bytes, int], tuple[int, int] | None]
plain_execute: Callable[[bytes, int, bool, bool], tuple[int, int, int, int] | None]
try:
    from pgproxy.protocol._fastlane import plain_execute, plain_result, query_text
except ImportError:  # no compiler at install time: the reference twins
    query_text, plain_result, plain_execute = _query_text_py, _plain_result_py, _plain_execute_py
