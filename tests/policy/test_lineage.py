"""Column lineage over sqlglot's tree: sources, direct/derived, shape uses, writes, failures."""

from __future__ import annotations

import pytest

from pgproxy.policy.catalog import Catalog, Column, Relation
from pgproxy.policy.lineage import LineageError, StatementLineage, analyze

P, V = 1, 2
ID, NAME, SSN, DOB = (P, 1), (P, 2), (P, 3), (P, 4)
VID, VPID, VNOTE = (V, 1), (V, 2), (V, 3)

CATALOG = Catalog.build(
    [
        Relation(
            P,
            "public",
            "patients",
            "r",
            tuple(Column(i + 1, n, 25) for i, n in enumerate(["id", "name", "ssn", "dob"])),
        ),
        Relation(
            V,
            "public",
            "visits",
            "r",
            tuple(Column(i + 1, n, 25) for i, n in enumerate(["id", "patient_id", "note"])),
        ),
    ],
    [],
    {"patients.ssn": "ssn", "patients.name": "name", "patients.dob": "dob"},
)


def lin(sql: str) -> StatementLineage:
    return analyze(sql, CATALOG)


def cols(sql: str) -> list[tuple[frozenset[tuple[int, int]], bool]]:
    return [(c.sources, c.direct) for c in lin(sql).columns]


def clauses(sql: str) -> dict[str, frozenset[tuple[int, int]]]:
    out: dict[str, frozenset[tuple[int, int]]] = {}
    for use in lin(sql).shape:
        out[use.clause] = out.get(use.clause, frozenset()) | use.sources
    return out


def test_direct_and_derived() -> None:
    assert cols("SELECT id, upper(ssn), ssn::text, (ssn) FROM patients") == [
        (frozenset({ID}), True),
        (frozenset({SSN}), False),
        (frozenset({SSN}), False),
        (frozenset({SSN}), True),
    ]


def test_star_and_whole_row_expand_to_every_column() -> None:
    assert [c.sources for c in lin("SELECT * FROM patients").columns] == [
        frozenset({c}) for c in (ID, NAME, SSN, DOB)
    ]
    assert cols("SELECT row_to_json(p) FROM patients p") == [
        (frozenset({ID, NAME, SSN, DOB}), False)
    ]
    assert cols("SELECT to_jsonb(p.*) FROM patients p") == [
        (frozenset({ID, NAME, SSN, DOB}), False)
    ]


def test_ctes_subqueries_and_set_operations() -> None:
    assert cols("WITH c AS (SELECT ssn AS x FROM patients) SELECT x FROM c") == [
        (frozenset({SSN}), True)
    ]
    assert cols("SELECT s.x FROM (SELECT ssn AS x FROM patients) AS s") == [
        (frozenset({SSN}), True)
    ]
    assert cols("SELECT note FROM visits UNION ALL SELECT ssn FROM patients") == [
        (frozenset({VNOTE, SSN}), True)
    ]
    assert cols("SELECT (SELECT max(ssn) FROM patients) AS m") == [(frozenset({SSN}), False)]


def test_counting_reveals_no_value() -> None:
    assert (
        cols("SELECT count(*), count(ssn), count(DISTINCT ssn) FROM patients")
        == [(frozenset(), False)] * 3
    )
    assert cols("SELECT count(upper(ssn)) FROM patients") == [(frozenset({SSN}), False)]


def test_shape_clauses() -> None:
    found = clauses(
        "SELECT p.id FROM patients p JOIN visits v ON v.patient_id = p.id "
        "WHERE dob > '2000-01-01' GROUP BY p.id, name HAVING max(ssn) > '1' ORDER BY 1 LIMIT 3"
    )
    assert found["JOIN"] == frozenset({VPID, ID})
    assert found["WHERE"] == frozenset({DOB})
    assert found["GROUP BY"] == frozenset({ID, NAME})
    assert found["HAVING"] == frozenset({SSN})
    assert found["ORDER BY"] == frozenset({ID})
    assert clauses("SELECT id FROM patients UNION SELECT patient_id FROM visits")["UNION"] == (
        frozenset({ID, VPID})
    )
    assert "UNION" not in clauses("SELECT id FROM patients UNION ALL SELECT id FROM visits")


def test_equality_with_a_constant_is_marked_as_lookup() -> None:
    uses = lin("SELECT id FROM patients WHERE ssn = $1 AND name LIKE 'a%'").shape
    assert {(u.sources, u.lookup) for u in uses} == {
        (frozenset({SSN}), True),
        (frozenset({NAME}), False),
    }


def test_writes_record_where_data_goes() -> None:
    result = lin("INSERT INTO visits (id, note) SELECT id, ssn FROM patients RETURNING note")
    assert {(w.target, w.sources) for w in result.writes} == {
        (VID, frozenset({ID})),
        (VNOTE, frozenset({SSN})),
    }
    assert [c.sources for c in result.columns] == [frozenset({VNOTE})]
    upd = lin("UPDATE visits SET note = p.name FROM patients p WHERE p.id = visits.patient_id")
    assert [(w.target, w.sources) for w in upd.writes] == [(VNOTE, frozenset({NAME}))]


def test_unresolved_names_taint_with_every_tagged_column() -> None:
    result = lin("SELECT nosuch FROM patients")
    assert result.tainted
    assert result.columns[0].sources == frozenset({NAME, SSN, DOB})
    assert not result.columns[0].direct


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM nowhere",
        "SELECT a FROM (SELECT 1 AS a, 2 AS b) AS s (x, y, z)",
        "SELECT 1 UNION SELECT 1, 2",
        "SELEC broken",
        "SELECT 1; SELECT 2",
        "SELECT id INTO t FROM patients",
    ],
)
def test_untraceable_statements_raise(sql: str) -> None:
    with pytest.raises(LineageError):
        analyze(sql, CATALOG)
