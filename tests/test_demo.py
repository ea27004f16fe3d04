"""``pgproxy demo`` as a newcomer runs it, plus its seed and mailbox parts on their own.

The end-to-end part starts the demo as a subprocess (its own embedded cluster, a small seed,
free ports on 127.0.0.1), reads masked data as an agent, has a held DDL approved and an
inference query denied through the mailbox pages, reads the audit as the analyst, and stops it
with SIGINT -- twice, the second run reusing the data directory without reseeding.
"""

from __future__ import annotations

import asyncio
import html
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib
import psycopg
import pytest
from aiohttp import web

from pgproxy.demo import DEMO_MARK, _pgserver_bindir, disable_ssl_unless_supported, seed
from pgproxy.demo_data import DATABASE, SeedPlan, seeded_patients
from pgproxy.demo_mail import Mailbox, linkify, mail_routes, start_smtp_sink
from pgproxy.pgcluster import (
    SUPERUSER,
    SUPERUSER_PASSWORD,
    Cluster,
    ClusterUnavailable,
    find_bindir,
    free_port,
)

PATIENTS = 120
MAIL_LINK = re.compile(r'href="(http://[^"]+/approvals/([\w-]+)\?t=[^"]+)"')


def _postgres_available() -> bool:
    try:
        find_bindir()
    except ClusterUnavailable:
        return _pgserver_bindir() is not None
    return True


needs_postgres = pytest.mark.skipif(
    not _postgres_available(), reason="no PostgreSQL binaries and no pgserver wheel here"
)


def _reachable_dir(prefix: str) -> Path:
    """A fresh directory the cluster's user (postgres, when we are root) can traverse."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


# -- seed plan and marker (pure) --------------------------------------------------------------


def test_seed_plan_scales_with_patients() -> None:
    plan = SeedPlan(PATIENTS)
    counts = plan.counts()
    assert counts["patients"] == PATIENTS
    assert counts["encounters"] == counts["diagnoses"] == 3 * PATIENTS
    assert counts["claims"] == 2 * PATIENTS and counts["clinical_notes"] == PATIENTS
    assert plan.total_rows == sum(counts.values())
    assert 99_000 < SeedPlan().total_rows < 110_000  # the default is ~100k rows
    with pytest.raises(ValueError):
        SeedPlan(0)


def test_seed_marker_round_trips_and_rejects_others() -> None:
    plan = SeedPlan(321)
    assert seeded_patients(plan.marker) == 321
    assert seeded_patients(plan.marker + "\n") == 321
    assert seeded_patients("") is None
    assert seeded_patients("pgproxy demo seed v999: 321 patients") is None
    assert seeded_patients("a comment someone wrote") is None


# -- mailbox pages ----------------------------------------------------------------------------


def test_linkify_escapes_everything_and_links_only_http() -> None:
    out = linkify('<b>hi</b> see http://h:1/approvals/a?t=x&y=1. or javascript:alert("x")')
    assert "<b>" not in out and "&lt;b&gt;" in out
    assert '<a href="http://h:1/approvals/a?t=x&amp;y=1">' in out
    assert out.count("<a ") == 1  # the trailing dot is not part of the link
    assert "javascript:alert(&quot;x&quot;)" in out


def _get(url: str, method: str = "GET") -> tuple[int, str, dict[str, str]]:
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), dict(exc.headers)


async def test_smtp_sink_delivers_into_escaped_read_only_pages() -> None:
    mailbox = Mailbox()
    sink = await start_smtp_sink(mailbox)
    app = web.Application()
    app.add_routes(mail_routes(mailbox))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    base = f"http://127.0.0.1:{port}"
    try:
        status, page, _ = await _in_thread(_get, f"{base}/mail")
        assert status == 200 and "No mail yet" in page
        msg = EmailMessage()
        msg["From"], msg["To"] = "pgproxy@example.org", "alice@example.org"
        msg["Subject"] = "Approval <needed>"
        msg.set_content("Review: http://127.0.0.1:9/approvals/apr_1?t=tok\n<script>x</script>\n")
        msg.add_alternative("<p onclick='x()'>hi</p>", subtype="html")
        await aiosmtplib.send(msg, hostname="127.0.0.1", port=sink.port, timeout=10)
        assert [m.recipients for m in mailbox.messages()] == [("alice@example.org",)]
        status, page, headers = await _in_thread(_get, f"{base}/mail")
        assert status == 200 and 'href="/mail/1"' in page and "Approval &lt;needed&gt;" in page
        assert "default-src 'none'" in headers["Content-Security-Policy"]
        status, page, _ = await _in_thread(_get, f"{base}/mail/1")
        assert status == 200
        assert '<a href="http://127.0.0.1:9/approvals/apr_1?t=tok">' in page
        assert "<script>" not in page and "&lt;script&gt;" in page
        assert "<p onclick" not in page and "&lt;p onclick=" in page
        for path in ("/mail/2", "/mail/x", "/mail/99999999999999"):
            assert (await _in_thread(_get, base + path))[0] == 404
        for method in ("POST", "DELETE", "PUT"):
            assert (await _in_thread(_get, f"{base}/mail/1", method))[0] == 405
        assert len(mailbox.messages()) == 1
    finally:
        await runner.cleanup()
        await sink.close()


async def _in_thread(fn: Any, *args: Any) -> Any:
    return await asyncio.to_thread(fn, *args)


# -- seeding on a real cluster ------------------------------------------------------------------


@needs_postgres
def test_seed_is_deterministic_idempotent_and_fake(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two clusters seeded with the same plan hold identical data; a second seed is a no-op.

    The second cluster runs on the pgserver wheel's binaries when that wheel is installed (the
    demo's fallback), else on the same system binaries."""
    plan = SeedPlan(PATIENTS)
    digests = []
    for use_wheel in (False, True):
        base = _reachable_dir("pgproxy-demo-seed-")
        with monkeypatch.context() as mp:
            wheel = _pgserver_bindir() if use_wheel else None
            if wheel is not None:
                mp.setenv("PATH", f"{wheel}{os.pathsep}{os.environ.get('PATH', '')}")
            try:
                cluster = Cluster.create(base / "pg")
            except ClusterUnavailable as exc:
                pytest.skip(str(exc))
            if wheel is not None:
                assert cluster.bindir == wheel
            disable_ssl_unless_supported(cluster)
            cluster.start()
        try:
            first = seed(cluster, plan)
            again = seed(cluster, SeedPlan(PATIENTS * 2))
            assert first.created and first.patients == PATIENTS
            assert not again.created and again.patients == PATIENTS
            for table, n in plan.counts().items():
                got = cluster.psql(f"SELECT count(*) FROM {table}", dbname=DATABASE).strip()
                assert int(got) == n, table
            bad = cluster.psql(
                "SELECT count(*) FROM patients WHERE ssn NOT LIKE '000-%' "
                "OR phone NOT LIKE '(%) 555-01__' OR email NOT LIKE '%@example.com'",
                dbname=DATABASE,
            )
            assert int(bad) == 0
            digests.append(
                cluster.psql(
                    "SELECT md5(string_agg(t::text, '|' ORDER BY t::text)) FROM ("
                    "SELECT p::text AS t FROM patients p UNION ALL "
                    "SELECT n::text FROM clinical_notes n UNION ALL "
                    "SELECT c::text FROM claims c) s",
                    dbname=DATABASE,
                )
            )
        finally:
            cluster.stop()
            shutil.rmtree(base, ignore_errors=True)
    assert digests[0] == digests[1]


# -- the demo end to end ---------------------------------------------------------------------


@dataclass
class Demo:
    data_dir: Path
    port: int
    http: int
    proc: subprocess.Popen[str] | None = None
    output: list[str] = field(default_factory=list)

    def start(self, *extra: str) -> None:
        self.output = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pgproxy", "demo", "--data-dir", str(self.data_dir),
             "--rows", str(PATIENTS), "--listen", f"127.0.0.1:{self.port}",
             "--http", f"127.0.0.1:{self.http}", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 120
        for line in self.proc.stdout:
            self.output.append(line)
            if "listening on" in line:
                break
            assert time.monotonic() < deadline, "".join(self.output)
        else:
            pytest.fail("pgproxy demo exited early:\n" + "".join(self.output))
        proc = self.proc
        threading.Thread(target=lambda: self.output.extend(proc.stdout or []), daemon=True).start()
        self.wait_for_output("Press Ctrl-C")

    def wait_for_output(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while text not in "".join(self.output):
            assert time.monotonic() < deadline, f"no {text!r} in:\n" + "".join(self.output)
            time.sleep(0.05)

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(60)

    @property
    def cluster_dir(self) -> Path:
        return self.data_dir / "pg"

    def superuser_dsn(self) -> str:
        port = int((self.cluster_dir / "port").read_text())
        return f"postgresql://{SUPERUSER}:{SUPERUSER_PASSWORD}@127.0.0.1:{port}/{DATABASE}"

    def agent_dsn(self, agent: str = "triage-bot", password: str = "s3cret") -> str:
        return f"postgresql://{agent}:{password}@127.0.0.1:{self.port}/{DATABASE}"

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http}{path}"


@pytest.fixture(scope="module")
def demo() -> Iterator[Demo]:
    if not _postgres_available():
        pytest.skip("no PostgreSQL binaries and no pgserver wheel here")
    root = _reachable_dir("pgproxy-demo-e2e-")
    d = Demo(root / "data", free_port(), free_port())
    d.start("--fresh")
    try:
        yield d
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait(30)
        c = Cluster.open_existing(d.cluster_dir)
        if c is not None:
            c.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_demo_prints_the_walkthrough(demo: Demo) -> None:
    text = "".join(demo.output)
    assert f"postgresql://triage-bot:s3cret@127.0.0.1:{demo.port}/{DATABASE}" in text
    assert f"http://127.0.0.1:{demo.http}/mail" in text
    assert f"postgresql://auditor:an0ther@127.0.0.1:{demo.port}/audit" in text
    assert f"audit sql --http 127.0.0.1:{demo.http}" in text
    assert str(demo.data_dir / "audit.duckdb") in text
    assert (demo.data_dir / DEMO_MARK).exists()


def test_seeded_once_with_the_requested_size(demo: Demo) -> None:
    with psycopg.connect(demo.superuser_dsn()) as conn:
        for table, n in SeedPlan(PATIENTS).counts().items():
            assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (n,), table


def test_agent_reads_only_masked_phi(demo: Demo) -> None:
    cols = "first_name, last_name, ssn, mrn, phone, email, street"
    with psycopg.connect(demo.superuser_dsn()) as conn:
        raw_patients = conn.execute(f"SELECT id, {cols} FROM patients ORDER BY id").fetchall()
        raw_claims = conn.execute("SELECT member_id, account_no FROM claims").fetchall()
    with psycopg.connect(demo.agent_dsn()) as conn:
        seen_patients = conn.execute(f"SELECT id, {cols} FROM patients ORDER BY id").fetchall()
        notes = conn.execute("SELECT body FROM clinical_notes ORDER BY id").fetchall()
        seen_claims = conn.execute("SELECT member_id, account_no FROM claims").fetchall()
    assert [r[0] for r in seen_patients] == [r[0] for r in raw_patients]  # ids pass through
    secrets = {str(v) for r in raw_patients for v in r[1:]} | {v for r in raw_claims for v in r}
    # each returned cell is masked: no seeded identifier appears in it, whole or as part
    returned = [str(v) for r in seen_patients for v in r[1:]] + [v for r in seen_claims for v in r]
    returned += [r[0] for r in notes]
    assert notes and all("Patient: <PERSON>" in r[0] for r in notes)
    leaks = {s for s in secrets if len(s) > 4 for cell in returned if s in cell}
    assert not leaks, sorted(leaks)[:5]


class _Agent(threading.Thread):
    """Runs one statement through the proxy in a thread: it blocks while held."""

    def __init__(self, dsn: str, sql: str) -> None:
        super().__init__(daemon=True)
        self.dsn, self.sql = dsn, sql
        self.error: psycopg.Error | None = None
        self.rows: list[tuple[Any, ...]] | None = None

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            try:
                cur = conn.execute(self.sql)
                self.rows = cur.fetchall() if cur.description else []
            except psycopg.Error as exc:
                self.error = exc


def _mail_numbers(demo: Demo) -> set[int]:
    status, page, _ = _get(demo.url("/mail"))
    assert status == 200
    return {int(n) for n in re.findall(r'href="/mail/(\d+)"', page)}


def _new_review_links(demo: Demo, before: set[int], count: int) -> list[tuple[str, str]]:
    """Wait for ``count`` new messages; the (review link, approval id) each carries."""
    deadline = time.monotonic() + 30
    while len(new := sorted(_mail_numbers(demo) - before)) < count:
        assert time.monotonic() < deadline, "the approval emails did not arrive in the mailbox"
        time.sleep(0.2)
    links = []
    for n in new:
        status, page, _ = _get(demo.url(f"/mail/{n}"))
        assert status == 200
        found = MAIL_LINK.search(page)
        assert found, "no clickable review link in the message page"
        links.append((html.unescape(found.group(1)), found.group(2)))
    return links


def _review_form(url: str) -> dict[str, str]:
    status, page, _ = _get(url)
    assert status == 200
    return dict(re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)">', page))


def _post(url: str, data: dict[str, str]) -> int:
    req = urllib.request.Request(url, data=urllib.parse.urlencode(data).encode(), method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def _table_exists(demo: Demo, name: str) -> bool:
    with psycopg.connect(demo.superuser_dsn()) as conn:
        return conn.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone() == (True,)


def test_held_ddl_runs_after_approval_from_the_mailbox(demo: Demo) -> None:
    before = _mail_numbers(demo)
    agent = _Agent(demo.agent_dsn(), "CREATE TABLE triage_worklist (patient_id int)")
    agent.start()
    links = _new_review_links(demo, before, 2)  # alice@ and bob@ each get a personal link
    assert len({aid for _, aid in links}) == 1
    assert agent.is_alive(), "the agent's call must wait while held"
    assert not _table_exists(demo, "triage_worklist")
    url = links[0][0]
    assert _post(url, {**_review_form(url), "decision": "approve"}) == 200
    agent.join(30)
    assert not agent.is_alive() and agent.error is None
    assert _table_exists(demo, "triage_worklist")


def test_inference_query_is_held_and_denied_from_the_mailbox(demo: Demo) -> None:
    before = _mail_numbers(demo)
    agent = _Agent(demo.agent_dsn(), "SELECT count(*) FROM patients WHERE ssn LIKE '000-1%'")
    agent.start()
    links = _new_review_links(demo, before, 2)
    assert agent.is_alive()
    url, approval_id = links[1]
    fields = _review_form(url)
    reason = "no SSN lookups from the triage bot"
    assert _post(url, {**fields, "decision": "deny", "reason": reason}) == 200
    agent.join(30)
    assert not agent.is_alive() and agent.rows is None
    assert isinstance(agent.error, psycopg.errors.InsufficientPrivilege)
    assert approval_id in str(agent.error) and reason in str(agent.error)


def test_analyst_reads_the_audit(demo: Demo) -> None:
    time.sleep(1.5)  # ordinary audit records are durable within the 1 s flush interval
    dsn = f"postgresql://auditor:an0ther@127.0.0.1:{demo.port}/audit"
    with psycopg.connect(dsn) as conn:
        statements = conn.execute("SELECT agent, decision, sql_redacted FROM statements").fetchall()
        approvals = conn.execute("SELECT status FROM approvals").fetchall()
    assert {"MASK"} <= {r[1] for r in statements}
    assert {r[0] for r in statements} == {"triage-bot"}
    assert not any("000-1%" in (r[2] or "") for r in statements)  # literals are redacted
    assert {"executed", "denied"} <= {r[0] for r in approvals}
    out = subprocess.run(
        [sys.executable, "-m", "pgproxy", "audit", "sql", "--http", f"127.0.0.1:{demo.http}",
         "--format", "csv", "SELECT status FROM approvals ORDER BY status"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "denied" in out.stdout and "executed" in out.stdout


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_sigint_stops_everything_and_a_rerun_reuses_the_data(demo: Demo) -> None:
    pg_port = int((demo.cluster_dir / "port").read_text())
    assert demo.stop() == 0, "".join(demo.output)
    demo.wait_for_output("pgproxy demo: stopped")
    assert not (demo.cluster_dir / "data" / "postmaster.pid").exists()
    assert not _accepts(pg_port) and not _accepts(demo.port) and not _accepts(demo.http)
    demo.start()  # no --fresh: same cluster, same clinic, nothing reseeded
    text = "".join(demo.output)
    assert "kept the clinic seeded earlier" in text and "seeded in" not in text
    assert _table_exists(demo, "triage_worklist")  # the approved DDL of the first run
    with psycopg.connect(demo.agent_dsn("billing-agent", "b1lling")) as conn:
        assert conn.execute("SELECT count(*) FROM claims").fetchone() == (2 * PATIENTS,)
    assert demo.stop() == 0, "".join(demo.output)
    assert not (demo.cluster_dir / "data" / "postmaster.pid").exists()
