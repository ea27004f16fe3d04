"""No seeded PHI value reaches the agent, by any path: assertions on every byte it received.

A database with fake, distinctive PHI sits behind a proxy running the real policy (catalog from
the upstream, lineage, Safe Harbor masks, scrubbed diagnostics). Each case is one attempt an
agent could make to get a value out; whatever the proxy answers — masked rows, an error, a
notice — the bytes on the wire must not contain any seeded value, and the session must go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import struct
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest

from pgproxy.protocol.relay import HoldRequested
from pgproxy.server.holds import HoldContext, HoldOutcome
from tests.integration._util import RawConn, message, startup_packet
from tests.integration.capture import CaptureHop
from tests.integration.conftest import ProxyThread
from tests.integration.conftest import policy_proxy as start_policy_proxy

DB = "pgproxy_phi_test"
PATIENTS = [
    # id, first, last, ssn, dob, email, mrn
    (1, "Quixanthe", "Vorhelmsky", "900-55-1234", dt.date(1961, 4, 17), "quix.v@example.invalid", "MRN7731199"),
    (2, "Zephyrine", "Klabautrik", "900-66-4321", dt.date(1975, 9, 3), "zeph.k@example.invalid", "MRN8842200"),
]  # fmt: skip

RULES = """
agents:
  - name: triage-bot
    password: "s3cret"
    owner: carol@example.org
    approvers: [alice@example.org]
tags:
  public.patients.first_name: name
  public.patients.last_name: name
  public.patients.ssn: ssn
  public.patients.dob: dob
  public.patients.email: email
  public.patients.mrn: mrn
  public.cards.ssn: ssn
  public.badges.ssn: ssn
  public.births.dob: dob
  public.contacts.email: email
approvals:
  hold: [ddl, privilege, bulk_export]
  bulk_export_rows: 1000
"""


def secrets_of(rows: list[tuple[object, ...]]) -> list[bytes]:
    out: list[bytes] = []
    epoch = dt.date(2000, 1, 1)
    for _id, first, last, ssn, dob, email, mrn in rows:
        assert isinstance(dob, dt.date)
        out += [str(v).encode() for v in (first, last, ssn, email, mrn)]
        out.append(str(ssn).replace("-", "").encode())
        out.append(dob.isoformat().encode())
        out.append(struct.pack("!i", (dob - epoch).days))  # binary date
    return out


@pytest.fixture(scope="module")
def phi_db(pg_cluster: object, pg_dsn: str) -> Iterator[str]:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DB}")
        conn.execute(f"CREATE DATABASE {DB}")
    dsn = pg_dsn.rsplit("/", 1)[0] + f"/{DB}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE patients (id int PRIMARY KEY, first_name text NOT NULL, last_name text,"
            " ssn text UNIQUE, dob date, email text, mrn text, visits int)"
        )
        conn.execute("CREATE TABLE referrals (id int, patient_ssn text REFERENCES patients (ssn))")
        conn.execute(
            "CREATE TABLE cards (id int, ssn text, ssn_copy text GENERATED ALWAYS AS (ssn || '')"
            " STORED)"
        )
        conn.execute(
            "CREATE TABLE badges (id int, label text GENERATED ALWAYS AS ('badge') STORED,"
            " ssn text)"
        )
        conn.execute("CREATE TABLE births (id int, dob date) PARTITION BY RANGE (dob)")
        conn.execute(
            "CREATE TABLE births_1961 PARTITION OF births"
            " FOR VALUES FROM ('1961-01-01') TO ('1962-01-01')"
        )
        conn.execute("CREATE TABLE births_other PARTITION OF births DEFAULT")
        for row in PATIENTS:
            conn.execute("INSERT INTO patients VALUES (%s,%s,%s,%s,%s,%s,%s, 3)", row)
        conn.execute("INSERT INTO births SELECT id, dob FROM patients")
        conn.execute("INSERT INTO cards (id, ssn) SELECT id, ssn FROM patients")
        conn.execute("INSERT INTO badges (id, ssn) SELECT id, ssn FROM patients")
        conn.execute("CREATE VIEW patient_view AS SELECT id, ssn, first_name FROM patients")
        conn.execute("CREATE VIEW born_early AS SELECT id FROM patients WHERE dob < '1970-01-01'")
        conn.execute("CREATE VIEW born_late AS SELECT id FROM patients WHERE dob >= '1970-01-01'")
        conn.execute("CREATE TABLE visits_summary (id int, note text)")
        conn.execute(
            "CREATE TABLE contacts (id int, email text UNIQUE DEFERRABLE INITIALLY DEFERRED)"
        )
        conn.execute("INSERT INTO contacts SELECT id, email FROM patients")
        conn.execute("ANALYZE patients")
    yield dsn


@pytest.fixture(scope="module")
def policy_proxy(phi_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyThread]:
    rules_dir: Path = tmp_path_factory.mktemp("phi-rules")
    (rules_dir / "rules.yaml").write_text(RULES)
    thread = start_policy_proxy(phi_db, rules_dir)
    try:
        yield thread
    finally:
        thread.stop()


@pytest.fixture
def hop(policy_proxy: ProxyThread) -> Iterator[CaptureHop]:
    with CaptureHop(policy_proxy.host, policy_proxy.port) as h:
        yield h


def dsn_for(hop: CaptureHop) -> str:
    return f"postgresql://triage-bot:s3cret@{hop.host}:{hop.port}/{DB}"


def assert_no_phi(received: bytes) -> None:
    leaked = [s for s in secrets_of(PATIENTS) if s in received]
    assert not leaked, f"seeded PHI reached the client: {leaked!r}"


SIMPLE_CASES = [
    "SELECT ssn, first_name, last_name, dob, email, mrn FROM patients",
    "SELECT upper(ssn) FROM patients",
    "SELECT ssn || '' FROM patients",
    "SELECT ssn::varchar FROM patients",
    "SELECT CAST(ssn AS bytea) FROM patients",
    "WITH x AS (SELECT ssn AS s, first_name AS n FROM patients) SELECT s, n FROM x",
    "SELECT id::text FROM patients UNION SELECT ssn FROM patients",
    "SELECT row_to_json(p) FROM patients p",
    "SELECT json_agg(p) FROM patients p",
    "SELECT to_jsonb(p) FROM patients p",
    "SELECT p FROM patients p",
    "SELECT p::text FROM patients p",
    "SELECT string_agg(ssn, ',') FROM patients",
    "SELECT array_agg(first_name) FROM patients",
    "SELECT (SELECT ssn FROM patients ORDER BY id LIMIT 1)",
    "SELECT * FROM patient_view",
    "SELECT id FROM patients WHERE ssn LIKE '900-55%'",
    "SELECT id FROM patients ORDER BY dob",
    "SELECT substr(ssn, 1, 1), count(*) FROM patients GROUP BY substr(ssn, 1, 1)",
    "SELECT ssn::int FROM patients",
    "SELECT 1 / (length(ssn) - 11) FROM patients",
    "SELECT histogram_bounds::text, most_common_vals::text FROM pg_stats WHERE tablename = 'patients'",
    "SELECT * FROM pg_stats",
    "DO $$BEGIN RAISE NOTICE '%', (SELECT ssn FROM patients LIMIT 1); END$$",
    "SELECT pg_notify('ch', (SELECT ssn FROM patients LIMIT 1))",
    "SELECT query FROM pg_stat_activity",
    "SELECT format('%s', ssn) FROM patients",
    "SELECT to_char(dob, 'YYYY-MM-DD') FROM patients",
    "SELECT jsonb_build_object('s', ssn) FROM patients",
    "SELECT CASE WHEN ssn LIKE '900%' THEN 1 END FROM patients",
    "SELECT id FROM patients WHERE EXISTS (SELECT 1 FROM patients q WHERE q.ssn = '900-55-1234')",
    "SELECT query_to_xml('select ssn from patients', true, true, '')",
    "SELECT x.s FROM (SELECT ssn AS s FROM patients) x, LATERAL (SELECT x.s AS t) y",
    "SELECT first_name, lag(ssn) OVER (ORDER BY id) FROM patients",
    "EXPLAIN ANALYZE SELECT * FROM patients WHERE ssn = '900-55-1234'",
    "INSERT INTO patients (id, ssn) VALUES (99, '900-55-1234')",
    "INSERT INTO visits_summary SELECT id, ssn FROM patients",
    "CREATE TEMP TABLE t AS SELECT ssn FROM patients",
    "SELECT * FROM t",
    "SELECT ssn FROM patients \\; SELECT first_name FROM patients",
    "COPY (SELECT ssn FROM patients) TO STDOUT",
    "COPY patients TO STDOUT",
    "PREPARE q AS SELECT ssn FROM patients",
    "EXECUTE q",
    "SELECT j.value FROM patients p, jsonb_each_text(to_jsonb(p)) j",
    "SELECT x FROM patients p, jsonb_path_query(to_jsonb(p), '$.ssn') x",
    "SELECT unnest(string_to_array(ssn, '-')) FROM patients",
    "SELECT s FROM patients, regexp_split_to_table(ssn, '') s",
    "SELECT ssn::json FROM patients",
    "SELECT to_date(ssn, 'YYYY') FROM patients",
    "SELECT coalesce(nullif(ssn, '900-55-1234'), (1 / (id - id))::text) FROM patients",
    "SELECT count(x) FROM (SELECT nullif(ssn, '900-55-1234') AS x FROM patients) t",
    "SELECT U&\"!0073sn\" UESCAPE '!' FROM patients",
    "SELECT ssn_copy FROM cards",
    "SELECT * FROM cards",
]


@pytest.mark.parametrize("sql", SIMPLE_CASES)
def test_simple_query_never_leaks(hop: CaptureHop, sql: str) -> None:
    with psycopg.connect(dsn_for(hop), autocommit=True) as conn:
        try:
            with conn.cursor() as cur:
                cur.execute(sql.replace("\\;", ";"), prepare=False)
                while True:
                    if cur.description is not None:
                        cur.fetchall()
                    if not cur.nextset():
                        break
        except psycopg.Error:
            pass
        # the session is still usable whatever happened
        assert conn.execute("SELECT 40 + 2").fetchone() == (42,)
        assert_no_phi(hop.snapshot())


def test_direct_projection_is_masked_not_blocked(hop: CaptureHop) -> None:
    with psycopg.connect(dsn_for(hop)) as conn:
        rows = conn.execute("SELECT id, ssn, dob, visits FROM patients ORDER BY id").fetchall()
    assert [r[0] for r in rows] == [1, 2]
    assert all(r[3] == 3 for r in rows)  # untagged columns pass untouched
    assert all(r[1] is not None and "900-" not in r[1] for r in rows)
    assert [r[2] for r in rows] == [dt.date(1961, 1, 1), dt.date(1975, 1, 1)]
    assert_no_phi(hop.snapshot())


def test_binary_results_and_prepared_statements(hop: CaptureHop) -> None:
    with psycopg.connect(dsn_for(hop)) as conn:
        cur = conn.cursor(binary=True)
        rows = cur.execute(
            "SELECT ssn, dob, first_name FROM patients ORDER BY id", prepare=True
        ).fetchall()
        rows += cur.execute(
            "SELECT ssn, dob, first_name FROM patients ORDER BY id", prepare=True
        ).fetchall()
    assert [r[1] for r in rows[:2]] == [dt.date(1961, 1, 1), dt.date(1975, 1, 1)]
    assert_no_phi(hop.snapshot())


def test_asyncpg_prepared_binary(hop: CaptureHop) -> None:
    async def run() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(dsn_for(hop))
        try:
            stmt = await conn.prepare("SELECT ssn, dob, mrn, visits FROM patients ORDER BY id")
            return list(await stmt.fetch())
        finally:
            await conn.close()

    rows = asyncio.run(run())
    assert [r["visits"] for r in rows] == [3, 3]
    assert [r["dob"] for r in rows] == [dt.date(1961, 1, 1), dt.date(1975, 1, 1)]
    assert_no_phi(hop.snapshot())


def test_cursor_declare_fetch(hop: CaptureHop) -> None:
    with psycopg.connect(dsn_for(hop)) as conn:
        with conn.cursor(name="c1") as cur:  # DECLARE … FETCH through psycopg
            cur.execute("SELECT ssn, first_name FROM patients")
            cur.fetchall()
        try:
            conn.execute("DECLARE c2 CURSOR FOR SELECT ssn FROM patients")
            conn.execute("FETCH ALL FROM c2").fetchall()
        except psycopg.Error:
            conn.rollback()
    assert_no_phi(hop.snapshot())


def test_unique_violation_detail_is_scrubbed(hop: CaptureHop) -> None:
    with psycopg.connect(dsn_for(hop), autocommit=True) as conn:
        with pytest.raises(psycopg.Error) as err:
            conn.execute(
                "UPDATE patients SET ssn = (SELECT ssn FROM patients WHERE id = 2) WHERE id = 1"
            )
        assert err.value.diag.message_detail is None
    assert_no_phi(hop.snapshot())


def test_listen_on_a_channel_not_allowlisted_is_refused(hop: CaptureHop, phi_db: str) -> None:
    with psycopg.connect(dsn_for(hop), autocommit=True) as agent:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            agent.execute("LISTEN leak_channel")
        with psycopg.connect(phi_db, autocommit=True) as admin:
            admin.execute("SELECT pg_notify('leak_channel', ssn) FROM patients")
        agent.execute("SELECT 1")
        assert list(agent.notifies(timeout=0.5)) == []
    assert_no_phi(hop.snapshot())


def test_blocked_statement_in_transaction_aborts_it(hop: CaptureHop) -> None:
    with psycopg.connect(dsn_for(hop)) as conn:
        conn.execute("SELECT 1")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT pg_sleep(0)")
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.rollback()
        assert conn.execute("SELECT 7").fetchone() == (7,)


class _ApproveEverything:
    """A reviewer who approves every hold at once: what is left to protect is the masking."""

    async def hold(self, ctx: HoldContext, held: HoldRequested) -> HoldOutcome:
        return HoldOutcome(True, "", "test-approval")

    async def executed(self, approval_id: str, rows: int, sqlstate: str) -> None:
        return None


@pytest.fixture(scope="module")
def approving_proxy(phi_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyThread]:
    rules_dir: Path = tmp_path_factory.mktemp("phi-rules-approve")
    (rules_dir / "rules.yaml").write_text(RULES)
    thread = start_policy_proxy(phi_db, rules_dir, holds=_ApproveEverything())
    try:
        yield thread
    finally:
        thread.stop()


@pytest.mark.parametrize(
    "sql",
    [
        "COPY (SELECT id, ssn, dob, first_name FROM patients ORDER BY id) TO STDOUT",
        "COPY patients TO STDOUT WITH (FORMAT csv, HEADER)",
        "COPY (SELECT id, upper(last_name) FROM patients) TO STDOUT (FORMAT csv)",
    ],
)
def test_approved_copy_out_is_still_masked(approving_proxy: ProxyThread, sql: str) -> None:
    with CaptureHop(approving_proxy.host, approving_proxy.port) as hop:
        with psycopg.connect(dsn_for(hop)) as conn, conn.cursor() as cur, cur.copy(sql) as copy:
            data = b"".join(bytes(chunk) for chunk in copy)
        assert data.count(b"\n") >= 2  # the rows did arrive
        assert_no_phi(hop.snapshot())
    if "dob" in sql:
        assert b"1961-01-01" in data  # dates kept to the year, in the column's type


COPY_VARIANTS = [
    # COPY of a table leaves out its generated columns: the cells are not where SELECT * has them
    "COPY badges TO STDOUT",
    "COPY badges TO STDOUT (FORMAT csv)",
    "COPY cards TO STDOUT",
    "COPY patients TO STDOUT (FORMAT 'CSV')",
    "COPY patients TO STDOUT WITH CSV HEADER",
    "COPY patients TO STDOUT WITH CSV HEADER QUOTE '\"' FORCE QUOTE *",
    "COPY patients TO STDOUT (HEADER)",
    "COPY patients TO STDOUT (FORMAT csv, HEADER 1)",
    "COPY patients TO STDOUT (FORMAT csv, HEADER 0)",
    "COPY patients TO STDOUT (FORMAT csv, HEADER 'on')",
    "COPY patients TO STDOUT (FORMAT csv, HEADER false)",
    "COPY patients TO STDOUT (FORMAT csv, DELIMITER '-')",
    "COPY patients TO STDOUT (FORMAT csv, QUOTE '9')",
    "COPY patients TO STDOUT (FORMAT csv, ESCAPE '9')",
    "COPY patients TO STDOUT (NULL '900-55-1234')",
    "COPY patients TO STDOUT (FORMAT csv, FORCE_QUOTE *)",
    "COPY patients TO STDOUT (FORMAT csv, ENCODING 'UTF8')",
    "COPY patients TO STDOUT (ENCODING 'LATIN1')",
    "COPY patients TO STDOUT (DELIMITER E'\\x01')",
    "COPY patients TO STDOUT BINARY",
    "COPY patients (ssn, id) TO STDOUT",
    'COPY patients ("ssn") TO STDOUT (FORMAT csv)',
    "COPY (SELECT ssn || E'\\t,\"\\n\\\\' || first_name, ssn FROM patients) TO STDOUT",
    "COPY (SELECT ssn || E'\\t,\"\\n\\\\' || first_name, ssn FROM patients) TO STDOUT (FORMAT csv)",
    "COPY (SELECT * FROM patient_view) TO STDOUT (FORMAT csv, HEADER)",
    "COPY (SELECT id, 'é' || mrn FROM patients) TO STDOUT",
    "COPY (SELECT ssn FROM patients UNION ALL SELECT ssn FROM cards) TO STDOUT",
    "COPY (UPDATE contacts SET id = id RETURNING email) TO STDOUT",
    "COPY (DELETE FROM contacts WHERE id < 0 RETURNING email) TO STDOUT",
    "COPY (WITH x AS (SELECT ssn FROM patients) SELECT * FROM x) TO STDOUT",
    "COPY (VALUES ((SELECT ssn FROM patients LIMIT 1))) TO STDOUT",
    "COPY (TABLE patients) TO STDOUT (FORMAT csv, HEADER true)",
    "COPY (SELECT p FROM patients p) TO STDOUT",
    "COPY (SELECT ROW(ssn, id) FROM patients) TO STDOUT (FORMAT csv)",
    "COPY (SELECT ARRAY[ssn] FROM patients) TO STDOUT",
    "COPY births_1961 TO STDOUT",
    "COPY births_other TO STDOUT (FORMAT csv)",
]


@pytest.mark.parametrize("sql", COPY_VARIANTS)
def test_copy_option_variants_never_leak(approving_proxy: ProxyThread, sql: str) -> None:
    with CaptureHop(approving_proxy.host, approving_proxy.port) as hop:
        with psycopg.connect(dsn_for(hop), autocommit=True) as conn:
            with contextlib.suppress(psycopg.Error), conn.cursor() as cur, cur.copy(sql) as copy:
                for _ in copy:
                    pass
            assert conn.execute("SELECT 7").fetchone() == (7,)
        assert_no_phi(hop.snapshot())


@pytest.mark.parametrize(
    "sql",
    [
        "COPY (SELECT ssn FROM patients) TO STDOUT; COPY (SELECT mrn, id FROM patients) TO STDOUT",
        "SELECT 1; COPY patients TO STDOUT (FORMAT csv, HEADER); SELECT ssn FROM patients",
        "COPY (SELECT id FROM patients) TO STDOUT (HEADER); COPY cards TO STDOUT (FORMAT csv)",
        "COPY badges TO STDOUT; COPY patients TO STDOUT",
    ],
)
def test_copies_in_one_query_message_never_leak(approving_proxy: ProxyThread, sql: str) -> None:
    with CaptureHop(approving_proxy.host, approving_proxy.port) as hop:
        raw = RawConn(hop.host, hop.port, timeout=20)
        try:
            raw.send(startup_packet({"user": "triage-bot", "database": DB}))
            raw.login("triage-bot", "s3cret")
            raw.query(sql)
            assert raw.query("SELECT 40 + 2")[-1][0] == b"Z"
        finally:
            raw.close()
        assert_no_phi(hop.snapshot())


def test_copy_of_a_table_with_generated_columns_masks_the_right_cells(
    approving_proxy: ProxyThread,
) -> None:
    with CaptureHop(approving_proxy.host, approving_proxy.port) as hop:
        with psycopg.connect(dsn_for(hop), autocommit=True) as conn:
            with conn.cursor() as cur, cur.copy("COPY cards TO STDOUT") as copy:
                data = b"".join(bytes(chunk) for chunk in copy)
            assert [row.split(b"\t")[0] for row in data.splitlines()] == [b"1", b"2"]
            # a generated column that reads no other column is left out too
            with conn.cursor() as cur, cur.copy("COPY badges TO STDOUT") as copy:
                badges = b"".join(bytes(chunk) for chunk in copy)
            rows = [row.split(b"\t") for row in badges.splitlines()]
            assert [len(r) for r in rows] == [2, 2] and [r[0] for r in rows] == [b"1", b"2"]
            assert conn.execute("SELECT 7").fetchone() == (7,)
        assert_no_phi(hop.snapshot())


def test_binary_copy_of_tagged_data_is_blocked(approving_proxy: ProxyThread) -> None:
    with CaptureHop(approving_proxy.host, approving_proxy.port) as hop:
        with (
            psycopg.connect(dsn_for(hop)) as conn,
            conn.cursor() as cur,
            pytest.raises(psycopg.errors.InsufficientPrivilege),
            cur.copy("COPY patients TO STDOUT (FORMAT binary)") as copy,
        ):
            for _ in copy:
                pass
        assert_no_phi(hop.snapshot())


def test_the_parser_and_the_server_always_read_literals_alike(hop: CaptureHop) -> None:
    """With standard_conforming_strings off, Postgres would read `'a\\''` as a shorter string
    than pglast does and run what pglast took for a literal. The setting is pinned on."""
    attack = "SELECT 'a\\'' , ssn FROM patients --'"
    dsn = dsn_for(hop)
    with psycopg.connect(
        dsn, autocommit=True, options="-c standard_conforming_strings=off"
    ) as conn:
        assert conn.execute("SHOW standard_conforming_strings").fetchone() == ("on",)
        for sql in (
            "SET standard_conforming_strings = off",
            "SET SESSION standard_conforming_strings TO off",
            "SELECT set_config('standard_conforming_strings', 'off', false)",
            "SET client_encoding = 'LATIN1'",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(sql)
        rows = conn.execute(attack).fetchall()
        assert rows  # one string literal, to the parser and to the server alike
        assert conn.execute("SHOW client_encoding").fetchone() == ("UTF8",)
    assert_no_phi(hop.snapshot())


def test_a_column_position_is_decided_on_its_own(hop: CaptureHop) -> None:
    """ORDER BY 2 after ORDER BY 1: one literal apart, but the second orders by the SSN."""
    with psycopg.connect(dsn_for(hop), autocommit=True) as conn:
        first = conn.execute("SELECT id, ssn FROM patients ORDER BY 1").fetchall()
        assert [r[0] for r in first] == [1, 2]
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT id, ssn FROM patients ORDER BY 2").fetchall()
        assert conn.execute("SELECT 40 + 2").fetchone() == (42,)
        assert_no_phi(hop.snapshot())


def _outcome(conn: psycopg.Connection[tuple[object, ...]], sql: str) -> str:
    """What the agent learns from one statement: its rows, or the SQLSTATE it failed with."""
    try:
        return repr(conn.execute(sql).fetchall())
    except psycopg.Error as exc:
        return f"error {exc.sqlstate}"


@pytest.mark.parametrize(
    "template",
    [
        # an error raised or not, depending on the first digit of the SSN
        "SELECT 1 / (ascii(substr(ssn, 1, 1)) - {guess}) FROM patients WHERE id = 1",
        "SELECT substr(ssn, 1, 1)::int / (ascii(substr(ssn, 1, 1)) - {guess}) FROM patients",
        # how many rows come back, depending on the SSN
        "SELECT count(*) FROM patients, generate_series(1, ascii(ssn) - {guess} + 1) g",
        "SELECT id, generate_series(1, ascii(ssn) - {guess} + 1) FROM patients WHERE id = 1",
        "SELECT id FROM patients TABLESAMPLE BERNOULLI ((SELECT (ascii(ssn) - {guess}) * 100"
        " FROM patients WHERE id = 1))",
        # a bad constant raises only when the value is not NULL, and nullif makes NULL a guess
        "SELECT substr(nullif(ascii(ssn), {guess})::text, 1, -1) FROM patients WHERE id = 1",
        "SELECT nullif(ascii(ssn), {guess}) / 0.0 FROM patients WHERE id = 1",
        "SELECT date_trunc('fortnight', CASE WHEN ascii(ssn) = {guess} THEN NULL ELSE dob END)"
        " FROM patients WHERE id = 1",
        # NULL or not, counted
        "SELECT count(x) FROM (SELECT nullif(ascii(ssn), {guess}) AS x FROM patients) t",
    ],
)
def test_an_answer_does_not_depend_on_a_guess_about_tagged_data(
    hop: CaptureHop, template: str
) -> None:
    """Right guess (the SSNs start with 9, ascii 57) and wrong guess must look alike."""
    with psycopg.connect(dsn_for(hop), autocommit=True) as conn:
        right = _outcome(conn, template.format(guess=57))
        wrong = _outcome(conn, template.format(guess=48))
        assert conn.execute("SELECT 40 + 2").fetchone() == (42,)
    assert right == wrong
    assert_no_phi(hop.snapshot())


def test_a_unicode_escape_character_is_decided_on_its_own(hop: CaptureHop) -> None:
    """One UESCAPE string apart: the first names the id column, the second the SSN."""
    sub = '(SELECT id AS "!0073sn", ssn FROM patients ORDER BY id) s'
    with psycopg.connect(dsn_for(hop), autocommit=True) as conn:
        first = conn.execute(f"SELECT U&\"!0073sn\" UESCAPE '#' FROM {sub}").fetchall()
        assert first == [(1,), (2,)]
        second = conn.execute(f"SELECT U&\"!0073sn\" UESCAPE '!' FROM {sub}").fetchall()
        assert len(second) == 2
    assert_no_phi(hop.snapshot())


def test_move_does_not_count_a_held_cursor(hop: CaptureHop) -> None:
    """MOVE ALL's command tag is the number of rows: for a cursor over WHERE ssn LIKE … that
    count is what the agent is after."""
    tags = []
    with psycopg.connect(dsn_for(hop)) as conn:
        for guess in ("9", "8"):
            cur = conn.cursor()
            cur.execute(f"DECLARE c CURSOR FOR SELECT id FROM patients WHERE ssn LIKE '{guess}%'")
            try:
                cur.execute("MOVE ALL IN c")
                tags.append(cur.statusmessage)
            except psycopg.Error as exc:
                tags.append(exc.sqlstate)
            conn.rollback()
    assert tags[0] == tags[1]
    assert_no_phi(hop.snapshot())


def _write_outcomes(
    hop: CaptureHop, template: str, guesses: tuple[str, str] = ("900-55-1234", "900-00-0000")
) -> list[str]:
    """The command tag or SQLSTATE of ``template`` for a right and a wrong guess (by default
    of patient 1's SSN), rolled back."""
    out = []
    with psycopg.connect(dsn_for(hop)) as conn:
        for guess in guesses:
            cur = conn.cursor()
            try:
                cur.execute(template.format(guess=guess))
                out.append(str(cur.statusmessage))
            except psycopg.Error as exc:
                out.append(f"error {exc.sqlstate}")
            conn.rollback()
    return out


def test_on_conflict_does_not_test_a_guess_against_tagged_values(hop: CaptureHop) -> None:
    outcomes = _write_outcomes(
        hop, "INSERT INTO patients (id, ssn) VALUES (99, '{guess}') ON CONFLICT DO NOTHING"
    )
    assert outcomes[0] == outcomes[1]
    assert_no_phi(hop.snapshot())


@pytest.mark.parametrize(
    "template",
    [
        # patients.ssn is UNIQUE: 23505 or not
        "INSERT INTO patients (id, first_name, ssn) VALUES (99, 'A', '{guess}')",
        "UPDATE patients SET ssn = '{guess}' WHERE id = 2",
        "INSERT INTO patients (id, first_name) VALUES (2, 'A')"
        " ON CONFLICT (id) DO UPDATE SET ssn = '{guess}'",
        # referrals.patient_ssn references patients.ssn: 23503 or not
        "INSERT INTO referrals (id, patient_ssn) VALUES (1, '{guess}')",
    ],
)
def test_a_write_does_not_test_a_guess_against_stored_values(
    hop: CaptureHop, template: str
) -> None:
    outcomes = _write_outcomes(hop, template)
    assert outcomes[0] == outcomes[1]
    assert_no_phi(hop.snapshot())


def test_a_partition_does_not_say_where_a_tagged_key_falls(hop: CaptureHop) -> None:
    """births is partitioned by dob: patient 1 (born 1961) is a row of births_1961."""
    with psycopg.connect(dsn_for(hop), autocommit=True) as conn:
        one = _outcome(conn, "SELECT id FROM births_1961")
        other = _outcome(conn, "SELECT id FROM births_other")
        everyone = _outcome(conn, "SELECT id FROM births ORDER BY id")
    assert one == other
    assert everyone == repr([(1,), (2,)])


def test_a_view_does_not_say_which_rows_its_tagged_condition_keeps(hop: CaptureHop) -> None:
    """born_early keeps patient 1 (1961), born_late patient 2 (1975): their rows are the dobs."""
    with psycopg.connect(dsn_for(hop), autocommit=True) as conn:
        early = _outcome(conn, "SELECT id FROM born_early")
        late = _outcome(conn, "SELECT id FROM born_late")
    assert early == late
    assert_no_phi(hop.snapshot())


def test_a_not_null_column_does_not_test_a_guess(hop: CaptureHop) -> None:
    """first_name is NOT NULL: nullif makes the NULL exactly when the guess is right."""
    out = _write_outcomes(
        hop,
        "UPDATE patients SET first_name = nullif(first_name, '{guess}') WHERE id = 1",
        ("Quixanthe", "Nobody"),
    )
    assert out[0] == out[1]
    assert_no_phi(hop.snapshot())


def test_copy_into_a_unique_tagged_column_does_not_test_a_guess(hop: CaptureHop) -> None:
    out = []
    with psycopg.connect(dsn_for(hop)) as conn:
        for guess in ("900-55-1234", "900-00-0000"):
            cur = conn.cursor()
            try:
                with cur.copy("COPY patients (id, first_name, ssn) FROM STDIN") as copy:
                    copy.write_row((99, "A", guess))
                out.append(str(cur.statusmessage))
            except psycopg.Error as exc:
                out.append(f"error {exc.sqlstate}")
            conn.rollback()
    assert out[0] == out[1]
    assert_no_phi(hop.snapshot())


def test_count_distinct_does_not_compare_an_inserted_guess(hop: CaptureHop) -> None:
    """Insert a row whose dob is a guess, then count the distinct dobs of it and patient 1."""
    out = []
    with psycopg.connect(dsn_for(hop)) as conn:
        for guess in ("1961-04-17", "1961-04-18"):
            conn.execute(f"INSERT INTO patients (id, first_name, dob) VALUES (99, 'A', '{guess}')")
            out.append(
                _outcome(conn, "SELECT count(DISTINCT dob) FROM patients WHERE id IN (1, 99)")
            )
            conn.rollback()
    assert out[0] == out[1]
    assert_no_phi(hop.snapshot())


def test_an_approved_temporary_view_cannot_shadow_a_known_table(
    approving_proxy: ProxyThread,
) -> None:
    """The catalog never holds temporary objects: a temporary view named like an untagged
    table would be decided as that table while Postgres reads the view. Even approved, no."""
    with CaptureHop(approving_proxy.host, approving_proxy.port) as hop:
        with psycopg.connect(dsn_for(hop), autocommit=True) as conn:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(
                    "CREATE TEMP VIEW visits_summary AS SELECT id, ssn AS note FROM patients"
                )
            with contextlib.suppress(psycopg.Error):
                conn.execute("SELECT id, note FROM visits_summary").fetchall()
        assert_no_phi(hop.snapshot())


def test_a_schema_named_after_the_upstream_role_does_not_shadow_public(
    hop: CaptureHop, phi_db: str
) -> None:
    """Postgres' default search_path starts with "$user"; the policy resolves names in
    public. pgproxy pins the upstream session's search_path, so both read the same relation."""
    with psycopg.connect(phi_db, autocommit=True) as owner:
        user = owner.info.user
        owner.execute(f'CREATE SCHEMA "{user}"')
        owner.execute(
            f'CREATE VIEW "{user}".visits_summary AS SELECT id, ssn AS note FROM public.patients'
        )
    try:
        with psycopg.connect(dsn_for(hop), autocommit=True) as conn:
            assert conn.execute("SHOW search_path").fetchone() == ("public",)
            with contextlib.suppress(psycopg.Error):
                conn.execute("SELECT id, note FROM visits_summary").fetchall()
    finally:
        with psycopg.connect(phi_db, autocommit=True) as owner:
            owner.execute(f'DROP SCHEMA "{user}" CASCADE')
    assert_no_phi(hop.snapshot())


# ------------------------------------------------------------- names shared across paths
# Prepared statements and portals are names on the server; SQL PREPARE/DECLARE and the
# extended protocol share them. A name the relay binds to one verdict must not run another
# statement upstream.


def _raw(hop: CaptureHop) -> RawConn:
    raw = RawConn(hop.host, hop.port, timeout=20)
    raw.send(startup_packet({"user": "triage-bot", "database": DB}))
    raw.login("triage-bot", "s3cret")
    return raw


def _parse(name: str, sql: str) -> bytes:
    return message(b"P", name.encode() + b"\x00" + sql.encode() + b"\x00" + struct.pack("!h", 0))


def _bind(portal: str, statement: str) -> bytes:
    body = portal.encode() + b"\x00" + statement.encode() + b"\x00"
    return message(b"B", body + struct.pack("!hhh", 0, 0, 0))


def _execute(portal: str, max_rows: int = 0) -> bytes:
    return message(b"E", portal.encode() + b"\x00" + struct.pack("!i", max_rows))


SYNC = message(b"S", b"")


def _until_ready(raw: RawConn, n: int = 1) -> list[tuple[bytes, bytes]]:
    out: list[tuple[bytes, bytes]] = []
    for _ in range(n):
        out += raw.read_until_ready()
    return out


def test_protocol_execute_of_an_sql_prepared_statement(hop: CaptureHop) -> None:
    raw = _raw(hop)
    try:
        raw.query("PREPARE sqlprep AS SELECT ssn, first_name FROM patients")
        raw.send(_bind("", "sqlprep") + _execute("") + SYNC)
        _until_ready(raw)
        assert raw.query("SELECT 40 + 2")[-1][0] == b"Z"
    finally:
        raw.close()
    assert_no_phi(hop.snapshot())


def test_protocol_execute_of_an_sql_cursor(hop: CaptureHop) -> None:
    raw = _raw(hop)
    try:
        raw.query("BEGIN")
        raw.query("DECLARE sqlcur CURSOR FOR SELECT ssn, first_name FROM patients")
        raw.send(_execute("sqlcur") + SYNC)
        _until_ready(raw)
        raw.query("ROLLBACK")
    finally:
        raw.close()
    assert_no_phi(hop.snapshot())


def test_a_second_parse_of_a_name_does_not_rebind_it(hop: CaptureHop) -> None:
    raw = _raw(hop)
    try:
        raw.send(_parse("twice", "SELECT ssn, first_name FROM patients") + SYNC)
        _until_ready(raw)
        # Postgres refuses the second Parse (the name exists): "twice" is still the first
        raw.send(_parse("twice", "SELECT 'x'::text, 'y'::text") + SYNC)
        _until_ready(raw)
        raw.send(_bind("", "twice") + _execute("") + SYNC)
        _until_ready(raw)
    finally:
        raw.close()
    assert_no_phi(hop.snapshot())


def test_a_blocked_parse_of_an_existing_name(hop: CaptureHop) -> None:
    raw = _raw(hop)
    try:
        raw.send(_parse("again", "SELECT ssn, first_name FROM patients") + SYNC)
        _until_ready(raw)
        raw.send(_parse("again", "SELECT pg_sleep(0)") + SYNC)  # blocked: replaced upstream
        _until_ready(raw)
        raw.send(_bind("", "again") + _execute("") + SYNC)
        _until_ready(raw)
    finally:
        raw.close()
    assert_no_phi(hop.snapshot())


def test_a_portal_replaced_by_an_sql_cursor(hop: CaptureHop) -> None:
    raw = _raw(hop)
    try:
        raw.query("BEGIN")
        raw.send(_parse("", "SELECT 'x'::text, 'y'::text") + _bind("pc", "") + SYNC)
        _until_ready(raw)
        raw.query("CLOSE pc")
        raw.query("DECLARE pc CURSOR FOR SELECT ssn, first_name FROM patients")
        raw.send(_execute("pc") + SYNC)
        _until_ready(raw)
        raw.query("ROLLBACK")
    finally:
        raw.close()
    assert_no_phi(hop.snapshot())


def test_a_refused_parse_pipelined_across_syncs(hop: CaptureHop) -> None:
    raw = _raw(hop)
    try:
        # all in one write: the relay cannot know the second Parse is refused when it sees
        # the Bind, so the Bind waits for the answers in flight
        raw.send(
            _parse("piped", "SELECT ssn, first_name FROM patients") + SYNC
            + _parse("piped", "SELECT 'x'::text, 'y'::text") + SYNC
            + _bind("", "piped") + _execute("") + SYNC
        )  # fmt: skip
        msgs = _until_ready(raw, 3)
        rows = [body for tag, body in msgs if tag == b"D"]
        assert len(rows) == 2  # the statement the server has, masked
        assert raw.query("SELECT 40 + 2")[-1][0] == b"Z"
    finally:
        raw.close()
    assert_no_phi(hop.snapshot())


def test_a_portal_bound_in_an_earlier_sync_segment_runs_masked(hop: CaptureHop) -> None:
    raw = _raw(hop)
    try:
        raw.query("BEGIN")
        raw.send(
            _parse("seg", "SELECT ssn, first_name FROM patients ORDER BY id") + _bind("pseg", "seg")
            + SYNC + _execute("pseg", 1) + SYNC + _execute("pseg") + SYNC
        )  # fmt: skip
        msgs = _until_ready(raw, 3)
        assert [tag for tag, _ in msgs].count(b"D") == 2
        assert b"s" in [tag for tag, _ in msgs]  # PortalSuspended after the first row
        raw.query("ROLLBACK")
    finally:
        raw.close()
    assert_no_phi(hop.snapshot())


def test_a_refused_sql_prepare_does_not_redefine_the_name(hop: CaptureHop) -> None:
    raw = _raw(hop)
    try:
        raw.query("PREPARE twice_sql AS SELECT ssn, first_name FROM patients")
        raw.query("PREPARE twice_sql AS SELECT 'x'::text, 'y'::text")  # already exists
        raw.query("EXECUTE twice_sql")
    finally:
        raw.close()
    assert_no_phi(hop.snapshot())


def test_a_refused_sql_declare_does_not_redefine_the_cursor(hop: CaptureHop) -> None:
    raw = _raw(hop)
    try:
        raw.query("BEGIN")
        raw.query("DECLARE dc CURSOR FOR SELECT ssn, first_name FROM patients")
        raw.query("SAVEPOINT a")
        raw.query("DECLARE dc CURSOR FOR SELECT 'x'::text, 'y'::text")  # already exists
        raw.query("ROLLBACK TO a")
        raw.query("FETCH ALL FROM dc")
        raw.query("ROLLBACK")
    finally:
        raw.close()
    assert_no_phi(hop.snapshot())


def test_sql_fetch_of_a_portal_bound_through_the_protocol(hop: CaptureHop) -> None:
    raw = _raw(hop)
    try:
        raw.query("BEGIN")
        raw.query("DECLARE pf CURSOR FOR SELECT 'x'::text, 'y'::text")
        raw.query("COMMIT")
        raw.query("BEGIN")
        raw.send(_parse("", "SELECT ssn, first_name FROM patients") + _bind("pf", "") + SYNC)
        _until_ready(raw)
        raw.query("FETCH ALL FROM pf")
        raw.query("ROLLBACK")
    finally:
        raw.close()
    assert_no_phi(hop.snapshot())


def test_sql_execute_of_a_statement_parsed_through_the_protocol(hop: CaptureHop) -> None:
    raw = _raw(hop)
    try:
        raw.query("PREPARE ps AS SELECT 'x'::text, 'y'::text")
        raw.send(message(b"C", b"Sps\x00") + SYNC)  # protocol Close of the SQL statement
        _until_ready(raw)
        raw.send(_parse("ps", "SELECT ssn, first_name FROM patients") + SYNC)
        _until_ready(raw)
        raw.query("EXECUTE ps")
    finally:
        raw.close()
    assert_no_phi(hop.snapshot())


def test_sql_prepared_statements_and_cursors_still_work(hop: CaptureHop) -> None:
    raw = _raw(hop)
    try:
        msgs = raw.query("PREPARE ok1 AS SELECT id, ssn FROM patients ORDER BY id; EXECUTE ok1")
        assert [tag for tag, _ in msgs].count(b"D") == 2
        assert [tag for tag, _ in raw.query("EXECUTE ok1")].count(b"D") == 2
        # separate Query messages in one write: the EXECUTE waits for the PREPARE's answer
        raw.send(message(b"Q", b"PREPARE ok2 AS SELECT id, dob FROM patients\x00"))
        raw.send(message(b"Q", b"EXECUTE ok2\x00"))
        msgs = _until_ready(raw, 2)
        assert [tag for tag, _ in msgs].count(b"D") == 2
        raw.query("BEGIN")
        raw.query("DECLARE ok3 CURSOR FOR SELECT id, first_name FROM patients ORDER BY id")
        assert [tag for tag, _ in raw.query("FETCH 1 FROM ok3")].count(b"D") == 1
        assert b"E" not in [tag for tag, _ in raw.query("MOVE BACKWARD 1 IN ok3")]
        assert [tag for tag, _ in raw.query("FETCH ALL FROM ok3")].count(b"D") == 2
        raw.query("COMMIT")
    finally:
        raw.close()
    assert_no_phi(hop.snapshot())


def test_a_named_psycopg_cursor_with_prepared_fetches(hop: CaptureHop) -> None:
    with (
        psycopg.connect(dsn_for(hop), prepare_threshold=0) as conn,
        conn.cursor(name="many") as cur,
    ):
        cur.itersize = 1
        cur.execute("SELECT id, ssn FROM patients CROSS JOIN generate_series(1, 4)")
        rows = list(cur)
    assert len(rows) == 8
    assert_no_phi(hop.snapshot())


def test_a_query_sent_during_copy_in_does_not_shift_the_answers(hop: CaptureHop) -> None:
    raw = _raw(hop)
    try:
        raw.send(message(b"Q", b"COPY visits_summary FROM STDIN\x00"))
        tag, _ = raw.read_message()
        assert tag == b"G"  # CopyInResponse: the server reads COPY data now
        # the server swallows the first Query as a COPY protocol error (and Postgres ends the
        # session); the second one's rows must never be matched to the first one's verdict
        raw.send(
            message(b"Q", b"SELECT 'x'::text, 'y'::text\x00")
            + message(b"Q", b"SELECT ssn, first_name FROM patients\x00")
        )
        assert raw.closed_by_peer()
    finally:
        raw.close()
    assert_no_phi(hop.snapshot())


def test_explain_analyze_of_a_redefined_prepared_statement(hop: CaptureHop) -> None:
    raw = _raw(hop)
    try:
        raw.query("PREPARE ex1 AS SELECT id FROM patients WHERE ssn LIKE '900-5%'")
        raw.query("PREPARE ex1 AS SELECT 1")  # refused by the server: ex1 exists
        msgs = raw.query("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) EXECUTE ex1")
        # the plan of the statement the server really has (a filter on ssn) never comes back
        assert b"ssn" not in b"".join(body for tag, body in msgs if tag == b"D")
    finally:
        raw.close()


def test_binary_and_holdable_cursors_are_masked(hop: CaptureHop) -> None:
    raw = _raw(hop)
    try:
        raw.query("BEGIN")
        raw.query("DECLARE bc BINARY CURSOR WITH HOLD FOR SELECT id, dob, ssn FROM patients")
        raw.query("COMMIT")  # the cursor outlives its transaction
        fetched = raw.query("FETCH ABSOLUTE 2 FROM bc") + raw.query("FETCH BACKWARD 1 FROM bc")
        assert [tag for tag, _ in fetched].count(b"D") == 2
        raw.query("CLOSE bc")
    finally:
        raw.close()
    assert_no_phi(hop.snapshot())


def test_an_error_at_commit_is_scrubbed(approving_proxy: ProxyThread) -> None:
    # A write into a tagged column under a unique index is held (an equality oracle); the
    # approving proxy lets it run, so that the deferred check fails at COMMIT
    with CaptureHop(approving_proxy.host, approving_proxy.port) as hop:
        raw = _raw(hop)
        try:
            raw.query("BEGIN")
            # copies a tagged value within its column: the unique check is deferred to
            # COMMIT, whose error would name the duplicated key
            raw.query("INSERT INTO contacts SELECT 3, email FROM contacts WHERE id = 1")
            msgs = raw.query("COMMIT")
            assert any(tag == b"E" for tag, _ in msgs)
        finally:
            raw.close()
        assert_no_phi(hop.snapshot())


def test_mixed_result_formats_are_masked_per_column(hop: CaptureHop) -> None:
    raw = _raw(hop)
    try:
        sql = b"SELECT dob, ssn, dob FROM patients ORDER BY id"
        formats = struct.pack("!hhhh", 3, 1, 0, 1)  # binary, text, binary
        raw.send(
            message(b"P", b"\x00" + sql + b"\x00\x00\x00")
            + message(b"B", b"\x00\x00" + struct.pack("!hh", 0, 0) + formats)
            + _execute("", 1) + _execute("") + SYNC
        )  # fmt: skip
        tags = [tag for tag, _ in _until_ready(raw)]
        assert tags.count(b"D") == 2 and b"s" in tags  # suspended after one row, then the rest
        # one format code for all columns: binary everywhere
        raw.send(
            message(b"P", b"\x00" + sql + b"\x00\x00\x00")
            + message(b"B", b"\x00\x00" + struct.pack("!hhhh", 0, 0, 1, 1))
            + _execute("") + SYNC
        )  # fmt: skip
        msgs = _until_ready(raw)
        assert [tag for tag, _ in msgs].count(b"D") == 2
    finally:
        raw.close()
    assert_no_phi(hop.snapshot())


def test_names_longer_than_the_server_keeps_are_one_name(hop: CaptureHop) -> None:
    """Postgres keys statements and portals by their first 63 bytes."""
    long1, long2 = "n" * 63 + "1", "n" * 63 + "2"
    raw = _raw(hop)
    try:
        raw.send(_parse(long1, "SELECT 'x'::text, 'y'::text") + SYNC)
        _until_ready(raw)
        raw.send(message(b"C", b"S" + long2.encode() + b"\x00") + SYNC)  # closes long1
        _until_ready(raw)
        raw.send(_parse(long2, "SELECT ssn, first_name FROM patients") + SYNC)
        _until_ready(raw)
        raw.send(_bind("", long1) + _execute("") + SYNC)
        _until_ready(raw)
    finally:
        raw.close()
    assert_no_phi(hop.snapshot())


# ------------------------------------------------------------- function calls and notices


def _function_call(oid: int, *args: bytes) -> bytes:
    body = struct.pack("!ihh", oid, 1, 0) + struct.pack("!h", len(args))
    body += b"".join(struct.pack("!i", len(a)) + a for a in args)
    return message(b"F", body + struct.pack("!h", 0))


def test_function_calls_by_oid_never_leak(hop: CaptureHop, phi_db: str) -> None:
    """The FunctionCall message names a function by OID: a built-in that reads stored data by
    OID or path is refused as it is in SQL, an allowlisted one runs, and the session goes on."""
    with psycopg.connect(phi_db, autocommit=True) as owner:
        lo = owner.execute(
            "SELECT lo_from_bytea(0, convert_to(%s, 'UTF8'))::int8", (PATIENTS[0][3],)
        ).fetchall()[0][0]

        def oid(signature: str) -> int:
            return int(owner.execute("SELECT %s::regprocedure::oid", (signature,)).fetchall()[0][0])

        refused = [
            _function_call(oid("lo_get(oid)"), str(lo).encode()),
            _function_call(oid("loread(integer,integer)"), b"0", b"100"),
            _function_call(oid("lo_export(oid,text)"), str(lo).encode(), b"lo.out"),
            _function_call(oid("pg_read_file(text)"), b"PG_VERSION"),
            _function_call(oid("pg_read_binary_file(text)"), b"PG_VERSION"),
            _function_call(oid("pg_stat_get_activity(integer)"), b"0"),
        ]
        allowed = _function_call(oid("current_setting(text)"), b"server_version")
    raw = _raw(hop)
    try:
        for call in refused:
            raw.send(call)
            tags = [tag for tag, _ in raw.read_until_ready()]
            assert tags == [b"E", b"Z"]
        raw.send(allowed)
        assert [tag for tag, _ in raw.read_until_ready()] == [b"V", b"Z"]
        assert raw.query("SELECT 40 + 2")[-1][0] == b"Z"
    finally:
        raw.close()
        with psycopg.connect(phi_db, autocommit=True) as owner:
            owner.execute("SELECT lo_unlink(%s)", (lo,))
    assert_no_phi(hop.snapshot())


NOTICE_STATEMENTS = [
    "SET client_min_messages = debug5",
    "SET debug_print_plan = on",
    "SET debug_print_parse = on",
    "SET trace_notify = on",
    "ANALYZE VERBOSE patients",
    "VACUUM VERBOSE patients",
    "DROP TABLE IF EXISTS no_such_table",
    "DO $$BEGIN RAISE NOTICE '%', (SELECT ssn FROM patients LIMIT 1); END$$",
    "SELECT id FROM patients WHERE ssn = '900-55-1234'",
    "SELECT ssn FROM patients",
    "UPDATE contacts SET email = email",
    "BEGIN",
    "SET CONSTRAINTS ALL IMMEDIATE",
    "COMMIT",
    "LISTEN anything",
    "SELECT pg_notify('anything', ssn) FROM patients",
    "NOTIFY anything, '900-55-1234'",
    "CREATE TEMP TABLE scratch AS SELECT id FROM patients",
    "CREATE TEMP TABLE scratch2 AS SELECT ssn FROM patients",
    "CREATE UNIQUE INDEX ON scratch2 (ssn)",
    "INSERT INTO scratch2 VALUES ('900-55-1234')",
    "CREATE TEMP TABLE scratch3 AS SELECT ssn FROM patients UNION ALL SELECT ssn FROM patients",
    "CREATE UNIQUE INDEX ON scratch3 (ssn)",
    "CREATE TEMP TABLE scratch4 (s text)",
    "INSERT INTO scratch4 SELECT ssn FROM patients",
    "ALTER TABLE scratch4 ADD PRIMARY KEY (s)",
    "INSERT INTO scratch4 SELECT ssn FROM patients",
    "CREATE INDEX ON patients ((ssn::int))",
    "ALTER TABLE patients ALTER ssn TYPE int USING ssn::int",
    "CREATE MATERIALIZED VIEW ssn_numbers AS SELECT ssn::int FROM patients",
    "ALTER TABLE scratch4 ALTER s TYPE int USING s::int",
    "DROP INDEX IF EXISTS no_such_index",
    "DROP VIEW IF EXISTS no_such_view",
    "CREATE INDEX ON scratch (id)",
    "REINDEX TABLE patients",
    "SELECT 1",
]


def test_notices_in_a_chatty_session_never_leak(approving_proxy: ProxyThread) -> None:
    """With every notice level sent to the client and every hold approved, what the statements
    print (ANALYZE and VACUUM VERBOSE, skipped DROPs, RAISE, index builds, deferred checks)
    must carry no seeded value."""
    with (
        CaptureHop(approving_proxy.host, approving_proxy.port) as hop,
        psycopg.connect(dsn_for(hop), autocommit=True) as conn,
    ):
        for sql in NOTICE_STATEMENTS:
            with contextlib.suppress(psycopg.Error):
                conn.execute(sql, prepare=False)
        assert conn.execute("SELECT 40 + 2").fetchone() == (42,)
        assert_no_phi(hop.snapshot())
