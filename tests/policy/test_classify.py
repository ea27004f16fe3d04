"""Statement classification: SQL fixture cases plus the properties the decider relies on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgproxy.policy.classify import Classified, ClassifyError, StatementClass, classify

FIXTURES = Path(__file__).parent / "fixtures" / "classify"
EXPECT = "-- expect:"


@dataclass(frozen=True)
class Expected:
    klass: str
    hold: str | None
    unbounded: bool
    inner: str | None

    @classmethod
    def parse(cls, text: str) -> Expected:
        words = text.split()
        opts = dict(w.split("=", 1) for w in words[1:] if "=" in w)
        unknown = set(opts) - {"hold", "inner"} | (
            {w for w in words[1:] if "=" not in w} - {"unbounded"}
        )
        assert not unknown, f"bad expectation words {unknown}"
        return cls(words[0], opts.get("hold"), "unbounded" in words[1:], opts.get("inner"))

    def matches(self, got: Classified) -> bool:
        return (
            got.klass.value == self.klass
            and got.hold_class == self.hold
            and got.unbounded_write == self.unbounded
            and (got.inner.klass.value if got.inner else None) == self.inner
        )


def _cases() -> list[object]:
    cases: list[object] = []
    for path in sorted(FIXTURES.glob("*.sql")):
        blocks: list[tuple[int, list[Expected], list[str]]] = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.startswith(EXPECT):
                expected = [Expected.parse(p) for p in line[len(EXPECT) :].split("|")]
                blocks.append((n, expected, []))
            elif blocks:
                blocks[-1][2].append(line)
        for n, expected, lines in blocks:
            cases.append(pytest.param(expected, "\n".join(lines), id=f"{path.stem}:{n}"))
    return cases


CASES = _cases()


def test_fixture_files_exist() -> None:
    assert len(CASES) > 100


@pytest.mark.parametrize(("expected", "sql"), CASES)
def test_fixture(expected: list[Expected], sql: str) -> None:
    got = classify(sql)
    described = [
        (c.klass.value, c.hold_class, c.unbounded_write, c.inner and c.inner.klass.value)
        for c in got
    ]
    assert len(got) == len(expected), described
    for exp, actual in zip(expected, got, strict=True):
        assert exp.matches(actual), described


def test_every_class_value_is_lower_case_name() -> None:
    for klass in StatementClass:
        assert klass.value == klass.name.lower()


@pytest.mark.parametrize("sql", ["", "   ", ";", ";;", "-- only a comment", "/* c */ -- d"])
def test_no_statements(sql: str) -> None:
    assert classify(sql) == []


def test_statement_text_is_sliced_per_statement() -> None:
    sql = "SELECT 1;\n  /* between */ UPDATE t SET a = 2 WHERE id = 3 ;  DELETE FROM t WHERE b"
    got = classify(sql)
    assert [c.klass for c in got] == [
        StatementClass.SELECT,
        StatementClass.UPDATE,
        StatementClass.DELETE,
    ]
    assert got[0].sql == "SELECT 1"
    assert got[1].sql == "UPDATE t SET a = 2 WHERE id = 3"
    assert got[2].sql == "DELETE FROM t WHERE b"


def test_statement_slices_count_characters_not_bytes() -> None:
    got = classify("SELECT 'é€😀'; SELECT 2")
    assert [c.sql for c in got] == ["SELECT 'é€😀'", "SELECT 2"]


def test_inner_statement_carries_text_and_node() -> None:
    (got,) = classify("EXPLAIN ANALYZE DELETE FROM patients WHERE id = 1")
    assert got.inner is not None
    assert got.inner.klass is StatementClass.DELETE
    assert "DELETE FROM patients" in got.inner.sql
    assert type(got.inner.node).__name__ == "DeleteStmt"
    assert type(got.node).__name__ == "ExplainStmt"


def test_classified_is_frozen() -> None:
    (got,) = classify("SELECT 1")
    with pytest.raises(AttributeError):
        got.klass = StatementClass.DDL  # type: ignore[misc]


SECRET = "Zq9SecretMarker"


@pytest.mark.parametrize(
    "sql",
    [
        f"SELECT '{SECRET}' FROM",
        f"SELECT {SECRET} {SECRET} {SECRET}",
        f"SELECT '{SECRET}",
        f'SELECT "{SECRET}',
        f"SELECT $x${SECRET}",
        f"UPDATE patients SET ssn = '{SECRET}' WHERE",
        f"INSERT INTO {SECRET} VALUES (",
    ],
)
def test_parse_error_never_echoes_sql(sql: str) -> None:
    with pytest.raises(ClassifyError) as info:
        classify(sql)
    assert SECRET.lower() not in str(info.value).lower()
    assert "unparseable" in str(info.value)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text_classifies_or_raises_classify_error(sql: str) -> None:
    try:
        got = classify(sql)
    except ClassifyError as exc:
        # The message is the parser's reason only: it must not quote the input back.
        assert "at or near" not in str(exc)
        return
    for c in got:
        assert isinstance(c.klass, StatementClass)
        assert c.sql in sql


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from(
        [
            "DELETE FROM t",
            "UPDATE t SET a = 1",
            "INSERT INTO t VALUES (1)",
            "MERGE INTO t USING s ON t.a = s.a WHEN MATCHED THEN DELETE",
        ]
    ),
    st.sampled_from(["{}", "EXPLAIN ANALYZE {}", "PREPARE p AS {}", "COPY ({}) TO STDOUT"]),
)
def test_write_hidden_in_cte_is_never_select(write: str, wrapper: str) -> None:
    sql = wrapper.format(f"WITH w AS ({write} RETURNING 1) SELECT * FROM w")
    (got,) = classify(sql)
    node = got.inner or got
    assert node.hold_class == "write"
    assert node.klass is not StatementClass.SELECT
