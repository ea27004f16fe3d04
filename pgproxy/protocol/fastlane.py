"""Recognising the relay's commonest exchange in one step: one simple Query, answered in one read.

Most statements an agent sends are one Query message, allowed as is, whose whole answer
(RowDescription, DataRows, CommandComplete, ReadyForQuery) arrives in one read. ``Relay``'s
fast lane (``Relay.fast_query`` / ``Relay.fast_result``) handles that exchange without framing
each message into its bookkeeping; these two functions say whether the bytes have exactly that
shape. Anything else (a partial message, an error, a notice, a parameter change, a second
request) returns None, and the relay's general path takes the bytes instead.

Both exist twice: compiled in ``_fastlane.c`` (built by ``pip install``; used when importable)
and the ``_py`` functions below, which are the reference and the fallback. The tests check with
hypothesis that both give the same answer for any bytes.
"""

from __future__ import annotations

from collections.abc import Callable

_Q, _T, _D, _C, _I, _Z = (ord(c) for c in "QTDCIZ")


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


def _plain_result_py(data: bytes, max_size: int) -> tuple[int, int] | None:
    """(DataRows, transaction status byte) when ``data`` is exactly a complete answer to a
    simple Query made only of RowDescription, DataRow, CommandComplete and EmptyQueryResponse
    messages, ending with its one ReadyForQuery; else None."""
    n = len(data)
    pos = 0
    rows = 0
    while n - pos >= 5:
        tag = data[pos]
        length = int.from_bytes(data[pos + 1 : pos + 5])
        end = pos + 1 + length
        if length < 4 or length > max_size or end > n:
            return None
        if tag == _D:
            rows += 1
        elif tag == _Z:
            if length != 5 or end != n:
                return None
            return rows, data[pos + 5]
        elif tag not in (_T, _C, _I):
            return None
        pos = end
    return None


query_text: Callable[[bytes, int], str | None]
plain_result: Callable[[bytes, int], tuple[int, int] | None]
try:
    from pgproxy.protocol._fastlane import plain_result, query_text
except ImportError:  # no compiler at install time: the reference twins
    query_text, plain_result = _query_text_py, _plain_result_py
