"""``pgproxy demo``: a throwaway Postgres with a synthetic clinic, behind the proxy, in one command.

What it assembles, all on 127.0.0.1 and all in this process except Postgres itself:

* a cluster from the Postgres binaries (``pgproxy.pgcluster``): the system's, or, when there are
  none, the ones the optional ``pgserver`` wheel ships (the ``demo`` extra);
* the clinic of ``pgproxy.demo_data`` seeded once per data directory (``--fresh`` starts over);
* the proxy (``pgproxy.server.runtime.run``) with the bundled ``rules/``, its audit and approval
  store in the data directory;
* an SMTP sink (``pgproxy.demo_mail``) that the proxy's ``--smtp`` points at, browsable at
  ``/mail`` on the proxy's HTTP port, so the approval emails can be read and their links clicked.

It prints a walkthrough; Ctrl-C (SIGINT) or SIGTERM drains the proxy, flushes the audit, stops
the SMTP sink and then Postgres. The data directory is kept for the next run.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import pwd
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from pgproxy.config import Settings, load_settings
from pgproxy.demo_data import DATABASE, DEFAULT_PATIENTS, SeedPlan, marker_query, seeded_patients
from pgproxy.demo_mail import Mailbox, mail_routes, start_smtp_sink
from pgproxy.pgcluster import Cluster, ClusterUnavailable, find_bindir

__all__ = [
    "DEMO_MARK",
    "DemoError",
    "DemoOptions",
    "bundled_rules",
    "disable_ssl_unless_supported",
    "ensure_postgres_binaries",
    "open_cluster",
    "run_demo",
    "seed",
    "supports_ssl",
    "walkthrough",
]

DEFAULT_DATA_DIR = ".pgproxy-demo"
FALLBACK_DATA_DIR = "/var/tmp/pgproxy-demo"
#: a file in every data directory the demo made: ``--fresh`` wipes only such directories
DEMO_MARK = ".pgproxy-demo"
MAIL_FROM = "pgproxy-demo@example.org"

# the walkthrough's statements
Q_PATIENTS = (
    "SELECT id, first_name, last_name, ssn, mrn, dob, zip FROM patients ORDER BY id LIMIT 5"
)
Q_NOTES = "SELECT id, body FROM clinical_notes ORDER BY id LIMIT 2"
Q_INFERENCE = "SELECT count(*) FROM patients WHERE ssn LIKE '000-1%'"
Q_DDL = "CREATE TABLE triage_worklist (patient_id int, priority int)"
Q_AUDIT_WIRE = "SELECT ts, agent, decision, sql_redacted FROM statements ORDER BY ts DESC LIMIT 10"
Q_AUDIT_HTTP = "SELECT status, count(*) AS n FROM approvals GROUP BY status"

INSTALL_HELP = (
    "no PostgreSQL server binaries (initdb, pg_ctl) on PATH or under /usr/lib/postgresql/*/bin.\n"
    "Install them, then run the demo again:\n"
    "  Debian/Ubuntu:  sudo apt-get install postgresql\n"
    "  Fedora/RHEL:    sudo dnf install postgresql-server\n"
    "  macOS:          brew install postgresql@16\n"
    "or, with no system package, install the pgserver wheel that bundles them into the same\n"
    "environment as pgproxy (the demo then uses those):\n"
    "  .venv/bin/pip install pgserver      (or the 'demo' extra: pip install -e '.[demo]')"
)


class DemoError(Exception):
    """Something the user can fix; the message says what and how."""


@dataclass(frozen=True, slots=True)
class DemoOptions:
    data_dir: Path
    fresh: bool
    listen: str
    http: str
    plan: SeedPlan
    data_dir_given: bool = True

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DemoOptions:
        rows = args.rows if args.rows is not None else DEFAULT_PATIENTS
        if rows < 1:
            raise DemoError("--rows: give a positive number of patients")
        return cls(
            data_dir=Path(args.data_dir or DEFAULT_DATA_DIR).resolve(),
            fresh=bool(args.fresh),
            listen=args.listen,
            http=args.http,
            plan=SeedPlan(rows),
            data_dir_given=args.data_dir is not None,
        )


def bundled_rules() -> Path:
    """The ``rules/`` directory shipped next to the package (or in the working directory)."""
    for cand in (Path(__file__).resolve().parent.parent / "rules", Path.cwd() / "rules"):
        if cand.is_dir():
            return cand
    raise DemoError("the bundled rules/ directory was not found")


def _pgserver_bindir() -> Path | None:
    """The binaries inside the optional ``pgserver`` wheel, located without importing it."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or spec.origin is None:
        return None
    bindir = Path(spec.origin).parent / "pginstall" / "bin"
    if (bindir / "initdb").exists() and (bindir / "pg_ctl").exists():
        return bindir
    return None


def ensure_postgres_binaries() -> str:
    """Make sure ``pgcluster`` finds initdb/pg_ctl; returns where they come from.

    The system's binaries win. Otherwise the pgserver wheel's directory is put first on this
    process's PATH, which is where ``pgcluster.find_bindir`` looks first."""
    try:
        return f"PostgreSQL binaries in {find_bindir()}"
    except ClusterUnavailable:
        pass
    bindir = _pgserver_bindir()
    if bindir is None:
        raise DemoError(INSTALL_HELP)
    os.environ["PATH"] = f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"
    return f"PostgreSQL binaries from the pgserver wheel ({bindir})"


def _wipe(data_dir: Path) -> None:
    if not data_dir.exists():
        return
    if not (data_dir / DEMO_MARK).exists() and any(data_dir.iterdir()):
        raise DemoError(
            f"--fresh: {data_dir} is not empty and was not made by pgproxy demo; "
            "not deleting it (choose another --data-dir)"
        )
    cluster = Cluster.open_existing(data_dir / "pg")
    if cluster is not None:  # a demo killed without Ctrl-C may have left Postgres running
        cluster.stop("immediate")
    shutil.rmtree(data_dir)


def _cluster_user() -> str | None:
    """Who Postgres will run as: as root, pgcluster picks ``postgres`` (else ``nobody``)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "nobody"
    return "postgres"


class DataDirUnreachable(DemoError):
    """As root, the user Postgres runs as cannot reach the data directory."""


def _reachable(path: Path, user: str) -> bool:
    probe = ["runuser", "-u", user, "--", "test", "-x", str(path)]
    return subprocess.run(probe, check=False, timeout=30).returncode == 0


def _check_reachable(data_dir: Path) -> None:
    """As root, Postgres runs as another user: it must reach the data dir and the binaries."""
    user = _cluster_user()
    if user is None or shutil.which("runuser") is None:
        return
    probe = next((p for p in (data_dir, *data_dir.parents) if p.exists()), data_dir)
    if not _reachable(probe, user):
        raise DataDirUnreachable(
            f"as root, Postgres runs as the {user!r} user, which cannot reach {probe}; "
            f"give a --data-dir it can reach, e.g. --data-dir {FALLBACK_DATA_DIR}"
        )
    binary = find_bindir() / "postgres"
    if not _reachable(binary, user):
        raise DemoError(
            f"as root, Postgres runs as the {user!r} user, which cannot run {binary}; "
            "install the system postgresql package instead"
        )


def open_cluster(data_dir: Path, fresh: bool) -> tuple[Cluster, bool]:
    """The demo's cluster in ``data_dir/pg`` (created when missing), not started; and whether
    it was created now."""
    _check_reachable(data_dir)
    if fresh:
        _wipe(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / DEMO_MARK).write_text("made by pgproxy demo; --fresh may delete this directory\n")
    existing = Cluster.open_existing(data_dir / "pg")
    if existing is not None:
        return existing, False
    return Cluster.create(data_dir / "pg"), True


def _open_cluster_somewhere(opts: DemoOptions) -> tuple[DemoOptions, Cluster, bool]:
    """``open_cluster`` in the chosen data dir; when the default one (in the working directory)
    is out of reach of Postgres' user, as under a root home directory, in FALLBACK_DATA_DIR."""
    try:
        return (opts, *open_cluster(opts.data_dir, opts.fresh))
    except DataDirUnreachable as exc:
        if opts.data_dir_given:
            raise
        print(f"pgproxy demo: {exc}; using {FALLBACK_DATA_DIR}", file=sys.stderr)
        opts = replace(opts, data_dir=Path(FALLBACK_DATA_DIR))
        return (opts, *open_cluster(opts.data_dir, opts.fresh))


def supports_ssl(bindir: Path) -> bool:
    """Whether these Postgres binaries were built with OpenSSL (pgserver's are not)."""
    pg_config = bindir / "pg_config"
    if not pg_config.exists():
        return True  # a distribution build without pg_config: assume the usual
    proc = subprocess.run(
        [str(pg_config), "--configure"], capture_output=True, text=True, check=False, timeout=30
    )
    return "openssl" in proc.stdout


def disable_ssl_unless_supported(cluster: Cluster) -> bool:
    """pgcluster always configures ``ssl = on``; a build without OpenSSL then refuses to start.
    For such a build, turn SSL off again (a later line wins). Returns whether it did."""
    if supports_ssl(cluster.bindir):
        return False
    conf = cluster.datadir / "postgresql.conf"
    note = "# these binaries have no OpenSSL (pgproxy demo)"
    if note not in conf.read_text():
        with conf.open("a") as fh:
            fh.write(f"\n{note}\nssl = off\n")
    return True


def _start(cluster: Cluster) -> None:
    disable_ssl_unless_supported(cluster)
    try:
        cluster.start()
    except RuntimeError as exc:
        raise DemoError(
            f"Postgres did not start ({exc}); see {cluster.base / 'postgres.log'}, "
            "or start over with --fresh"
        ) from None


@dataclass(frozen=True, slots=True)
class Seeded:
    patients: int
    created: bool
    seconds: float


def seed(cluster: Cluster, plan: SeedPlan) -> Seeded:
    """Create and seed the clinic database unless an earlier run did (then keep it as is)."""
    databases = cluster.psql("SELECT datname FROM pg_database").split()
    if DATABASE not in databases:
        cluster.psql(f"CREATE DATABASE {DATABASE}")
    already = seeded_patients(cluster.psql(marker_query()))
    if already is not None:
        return Seeded(already, False, 0.0)
    started = time.monotonic()
    cluster.psql(plan.sql(), dbname=DATABASE)
    return Seeded(plan.patients, True, time.monotonic() - started)


def _pgproxy_command() -> str:
    script = Path(sys.executable).with_name("pgproxy")
    if shutil.which("pgproxy") == str(script):
        return "pgproxy"
    if script.exists():
        try:
            return os.path.relpath(script)
        except ValueError:  # pragma: no cover - another drive on Windows
            return str(script)
    return f"{sys.executable} -m pgproxy"


def _psql_command(cluster: Cluster) -> str:
    if shutil.which("psql"):
        return "psql"
    bundled = cluster.bindir / "psql"
    return str(bundled) if bundled.exists() else "psql"


def walkthrough(settings: Settings, cluster: Cluster, seeded: Seeded) -> str:
    """What the demo prints once the proxy accepts connections."""
    host, port = settings.listen_addr
    http_host, http_port = settings.http_addr
    web = f"http://{http_host}:{http_port}"
    agent = f"postgresql://triage-bot:s3cret@{host}:{port}/{DATABASE}"
    analyst = f"postgresql://auditor:an0ther@{host}:{port}/audit"
    psql, pgproxy = _psql_command(cluster), _pgproxy_command()
    counts = SeedPlan(seeded.patients).counts()
    return f"""
pgproxy demo is running: a synthetic clinic ({seeded.patients:,} patients, \
{sum(counts.values()):,} rows; every name, number and date in it is fake).

  agents connect to   {agent}
                      (also billing-agent:b1lling; the real database credentials stay here)
  mailbox             {web}/mail   (approval emails to alice@, bob@example.org land here)
  pending approvals   {web}/api/approvals?status=pending
  audit (DuckDB)      {settings.audit}
  audit over the wire {analyst}

1. Read patients as the agent: names, SSNs, MRNs and phones come back masked, dates keep
   only the year, and PHI inside the free-text notes is replaced by <TYPE> tokens.
     {psql} '{agent}' -c '{Q_PATIENTS}'
     {psql} '{agent}' -c '{Q_NOTES}'

2. Try to learn PHI through a filter instead (an inference query): it is HELD for approval.
     {psql} '{agent}' -c "{Q_INFERENCE}"
   psql now waits (a NOTICE names the approval id) until a reviewer decides, or the request
   expires after 15 minutes. Open {web}/mail, open the newest message, click its link and
   Approve (the count is returned) or Deny with a reason (psql gets a 42501 error).

3. Change the schema: DDL is held the same way.
     {psql} '{agent}' -c '{Q_DDL}'
   Open {web}/mail, click the link in the new message, press Approve: psql prints
   CREATE TABLE and the statement has run exactly once.

4. Read the audit while the demo runs (every statement, decision and approval; no PHI):
     {psql} '{analyst}' -c '{Q_AUDIT_WIRE}'
     {pgproxy} audit sql --http {http_host}:{http_port} "{Q_AUDIT_HTTP}"

Press Ctrl-C to stop: sessions drain, the audit is flushed, Postgres stops. The data stays in
{cluster.base.parent} for the next run (--fresh starts over).
"""


async def run_demo(args: argparse.Namespace) -> int:
    """The ``pgproxy demo`` command; returns the exit code."""
    from pgproxy.server.runtime import run

    try:
        opts = DemoOptions.from_args(args)
        load_settings({"listen": opts.listen, "http": opts.http}, environ={})  # validate early
        rules = bundled_rules()
        source = await asyncio.to_thread(ensure_postgres_binaries)
        opts, cluster, created = await asyncio.to_thread(_open_cluster_somewhere, opts)
        what = "created" if created else "reusing"
        print(f"pgproxy demo: {what} a cluster in {cluster.base} ({source})", flush=True)
        await asyncio.to_thread(_start, cluster)
    except (DemoError, ClusterUnavailable) as exc:
        print(f"pgproxy demo: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:  # initdb failed
        print(f"pgproxy demo: cannot create the cluster: {exc}", file=sys.stderr)
        return 1
    sink = None
    try:
        plan = opts.plan
        print(
            f"pgproxy demo: seeding {plan.patients:,} patients ({plan.total_rows:,} rows) "
            "unless already seeded...",
            flush=True,
        )
        try:
            seeded = await asyncio.to_thread(seed, cluster, plan)
        except RuntimeError as exc:  # psql failed
            print(f"pgproxy demo: seeding failed: {exc}", file=sys.stderr)
            return 1
        if seeded.created:
            print(f"pgproxy demo: seeded in {seeded.seconds:.1f} s", flush=True)
        else:
            note = "" if seeded.patients == plan.patients else " (--fresh reseeds with --rows)"
            print(
                f"pgproxy demo: kept the clinic seeded earlier ({seeded.patients:,} patients)"
                + note,
                flush=True,
            )
        mailbox = Mailbox()
        sink = await start_smtp_sink(mailbox)
        settings = load_settings(
            {
                "listen": opts.listen,
                "http": opts.http,
                "upstream": cluster.dsn(dbname=DATABASE),
                "rules": str(rules),
                "audit": str(opts.data_dir / "audit.duckdb"),
                "smtp": sink.url,
                "mail_from": MAIL_FROM,
                "drain_seconds": 5,
            },
            environ={},
        )

        def ready(_runtime: object) -> None:
            print(walkthrough(settings, cluster, seeded), flush=True)

        return await run(settings, ready, extra_routes=[mail_routes(mailbox)])
    finally:
        if sink is not None:
            await sink.close()
        await asyncio.to_thread(cluster.stop, "fast")
        print("pgproxy demo: stopped (Postgres is down, the audit is flushed)", flush=True)
