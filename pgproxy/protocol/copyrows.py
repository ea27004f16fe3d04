"""COPY TO STDOUT rows in text and CSV format: split into cells and join back.

Postgres sends one row per CopyData message when copying out. Text format (protocol section
"COPY", and the COPY command's "Text Format") separates columns by a tab, writes NULL as
``\\N`` and backslash-escapes control characters; CSV (default options only) quotes with ``"``
and writes NULL as an unquoted empty field. Values handed to cell rewriters are the plain text
representation of the value, exactly what a DataRow in text format would carry.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable, Sequence

_UNESCAPE = re.compile(rb"\\(x[0-9a-fA-F]{1,2}|[0-7]{1,3}|.)", re.DOTALL)
_SIMPLE = {b"b": b"\b", b"f": b"\f", b"n": b"\n", b"r": b"\r", b"t": b"\t", b"v": b"\v"}


def _unescape_one(m: re.Match[bytes]) -> bytes:
    s = m.group(1)
    if s in _SIMPLE:
        return _SIMPLE[s]
    if s[:1] == b"x" and len(s) > 1:
        return bytes([int(s[1:], 16)])
    if s[:1].isdigit() and s[:1] in b"01234567":
        return bytes([int(s, 8) & 0xFF])
    return s


def split_text(row: bytes) -> list[bytes | None]:
    line = row[:-1] if row.endswith(b"\n") else row
    out: list[bytes | None] = []
    for cell in line.split(b"\t"):
        out.append(None if cell == b"\\N" else _UNESCAPE.sub(_unescape_one, cell))
    return out


def join_text(cells: Sequence[bytes | None]) -> bytes:
    parts = []
    for c in cells:
        if c is None:
            parts.append(b"\\N")
        else:
            parts.append(
                c.replace(b"\\", b"\\\\").replace(b"\t", b"\\t").replace(b"\n", b"\\n")
                .replace(b"\r", b"\\r")
            )  # fmt: skip
    return b"\t".join(parts) + b"\n"


def split_csv(row: bytes) -> list[bytes | None]:
    text = row.decode()
    fields = next(csv.reader(io.StringIO(text)), [])
    # an unquoted empty field is NULL; a quoted one ("") is the empty string
    raw_fields = _raw_csv_fields(text.rstrip("\r\n"))
    return [
        None if f == "" and raw == "" else f.encode()
        for f, raw in zip(fields, raw_fields + [""] * (len(fields) - len(raw_fields)), strict=False)
    ]


def _raw_csv_fields(line: str) -> list[str]:
    out: list[str] = []
    cur: list[str] = []
    quoted = False
    for ch in line:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return out


def join_csv(cells: Sequence[bytes | None]) -> bytes:
    parts = []
    for c in cells:
        if c is None:
            parts.append("")
        else:
            s = c.decode("utf-8", "replace")
            if s == "" or any(ch in s for ch in ',"\n\r') or s.strip() != s:
                s = '"' + s.replace('"', '""') + '"'
            parts.append(s)
    return (",".join(parts) + "\n").encode()


Rewrite = Callable[[bytes | None, int], bytes | None]


def rewrite_row(row: bytes, fmt: str, rewriters: dict[int, Rewrite]) -> tuple[bytes, int]:
    """The row with its cells rewritten, and how many cells were; unparseable ⇒ ValueError."""
    cells = split_csv(row) if fmt == "csv" else split_text(row)
    n = 0
    for ordinal, rewrite in rewriters.items():
        if ordinal < len(cells):
            try:
                cells[ordinal] = rewrite(cells[ordinal], 0)
            except Exception:
                cells[ordinal] = None
            n += 1
    return (join_csv(cells) if fmt == "csv" else join_text(cells)), n
