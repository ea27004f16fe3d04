"""The catalog loader against a real Postgres, and the engine's plans against real RowDescriptions.

A throwaway database gets a small clinic schema (tables, a partitioned table, views, a view over
a view, a materialized view, a user function). The loaded catalog must carry the tags to where
they belong, and for real queries the (table oid, attnum) the server reports for each result
column must agree with the lineage the engine computed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import psycopg
import pytest

from pgproxy.policy.catalog import Catalog
from pgproxy.policy.decide import PolicyEngine
from pgproxy.policy.operators import MaskCatalog
from pgproxy.policy.seam import Action, FieldInfo, StatementContext
from pgproxy.rules import Rules
from pgproxy.server.catalog_loader import build_catalog, load_catalog

DB = "pgproxy_catalog_loader_test"

SCHEMA = """
CREATE SCHEMA clinic;
CREATE TABLE clinic.patients (
    id int PRIMARY KEY, first_name text, ssn text, dob date, city text, dropped text);
ALTER TABLE clinic.patients DROP COLUMN dropped;
CREATE TABLE clinic.visits (id int, patient_id int, reason text, email text);
CREATE TABLE clinic.labs (id int, mrn text, value text) PARTITION BY LIST (id);
CREATE TABLE clinic.labs_1 PARTITION OF clinic.labs FOR VALUES IN (1);
CREATE VIEW clinic.patient_summary AS
    SELECT p.id, p.ssn, upper(p.first_name) AS shout, p.city FROM clinic.patients p;
CREATE VIEW clinic.summary_ssn AS SELECT ssn FROM clinic.patient_summary;
CREATE MATERIALIZED VIEW clinic.city_ssn AS SELECT city, ssn FROM clinic.patients;
CREATE FUNCTION clinic.leak(t text) RETURNS text LANGUAGE sql AS 'SELECT t';
INSERT INTO clinic.patients VALUES (1, 'Testy', '000-12-3456', '1970-01-01', 'Springfield');
CREATE TABLE clinic.members (
    id int PRIMARY KEY, email text, mrn text CONSTRAINT members_mrn UNIQUE, nick text, note text,
    joined int GENERATED ALWAYS AS IDENTITY);
CREATE UNIQUE INDEX members_lower_email ON clinic.members (lower(email));
CREATE UNIQUE INDEX members_nick ON clinic.members (nick) WHERE note IS NOT NULL;
CREATE TABLE clinic.visit_notes (
    id int, member_mrn text REFERENCES clinic.members (mrn), admitted date, born date,
    CHECK (admitted >= born));
CREATE FUNCTION clinic.touch() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NEW; END';
CREATE TABLE clinic.audited (id int, note text);
CREATE TRIGGER audited_touch BEFORE INSERT ON clinic.audited
    FOR EACH ROW EXECUTE FUNCTION clinic.touch();
CREATE TABLE clinic.cards (id int, ssn text, tail text GENERATED ALWAYS AS (right(ssn, 4)) STORED);
CREATE TABLE clinic.births (id int, dob date) PARTITION BY RANGE (dob);
CREATE TABLE clinic.births_1960s PARTITION OF clinic.births
    FOR VALUES FROM ('1960-01-01') TO ('1970-01-01');
"""

RULES = Rules.model_validate(
    {
        "agents": [{"name": "bot", "password": "x"}],
        "tags": {
            "clinic.patients.ssn": "ssn",
            "clinic.patients.first_name": "name",
            "clinic.patients.dob": "dob",
            "clinic.labs.mrn": "mrn",
            "clinic.*.email": "email",
            "clinic.members.mrn": "mrn",
            "clinic.visit_notes.born": "dob",
            "clinic.cards.ssn": "ssn",
            "clinic.births.dob": "dob",
        },
        "approvals": {"approvers": ["privacy@example.org"]},
    }
)
CTX = StatementContext(agent="bot", database=DB, origin="query")


def _with_db(dsn: str, db: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{db}"))


@pytest.fixture(scope="module")
async def clinic_dsn(pg_dsn: str) -> AsyncIterator[str]:
    admin = await asyncpg.connect(pg_dsn, timeout=10)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {DB}")
        await admin.execute(f"CREATE DATABASE {DB}")
        dsn = _with_db(pg_dsn, DB)
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            await conn.execute(SCHEMA)
        finally:
            await conn.close()
        yield dsn
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        await admin.close()


@pytest.fixture(scope="module")
async def catalog(clinic_dsn: str) -> Catalog:
    conn = await asyncpg.connect(clinic_dsn, timeout=10)
    try:
        return await load_catalog(conn, RULES)
    finally:
        await conn.close()


def _ref(cat: Catalog, table: str, column: str) -> tuple[int, int]:
    rel = cat.relation("clinic", table)
    assert rel is not None, table
    col = rel.column(column)
    assert col is not None, column
    return (rel.oid, col.attnum)


async def test_loader_reads_relations_columns_and_functions(catalog: Catalog) -> None:
    patients = catalog.relation("clinic", "patients")
    assert patients is not None and patients.relkind == "r"
    assert [c.name for c in patients.columns] == ["id", "first_name", "ssn", "dob", "city"]
    assert catalog.relation(None, "pg_stats", ()) is not None
    assert catalog.functions(None, "upper", ())[0].is_builtin
    assert not catalog.functions("clinic", "leak")[0].is_builtin
    labs_1 = catalog.relation("clinic", "labs_1")
    labs = catalog.relation("clinic", "labs")
    assert labs_1 is not None and labs is not None and labs_1.parent_oids == (labs.oid,)


async def test_loader_tags_tables_partitions_views_and_matviews(catalog: Catalog) -> None:
    def tag(table: str, column: str) -> tuple[frozenset[str], bool] | None:
        t = catalog.tag(_ref(catalog, table, column))
        return None if t is None else (t.tags, t.derived)

    assert tag("patients", "ssn") == (frozenset({"ssn"}), False)
    assert tag("patients", "city") is None
    assert tag("visits", "email") == (frozenset({"email"}), False)
    assert tag("labs_1", "mrn") == (frozenset({"mrn"}), False)
    assert tag("patient_summary", "ssn") == (frozenset({"ssn"}), False)
    assert tag("patient_summary", "shout") == (frozenset({"name"}), True)
    assert tag("patient_summary", "city") is None
    assert tag("summary_ssn", "ssn") == (frozenset({"ssn"}), False)
    assert tag("city_ssn", "ssn") == (frozenset({"ssn"}), False)
    assert not catalog.opaque


async def test_catalog_version_is_stable_and_tracks_rules(
    clinic_dsn: str, catalog: Catalog
) -> None:
    conn = await asyncpg.connect(clinic_dsn, timeout=10)
    try:
        again = await load_catalog(conn, RULES)
        fewer = await load_catalog(
            conn, Rules.model_validate({"tags": {"clinic.patients.ssn": "ssn"}})
        )
    finally:
        await conn.close()
    assert again.version == catalog.version
    assert fewer.version != catalog.version


def _fields(dsn: str, sql: str) -> list[FieldInfo]:
    """The RowDescription the server sends for ``sql``."""
    with psycopg.connect(dsn, connect_timeout=10) as conn, conn.cursor() as cur:
        cur.execute(sql)
        res = cur.pgresult
        assert res is not None
        return [
            FieldInfo(
                (res.fname(i) or b"").decode(),
                res.ftable(i),
                res.ftablecol(i),
                res.ftype(i),
                res.fsize(i),
                res.fmod(i),
                res.fformat(i),
            )
            for i in range(res.nfields)
        ]


@pytest.mark.parametrize(
    ("sql", "masked"),
    [
        ("SELECT id, ssn, city FROM clinic.patients", {1: "ssn"}),
        ("SELECT * FROM clinic.patients", {1: "name", 2: "ssn", 3: "dob"}),
        ("SELECT upper(ssn) AS s, id FROM clinic.patients", {0: "ssn"}),
        ("WITH c AS (SELECT ssn AS x FROM clinic.patients) SELECT x FROM c", {0: "ssn"}),
        ("SELECT s.x FROM (SELECT ssn AS x, id FROM clinic.patients) s", {0: "ssn"}),
        ("SELECT ssn, shout, city FROM clinic.patient_summary", {0: "ssn", 1: "name"}),
        ("SELECT ssn FROM clinic.summary_ssn", {0: "ssn"}),
        ("SELECT city, ssn FROM clinic.city_ssn", {1: "ssn"}),
        ("SELECT ssn FROM clinic.patients UNION ALL SELECT ssn FROM clinic.patients", {0: "ssn"}),
        ("SELECT p FROM clinic.patients p", {0: "dob,name,ssn"}),
        ("SELECT count(*), count(ssn) FROM clinic.patients", {}),
    ],
)
async def test_plans_agree_with_real_row_descriptions(
    clinic_dsn: str, catalog: Catalog, sql: str, masked: dict[int, str]
) -> None:
    engine = PolicyEngine(RULES, catalog, MaskCatalog(RULES), "bot")
    verdict = engine.statement(sql, CTX)
    assert verdict.admits, verdict.reasons
    assert verdict.result is not None
    plan = verdict.result.plan(_fields(clinic_dsn, sql))
    assert plan.block is None
    assert {m.ordinal: m.tag for m in plan.masks} == masked
    if masked:
        assert verdict.action is Action.MASK


async def test_a_mismatched_row_description_is_blocked(clinic_dsn: str, catalog: Catalog) -> None:
    engine = PolicyEngine(RULES, catalog, MaskCatalog(RULES), "bot")
    verdict = engine.statement("SELECT id, city FROM clinic.patients", CTX)
    assert verdict.result is not None
    real = _fields(clinic_dsn, "SELECT id, ssn FROM clinic.patients")
    assert verdict.result.plan(real).block


async def test_unknown_and_temporary_relations_are_blocked(
    clinic_dsn: str, catalog: Catalog
) -> None:
    engine = PolicyEngine(RULES, catalog, MaskCatalog(RULES), "bot")
    assert engine.statement("SELECT * FROM clinic.nope", CTX).action is Action.BLOCK
    with psycopg.connect(clinic_dsn, connect_timeout=10) as conn:
        conn.execute("CREATE TEMP TABLE t AS SELECT ssn FROM clinic.patients")
        # the catalog was loaded before the temp table existed, and never lists temp schemas
        assert engine.statement("SELECT * FROM t", CTX).action is Action.BLOCK
        assert engine.statement("SELECT * FROM pg_temp.t", CTX).action is Action.BLOCK
    assert engine.statement("SELECT clinic.leak(ssn) FROM clinic.patients", CTX).action is (
        Action.BLOCK
    )


async def test_loader_reads_the_checks_a_write_makes(catalog: Catalog) -> None:
    members = catalog.relation("clinic", "members")
    notes = catalog.relation("clinic", "visit_notes")
    audited = catalog.relation("clinic", "audited")
    assert members is not None and notes is not None and audited is not None
    col = {c.name: c.attnum for c in members.columns}
    unique = {c.columns for c in members.checks if c.kind == "unique index"}
    assert unique == {
        frozenset({col["id"]}),
        frozenset({col["mrn"]}),
        frozenset({col["email"]}),  # lower(email)
        frozenset({col["nick"], col["note"]}),  # nick WHERE note IS NOT NULL
    }
    assert [c.kind for c in members.checks if c.kind == "referenced key"] == ["referenced key"]
    assert {c.name for c in members.columns if c.has_default} == {"joined"}
    assert {c.kind for c in notes.checks} == {"foreign key", "check constraint"}
    assert [c.kind for c in audited.checks] == ["trigger or rule"]


@pytest.mark.parametrize(
    ("sql", "action", "reason"),
    [
        ("INSERT INTO clinic.members (id, email) VALUES (7, 'a@b.c')", Action.HOLD, "unique"),
        ("INSERT INTO clinic.members (id, mrn) VALUES (7, 'MRN1')", Action.HOLD, "unique"),
        ("INSERT INTO clinic.members (id, nick, note) VALUES (7, 'x', 'y')", Action.ALLOW, ""),
        ("INSERT INTO clinic.visit_notes (id, member_mrn) VALUES (1, 'M')", Action.HOLD, "foreign"),
        ("DELETE FROM clinic.members WHERE id = 7", Action.HOLD, "referenced key"),
        ("UPDATE clinic.visit_notes SET admitted = '1970-01-01'", Action.HOLD, "check"),
        ("INSERT INTO clinic.audited (id, note) VALUES (1, 'x')", Action.HOLD, "trigger"),
        ("COPY clinic.members (id, mrn) FROM STDIN", Action.HOLD, "unique"),
        ("INSERT INTO clinic.patients (id, city) VALUES (9, 'Springfield')", Action.ALLOW, ""),
    ],
)
async def test_writes_that_test_stored_tagged_values_are_held(
    catalog: Catalog, sql: str, action: Action, reason: str
) -> None:
    verdict = PolicyEngine(RULES, catalog, MaskCatalog(RULES), "bot").statement(sql, CTX)
    assert verdict.action is action, verdict.reasons
    assert any(reason in r for r in verdict.reasons), verdict.reasons


async def test_generated_columns_and_partition_keys_carry_tags(catalog: Catalog) -> None:
    tail = catalog.tag(_ref(catalog, "cards", "tail"))
    assert tail is not None and tail.tags == {"ssn"} and tail.derived
    births = catalog.relation("clinic", "births")
    assert births is not None and births.partition_key == {_ref(catalog, "births", "dob")[1]}
    engine = PolicyEngine(RULES, catalog, MaskCatalog(RULES), "bot")
    masked = engine.statement("SELECT id, tail FROM clinic.cards", CTX)
    assert masked.action is Action.MASK and [m.column for m in masked.masks] == ["tail"]
    held = engine.statement("SELECT id FROM clinic.births_1960s", CTX)
    assert held.action is Action.HOLD and any("partition" in r for r in held.reasons)
    assert engine.statement("SELECT id FROM clinic.births", CTX).action is Action.ALLOW


def test_a_write_into_a_foreign_table_runs_checks_the_policy_cannot_see() -> None:
    rels = [{"oid": 5, "schema": "clinic", "name": "remote", "relkind": "f", "viewdef": None}]
    cols = [{"relid": 5, "attnum": 1, "name": "id", "type_oid": 23}]
    cat = build_catalog(rels, cols, [], [], RULES)
    remote = cat.relation("clinic", "remote")
    assert remote is not None and [c.kind for c in remote.checks] == ["trigger or rule"]
