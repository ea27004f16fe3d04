"""What the audit may store about a statement: its shape, never its literals.

``redact`` rebuilds the statement from Postgres' own scanner tokens (pglast / libpg_query) rather
than editing the input text, so nothing that is not a recognised token can survive: every
literal token (string, E'' / U&'' string, dollar-quoted body, bit/hex string, integer, float —
which covers typed literals such as ``date '2020-01-01'``, array literals ``'{...}'`` and the
bodies of DO blocks and CREATE FUNCTION) becomes a placeholder, comments are dropped, and the
whitespace between tokens is collapsed. ``$1`` parameters, keywords, identifiers and operators
are kept. When even scanning fails (e.g. an unterminated quote) the result is a fixed marker,
never the raw text.

``fingerprint`` is pglast's statement fingerprint (literal-insensitive); for unparseable input it
is a hash of the redacted token stream.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from pglast import parser

UNPARSEABLE = "<unparseable statement>"
IDENT_PLACEHOLDER = '"?"'
STRING_PLACEHOLDER = "'?'"
NUMBER_PLACEHOLDER = "?"

_STRING_TOKENS = frozenset({"SCONST", "USCONST", "BCONST", "XCONST"})
_NUMBER_TOKENS = frozenset({"ICONST", "FCONST"})
_COMMENT_TOKENS = frozenset({"SQL_COMMENT", "C_COMMENT"})


#: identifiers an agent did not invent: type names used in casts
_TYPE_NAMES = frozenset(
    {
        "text", "varchar", "char", "bpchar", "name", "int", "int2", "int4", "int8", "integer",
        "smallint", "bigint", "float4", "float8", "real", "numeric", "decimal", "date", "time",
        "timestamp", "timestamptz", "timetz", "interval", "bool", "boolean", "bytea", "uuid",
        "json", "jsonb", "xml", "inet", "cidr", "macaddr", "money", "oid", "regclass", "regtype",
        "regproc", "tsvector", "tsquery", "point", "line", "box", "circle", "polygon", "path",
    }
)  # fmt: skip


def redact(sql: str, known: Callable[[str], bool] | None = None) -> str:
    """``sql`` with every literal replaced by a placeholder and comments removed.

    With ``known``, an identifier it does not recognise (nor a built-in type name) becomes
    ``"?"`` too: a value typed where a literal belonged (``WHERE name = Smith`` or
    ``"900-12-3456"``) parses as an identifier, and must not reach the audit either."""
    try:
        tokens = parser.scan(sql)
    except Exception:
        return UNPARSEABLE
    out: list[str] = []
    prev_end = -1
    for tok in tokens:
        if tok.name in _COMMENT_TOKENS:
            continue
        if tok.name in _STRING_TOKENS:
            text = STRING_PLACEHOLDER
        elif tok.name in _NUMBER_TOKENS:
            text = NUMBER_PLACEHOLDER
        elif (
            tok.name == "IDENT"
            and known is not None
            and not _is_known(sql[tok.start : tok.end + 1], known)
        ):
            text = IDENT_PLACEHOLDER
        else:
            text = sql[tok.start : tok.end + 1]
        if out and tok.start > prev_end + 1:
            out.append(" ")
        out.append(text)
        prev_end = tok.end
    return "".join(out)


def _is_known(token: str, known: Callable[[str], bool]) -> bool:
    name = token[1:-1].replace('""', '"') if token.startswith('"') else token.lower()
    return name in _TYPE_NAMES or known(name)


def fingerprint(sql: str) -> str:
    """A stable id of the statement's shape: equal for statements differing only in literals."""
    try:
        return str(parser.fingerprint(sql))
    except Exception:
        digest = hashlib.sha256(redact(sql).encode("utf-8")).hexdigest()[:16]
        return f"x{digest}"
