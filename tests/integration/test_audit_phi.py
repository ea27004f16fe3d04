"""No seeded PHI value is ever at rest in what ``pgproxy serve`` writes: audit, WAL, checkpoints,
Parquet export, logs.

A database with distinctive fake PHI sits behind a ``pgproxy serve`` subprocess (real policy,
``--audit``, ``--audit-export``, no ``--smtp`` so approval emails are logged with their links).
An agent drives every kind of statement through it with the PHI values in every place a value
can travel: masked reads, literals in held, blocked, unparseable and failing statements, COPY in
both directions, bound parameters in text and binary, a held DDL denied on the review page, and
failed logins whose secrets look like PHI. After SIGTERM the audit is exported to Parquet and the
raw bytes of every artifact (the DuckDB file, a copy of its WAL taken while serving, the
checkpoints file, each Parquet file, the process's output) are searched for every seeded value
and its binary encodings -- and, since DuckDB and Parquet may compress strings, every text cell
of every table is searched too. Canaries known to be stored prove the searches can find things.

The approval store (SQLite) is deliberately not scanned: it keeps a held statement's text so a
reviewer can judge it, by design.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import duckdb
import psycopg
import pytest

from pgproxy.audit.export import export_parquet
from pgproxy.pgcluster import free_port
from tests.integration._util import RawConn, message, startup_packet

DB = "pgproxy_audit_phi"
AGENT = "triage-bot"
PASSWORD = "s3cret"
#: a string that only reaches the audit as an identifier: proves sql_redacted is scannable
CANARY_TABLE = "zebulon_canary_ledger"
#: a wrong password shaped like an SSN
BAD_PASSWORD = "900-99-8642"


@dataclass(frozen=True)
class Patient:
    id: int
    first: str
    last: str
    ssn: str
    dob: dt.date
    email: str
    mrn: str
    admitted: dt.datetime


UTC = dt.UTC


def _ts(y: int, mo: int, d: int, h: int, mi: int, s: int) -> dt.datetime:
    return dt.datetime(y, mo, d, h, mi, s, tzinfo=UTC)


#: in the database before the proxy starts
Q = Patient(1, "Quixanthe", "Vorhelmsky", "900-55-1234", dt.date(1961, 4, 17),
            "quix.v@example.invalid", "MRN7731199", _ts(2021, 6, 15, 13, 45, 7))  # fmt: skip
Z = Patient(2, "Zephyrine", "Klabautrik", "900-66-4321", dt.date(1975, 9, 3),
            "zeph.k@example.invalid", "MRN8842200", _ts(2022, 2, 8, 9, 5, 33))  # fmt: skip
#: its SSN is typed in double quotes: the wrong-quotes mistake (an identifier, not a literal)
TYPO = Patient(6, "Ottoline", "Fernsbury", "900-31-5555", dt.date(1969, 10, 5),
               "otto.f@example.invalid", "MRN3286644", _ts(2019, 8, 7, 6, 5, 4))  # fmt: skip
SEEDED = [Q, Z, TYPO]
#: sent through the proxy by the agent: COPY FROM STDIN, then bound parameters
COPIED = Patient(3, "Brontevalle", "Oozmaphrey", "900-77-2468", dt.date(1983, 2, 11),
                 "bront.o@example.invalid", "MRN9953311", _ts(2023, 3, 9, 7, 1, 2))  # fmt: skip
BOUND = Patient(4, "Xylophina", "Quarrendell", "900-88-1357", dt.date(1990, 12, 24),
                "xylo.q@example.invalid", "MRN1064422", _ts(2024, 1, 2, 3, 4, 5))  # fmt: skip
ASYNCPG_BOUND = Patient(5, "Wendolack", "Prismhaven", "900-12-9753", dt.date(1958, 7, 30),
                        "wend.p@example.invalid", "MRN2175533", _ts(2020, 5, 6, 7, 8, 9))  # fmt: skip
PATIENTS = [*SEEDED, COPIED, BOUND, ASYNCPG_BOUND]
#: the secret only the double-quoted statement carries (asserted apart, in its own test)
TYPO_SECRETS = {"patient 6 ssn"}

RULES = f"""
agents:
  - name: {AGENT}
    password: "{PASSWORD}"
    owner: carol@example.org
    approvers: [alice@example.org]
analysts:
  - name: auditor
    password: "an0ther"
tags:
  public.patients.first_name: name
  public.patients.last_name: name
  public.patients.ssn: ssn
  public.patients.dob: dob
  public.patients.email: email
  public.patients.mrn: mrn
  public.patients.admitted: date
approvals:
  hold: [ddl, privilege, bulk_export]
  bulk_export_rows: 1000
  quorum: 1
  timeout_seconds: 120
"""

PG_EPOCH = dt.date(2000, 1, 1)
PG_EPOCH_TS = dt.datetime(2000, 1, 1, tzinfo=UTC)
UNIX_EPOCH_TS = dt.datetime(1970, 1, 1, tzinfo=UTC)


def _renderings(raw: bytes) -> dict[str, bytes]:
    """How binary bytes look once something writes them as text: hex, Python's repr."""
    return {"hex": raw.hex().encode(), "repr": repr(raw)[2:-1].encode()}


def secrets_of(p: Patient) -> dict[str, bytes]:
    """Every form in which a value of ``p`` could be at rest: text and binary encodings.

    A date's binary forms are small integers (days since 2000 or 1970) that turn up by chance
    in any binary file, so they are searched only as text renderings; the audit has no DATE or
    BLOB column a raw one could sit in. The 8-byte timestamps and the SSN as an int32 are
    searched raw as well."""
    digits = p.ssn.replace("-", "")
    pg_days = (p.dob - PG_EPOCH).days
    pg_micros = (p.admitted - PG_EPOCH_TS) // dt.timedelta(microseconds=1)
    unix_micros = (p.admitted - UNIX_EPOCH_TS) // dt.timedelta(microseconds=1)
    out = {
        "first": p.first.encode(),
        "last": p.last.encode(),
        "ssn": p.ssn.encode(),
        "ssn digits": digits.encode(),
        "email": p.email.encode(),
        "mrn": p.mrn.encode(),
        "dob": p.dob.isoformat().encode(),
        "dob us": p.dob.strftime("%m/%d/%Y").encode(),
        "admitted": p.admitted.strftime("%Y-%m-%d %H:%M:%S").encode(),
        "admitted iso": p.admitted.strftime("%Y-%m-%dT%H:%M:%S").encode(),
        "admitted epoch": str(int(p.admitted.timestamp())).encode(),
        # Postgres binary: timestamptz = int64 µs since 2000; DuckDB/Parquet: µs since 1970
        "admitted pg binary": struct.pack("!q", pg_micros),
        "admitted duckdb": struct.pack("<q", unix_micros),
        "ssn int32 be": struct.pack("!i", int(digits)),
        "ssn int32 le": struct.pack("<i", int(digits)),
    }
    for form, text in _renderings(struct.pack("!i", pg_days)).items():
        out[f"dob pg binary as {form}"] = text
    for form, text in _renderings(struct.pack("!q", pg_micros)).items():
        out[f"admitted pg binary as {form}"] = text
    return {f"patient {p.id} {k}": v for k, v in out.items()}


def all_secrets() -> dict[str, bytes]:
    out: dict[str, bytes] = {"bad password": BAD_PASSWORD.encode()}
    for p in PATIENTS:
        out.update(secrets_of(p))
    return out


def find_secrets(data: bytes, only: set[str] | None = None) -> list[str]:
    """Names of the secrets present in ``data`` (text ones case-insensitively): all but the
    typo's by default, or ``only`` those named."""
    lowered = data.lower()
    found = []
    for name, s in all_secrets().items():
        if (name not in only) if only is not None else (name in TYPO_SECRETS):
            continue
        if s in data or (s.isascii() and s.decode("ascii").isprintable() and s.lower() in lowered):
            found.append(name)
    return found


# --------------------------------------------------------------------------- the serve process


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    port: int
    http: int
    audit: Path
    export: Path
    upstream: str
    output: bytearray = field(default_factory=bytearray)
    lock: threading.Condition = field(default_factory=threading.Condition)

    def dsn(self, password: str = PASSWORD) -> str:
        return f"postgresql://{AGENT}:{password}@127.0.0.1:{self.port}/{DB}"

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http}{path}"

    def wait_output(
        self, pattern: re.Pattern[str], count: int, timeout: float = 30
    ) -> list[re.Match[str]]:
        """The first ``count`` matches of ``pattern`` in the output, waiting for them."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while True:
                found = list(pattern.finditer(self.output.decode(errors="replace")))
                if len(found) >= count:
                    return found[:count]
                left = deadline - time.monotonic()
                assert left > 0 and self.proc.poll() is None, self.output.decode(errors="replace")
                self.lock.wait(left)

    def pump(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while chunk := os.read(fd, 65536):
            with self.lock:
                self.output += chunk
                self.lock.notify_all()


def _pgproxy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgproxy", *args], capture_output=True, text=True, timeout=60
    )


def _seed(pg_dsn: str) -> str:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DB}")
        conn.execute(f"CREATE DATABASE {DB}")
    upstream = pg_dsn.rsplit("/", 1)[0] + f"/{DB}"
    with psycopg.connect(upstream, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE patients (id int PRIMARY KEY, first_name text, last_name text,"
            " ssn text, dob date, email text, mrn text, admitted timestamptz,"
            " visits int DEFAULT 3)"
        )
        for p in SEEDED:
            conn.execute(
                "INSERT INTO patients VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                (p.id, p.first, p.last, p.ssn, p.dob, p.email, p.mrn, p.admitted),
            )
        conn.execute(f"CREATE TABLE {CANARY_TABLE} (id int, note text)")
        conn.execute("ANALYZE patients")
    return upstream


LINK = re.compile(
    r"approval email to (?P<to>\S+): .*? <(?P<url>http://\S+/approvals/(?P<id>[\w-]+)"
    r"\?t=(?P<token>[\w\-]+))>"
)


@pytest.fixture(scope="module")
def served(pg_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    upstream = _seed(pg_dsn)
    root = tmp_path_factory.mktemp("audit-phi")
    (root / "rules").mkdir()
    (root / "rules" / "rules.yaml").write_text(RULES)
    port, http = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGPROXY_")}
    env["PGPROXY_UPSTREAM"] = upstream
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgproxy", "serve", "--listen", f"127.0.0.1:{port}",
         "--rules", str(root / "rules"), "--audit", str(root / "audit.duckdb"),
         "--audit-export", str(root / "export"), "--http", f"127.0.0.1:{http}",
         "--drain-seconds", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    s = Served(proc, port, http, root / "audit.duckdb", root / "export", upstream)
    threading.Thread(target=s.pump, daemon=True).start()
    try:
        s.wait_output(re.compile("listening on"), 1, timeout=60)
        yield s
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(40)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


# --------------------------------------------------------------------------- agent helpers


class _Held(threading.Thread):
    """Runs ``work`` on its own agent connection: it blocks while the statement is held."""

    def __init__(self, dsn: str, work: Callable[[psycopg.Connection[Any]], object]) -> None:
        super().__init__(daemon=True)
        self.dsn, self.work = dsn, work
        self.result: object = None
        self.error: psycopg.Error | None = None

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            try:
                self.result = self.work(conn)
            except psycopg.Error as exc:
                self.error = exc


@dataclass
class Approvals:
    """Decides held statements as the approver, from the links the serve process logs."""

    served: Served
    seen: int = 0
    denied: dict[str, str] = field(default_factory=dict)

    def next_link(self) -> re.Match[str]:
        self.seen += 1
        return self.served.wait_output(LINK, self.seen)[-1]

    def hold(
        self, work: Callable[[psycopg.Connection[Any]], object], decision: str, reason: str = ""
    ) -> _Held:
        agent = _Held(self.served.dsn(), work)
        agent.start()
        link = self.next_link()
        assert agent.is_alive(), "a held statement must wait for its decision"
        req = urllib.request.Request(
            self.served.url(f"/api/approvals/{link['id']}/decision"),
            data=json.dumps({"decision": decision, "reason": reason}).encode(),
            headers={
                "Authorization": f"Bearer {link['token']}",
                "Content-Type": "application/json",
            },
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200, resp.read()
        if decision == "deny":
            self.denied[link["id"]] = reason
        agent.join(30)
        assert not agent.is_alive()
        return agent

    def deny_on_review_page(
        self, work: Callable[[psycopg.Connection[Any]], object], reason: str
    ) -> tuple[_Held, str]:
        agent = _Held(self.served.dsn(), work)
        agent.start()
        link = self.next_link()
        with urllib.request.urlopen(link["url"], timeout=10) as resp:
            page = resp.read().decode()
        fields = dict(re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)">', page))
        data = urllib.parse.urlencode({**fields, "decision": "deny", "reason": reason}).encode()
        req = urllib.request.Request(link["url"], data=data, method="POST")
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200
        self.denied[link["id"]] = reason
        agent.join(30)
        assert not agent.is_alive()
        return agent, link["id"]


def _fails(conn: psycopg.Connection[Any], sql: str, *params: object) -> str:
    """Runs ``sql`` expecting an error; returns its SQLSTATE. The session must go on."""
    with pytest.raises(psycopg.Error) as err:
        conn.execute(sql, params or None)
    assert conn.execute("SELECT 1").fetchone() == (1,)
    return err.value.sqlstate or ""


def _raw_login_attempts(host: str, port: int) -> None:
    """Failed logins that put PHI-shaped bytes on the wire: a SCRAM exchange whose nonce and
    proof are made of PHI, and a cleartext password where SASL was asked for."""
    p = Q
    conn = RawConn(host, port)
    try:
        conn.send(startup_packet({"user": AGENT, "database": DB}))
        tag, _ = conn.read_message()
        assert tag == b"R"
        first = f"n,,n=,r={p.ssn}{p.last}".encode()
        conn.send(message(b"p", b"SCRAM-SHA-256\x00" + struct.pack("!i", len(first)) + first))
        tag, body = conn.read_message()
        assert tag == b"R", (tag, body)
        server_first = body[4:].decode()
        nonce = dict(kv.split("=", 1) for kv in server_first.split(","))["r"]
        proof = base64.b64encode(p.mrn.encode().ljust(32, b"0")).decode()
        conn.send(message(b"p", f"c=biws,r={nonce},p={proof}".encode()))
        tag, body = conn.read_message()
        assert tag == b"E", (tag, body)
    finally:
        conn.close()
    conn = RawConn(host, port)
    try:
        conn.send(startup_packet({"user": AGENT, "database": DB}))
        tag, _ = conn.read_message()
        assert tag == b"R"
        conn.send(message(b"p", Z.ssn.encode() + b"\x00"))
        tag, body = conn.read_message()
        assert tag == b"E", (tag, body)
    except (ConnectionError, OSError):
        pass  # closing without a word is an answer too
    finally:
        conn.close()


# --------------------------------------------------------------------------- the session


@dataclass
class Outcome:
    """What the agent saw, and the artifacts left behind, for the tests to assert on."""

    served: Served
    masked_rows: list[tuple[Any, ...]]
    binary_rows: list[tuple[Any, ...]]
    approved_select: list[tuple[Any, ...]]
    copied_out: bytes
    cast_error: str
    unique_error: str
    blocked_error: str
    unparseable_error: str
    denied_ddl_id: str
    denied_ddl_error: psycopg.Error | None
    denied_reasons: dict[str, str]
    exit_code: int
    parquet: list[Path]
    wal_snapshot: bytes


def _drive(s: Served) -> Outcome:
    q, z = Q, Z
    decide = Approvals(s)
    with psycopg.connect(s.dsn(), autocommit=True) as conn:
        # masked reads, text and binary, simple and extended
        masked_rows = conn.execute(
            "SELECT id, first_name, last_name, ssn, dob, email, mrn, admitted, visits"
            " FROM patients ORDER BY id"
        ).fetchall()
        binary_rows = (
            conn.cursor(binary=True)
            .execute("SELECT ssn, dob, admitted, mrn FROM patients ORDER BY id", prepare=True)
            .fetchall()
        )
        conn.execute(f"SELECT count(*) FROM {CANARY_TABLE}")
        # literals holding PHI in statements that run: comments, dollar quotes, numbers
        conn.execute(f"SELECT 1 /* patient {q.first} {q.last} {q.ssn} */")
        conn.execute(f"SELECT length($x${z.email}$x$) -- {z.mrn}")
        conn.execute(f"SELECT id FROM patients WHERE id = {q.ssn.replace('-', '')}")
        conn.execute(f"INSERT INTO {CANARY_TABLE} VALUES (1, 'called back {q.first} at {q.email}')")
        conn.execute("SELECT length(%s::text), length(%s::text)", (q.ssn, z.last))
        _fails(conn, f"DO $$BEGIN RAISE NOTICE 'seen %', '{q.mrn}'; END$$")  # blocked
        # failing statements that carry the value: a unique violation of the (untagged) key; a
        # unique index on a tagged column would make the insert an equality test, held (a bad
        # cast of tagged data is an error channel, held too: it runs below, once approved)
        unique_error = _fails(conn, "INSERT INTO patients (id, ssn) VALUES (1, %s)", q.ssn)
        _fails(conn, f"INSERT INTO patients (id, ssn) VALUES (2, '{z.ssn}')")
        # blocked statements and unparseable ones, with PHI in them
        blocked_error = _fails(
            conn, f"SELECT pg_sleep(0) FROM patients WHERE last_name = '{q.last}'"
        )
        _fails(conn, f"SELECT query FROM pg_stat_activity WHERE query LIKE '%{q.ssn}%'")
        unparseable_error = _fails(conn, f"SELEC id FROM patients WHERE ssn = '{q.ssn}'")
        _fails(conn, f"SELECT id FROM patients WHERE ssn = '{z.ssn}")  # unterminated
        # a failing transaction with PHI in it
        with pytest.raises(psycopg.Error), conn.transaction():
            conn.execute(f"UPDATE patients SET email = '{z.email}' WHERE id = 2")
            conn.execute(f"SELECT 1 / 0 WHERE '{z.first}' <> ''")
        # COPY FROM STDIN with new PHI, then bound parameters (text and binary, prepared)
        c = COPIED
        with conn.cursor() as cur, cur.copy("COPY patients (id, first_name, last_name, ssn,"
                                            " dob, email, mrn, admitted) FROM STDIN") as copy:  # fmt: skip
            copy.write_row((c.id, c.first, c.last, c.ssn, c.dob, c.email, c.mrn, c.admitted))
        b = BOUND
        conn.execute(
            "INSERT INTO patients (id, first_name, last_name, ssn, dob, email, mrn, admitted)"
            " VALUES (%b, %b, %b, %b, %b, %b, %b, %b)",
            (b.id, b.first, b.last, b.ssn, b.dob, b.email, b.mrn, b.admitted),
            prepare=True,
        )
        conn.execute("UPDATE patients SET email = %s WHERE id = %s", (b.email, b.id), prepare=True)
        conn.execute(
            "PREPARE ins(int, text, date) AS INSERT INTO patients (id, ssn, dob)"
            " VALUES ($1, $2, $3)"
        )
        _fails(conn, f"EXECUTE ins(1, '{b.ssn}', '{b.dob}')")  # unique violation again
        conn.execute("DEALLOCATE ins")
    _asyncpg_bound(s)

    # held statements: an inference with a PHI literal approved, one with a bound parameter
    # approved, one denied; COPY TO approved (a bulk export: it still comes back masked)
    approved = decide.hold(
        lambda c: c.execute(f"SELECT id FROM patients WHERE ssn = '{q.ssn}'").fetchall(),
        "approve",
    )
    assert approved.error is None, approved.error
    decide.hold(
        lambda c: c.execute(
            "SELECT id FROM patients WHERE mrn = %s", (z.mrn,), prepare=True
        ).fetchall(),
        "approve",
    )
    denied = decide.hold(
        lambda c: c.execute(f"UPDATE patients SET visits = 9 WHERE email = '{z.email}'"),
        "deny",
        "no writes keyed on contact details",
    )
    assert isinstance(denied.error, psycopg.errors.InsufficientPrivilege)

    def copy_out(c: psycopg.Connection[Any]) -> bytes:
        with (
            c.cursor() as cur,
            cur.copy("COPY (SELECT * FROM patients ORDER BY id) TO STDOUT") as cp,
        ):
            return b"".join(bytes(chunk) for chunk in cp)

    copied = decide.hold(copy_out, "approve")
    assert copied.error is None, copied.error
    assert isinstance(copied.result, bytes)
    typo = decide.hold(
        lambda c: c.execute(f'SELECT id FROM patients WHERE ssn = "{TYPO.ssn}"').fetchall(),
        "approve",
    )
    assert isinstance(typo.error, psycopg.errors.UndefinedColumn)
    assert TYPO.ssn not in str(typo.error)  # the server's message names it: scrubbed
    cast = decide.hold(lambda c: c.execute("SELECT ssn::int FROM patients").fetchall(), "approve")
    assert isinstance(cast.error, psycopg.Error)
    cast_error = str(cast.error.sqlstate)
    ddl, ddl_id = decide.deny_on_review_page(
        lambda c: c.execute(
            f"CREATE TABLE held_copy AS SELECT id FROM patients WHERE ssn = '{q.ssn}'"
        ),
        "no copies of patient data",
    )

    # failed logins with PHI-looking secrets
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(s.dsn(password=BAD_PASSWORD), connect_timeout=10)
    _raw_login_attempts("127.0.0.1", s.port)

    # the WAL while serving: ordinary records are committed within the 1 s flush interval
    time.sleep(1.5)
    wal = Path(f"{s.audit}.wal")
    wal_snapshot = wal.read_bytes() if wal.exists() else b""

    s.proc.send_signal(signal.SIGTERM)
    exit_code = s.proc.wait(40)
    with duckdb.connect(str(s.audit), read_only=True) as audit:
        parquet = [Path(p) for p in export_parquet(audit, s.export)]
    return Outcome(
        served=s,
        masked_rows=masked_rows,
        binary_rows=binary_rows,
        approved_select=list(approved.result or []),  # type: ignore[call-overload]
        copied_out=copied.result,
        cast_error=cast_error,
        unique_error=unique_error,
        blocked_error=blocked_error,
        unparseable_error=unparseable_error,
        denied_ddl_id=ddl_id,
        denied_ddl_error=ddl.error,
        denied_reasons=dict(decide.denied),
        exit_code=exit_code,
        parquet=parquet,
        wal_snapshot=wal_snapshot,
    )


def _asyncpg_bound(s: Served) -> None:
    """asyncpg: binary bound parameters in a prepared INSERT, then a prepared masked read."""
    a = ASYNCPG_BOUND

    async def run() -> None:
        conn = await asyncpg.connect(s.dsn())
        try:
            stmt = await conn.prepare(
                "INSERT INTO patients (id, first_name, last_name, ssn, dob, email, mrn, admitted)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
            )
            await stmt.fetch(a.id, a.first, a.last, a.ssn, a.dob, a.email, a.mrn, a.admitted)
            rows = await conn.fetch("SELECT ssn, dob FROM patients WHERE id = $1", a.id)
            assert rows and rows[0]["ssn"] != a.ssn and rows[0]["dob"] == dt.date(1958, 1, 1)
        finally:
            await conn.close()

    asyncio.run(run())


@pytest.fixture(scope="module")
def outcome(served: Served) -> Outcome:
    return _drive(served)


# --------------------------------------------------------------------------- what the agent saw


def test_the_agent_saw_masked_values_and_policy_errors(outcome: Outcome) -> None:
    assert [r[0] for r in outcome.masked_rows] == [p.id for p in SEEDED]
    for row, p in zip(outcome.masked_rows, SEEDED, strict=True):
        assert row[3] != p.ssn and row[5] != p.email and row[6] != p.mrn
        assert row[4] == dt.date(p.dob.year, 1, 1)
        assert row[8] == 3  # untagged
    assert [r[1] for r in outcome.binary_rows] == [dt.date(p.dob.year, 1, 1) for p in SEEDED]
    assert [r[2] for r in outcome.binary_rows] == [
        _ts(p.admitted.year, 1, 1, 0, 0, 0) for p in SEEDED
    ]
    assert outcome.approved_select == [(1,)]
    assert outcome.copied_out.count(b"\n") == len(PATIENTS)
    assert not find_secrets(outcome.copied_out)
    assert outcome.cast_error == "22P02"
    assert outcome.unique_error == "23505"
    assert outcome.blocked_error == "42501"
    assert outcome.unparseable_error == "42501"
    assert isinstance(outcome.denied_ddl_error, psycopg.errors.InsufficientPrivilege)
    assert outcome.denied_ddl_id in str(outcome.denied_ddl_error)
    assert "no copies of patient data" in str(outcome.denied_ddl_error)
    assert outcome.exit_code == 0


# --------------------------------------------------------------------------- the byte scans


def _artifacts(outcome: Outcome) -> dict[str, bytes]:
    s = outcome.served
    out = {
        "duckdb file": s.audit.read_bytes(),
        "duckdb WAL (while serving)": outcome.wal_snapshot,
        "checkpoints file": Path(f"{s.audit}.checkpoints").read_bytes(),
        "serve output": bytes(s.output),
    }
    for p in outcome.parquet:
        out[f"parquet {p.relative_to(s.export)}"] = p.read_bytes()
    return out


def test_every_artifact_exists_and_the_scan_finds_canaries(outcome: Outcome) -> None:
    arts = _artifacts(outcome)
    assert {"statements", "sessions", "approvals", "approval_events", "policy_events"} <= {
        Path(name.split(" ", 1)[1]).parts[0] for name in arts if name.startswith("parquet ")
    }
    assert outcome.wal_snapshot, "no WAL while serving: nothing was scanned there"
    with duckdb.connect(str(outcome.served.audit), read_only=True) as audit:
        row = audit.execute("SELECT row_hash FROM audit_rows ORDER BY seq DESC LIMIT 1").fetchone()
    assert row is not None
    canaries = {
        "duckdb file": [AGENT.encode(), CANARY_TABLE.encode()],
        "duckdb WAL (while serving)": [AGENT.encode(), CANARY_TABLE.encode()],
        "checkpoints file": [str(row[0]).encode()],
        "serve output": [b"listening on", b"approval email to alice@example.org"],
    }
    for name, wanted in canaries.items():
        for c in wanted:
            assert c in arts[name], f"canary {c!r} not found in the {name}"
    statements = [v for k, v in arts.items() if k.startswith("parquet statements/")]
    assert any(CANARY_TABLE.encode() in v for v in statements)


def test_no_seeded_value_in_any_artifact(outcome: Outcome) -> None:
    leaks = {
        name: found for name, data in _artifacts(outcome).items() if (found := find_secrets(data))
    }
    assert not leaks, f"seeded PHI at rest: {leaks}"


def test_a_double_quoted_value_is_not_kept_verbatim(outcome: Outcome) -> None:
    """``WHERE ssn = "900-31-5555"`` parses as an identifier, not a literal: the redaction must
    replace identifiers the catalog does not know too."""
    leaks = {
        name: found
        for name, data in _artifacts(outcome).items()
        if (found := find_secrets(data, only=TYPO_SECRETS))
    }
    assert not leaks, f"a double-quoted SSN at rest: {leaks}"


def _all_text(conn: duckdb.DuckDBPyConnection, relation: str) -> bytes:
    """Every cell of ``relation`` as text: what survives whatever compression the file uses."""
    cols = [r[0] for r in conn.execute(f"DESCRIBE SELECT * FROM {relation}").fetchall()]
    exprs = ", ".join(f"coalesce(CAST({c!s} AS VARCHAR), '')" for c in cols)
    rows = conn.execute(f"SELECT concat_ws(chr(31), {exprs}) FROM {relation}").fetchall()
    return "\n".join(str(r[0]) for r in rows).encode()


def test_no_seeded_value_in_any_table_or_parquet_cell(outcome: Outcome) -> None:
    leaks: dict[str, list[str]] = {}
    with duckdb.connect(str(outcome.served.audit), read_only=True) as audit:
        tables = [r[0] for r in audit.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'"
        ).fetchall()]  # fmt: skip
        assert {"log_statement", "log_session_start", "log_approval_event"} <= set(tables)
        for t in tables:
            text = _all_text(audit, f'"{t}"')
            if found := find_secrets(text):
                leaks[t] = found
        assert CANARY_TABLE.encode() in _all_text(audit, "statements")
    with duckdb.connect() as mem:
        for p in outcome.parquet:
            text = _all_text(mem, f"read_parquet('{p}')")
            if found := find_secrets(text):
                leaks[str(p.relative_to(outcome.served.export))] = found
    assert not leaks, f"seeded PHI in audit cells: {leaks}"


# --------------------------------------------------------------------------- the audit itself


def test_the_audit_verifies(outcome: Outcome) -> None:
    out = _pgproxy("audit", "verify", "--audit", str(outcome.served.audit))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ok" in out.stdout


def _query(outcome: Outcome, sql: str) -> list[dict[str, Any]]:
    out = _pgproxy("audit", "sql", "--audit", str(outcome.served.audit), "--format", "json", sql)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert isinstance(rows, list)
    return rows


def test_contract_views_have_the_expected_rows(outcome: Outcome) -> None:
    blocked = _query(
        outcome,
        "SELECT decision, sqlstate, sql_redacted FROM statements "
        "WHERE sql_redacted LIKE '%pg_sleep%'",
    )
    assert blocked and all(r["decision"] == "BLOCK" and r["sqlstate"] == "42501" for r in blocked)
    masked = _query(
        outcome,
        "SELECT masked_columns, rows FROM statements WHERE decision = 'MASK' "
        "AND sql_redacted LIKE 'SELECT id, first_name, last_name, ssn%'",
    )
    assert masked and all(r["masked_columns"] for r in masked)
    assert masked[0]["rows"] == len(SEEDED)
    for column in ("first_name", "last_name", "ssn", "dob", "email", "mrn", "admitted"):
        assert any(column in entry for entry in masked[0]["masked_columns"]), column
    assert not any("visits" in entry for entry in masked[0]["masked_columns"])
    errors = _query(outcome, "SELECT sqlstate FROM statements WHERE sqlstate IN ('22P02', '23505')")
    assert {r["sqlstate"] for r in errors} == {"22P02", "23505"}
    approvals = _query(
        outcome,
        "SELECT approval_id, status, reason, decided_by FROM approvals ORDER BY requested_at",
    )
    by_id = {r["approval_id"]: r for r in approvals}
    assert set(outcome.denied_reasons) <= set(by_id)
    for approval_id, reason in outcome.denied_reasons.items():
        assert by_id[approval_id]["status"] == "denied"
        assert by_id[approval_id]["reason"] == reason
        assert by_id[approval_id]["decided_by"] == "alice@example.org"
    assert sum(r["status"] == "executed" for r in approvals) == 5  # with the failing cast
    failed = _query(outcome, "SELECT count(*) AS n FROM sessions WHERE NOT auth_ok")
    assert failed[0]["n"] >= 2
