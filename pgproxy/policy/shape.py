"""The literal-insensitive cache key of a statement: which statements may share one decision.

``PolicyEngine`` decides a statement text once and reuses the verdict for texts that differ
only in literal values (``WHERE aid = 48213`` and ``WHERE aid = 99120``). A key that is too
coarse is a breach: it hands one statement the decision made for another. So a key keeps every
literal whose value can change the decision and the engine shares keys only between plain DML
statements (``SHARED_CLASSES``), where no literal value matters except one: a small integer
can be a column position (``ORDER BY 2``, ``GROUP BY 1``, ``DISTINCT ON (1)``), and ordering by
position 1 may order by a tagged column where position 2 does not. In a text that contains
``ORDER``, ``GROUP`` or ``DISTINCT`` anywhere (any case; only those clauses read positions),
integers below ``10000`` (more than the 1664 columns a select list can have) therefore stay in
the key verbatim, and so does any integer written in a form other than plain decimal without
leading zeros; in any other text every plain decimal integer is a placeholder. One string is
not a value either: the escape character after ``UESCAPE`` decides which identifier
``U&"!0073sn"`` names, so it stays in the key too. Option
values of EXPLAIN, SET and the like (``ANALYZE 'true'``) are why no other class shares keys.

Two ways to the same kind of key: statements made only of identifiers, keywords, numbers,
whitespace and simple punctuation (no quotes, dollars, comments or backslashes — nothing that
can hide a token boundary) are keyed by regular expressions; all others by Postgres' own
scanner (pglast), where strings and floats become placeholders too. The first way, for ASCII
text, also exists compiled (``_shapekey.c``, a tenth of the regular expressions' time, used
when it was built): ``_simple_key_py`` is its reference, and tests check that both agree.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final

from pglast import parser

#: statement classes whose decision depends on no literal value except column positions
SHARED_CLASSES: Final = frozenset({"select", "insert", "update", "delete"})

_SIMPLE: Final = re.compile(r"[A-Za-z0-9_\s,.;()=<>*+\-:]*")
#: a standalone decimal integer of 5+ digits (not part of an identifier, a float or a param)
_BIG_INT: Final = re.compile(r"(?<![\w.])[1-9][0-9]{4,}(?![\w.])")
#: any standalone decimal integer
_ANY_INT: Final = re.compile(r"(?<![\w.])[0-9]+(?![\w.])")
#: the clauses where an integer constant is a column position
_POSITIONS: Final = re.compile(r"order|group|distinct", re.IGNORECASE)
_STRING_TOKENS: Final = frozenset({"SCONST", "USCONST", "BCONST", "XCONST"})
_COMMENT_TOKENS: Final = frozenset({"SQL_COMMENT", "C_COMMENT"})


def _reads_positions(sql: str) -> bool:
    """Whether ORDER, GROUP or DISTINCT occurs anywhere, in any case (``_POSITIONS``; for
    ASCII text the same answer without the slower case-insensitive search)."""
    if sql.isascii():
        low = sql.lower()
        return "order" in low or "group" in low or "distinct" in low
    return _POSITIONS.search(sql) is not None


def _regex_key(sql: str) -> str | None:
    """The key of a text made only of ``_SIMPLE`` characters with no comment, else None."""
    if _SIMPLE.fullmatch(sql) is None or "--" in sql:
        return None
    return "f:" + (_BIG_INT if _reads_positions(sql) else _ANY_INT).sub("?", sql)


def _simple_key_py(sql: str) -> str | None:
    """``_regex_key`` of an ASCII text (the reference of the compiled ``simple_key``)."""
    return _regex_key(sql) if sql.isascii() else None


simple_key: Callable[[str], str | None]
try:
    from pgproxy.policy._shapekey import simple_key
except ImportError:  # no compiler at install time: the reference twin
    simple_key = _simple_key_py


def key(sql: str) -> str | None:
    """The statement's shape key, or None when it will not scan (such a text is never shared)."""
    simple = simple_key(sql) if sql.isascii() else _regex_key(sql)  # Unicode whitespace
    if simple is not None:
        return simple
    ints = _BIG_INT if _reads_positions(sql) else _ANY_INT
    try:
        tokens = parser.scan(sql)
    except Exception:
        return None
    out = ["s:"]
    previous = ""
    for tok in tokens:
        name = tok.name
        if name in _COMMENT_TOKENS:
            continue
        text = sql[tok.start : tok.end + 1]
        after_uescape, previous = previous == "UESCAPE", name
        if name in _STRING_TOKENS and not after_uescape:
            text = "'?'"
        elif name == "FCONST" or (name == "ICONST" and ints.fullmatch(text) is not None):
            text = "?"
        out.append(text)
        out.append(" ")
    return "".join(out)
