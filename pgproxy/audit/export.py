"""Parquet export of the audit views, partitioned by day (``<view>/day=YYYY-MM-DD/*.parquet``).

Each run rewrites every view into a temporary directory and swaps it in with renames, so an
export is idempotent (the same audit gives the same files, never duplicates) and a reader never
sees a half-written view. Only the analyst views are exported: they carry redacted SQL, ids,
classes and counts, never parameter or row values.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    import duckdb

    from pgproxy.audit.sink import DuckDBSink

log = logging.getLogger("pgproxy.audit")

#: view -> the timestamp column its day partition comes from
EXPORTS: Final[dict[str, str]] = {
    "sessions": "started_at",
    "statements": "ts",
    "approvals": "requested_at",
    "approval_events": "ts",
    "policy_events": "ts",
}


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def export_parquet(conn: duckdb.DuckDBPyConnection, out_dir: str | os.PathLike[str]) -> list[str]:
    """Write every view under ``out_dir``; returns the Parquet files written, sorted."""
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    for view, ts_col in EXPORTS.items():
        final = out / view
        tmp = out / f".{view}.tmp"
        old = out / f".{view}.old"
        for leftover in (tmp, old):
            if leftover.exists():
                shutil.rmtree(leftover)
        tmp.mkdir()
        conn.execute(
            f"COPY (SELECT *, strftime({ts_col}, '%Y-%m-%d') AS day FROM {view} "
            f"ORDER BY {ts_col}) TO {_sql_str(str(tmp))} "
            "(FORMAT parquet, PARTITION_BY (day), OVERWRITE_OR_IGNORE)"
        )
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        if old.exists():
            shutil.rmtree(old)
        written += sorted(str(p) for p in final.rglob("*.parquet"))
    return written


async def run_periodic_export(
    sink: DuckDBSink, out_dir: str | os.PathLike[str], every: float
) -> None:
    """Export through the live sink every ``every`` seconds until cancelled."""
    while True:
        await asyncio.sleep(every)
        try:
            files = await sink.export_parquet(out_dir)
            log.info("audit exported to Parquet (%d files)", len(files))
        except Exception as exc:  # an export failure must not stop the proxy
            log.error("audit Parquet export failed: %s", type(exc).__name__)
