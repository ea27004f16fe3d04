"""Catalog lookups (search_path, pg_temp, pg_catalog) and tag resolution and propagation."""

from __future__ import annotations

from pgproxy.policy.catalog import Catalog, Column, ColumnTag, Function, Relation

TEXT = 25


def _rel(oid: int, schema: str, name: str, *cols: str, kind: str = "r", **kw: object) -> Relation:
    columns = tuple(Column(i + 1, c, TEXT) for i, c in enumerate(cols))
    return Relation(oid, schema, name, kind, columns, **kw)  # type: ignore[arg-type]


RELS = [
    _rel(1, "public", "patients", "id", "ssn", "email", "SSN"),
    _rel(2, "billing", "patients", "id", "ssn"),
    _rel(3, "billing", "accounts", "id", "email"),
    _rel(4, "pg_catalog", "pg_class", "oid", "relname"),
    _rel(5, "pg_temp_3", "scratch", "x"),
    _rel(6, "public", "events", "id", "email", kind="p"),
    _rel(7, "public", "events_2024", "email", "id", parent_oids=(6,)),
    _rel(8, "public", "events_2024_q1", "id", "email", parent_oids=(7,)),
    _rel(
        9,
        "public",
        "v_patients",
        "id",
        "ssn",
        "low",
        "both",
        kind="v",
        view_sql=" SELECT p.id, p.ssn, lower(p.email) AS low, p.ssn || p.email AS both"
        " FROM public.patients p;",
    ),
    _rel(
        10,
        "public",
        "v_v",
        "ssn",
        kind="v",
        view_sql=" SELECT v_patients.ssn FROM public.v_patients;",
    ),
    _rel(11, "public", "bad_view", "x", kind="v", view_sql="not sql at all ((("),
    _rel(
        12,
        "public",
        "untagged_view",
        "id",
        kind="m",
        view_sql=" SELECT patients.id FROM public.patients;",
    ),
]
FUNCS = [Function(100, "pg_catalog", "lower"), Function(101, "public", "lower")]
GLOBS = {
    "patients.ssn": "ssn",
    "public.*.email": "email",
    "billing.patients.ssn": "ssn",
    "public.patients.SSN": "ssn",
}


def build(globs: dict[str, str] = GLOBS) -> Catalog:
    return Catalog.build(RELS, FUNCS, globs)


def test_relation_lookup_follows_search_path() -> None:
    cat = build()
    assert cat.relation(None, "patients", ("public",)).oid == 1  # type: ignore[union-attr]
    assert cat.relation(None, "patients", ("billing", "public")).oid == 2  # type: ignore[union-attr]
    assert cat.relation(None, "accounts", ("public",)) is None
    assert cat.relation("billing", "accounts").oid == 3  # type: ignore[union-attr]


def test_pg_catalog_and_pg_temp_are_searched_first_unless_placed() -> None:
    cat = build()
    assert cat.relation(None, "pg_class", ("public",)).oid == 4  # type: ignore[union-attr]
    assert cat.relation(None, "scratch", ("public",)).oid == 5  # type: ignore[union-attr]
    assert cat.relation("pg_temp", "scratch").oid == 5  # type: ignore[union-attr]
    # functions never come from pg_temp, and pg_catalog wins unless the path places it later
    assert cat.functions(None, "lower", ("public",))[0].schema == "pg_catalog"
    assert cat.functions(None, "lower", ("public", "pg_catalog"))[0].schema == "public"


def test_two_part_globs_mean_public_and_exact_names_are_case_sensitive() -> None:
    cat = build()
    assert cat.tag((1, 2)) == ColumnTag(frozenset({"ssn"}))
    assert cat.tag((1, 4)) == ColumnTag(frozenset({"ssn"}))  # "SSN"
    assert cat.tag((2, 2)) == ColumnTag(frozenset({"ssn"}))
    assert cat.tag((1, 1)) is None
    assert cat.tag((3, 2)) is None  # public.*.email does not reach billing
    assert cat.tag((1, 3)) == ColumnTag(frozenset({"email"}))
    assert cat.tag((4, 2)) is None


def test_partitions_inherit_by_column_name_through_levels() -> None:
    cat = build()
    assert cat.tag((7, 1)) == ColumnTag(frozenset({"email"}))  # email is column 1 there
    assert cat.tag((7, 2)) is None
    assert cat.tag((8, 2)) == ColumnTag(frozenset({"email"}))


def test_views_are_tagged_through_their_definitions() -> None:
    cat = build()
    assert cat.tag((9, 1)) is None
    assert cat.tag((9, 2)) == ColumnTag(frozenset({"ssn"}), derived=False)
    assert cat.tag((9, 3)) == ColumnTag(frozenset({"email"}), derived=True)
    assert cat.tag((9, 4)) == ColumnTag(frozenset({"ssn", "email"}), derived=True)
    assert cat.tag((10, 1)) == ColumnTag(frozenset({"ssn"}), derived=False)
    assert cat.tagged_refs_of(12) == frozenset()


def test_untraceable_views_are_opaque() -> None:
    cat = build()
    assert 11 in cat.opaque
    assert 9 not in cat.opaque


def test_version_tracks_contents() -> None:
    assert build().version == build().version
    assert build().version != build({"patients.ssn": "ssn"}).version
    assert build().version != Catalog.build(RELS[:-1], FUNCS, GLOBS).version


def test_first_matching_glob_wins_and_exact_beats_glob() -> None:
    cat = Catalog.build(RELS, FUNCS, {"public.patients.*": "free_text", "patients.ssn": "ssn"})
    assert cat.tag((1, 2)) == ColumnTag(frozenset({"ssn"}))
    assert cat.tag((1, 1)) == ColumnTag(frozenset({"free_text"}))
    assert cat.column_name((1, 2)) == "public.patients.ssn"
