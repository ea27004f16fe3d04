"""pgproxy's benchmark: direct Postgres, a plain relay, PgBouncer and pgproxy, side by side.

One command, one Postgres cluster, one machine, one table::

    python benchmarks/run.py            # full sizes (a few minutes)
    python benchmarks/run.py --quick    # small sizes (well under a minute)

Every target is a separate process that clients reach over TCP on 127.0.0.1, and no hop uses
TLS (``sslmode=disable`` for the clients and for every proxy's upstream), so the columns differ
only by what sits between the client and Postgres:

- ``direct``: Postgres itself;
- ``relay``: ``benchmarks/relay.py``, a byte relay on asyncio/uvloop (the floor for any Python
  proxy);
- ``pgbouncer``: PgBouncer in session mode, when it is installed (else the column is skipped);
- ``pgproxy``: ``python -m pgproxy serve`` with rules that hold nothing and tag nothing.

Measured, in rounds that visit every target in turn (``--repeat N`` rounds; medians reported):

1. TPS of ``pgbench -S -c 8 -j 2 -T <duration>`` on a ``pgbench -i -s <scale>`` database (the
   initialisation runs directly against Postgres);
2. average latency of ``pgbench -S -c 1`` in ``-M simple`` and ``-M prepared``, and the latency
   each proxy adds over the direct connection. Each round splits these runs into
   ``--latency-slices`` short runs that alternate between the targets: on a small machine a
   single run's latency depends on where the scheduler happens to place the processes, so one
   long run per target compares placements more than proxies;
3. each proxy's CPU time per transaction under those loads (user + system time of its process
   and its child processes, over the transactions pgbench reports): steadier than TPS where
   other jobs share the machine;
4. rows/s of one 10-column ``generate_series`` result, received whole by libpq (psycopg);
5. each proxy's peak RSS (``VmHWM``, reset just before) while a client that discards rows
   streams ``repeat('x', 1000)`` rows totalling ``--rss-mb`` megabytes through it; for pgproxy
   this is its main process, and the audit writer process (its child, found through
   ``/proc/<pid>/task/*/children``) gets its own row: its peak over the whole run.

The targets from the product issue are printed next to the numbers with PASS/FAIL. They never
change the exit status: it is 0 when every measurement ran, 2 when one of them failed.
``--profile DIR`` then records pgproxy with py-spy (``pip install py-spy``) under each pgbench
load (raw folded stacks, one file per load, e.g. for speedscope or flamegraph.pl) and prints
where the time goes.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import pwd
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TypeVar

import psycopg

from pgproxy.pgcluster import Cluster, find_bindir, free_port

T = TypeVar("T")
HERE = Path(__file__).resolve().parent
PASSWORD = "bench-pw"
START_TIMEOUT = 60.0


# ------------------------------------------------------------------------------- settings


@dataclass(frozen=True, slots=True)
class Sizes:
    duration: int
    scale: int
    stream_rows: int
    rss_mb: int
    repeat: int
    latency_slices: int


FULL = Sizes(duration=10, scale=10, stream_rows=1_000_000, rss_mb=2200, repeat=1, latency_slices=5)
QUICK = Sizes(duration=2, scale=1, stream_rows=50_000, rss_mb=50, repeat=1, latency_slices=1)

TPS_ARGS = ["-c", "8", "-j", "2"]
TARGETS = ("direct", "relay", "pgbouncer", "pgproxy")
PROXIES = ("relay", "pgbouncer", "pgproxy")


@dataclass(frozen=True, slots=True)
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool


def metrics(sizes: Sizes) -> tuple[Metric, ...]:
    gb = sizes.rss_mb / 1000
    return (
        Metric("tps", "TPS pgbench -S -c 8 -j 2", "tps", True),
        Metric("lat_simple", "latency -c 1 -M simple", "ms", False),
        Metric("add_simple", "added latency -c 1 -M simple", "µs", False),
        Metric("lat_prepared", "latency -c 1 -M prepared", "ms", False),
        Metric("add_prepared", "added latency -c 1 -M prepared", "µs", False),
        Metric("cpu_tps", "proxy CPU per transaction -c 8", "µs", False),
        Metric("cpu_simple", "proxy CPU per transaction -c 1 -M simple", "µs", False),
        Metric("cpu_prepared", "proxy CPU per transaction -c 1 -M prepared", "µs", False),
        Metric("rows", f"rows/s, {sizes.stream_rows:,} rows x 10 columns", "rows/s", True),
        Metric("rss_idle", "RSS before streaming", "MB", False),
        Metric("rss", f"peak RSS streaming {gb:g} GB", "MB", False),
        Metric("rss_audit", "audit writer process peak RSS (whole run)", "MB", False),
    )


# ------------------------------------------------------------------------------ processes


@dataclass
class Service:
    """A target's process (None for direct Postgres) and where clients connect."""

    name: str
    port: int
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    version: str = ""
    #: a directory of its own (config, logs) to remove when it stops
    home: Path | None = None


def unprivileged_user() -> str | None:
    """Postgres-side tools refuse root: the user they run as (as pgproxy.pgcluster does)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "nobody"
    return "postgres"


def give_to(path: Path, user: str | None) -> None:
    if user is None:
        return
    entry = pwd.getpwnam(user)
    for p in (path, *path.rglob("*")):
        os.chown(p, entry.pw_uid, entry.pw_gid)


def log_tail(path: Path | None, lines: int = 15) -> str:
    if path is None or not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def spawn(cmd: list[str], log: Path, cwd: Path) -> subprocess.Popen[bytes]:
    # output goes to a file: a pipe nobody reads would eventually block the process
    with log.open("wb") as fh:
        return subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd
        )


def wait_listening(proc: subprocess.Popen[bytes], log: Path) -> int:
    """The port from the ``listening on HOST:PORT`` line the process prints once ready."""
    deadline = time.monotonic() + START_TIMEOUT
    pattern = re.compile(r"listening on [\w.\[\]:]*:(\d+)")
    while time.monotonic() < deadline:
        found = pattern.search(log.read_text(errors="replace")) if log.exists() else None
        if found:
            return int(found.group(1))
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} before listening:\n{log_tail(log)}")
        time.sleep(0.05)
    raise RuntimeError(f"not listening after {START_TIMEOUT:.0f}s:\n{log_tail(log)}")


def wait_port(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    import socket

    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}:\n{log_tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"port {port} not open after {START_TIMEOUT:.0f}s:\n{log_tail(log)}")


def stop(service: Service) -> None:
    proc = service.proc
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    if service.home is not None:
        shutil.rmtree(service.home, ignore_errors=True)


def start_relay(pg: Database, work: Path, mode: str) -> Service:
    log = work / "relay.log"
    cmd = [sys.executable, str(HERE / "relay.py"), "--listen", "127.0.0.1:0"]
    proc = spawn([*cmd, "--upstream", f"{pg.host}:{pg.port}", "--mode", mode], log, work)
    try:
        port = wait_listening(proc, log)
    except BaseException:
        stop(Service("relay", 0, proc))
        raise
    return Service("relay", port, proc, log, version=f"relay.py --mode {mode}")


def start_pgproxy(
    pg: Database,
    work: Path,
    rules_text: str | None = None,
    label: str = "allow-all",
    launcher: list[str] | None = None,
) -> Service:
    """``pgproxy serve`` in front of ``pg``; the default rules tag nothing and hold nothing.
    ``launcher`` replaces ``python -m pgproxy`` (the command that takes ``serve …``)."""
    role, db = pg.role, pg.db
    rules = work / "rules"
    rules.mkdir()
    (rules / "bench.yaml").write_text(
        rules_text
        or f'agents:\n  - name: {role}\n    password: "{PASSWORD}"\napprovals:\n  hold: []\n'
    )
    upstream = f"postgresql://{role}:{PASSWORD}@{pg.host}:{pg.port}/{db}?sslmode=disable"
    log = work / "pgproxy.log"
    cmd = [*(launcher or [sys.executable, "-m", "pgproxy"]), "serve", "--upstream", upstream,
           "--rules", str(rules), "--listen", "127.0.0.1:0",
           "--http", f"127.0.0.1:{free_port()}", "--audit", str(work / "audit.duckdb")]  # fmt: skip
    proc = spawn(cmd, log, work)
    try:
        port = wait_listening(proc, log)
    except BaseException:
        stop(Service("pgproxy", 0, proc))
        raise
    return Service("pgproxy", port, proc, log, version=f"python -m pgproxy serve ({label})")


def start_pgbouncer(pg: Database, work: Path) -> Service | str:
    """PgBouncer in session mode, or the reason there is none."""
    role, db = pg.role, pg.db
    exe = shutil.which("pgbouncer") or (
        "/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").exists() else None
    )
    if exe is None:
        return "pgbouncer not installed (apt-get install pgbouncer): column skipped"
    user = unprivileged_user()
    home = Path(tempfile.mkdtemp(prefix="pgproxy-bench-bouncer-"))
    port = free_port()
    (home / "userlist.txt").write_text(f'"{role}" "{PASSWORD}"\n')
    ini = home / "pgbouncer.ini"
    ini.write_text(
        f"[databases]\n{db} = host={pg.host} port={pg.port} dbname={db}\n\n"
        "[pgbouncer]\nlisten_addr = 127.0.0.1\n"
        f"listen_port = {port}\nunix_socket_dir =\n"
        f"auth_type = scram-sha-256\nauth_file = {home / 'userlist.txt'}\n"
        "pool_mode = session\nmax_client_conn = 200\ndefault_pool_size = 50\n"
        f"logfile = {home / 'pgbouncer.log'}\npidfile = {home / 'pgbouncer.pid'}\n"
        "client_tls_sslmode = disable\nserver_tls_sslmode = disable\n"
        "ignore_startup_parameters = extra_float_digits\n"
        "log_connections = 0\nlog_disconnections = 0\n"
    )
    give_to(home, user)
    log = work / "pgbouncer.out"
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10)
    proc = spawn([exe, *(["-u", user] if user else []), str(ini)], log, work)
    try:
        wait_port(proc, port, log)
    except BaseException:
        stop(Service("pgbouncer", 0, proc, home=home))
        raise
    first = version.stdout.splitlines()[0] if version.stdout else "pgbouncer"
    return Service("pgbouncer", port, proc, log, f"{first}, session mode", home)


# --------------------------------------------------------------------------- measurements


@dataclass(frozen=True, slots=True)
class Conn:
    host: str
    port: int
    role: str
    db: str

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "PGHOST": self.host,
            "PGPORT": str(self.port),
            "PGUSER": self.role,
            "PGPASSWORD": PASSWORD,
            "PGDATABASE": self.db,
            "PGSSLMODE": "disable",
            "PGCONNECT_TIMEOUT": "10",
        }

    def psycopg(self) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(
            host=self.host,
            port=self.port,
            user=self.role,
            password=PASSWORD,
            dbname=self.db,
            sslmode="disable",
            connect_timeout=10,
            autocommit=True,
        )


def pgbench_exe() -> str:
    return shutil.which("pgbench") or str(find_bindir() / "pgbench")


def pgbench(conn: Conn, args: list[str], duration: int) -> tuple[float, float, int]:
    """(tps, average latency in ms, transactions) of one bounded pgbench run."""
    proc = subprocess.run(
        [pgbench_exe(), "-n", "-S", "-T", str(duration), *args],
        env=conn.env(),
        capture_output=True,
        text=True,
        timeout=duration + 60,
    )
    tps = re.search(r"^tps = ([\d.]+)", proc.stdout, re.M)
    lat = re.search(r"^latency average = ([\d.]+) ms", proc.stdout, re.M)
    done = re.search(r"^number of transactions actually processed: (\d+)", proc.stdout, re.M)
    failed = re.search(r"^number of failed transactions: (\d+)", proc.stdout, re.M)
    bad = tps is None or lat is None or done is None or (failed and int(failed.group(1)))
    if proc.returncode != 0 or bad:
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"pgbench {' '.join(args)} failed: {' | '.join(detail)}")
    assert tps is not None and lat is not None and done is not None
    return float(tps.group(1)), float(lat.group(1)), int(done.group(1))


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (all its threads) and of its child processes."""
    total = 0
    for p in [pid, *child_pids(pid)]:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / os.sysconf("SC_CLK_TCK")


def pgbench_load(
    conn: Conn, args: list[str], duration: int, pid: int | None
) -> tuple[float, float, float | None]:
    """(tps, average latency in ms, CPU µs per transaction of ``pid`` or None)."""
    before = cpu_seconds(pid) if pid is not None else 0.0
    tps, lat, done = pgbench(conn, args, duration)
    cpu = (cpu_seconds(pid) - before) / done * 1e6 if pid is not None and done else None
    return tps, lat, cpu


STREAM_SQL = (
    "SELECT i, i * 2, i::float8 / 7, 'row-' || i, i % 2 = 0, date '2024-01-01' + i % 365,"
    " i % 100, 'constant text value', (i % 100000)::numeric / 100, 100000000 - i"
    " FROM generate_series(1, {n}) AS s(i)"
)


def rows_per_second(conn: Conn, rows: int) -> float:
    """One 10-column result received whole by libpq; rows are not decoded into Python."""
    with conn.psycopg() as c, c.cursor() as cur:
        cur.execute("SELECT 1")
        t0 = time.perf_counter()
        cur.execute(STREAM_SQL.format(n=rows))
        elapsed = time.perf_counter() - t0
        if cur.rowcount != rows:
            raise RuntimeError(f"expected {rows} rows, got {cur.rowcount}")
    return rows / elapsed


def vm_kb(pid: int, field_name: str) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    found = re.search(rf"^{field_name}:\s+(\d+) kB", status, re.M)
    if found is None:
        raise RuntimeError(f"no {field_name} in /proc/{pid}/status")
    return int(found.group(1))


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0, same user or root)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def child_pids(pid: int) -> list[int]:
    out: list[int] = []
    for f in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            out += [int(p) for p in f.read_text().split()]
    return out


def audit_writer_peak_rss(pid: int) -> float:
    """Peak RSS (``VmHWM``, MB) of pgproxy's audit writer process, a child of ``pid``."""
    for child in child_pids(pid):
        with contextlib.suppress(OSError):
            if "pgproxy.audit.writer" in Path(f"/proc/{child}/cmdline").read_text():
                return vm_kb(child, "VmHWM") / 1024
    raise RuntimeError(f"no audit writer process under pid {pid}")


def peak_rss_streaming(conn: Conn, pid: int, megabytes: int) -> tuple[float, float]:
    """(RSS before, peak RSS during) in MB of ``pid`` while a slow client streams ``megabytes``
    of 1 kB rows. Without a peak reset, the peak is since the process started."""
    rows = megabytes * 1000
    before = vm_kb(pid, "VmRSS") / 1024
    reset_peak(pid)
    received = 0
    with conn.psycopg() as c, c.cursor() as cur:
        # single-row mode: the client takes one row at a time, so the proxy must push back
        for _row in cur.stream(f"SELECT repeat('x', 1000) FROM generate_series(1, {rows})"):
            received += 1
    if received != rows:
        raise RuntimeError(f"expected {rows} rows, got {received}")
    return before, vm_kb(pid, "VmHWM") / 1024


# ------------------------------------------------------------------------------- database


@dataclass
class Database:
    """A role and a database made for this run, on a cluster we own or were given."""

    superuser_dsn: str
    host: str
    port: int
    role: str
    db: str
    server_version: str = ""

    @classmethod
    def create(cls, superuser_dsn: str) -> Database:
        suffix = secrets.token_hex(3)
        role, db = f"bench_{suffix}", f"bench_{suffix}"
        with psycopg.connect(superuser_dsn, autocommit=True) as c:
            port = int(c.info.port)
            # a Unix-socket DSN: the proxies and pgbench still go through TCP on loopback
            host = "127.0.0.1" if c.info.host.startswith("/") else c.info.host
            version = str(c.execute("SHOW server_version").fetchone()[0])  # type: ignore[index]
            c.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{PASSWORD}'")
            c.execute(f"CREATE DATABASE {db} OWNER {role}")
        return cls(superuser_dsn, host, port, role, db, version)

    def drop(self) -> None:
        with (
            contextlib.suppress(psycopg.Error),
            psycopg.connect(self.superuser_dsn, autocommit=True) as c,
        ):
            c.execute(f"DROP DATABASE IF EXISTS {self.db} WITH (FORCE)")
            c.execute(f"DROP ROLE IF EXISTS {self.role}")


@contextlib.contextmanager
def postgres(dsn: str | None) -> Iterator[str]:
    """A superuser DSN: the one given, or a throwaway cluster's."""
    if dsn:
        yield dsn
        return
    base = Path(tempfile.mkdtemp(prefix="pgproxy-bench-pg-"))
    try:
        cluster = Cluster.create(base)
        cluster.start()
        try:
            yield cluster.dsn()
        finally:
            cluster.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


# --------------------------------------------------------------------------------- report


@dataclass
class Results:
    sizes: Sizes
    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    errors: dict[str, dict[str, str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    environment: dict[str, str] = field(default_factory=dict)

    def add(self, metric: str, target: str, value: float) -> None:
        self.samples.setdefault(metric, {}).setdefault(target, []).append(value)

    def fail(self, metric: str, target: str, exc: BaseException) -> None:
        self.errors.setdefault(metric, {})[target] = str(exc).strip().splitlines()[0][:200]

    def value(self, metric: str, target: str) -> float | None:
        got = self.samples.get(metric, {}).get(target)
        return statistics.median(got) if got else None


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit in ("tps", "rows/s"):
        return f"{value:,.0f}"
    if unit == "ms":
        return f"{value:.3f}"
    return f"{value:,.1f}" if unit == "MB" else f"{value:,.0f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return a / b


def verdicts(res: Results) -> dict[str, tuple[str, str]]:
    """metric -> (target text, PASS/FAIL/n/a) for the product issue's targets."""
    out: dict[str, tuple[str, str]] = {}

    def mark(ok: bool | None) -> str:
        return "n/a" if ok is None else ("PASS" if ok else "FAIL")

    tps = _ratio(res.value("tps", "pgproxy"), res.value("tps", "relay"))
    out["tps"] = ("≥ 0.90x relay", mark(None if tps is None else tps >= 0.9))
    for key in ("add_simple", "add_prepared"):
        r = _ratio(res.value(key, "pgproxy"), res.value(key, "relay"))
        out[key] = ("≤ 1.30x relay's", mark(None if r is None else r <= 1.3))
    rss = res.value("rss", "pgproxy")
    out["rss"] = ("pgproxy < 150 MB", mark(None if rss is None else rss < 150))
    return out


def render(res: Results) -> str:
    checks = verdicts(res)
    header = ["metric", "unit", *TARGETS, "pgproxy÷direct", "pgproxy÷relay", "target", "result"]
    rows: list[list[str]] = []
    for met in metrics(res.sizes):
        direct = res.value(met.key, "direct")
        relay = res.value(met.key, "relay")
        cells = [met.label, met.unit]
        for t in TARGETS:
            v = res.value(met.key, t)
            text = "ERR" if t in res.errors.get(met.key, {}) else _fmt(v, met.unit)
            if t in ("relay", "pgbouncer") and not met.key.startswith("add"):
                r = _ratio(v, direct)
                text += f" ({r:.2f}x)" if r is not None else ""
            cells.append(text)
        pv = res.value(met.key, "pgproxy")
        rd = None if met.key.startswith("add") else _ratio(pv, direct)
        cells.append(f"{rd:.2f}x" if rd is not None else "—")
        rr = _ratio(pv, relay)
        cells.append(f"{rr:.2f}x" if rr is not None else "—")
        cells.extend(checks.get(met.key, ("", "")))
        rows.append(cells)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


# ---------------------------------------------------------------------------------- runner


def measure(res: Results, metric: str, target: str, fn: Callable[[], T]) -> T | None:
    try:
        return fn()
    except Exception as exc:
        res.fail(metric, target, exc)
        print(f"  {metric} via {target}: FAILED: {exc}", file=sys.stderr, flush=True)
        return None


def run_rounds(res: Results, conns: dict[str, Conn], pids: dict[str, int]) -> None:
    s = res.sizes
    slices = max(1, s.latency_slices)
    slice_seconds = max(1, round(s.duration / slices))
    for rnd in range(1, s.repeat + 1):
        print(f"round {rnd}/{s.repeat}", file=sys.stderr, flush=True)
        for target, conn in conns.items():
            print(f"  {target}: pgbench -c 8", file=sys.stderr, flush=True)
            load = partial(pgbench_load, conn, TPS_ARGS, s.duration, pids.get(target))
            got = measure(res, "tps", target, load)
            if got is not None:
                res.add("tps", target, got[0])
                if got[2] is not None:
                    res.add("cpu_tps", target, got[2])
        print(
            f"  pgbench -c 1: {slices} x {slice_seconds}s per target and mode, alternating",
            file=sys.stderr,
            flush=True,
        )
        for _ in range(slices):
            for target, conn in conns.items():
                for mode in ("simple", "prepared"):
                    args = ["-c", "1", "-j", "1", "-M", mode]
                    load = partial(pgbench_load, conn, args, slice_seconds, pids.get(target))
                    got = measure(res, f"lat_{mode}", target, load)
                    if got is not None:
                        res.add(f"lat_{mode}", target, got[1])
                        if got[2] is not None:
                            res.add(f"cpu_{mode}", target, got[2])
        for target, conn in conns.items():
            print(f"  {target}: streaming {s.stream_rows:,} rows", file=sys.stderr, flush=True)
            rate = measure(res, "rows", target, partial(rows_per_second, conn, s.stream_rows))
            if rate is not None:
                res.add("rows", target, rate)
    for target in conns:
        for mode in ("simple", "prepared"):
            lat, base = res.value(f"lat_{mode}", target), res.value(f"lat_{mode}", "direct")
            if lat is not None and base is not None and target != "direct":
                res.add(f"add_{mode}", target, (lat - base) * 1000)
    for target, pid in pids.items():
        print(f"  {target}: peak RSS over {s.rss_mb} MB", file=sys.stderr, flush=True)
        fn = partial(peak_rss_streaming, conns[target], pid, s.rss_mb)
        rss = measure(res, "rss", target, fn)
        if rss is not None:
            res.add("rss_idle", target, rss[0])
            res.add("rss", target, rss[1])
    if "pgproxy" in pids:
        peak = measure(res, "rss_audit", "pgproxy", partial(audit_writer_peak_rss, pids["pgproxy"]))
        if peak is not None:
            res.add("rss_audit", "pgproxy", peak)


PROFILED_LOADS = {
    "tps": TPS_ARGS,
    "simple": ["-c", "1", "-j", "1", "-M", "simple"],
    "prepared": ["-c", "1", "-j", "1", "-M", "prepared"],
}
#: frames every sample has (interpreter start-up, the event loop, thread bootstrap)
_PLUMBING = ("runpy", "pgproxy/__main__.py", "pgproxy/cli.py", "uvloop/", "asyncio/runners.py",
             "threading.py", "concurrent/futures/thread.py")  # fmt: skip


def profile(conn: Conn, pid: int, out_dir: Path, duration: int) -> str:
    """py-spy records of pgproxy under each pgbench load; returns where the time goes."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries = []
    for name, args in PROFILED_LOADS.items():
        out = out_dir / f"pgproxy-{name}.raw"
        rec = subprocess.Popen(
            [spy, "record", "--pid", str(pid), "--format", "raw", "--output", str(out),
             "--duration", str(duration + 1), "--rate", "500", "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        time.sleep(0.5)
        pgbench(conn, args, duration)
        _, err = rec.communicate(timeout=duration + 60)
        if rec.returncode != 0 or not out.exists():
            raise RuntimeError(f"py-spy failed: {err.decode(errors='replace').strip()[-300:]}")
        summaries.append(summarize_profile(out, f"pgbench -S {' '.join(args)}"))
    return "\n\n".join(summaries)


def summarize_profile(path: Path, load: str, top: int = 15) -> str:
    """Self and inclusive time per function from a py-spy raw (folded stacks) file."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = [f.strip() for f in stack.split(";") if f.strip()]
        if frames:
            own[_short(frames[-1])] += n
        for f in {_short(f) for f in frames if not any(p in f for p in _PLUMBING)}:
            total[f] += n
    if not samples:
        return f"py-spy, {load}: no samples"
    lines = [f"py-spy, {load}: {samples} samples of pgproxy (all threads)", "  self time:"]
    lines += [f"    {100 * n / samples:5.1f}%  {f}" for f, n in own.most_common(top)]
    lines.append("  inclusive time:")
    lines += [f"    {100 * n / samples:5.1f}%  {f}" for f, n in total.most_common(top)]
    return "\n".join(lines)


def _short(frame: str) -> str:
    """``func (path/to/file.py:12)`` -> ``func (file.py)``."""
    return re.sub(r"\s*\((\S*/)?([^/]+?):\d+\)$", r" (\2)", frame)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="pgproxy vs direct Postgres, a relay and PgBouncer")
    p.add_argument("--quick", action="store_true", help="small sizes for a quick check")
    p.add_argument("--duration", type=int, help="seconds per pgbench run (10; quick 2)")
    p.add_argument("--scale", type=int, help="pgbench -i scale (10; quick 1)")
    p.add_argument("--rows", type=int, help="rows in the 10-column result (1M; quick 50k)")
    p.add_argument("--rss-mb", type=int, help="MB streamed for peak RSS (2200; quick 50)")
    p.add_argument("--repeat", type=int, help="rounds; medians are reported (1)")
    p.add_argument(
        "--latency-slices",
        type=int,
        help="short alternating -c 1 runs per round that share --duration (5; quick 1)",
    )
    p.add_argument("--dsn", help="superuser DSN of an existing Postgres (default: throwaway)")
    p.add_argument("--relay-mode", choices=["protocol", "streams"], default="protocol")
    p.add_argument("--no-pgbouncer", action="store_true", help="skip the PgBouncer column")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--profile", type=Path, help="also profile pgproxy with py-spy into this dir")
    return p.parse_args(argv)


def sizes_from(args: argparse.Namespace) -> Sizes:
    base = QUICK if args.quick else FULL
    return Sizes(
        duration=args.duration or base.duration,
        scale=args.scale or base.scale,
        stream_rows=args.rows or base.stream_rows,
        rss_mb=args.rss_mb or base.rss_mb,
        repeat=args.repeat or base.repeat,
        latency_slices=args.latency_slices or base.latency_slices,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    res = Results(sizes_from(args))
    services: list[Service] = []
    work = Path(tempfile.mkdtemp(prefix="pgproxy-bench-"))
    profile_text = ""
    try:
        with postgres(args.dsn) as superuser_dsn:
            database = Database.create(superuser_dsn)
            try:
                direct = Conn(database.host, database.port, database.role, database.db)
                print(f"pgbench -i -s {res.sizes.scale} (direct)", file=sys.stderr, flush=True)
                init = subprocess.run(
                    [pgbench_exe(), "-i", "-q", "-s", str(res.sizes.scale)],
                    env=direct.env(), capture_output=True, text=True, timeout=1800,
                )  # fmt: skip
                if init.returncode != 0:
                    raise RuntimeError(f"pgbench -i failed: {init.stderr.strip()[-500:]}")
                services.append(start_relay(database, work, args.relay_mode))
                if args.no_pgbouncer:
                    res.notes.append("pgbouncer: skipped (--no-pgbouncer)")
                else:
                    bouncer = start_pgbouncer(database, work)
                    if isinstance(bouncer, str):
                        res.notes.append(bouncer)
                    else:
                        services.append(bouncer)
                services.append(start_pgproxy(database, work))
                conns = {"direct": direct} | {
                    s.name: Conn("127.0.0.1", s.port, database.role, database.db) for s in services
                }
                pids = {s.name: s.proc.pid for s in services if s.proc is not None}
                res.environment = environment(database, services)
                run_rounds(res, conns, pids)
                if args.profile:
                    print("profiling pgproxy with py-spy", file=sys.stderr, flush=True)
                    profile_text = profile(
                        conns["pgproxy"], pids["pgproxy"], args.profile, res.sizes.duration
                    )
            finally:
                for s in reversed(services):
                    stop(s)
                database.drop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_report(res, profile_text)
    if args.json:
        args.json.write_text(json.dumps(report_json(res), indent=2))
    return 2 if res.errors else 0


def environment(database: Database, services: list[Service]) -> dict[str, str]:
    try:
        loop = f"uvloop {importlib.metadata.version('uvloop')}"
    except importlib.metadata.PackageNotFoundError:
        loop = "asyncio"
    env = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "python": f"{platform.python_version()} ({loop})",
        "postgres": database.server_version,
    }
    for s in services:
        env[s.name] = s.version
    return env


def print_report(res: Results, profile_text: str) -> None:
    s = res.sizes
    print()
    for key, value in res.environment.items():
        print(f"{key}: {value}")
    print(
        f"sizes: pgbench -T {s.duration}s, scale {s.scale}; {s.stream_rows:,} rows x 10 columns;"
        f" {s.rss_mb} MB streamed for RSS; {s.repeat} round(s), medians;"
        f" -c 1 latency in {s.latency_slices} alternating slice(s) per round"
    )
    print("(relay / pgbouncer cells: value (ratio to direct))\n")
    print(render(res))
    for note in res.notes:
        print(f"note: {note}")
    for metric, failures in res.errors.items():
        for target, message in failures.items():
            print(f"error: {metric} via {target}: {message}")
    if profile_text:
        print()
        print(profile_text)


def report_json(res: Results) -> dict[str, object]:
    return {
        "sizes": asdict(res.sizes),
        "environment": res.environment,
        "values": {m.key: {t: res.value(m.key, t) for t in TARGETS} for m in metrics(res.sizes)},
        "samples": res.samples,
        "targets": {k: {"target": a, "result": b} for k, (a, b) in verdicts(res).items()},
        "errors": res.errors,
        "notes": res.notes,
    }


if __name__ == "__main__":
    raise SystemExit(main())
