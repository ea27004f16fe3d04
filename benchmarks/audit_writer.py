"""Sustained audit write rate: how many StatementRecords per second ``DuckDBSink`` commits.

Run: ``python benchmarks/audit_writer.py [--rows N] [--queue-size N] [--rounds N]`` (target
≥ 100k rows/s). One producer task emits pre-built records as fast as ``emit`` accepts them; the
clock stops when ``close()`` has committed and checkpointed everything and the writer process
has exited, so the rate is end to end (queue, pipe, hash chain, DuckDB commit). Also reports
CPU per record: the proxy process's own (user+sys of this process: ``emit``, batching, the
pipe) and the audit writer process's (its user+sys, collected when it is reaped). Medians over
``--rounds``; then verifies the chain of the last round.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pgproxy.audit.records import StatementRecord
from pgproxy.audit.sink import DuckDBSink
from pgproxy.audit.verify import verify


def make_records(n: int) -> list[StatementRecord]:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    return [
        StatementRecord(
            statement_id=f"st-{i:09d}",
            session_id=f"sess-{i % 64}",
            ts=t0 + timedelta(microseconds=i * 37),
            agent=("triage-bot", "billing-bot", "research-bot")[i % 3],
            statement_class="select",
            fingerprint=f"{i % 500:016x}",
            sql_redacted="SELECT first_name, ssn FROM public.patients WHERE id = $1",
            decision="mask" if i % 2 else "allow",
            reasons=("masked by tag ssn",) if i % 2 else (),
            relations=("public.patients",),
            columns=("public.patients.first_name", "public.patients.ssn"),
            tags=("name", "ssn"),
            masked_columns=("0:first_name:name:replace", "1:ssn:ssn:mask") if i % 2 else (),
            rows=i % 20,
            duration_ms=0.5 + (i % 100) / 10,
        )
        for i in range(n)
    ]


async def run(rows: int, queue_size: int, out: Path) -> tuple[float, float, float]:
    """(rows/s, proxy CPU µs/record, writer process CPU µs/record)."""
    records = make_records(rows)
    sink = DuckDBSink(out, signing_key=b"bench-key", queue_size=queue_size)
    await sink.start()
    c0 = os.times()
    t0 = time.perf_counter()
    emit = sink.emit
    for rec in records:
        await emit(rec)
    await sink.close()
    wall = time.perf_counter() - t0
    c1 = os.times()
    own = (c1.user - c0.user) + (c1.system - c0.system)
    child = (c1.children_user - c0.children_user) + (c1.children_system - c0.children_system)
    return rows / wall, own / rows * 1e6, child / rows * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--rows", type=int, default=500_000)
    ap.add_argument("--queue-size", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--uvloop", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = []
        for i in range(args.rounds):
            path = Path(tmp) / f"bench{i}.duckdb"
            if args.uvloop:
                import uvloop

                results.append(uvloop.run(run(args.rows, args.queue_size, path)))
            else:
                results.append(asyncio.run(run(args.rows, args.queue_size, path)))
        rate, own, child = (statistics.median(r[k] for r in results) for k in range(3))
        print(
            f"audit writer: {rate:,.0f} rows/s sustained ({args.rows:,} StatementRecords, "
            f"median of {args.rounds})"
        )
        print(f"CPU per record: proxy process {own:.2f} µs, audit writer process {child:.2f} µs")
        t0 = time.perf_counter()
        result = verify(path, b"bench-key")
        dt = time.perf_counter() - t0
        print(f"verify: ok={result.ok} rows={result.rows:,} in {dt:.1f}s")


if __name__ == "__main__":
    main()
