"""Decision latency: how long ``PolicyEngine.statement`` takes for a realistic agent workload.

    python benchmarks/decisions.py            # 1000 samples per statement (about 15 s)
    python benchmarks/decisions.py --quick    # 50 samples per statement

The policy is the bundled ``rules/`` (the demo's Safe Harbor tags and agents), and the catalog is
read with pgproxy's own loader from a database holding the demo clinic schema
(``pgproxy.demo_data``; a throwaway cluster, or ``--dsn``), so every lookup runs against the full
``pg_catalog`` a live server reports. ``MIX`` below is what agents send: point lookups, joins,
aggregates, CTEs, window functions, writes, transaction and session commands, and statements that
end masked, held or blocked. Each template is formatted with fresh literals for every sample.

Three latencies are measured, each in-process with ``time.perf_counter_ns`` around one call:

- ``first sight``: a statement shape the engine has never seen (a fresh engine per sample: no
  cache of any kind) -- target ≤ 5 ms;
- ``new literals``: a text not seen before whose shape was (the engine shares the verdict of
  texts that differ only in their literals; this is what ``pgbench -S`` style traffic hits);
- ``cached repeat``: the exact text again -- target ≤ 50 µs.

Warm-up: every template is decided once before measuring, so one-time costs (lazy imports of
sqlglot's postgres dialect and the like) are reported separately as ``process first call``.
Prints p50/p99 over the whole mix, then per template. Exit status 0 unless setup failed; the
targets never change it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import psycopg

from pgproxy.demo_data import SeedPlan
from pgproxy.policy.catalog import Catalog
from pgproxy.policy.decide import PolicyEngine
from pgproxy.policy.operators import MaskCatalog
from pgproxy.policy.seam import StatementContext
from pgproxy.rules import Rules, load_rules
from pgproxy.server.catalog_loader import load_catalog

HERE = Path(__file__).resolve().parent
RULES_DIR = HERE.parent / "rules"
sys.path.insert(0, str(HERE))

from run import Database, postgres  # noqa: E402  (benchmarks/ is a folder of scripts)

AGENT = "triage-bot"
FIRST_SIGHT_TARGET_MS = 5.0
CACHED_TARGET_US = 50.0

#: (name, template); ``{n}`` becomes a different integer for every sample
MIX: tuple[tuple[str, str], ...] = (
    ("lookup untagged", "SELECT id, sex, state FROM patients WHERE id = {n}"),
    ("lookup masked", "SELECT id, first_name, last_name, dob, ssn FROM patients WHERE id = {n}"),
    (
        "join 3 tables",
        "SELECT p.mrn, e.admitted_at, d.icd10_code, d.description FROM patients p"
        " JOIN encounters e ON e.patient_id = p.id JOIN diagnoses d ON d.encounter_id = e.id"
        " WHERE p.id = {n}",
    ),
    (
        "aggregate",
        "SELECT e.department, count(*), avg(c.billed_cents) FROM encounters e"
        " JOIN claims c ON c.encounter_id = e.id WHERE c.billed_cents > {n}"
        " GROUP BY e.department ORDER BY 2 DESC LIMIT 10",
    ),
    (
        "cte + window (held)",
        "WITH recent AS (SELECT patient_id, admitted_at, row_number() OVER"
        " (PARTITION BY patient_id ORDER BY admitted_at DESC) AS rn FROM encounters"
        " WHERE provider_id = {n}) SELECT patient_id, admitted_at FROM recent WHERE rn = 1",
    ),
    (
        "subquery",
        "SELECT icd10_code, count(*) FROM diagnoses WHERE encounter_id IN"
        " (SELECT id FROM encounters WHERE patient_id < {n}) GROUP BY icd10_code",
    ),
    ("free-text note", "SELECT id, body FROM clinical_notes WHERE encounter_id = {n}"),
    ("claims by status", "SELECT status, sum(paid_cents) FROM claims WHERE id > {n} GROUP BY 1"),
    ("update", "UPDATE claims SET status = 'paid' WHERE id = {n}"),
    (
        "insert",
        "INSERT INTO diagnoses (id, encounter_id, icd10_code, description, diagnosed_on)"
        " VALUES ({n}, 1, 'Z00.00', 'General adult medical examination', '2024-01-02')",
    ),
    ("inference (held)", "SELECT id FROM patients WHERE ssn LIKE '000-{n}%'"),
    ("catalog view (blocked)", "SELECT pid, query FROM pg_stat_activity WHERE pid <> {n}"),
    ("ddl (held)", "CREATE INDEX idx_{n} ON claims (status)"),
    ("savepoint", "SAVEPOINT sp_{n}"),
    ("set", "SET statement_timeout = {n}"),
)


@dataclass
class Timings:
    first: dict[str, list[float]]
    literals: dict[str, list[float]]
    cached: dict[str, list[float]]
    process_first_call_ms: float
    actions: dict[str, str]


async def read_catalog(superuser_dsn: str, rules: Rules) -> Catalog:
    """The demo schema in a database of its own, read back with pgproxy's catalog loader."""
    db = Database.create(superuser_dsn)
    try:
        seed = SeedPlan(patients=100).sql()
        schema, marker, _ = seed.rpartition("COMMENT ON DATABASE")
        if not marker:
            raise RuntimeError("the demo seed script no longer ends with its marker comment")
        with psycopg.connect(db_dsn(superuser_dsn, db.db), autocommit=True) as c:
            c.execute(schema.encode())
        params = psycopg.conninfo.conninfo_to_dict(superuser_dsn)
        conn = await asyncpg.connect(
            host=params.get("host"),
            port=params.get("port"),
            user=params.get("user"),
            password=params.get("password"),
            database=db.db,
            ssl=False,
            timeout=10,
        )
        try:
            return await load_catalog(conn, rules)
        finally:
            await conn.close()
    finally:
        db.drop()


def db_dsn(superuser_dsn: str, dbname: str) -> str:
    return psycopg.conninfo.make_conninfo(superuser_dsn, dbname=dbname)


def timed(engine: PolicyEngine, sql: str, ctx: StatementContext) -> float:
    """µs of one decision."""
    t0 = time.perf_counter_ns()
    engine.statement(sql, ctx)
    return (time.perf_counter_ns() - t0) / 1e3


def measure(rules: Rules, catalog: Catalog, samples: int) -> Timings:
    masks = MaskCatalog(rules)
    ctx = StatementContext(agent=AGENT, database="clinic", origin="query")

    def engine() -> PolicyEngine:
        return PolicyEngine(rules, catalog, masks, AGENT)

    warm = engine()
    first_call = timed(warm, MIX[0][1].format(n=1), ctx) / 1e3
    actions = {}
    for name, template in MIX:
        actions[name] = warm.statement(template.format(n=2), ctx).action.value
    t = Timings({}, {}, {}, first_call, actions)
    for i in range(samples):
        for name, template in MIX:
            # a fresh engine: nothing cached, as for a shape never seen
            sql = template.format(n=1000 + i)
            e = engine()
            t.first.setdefault(name, []).append(timed(e, sql, ctx))
            # same engine, new literals: the text is new, its shape is not
            sql2 = template.format(n=500_000 + i)
            t.literals.setdefault(name, []).append(timed(e, sql2, ctx))
            # exactly the same text again
            t.cached.setdefault(name, []).append(timed(e, sql2, ctx))
    return t


def pct(values: list[float], p: int) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


def _fmt_us(us: float) -> str:
    return f"{us / 1000:.2f} ms" if us >= 1000 else f"{us:.1f} µs"


def report(t: Timings) -> dict[str, object]:
    kinds = (("first sight", t.first), ("new literals", t.literals), ("cached repeat", t.cached))
    summary: dict[str, dict[str, float]] = {}
    print(f"\nprocess first call (one-time imports, warm-up): {t.process_first_call_ms:.1f} ms")
    print(f"{len(MIX)} statements in the mix, {len(next(iter(t.first.values())))} samples each\n")
    print("| latency | p50 | p99 | max | target | result |")
    print("|---|---|---|---|---|---|")
    verdicts: dict[str, str] = {}
    for label, data in kinds:
        everything = [v for vs in data.values() for v in vs]
        p50, p99 = pct(everything, 50), pct(everything, 99)
        summary[label] = {"p50_us": p50, "p99_us": p99, "max_us": max(everything)}
        target, result = "", ""
        if label == "first sight":
            target = f"≤ {FIRST_SIGHT_TARGET_MS:g} ms"
            result = "PASS" if p99 <= FIRST_SIGHT_TARGET_MS * 1000 else "FAIL"
        elif label == "cached repeat":
            target = f"≤ {CACHED_TARGET_US:g} µs"
            result = "PASS" if p99 <= CACHED_TARGET_US else "FAIL"
        if result:
            verdicts[label] = result
        row = [label, _fmt_us(p50), _fmt_us(p99), _fmt_us(max(everything)), target, result]
        print("| " + " | ".join(row) + " |")
    print("\n(targets are judged on p99)\n")
    print("| statement | decision | first sight p50 / p99 | new literals p50 | cached p50 |")
    print("|---|---|---|---|---|")
    per: dict[str, dict[str, object]] = {}
    for name, _ in MIX:
        f, lit, c = t.first[name], t.literals[name], t.cached[name]
        per[name] = {
            "decision": t.actions[name],
            "first_p50_us": pct(f, 50),
            "first_p99_us": pct(f, 99),
            "literals_p50_us": pct(lit, 50),
            "cached_p50_us": pct(c, 50),
        }
        print(
            f"| {name} | {t.actions[name]} | {_fmt_us(pct(f, 50))} / {_fmt_us(pct(f, 99))}"
            f" | {_fmt_us(pct(lit, 50))} | {_fmt_us(pct(c, 50))} |"
        )
    return {
        "process_first_call_ms": t.process_first_call_ms,
        "summary": summary,
        "targets": verdicts,
        "statements": per,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="pgproxy policy decision latency")
    p.add_argument("--quick", action="store_true", help="50 samples per statement")
    p.add_argument("--samples", type=int, help="samples per statement (1000; quick 50)")
    p.add_argument("--dsn", help="superuser DSN of an existing Postgres (default: throwaway)")
    p.add_argument("--rules", type=Path, default=RULES_DIR, help="rules directory (./rules)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    args.samples = args.samples or (50 if args.quick else 1000)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rules = load_rules(args.rules)
    with postgres(args.dsn) as superuser_dsn:
        print("reading the catalog of the demo schema", file=sys.stderr, flush=True)
        catalog = asyncio.run(read_catalog(superuser_dsn, rules))
    print(f"measuring {args.samples} samples x {len(MIX)} statements", file=sys.stderr, flush=True)
    result = report(measure(rules, catalog, args.samples))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
