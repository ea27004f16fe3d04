"""Masking throughput: the same 10-column result through pgproxy, with 3 columns masked and none.

    python benchmarks/masking.py              # 1,000,000 rows, 3 rounds (a minute or two)
    python benchmarks/masking.py --quick      # 20,000 rows, 1 round

Two tables with identical rows (10 columns: int, text, float8, bool, numeric, bigint, timestamptz
and three PHI columns) are streamed whole, ``SELECT <all 10 columns> FROM <table>``, by psycopg
(libpq receives the whole result; rows are not decoded into Python objects):

- ``masked``: ``bench_people_masked``, whose ``first_name``, ``ssn`` and ``dob`` are tagged
  ``name``, ``ssn`` and ``dob`` in the rules: pgproxy's real policy decides MASK and rewrites
  those 3 cells of every row (``<NAME>``, ``<SSN>``, the year of birth);
- ``unmasked``: ``bench_people_plain``, the same rows with no tag: the policy decides ALLOW and
  rows pass as the original bytes;
- ``direct``: the masked table read from Postgres without pgproxy, for reference.

Both pgproxy rows go through one ``python -m pgproxy serve`` with the same rules (bulk-export
holds off, so no row limit applies). Rounds alternate the targets; medians are reported. The
target from the product issue is masked ≥ 0.5x unmasked. With ``--binary`` the results are also
fetched in binary format (the date is then rewritten in Postgres' binary encoding).

The first row of every masked result is checked (masked values, not the originals) so the
benchmark cannot silently measure an unmasked stream. ``--profile FILE`` records pgproxy with
py-spy during one extra masked stream and prints where the time goes. Exit status 0 when every
measurement ran, 2 otherwise; the target never changes it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import (  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)
    PASSWORD,
    Conn,
    Database,
    Service,
    postgres,
    start_pgproxy,
    stop,
    summarize_profile,
)

MASKED, PLAIN = "bench_people_masked", "bench_people_plain"
COLUMNS = "id, first_name, ssn, dob, city, visits, score, active, balance, updated_at"
TARGET_RATIO = 0.5

_CREATE = f"""
CREATE UNLOGGED TABLE {MASKED} (
  id int, first_name text, ssn text, dob date, city text, visits int, score float8,
  active bool, balance numeric(12, 2), updated_at timestamptz);
INSERT INTO {MASKED}
SELECT i,
       (ARRAY['Avery','Blake','Casey','Drew','Emerson','Finley','Gray','Harper'])[1 + i % 8],
       '000-' || lpad((i % 100)::text, 2, '0') || '-'
         || lpad((i::int8 * 7919 % 10000)::text, 4, '0'),
       date '1935-01-01' + (i::int8 * 7919 % 30000)::int,
       (ARRAY['Springfield','Riverton','Fairview','Lakeside'])[1 + i % 4],
       i % 97, i::float8 / 7, i % 2 = 0, (i % 100000)::numeric / 100,
       timestamptz '2020-01-01 00:00:00+00' + (i % 1576800) * interval '1 minute'
FROM generate_series(1, {{rows}}) AS s(i);
CREATE UNLOGGED TABLE {PLAIN} AS SELECT * FROM {MASKED};
ANALYZE;
"""


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    target: str  # "pgproxy" or "direct"
    table: str
    binary: bool


def cases(binary: bool) -> list[Case]:
    out = [
        Case("unmasked (pgproxy)", "pgproxy", PLAIN, False),
        Case("masked (pgproxy)", "pgproxy", MASKED, False),
        Case("direct (no proxy)", "direct", MASKED, False),
    ]
    if binary:
        out += [
            Case("unmasked, binary (pgproxy)", "pgproxy", PLAIN, True),
            Case("masked, binary (pgproxy)", "pgproxy", MASKED, True),
        ]
    return out


def rules_yaml(role: str) -> str:
    return (
        f'agents:\n  - name: {role}\n    password: "{PASSWORD}"\n'
        f"tags:\n  public.{MASKED}.first_name: name\n  public.{MASKED}.ssn: ssn\n"
        f"  public.{MASKED}.dob: dob\n"
        "approvals:\n  hold: []\n"
    )


def start_masking_pgproxy(db: Database, work: Path) -> Service:
    return start_pgproxy(db, work, rules_yaml(db.role), "3 tagged columns")


def check_first_row(case: Case, row: tuple[object, ...]) -> None:
    """The masked stream really is masked, the unmasked one really is not."""
    _id, name, ssn, dob = row[:4]
    if case.table == MASKED and case.target == "pgproxy":
        ok = name == "<NAME>" and ssn == "<SSN>"
        ok = ok and isinstance(dob, dt.date) and (dob.month, dob.day) == (1, 1)
    else:
        ok = isinstance(ssn, str) and ssn.startswith("000-") and name != "<NAME>"
    if not ok:
        raise RuntimeError(f"{case.name}: first row is not as expected (masking not applied?)")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class Sample:
    rows_per_s: float
    #: CPU time pgproxy spent per row (µs), None for direct
    cpu_us_per_row: float | None


def stream(conn: Conn, case: Case, rows: int, pid: int | None) -> Sample:
    """One whole result received by libpq; with ``pid``, also that process's CPU per row."""
    with conn.psycopg() as c, c.cursor(binary=case.binary) as cur:
        cur.execute("SELECT 1")
        cpu0 = cpu_seconds(pid) if pid else 0.0
        t0 = time.perf_counter()
        cur.execute(f"SELECT {COLUMNS} FROM {case.table}")
        elapsed = time.perf_counter() - t0
        cpu = (cpu_seconds(pid) - cpu0) * 1e6 / rows if pid else None
        if cur.rowcount != rows:
            raise RuntimeError(f"{case.name}: expected {rows} rows, got {cur.rowcount}")
        first = cur.fetchone()
        assert first is not None
        check_first_row(case, first)
    return Sample(rows / elapsed, cpu)


def profile_masked(conn: Conn, pid: int, rows: int, out: Path) -> str:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    rec = subprocess.Popen(
        [spy, "record", "--pid", str(pid), "--format", "raw", "--output", str(out),
         "--rate", "500", "--nonblocking"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        time.sleep(0.5)
        stream(conn, Case("masked (profiled)", "pgproxy", MASKED, False), rows, None)
        time.sleep(0.2)
    finally:
        rec.send_signal(2)  # SIGINT: py-spy writes the file and exits
        _, err = rec.communicate(timeout=60)
    if not out.exists():
        raise RuntimeError(f"py-spy failed: {err.decode(errors='replace').strip()[-300:]}")
    return summarize_profile(out, f"one masked stream of {rows:,} rows", top=20)


def run(args: argparse.Namespace) -> tuple[dict[str, list[Sample]], dict[str, str], str]:
    samples: dict[str, list[Sample]] = {}
    errors: dict[str, str] = {}
    profile_text = ""
    work = Path(tempfile.mkdtemp(prefix="pgproxy-bench-mask-"))
    service: Service | None = None
    try:
        with postgres(args.dsn) as superuser_dsn:
            db = Database.create(superuser_dsn)
            try:
                direct = Conn(db.host, db.port, db.role, db.db)
                print(f"creating 2 x {args.rows:,} rows", file=sys.stderr, flush=True)
                with direct.psycopg() as c:
                    c.execute(_CREATE.format(rows=args.rows).encode())
                service = start_masking_pgproxy(db, work)
                proxied = Conn("127.0.0.1", service.port, db.role, db.db)
                conns = {"direct": direct, "pgproxy": proxied}
                pids = {"direct": None, "pgproxy": service.proc.pid if service.proc else None}
                todo = cases(args.binary)
                for rnd in range(1, args.repeat + 1):
                    print(f"round {rnd}/{args.repeat}", file=sys.stderr, flush=True)
                    for case in todo:
                        try:
                            got = stream(conns[case.target], case, args.rows, pids[case.target])
                        except Exception as exc:
                            errors[case.name] = str(exc).strip().splitlines()[0][:200]
                            print(f"  {case.name}: FAILED: {exc}", file=sys.stderr, flush=True)
                            continue
                        samples.setdefault(case.name, []).append(got)
                        print(f"  {case.name}: {got.rows_per_s:,.0f} rows/s", file=sys.stderr)
                if args.profile and service.proc is not None:
                    profile_text = profile_masked(
                        proxied, service.proc.pid, args.rows, args.profile
                    )
            finally:
                if service is not None:
                    stop(service)
                db.drop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return samples, errors, profile_text


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def report(samples: dict[str, list[Sample]], args: argparse.Namespace) -> dict[str, object]:
    rates = {k: statistics.median(s.rows_per_s for s in v) for k, v in samples.items()}
    cpus = {k: _median([s.cpu_us_per_row for s in v]) for k, v in samples.items()}
    print(f"\n{args.rows:,} rows x 10 columns, {args.repeat} round(s), medians\n")
    print("| stream | rows/s | vs unmasked | pgproxy CPU per row |")
    print("|---|---|---|---|")
    ratios: dict[str, float] = {}
    for name, value in rates.items():
        base_name = "unmasked, binary (pgproxy)" if "binary" in name else "unmasked (pgproxy)"
        base = rates.get(base_name)
        ratio = value / base if base else None
        if ratio is not None and name.startswith("masked"):
            ratios[name] = ratio
        shown = f"{ratio:.2f}x" if ratio is not None else "—"
        cpu = cpus[name]
        cpu_text = f"{cpu:.2f} µs" if cpu is not None else "—"
        print(f"| {name} | {value:,.0f} | {shown} | {cpu_text} |")
    verdicts = {name: "PASS" if r >= TARGET_RATIO else "FAIL" for name, r in sorted(ratios.items())}
    for name, verdict in verdicts.items():
        print(f"target masked >= {TARGET_RATIO}x unmasked, {name}: {ratios[name]:.2f}x {verdict}")
    return {
        "rows": args.rows,
        "rows_per_s": rates,
        "cpu_us_per_row": cpus,
        "samples": {k: [asdict(s) for s in v] for k, v in samples.items()},
        "ratios": ratios,
        "targets": verdicts,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="pgproxy masking throughput, masked vs unmasked")
    p.add_argument("--quick", action="store_true", help="20,000 rows, 1 round")
    p.add_argument("--rows", type=int, help="rows per stream (1,000,000; quick 20,000)")
    p.add_argument("--repeat", type=int, help="rounds; medians are reported (3; quick 1)")
    p.add_argument("--binary", action="store_true", help="also stream in binary format")
    p.add_argument("--dsn", help="superuser DSN of an existing Postgres (default: throwaway)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--profile", type=Path, help="py-spy raw output file for one masked stream")
    args = p.parse_args(argv)
    args.rows = args.rows or (20_000 if args.quick else 1_000_000)
    args.repeat = args.repeat or (1 if args.quick else 3)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    samples, errors, profile_text = run(args)
    result = report(samples, args)
    result["errors"] = errors
    for name, message in errors.items():
        print(f"error: {name}: {message}")
    if profile_text:
        print()
        print(profile_text)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 2 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
