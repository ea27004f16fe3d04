"""The shape key: statements share a key only when they differ in literals no decision reads."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgproxy.policy import shape
from pgproxy.policy.shape import key

TEMPLATES = (
    "SELECT abalance FROM pgbench_accounts WHERE aid = {a}",
    "SELECT ssn, id FROM patients WHERE id > {a} ORDER BY {b} LIMIT {c}",
    "SELECT ssn FROM patients WHERE note = 'x{a}' ORDER BY {b}",  # scanner path
    "SELECT a.{c} FROM t a",
    "SELECT id FROM patients WHERE id = {a} AND visits > {b}",  # no position clause
    "SELECT id FROM orders WHERE id = {a}",  # 'order' in a name: positions assumed
)


def test_small_integers_stay_where_they_can_be_column_positions() -> None:
    assert key("SELECT x FROM t WHERE id = 123456") == key("SELECT x FROM t WHERE id = 654321")
    assert key("SELECT x FROM t WHERE id = 12") == key("SELECT x FROM t WHERE id = 13")
    assert key("SELECT x FROM t WHERE id = 12 ORDER BY x") != key(
        "SELECT x FROM t WHERE id = 13 ORDER BY x"
    )
    assert key("SELECT x, y FROM t ORDER BY 1") != key("SELECT x, y FROM t ORDER BY 2")
    assert key("select x, y from t group by 1") != key("select x, y from t group by 2")
    assert key("SELECT DISTINCT ON (1) x, y FROM t") != key("SELECT DISTINCT ON (2) x, y FROM t")
    # not plain decimal: kept as written, never merged with another value
    assert key("SELECT x FROM t ORDER BY 010000") != key("SELECT x FROM t ORDER BY 010001")
    assert key("SELECT x FROM t WHERE id = 1e5") != key("SELECT x FROM t WHERE id = 2e5")
    assert key("SELECT t10000 FROM t") != key("SELECT t10001 FROM t")


def test_scanner_path_hides_strings_and_keeps_token_boundaries() -> None:
    assert key("SELECT 'a' FROM t") == key("SELECT 'bb' FROM t")
    assert key("SELECT 'a' FROM t ORDER BY 1") != key("SELECT 'a' FROM t ORDER BY 2")
    assert key('SELECT "a b" FROM t') != key("SELECT a b FROM t")
    assert key("SELECT $1 FROM t") != key("SELECT $2 FROM t")
    assert key("SELECT 1 -- 2\n FROM t") == key("SELECT 1 -- 3\n FROM t")
    assert key("SELECT 'unterminated") is None
    # the escape character of a Unicode identifier is part of the name, not a value
    assert key("SELECT U&\"!0073\" UESCAPE '!' FROM t") != key(
        "SELECT U&\"!0073\" UESCAPE '#' FROM t"
    )


@given(
    st.sampled_from(TEMPLATES),
    st.tuples(*(st.integers(0, 10**9) for _ in range(3))),
    st.tuples(*(st.integers(0, 10**9) for _ in range(3))),
)
def test_keys_are_equal_exactly_when_the_small_integers_are(
    template: str, one: tuple[int, int, int], two: tuple[int, int, int]
) -> None:
    a = template.format(a=one[0], b=one[1], c=one[2])
    b = template.format(a=two[0], b=two[1], c=two[2])

    positions = any(w in template.upper() for w in ("ORDER", "GROUP", "DISTINCT"))

    def visible(v: int, field: str) -> object:
        if field == "c" and "a.{c}" in template:
            return v  # part of an identifier: always kept
        if field == "a" and "'x{a}'" in template:
            return None  # inside a string: always hidden
        return v if positions and v < 10000 else None

    same = all(
        visible(x, f) == visible(y, f)
        for x, y, f in zip(one, two, "abc", strict=True)
        if "{" + f + "}" in template
    )
    assert (key(a) == key(b)) is same


#: pieces that spell (or nearly spell) the position clauses, in every case and with the
#: Unicode letters that case-fold onto ASCII ones (the long s, the Kelvin sign, dotted I)
_PIECES = st.sampled_from(
    ["order", "ORDER", "OrDeR", "ord", "er", "group", "GROUP", "grOUP", "distinct", "DISTINCT",
     "di", "\u017f", "tinct", "\u212a", "\u0130", "\u0131", " ", "_", "1", "x", "\u00e9"]
)  # fmt: skip
_WORDY = st.lists(_PIECES | st.characters(), max_size=12).map("".join)


@given(_WORDY)
@settings(max_examples=500, deadline=None)
def test_the_position_check_answers_as_the_case_insensitive_search(sql: str) -> None:
    # the key keeps small integers exactly where the slower regular expression would
    assert shape._reads_positions(sql) == (shape._POSITIONS.search(sql) is not None)


# ------------------------------------------------------------ the compiled simple key

try:
    from pgproxy.policy import _shapekey
except ImportError:  # pragma: no cover - the REQUIRE_EXT test below reports it in CI
    _shapekey = None  # type: ignore[assignment]

needs_ext = pytest.mark.skipif(_shapekey is None, reason="pgproxy.policy._shapekey is not built")


def test_the_compiled_key_is_there_when_required() -> None:
    if os.environ.get("PGPROXY_REQUIRE_EXT") != "1":
        pytest.skip("PGPROXY_REQUIRE_EXT=1 not set")
    assert _shapekey is not None, "pgproxy.policy._shapekey did not build (pip install -e .)"
    assert shape.simple_key is _shapekey.simple_key


#: pieces of simple texts: digits and what may stand next to an integer, the clause words,
#: the comment marker and the ASCII whitespace Python's \s knows
_SIMPLE_PIECES = ["0", "1", "9", "00", "999", "1000", "9999", "10000", "12345", "012345", "99999999999999999999", ".",
                  "_", "a", "Z", "-", "--", "e", " ", "\t", "\x0b", "\x1c", "\x1f", ",", ";",
                  "(", ")", "=", "<", ">", "*", "+", ":", "order", "GROUP", "Distinct",
                  "SELECT x FROM t WHERE id = "]  # fmt: skip
#: and what is not simple: quotes, other punctuation, NUL, non-ASCII whitespace and letters
_OTHER_PIECES = ["\x85", "\xa0", "\u2003", "'", '"', "$", "/", "\\", "\x00", "\x7f", "\u017f",
                 "\u212a", "é"]  # fmt: skip
_SQLISH = st.lists(st.sampled_from(_SIMPLE_PIECES), max_size=24).map("".join) | st.lists(
    st.sampled_from(_SIMPLE_PIECES + _OTHER_PIECES) | st.characters(), max_size=24
).map("".join)


@needs_ext
@given(_SQLISH)
@settings(max_examples=3000, deadline=None)
def test_the_simple_key_twins_agree(sql: str) -> None:
    assert _shapekey.simple_key(sql) == shape._simple_key_py(sql)


@needs_ext
@given(st.text(max_size=40))
@settings(max_examples=1000, deadline=None)
def test_the_simple_key_twins_agree_on_any_text(sql: str) -> None:
    assert _shapekey.simple_key(sql) == shape._simple_key_py(sql)


@pytest.mark.parametrize("impl", ["python", "compiled"])
def test_simple_key_examples(impl: str) -> None:
    if impl == "compiled" and _shapekey is None:
        pytest.skip("pgproxy.policy._shapekey is not built")
    fn = _shapekey.simple_key if impl == "compiled" else shape._simple_key_py
    assert fn("SELECT abalance FROM a WHERE aid = 912345;") == (
        "f:SELECT abalance FROM a WHERE aid = ?;"
    )
    assert fn("SELECT x FROM t WHERE id = 7 ORDER BY 2") == (
        "f:SELECT x FROM t WHERE id = 7 ORDER BY 2"
    )
    assert fn("select 123456, 012345, 1.5, x1, 1x, 9 from orders") == (
        "f:select ?, 012345, 1.5, x1, 1x, 9 from orders"
    )
    assert fn("SELECT 1, 22,333") == "f:SELECT ?, ?,?"
    assert fn("SELECT 9999, 10000 FROM t ORDER BY 1") == "f:SELECT 9999, ? FROM t ORDER BY 1"
    assert fn("") == "f:"
    assert fn("SELECT 'a'") is None  # a string: the scanner's
    assert fn("SELECT 1 -- 2") is None  # a comment
    assert fn("SELECT 1\xa0FROM t") is None  # not ASCII: the general key
    assert fn("SELECT 1\x00") is None


def test_unicode_whitespace_still_takes_the_simple_key() -> None:
    # not ASCII, so not the compiled key's; the same key as before all the same
    assert key("SELECT x\xa0FROM t WHERE id = 123") == "f:SELECT x\xa0FROM t WHERE id = ?"
    assert key("SELECT x FROM t WHERE id = 123") == "f:SELECT x FROM t WHERE id = ?"
