"""Shared helpers for the audit tests: synthetic records, a populated audit, waiting."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pytest

from pgproxy.audit.records import (
    ApprovalEvent,
    AuditRecord,
    PolicyEvent,
    SessionEnded,
    SessionStarted,
    StatementRecord,
)

KEY = b"test-signing-key-not-a-secret"
T0 = datetime(2026, 3, 1, 9, 30, tzinfo=UTC)


def stmt(statement_id: str, **kw: object) -> StatementRecord:
    base: dict[str, object] = {
        "statement_id": statement_id,
        "session_id": "sess-1",
        "ts": T0,
        "agent": "triage-bot",
        "statement_class": "select",
        "fingerprint": "fp-select-patients",
        "sql_redacted": "SELECT first_name FROM public.patients WHERE id = $1",
        "decision": "ALLOW",
    }
    base.update(kw)
    return StatementRecord(**base)  # type: ignore[arg-type]


def sample_records() -> list[AuditRecord]:
    """A small day of activity touching every view and every example query's filter."""
    t = T0
    h = timedelta(hours=1)
    return [
        PolicyEvent(t, "loaded", "rules: 3 files"),
        SessionStarted("sess-1", "triage-bot", "127.0.0.1:50001", "clinic", "psql", t, tls=True),
        SessionStarted("sess-2", "billing-bot", "127.0.0.1:50002", "clinic", "app", t + h),
        SessionStarted(
            "sess-3", "intruder", "127.0.0.1:50003", "clinic", "", t + h, auth="unknown agent"
        ),
        stmt(
            "st-1",
            decision="MASK",
            columns=("public.patients.first_name", "public.patients.ssn"),
            tags=("name", "ssn"),
            relations=("public.patients",),
            masked_columns=("0:first_name:name:replace", "1:ssn:ssn:mask"),
            reasons=("masked by tag",),
            rows=3,
            duration_ms=1.5,
        ),
        stmt(
            "st-2",
            session_id="sess-2",
            agent="billing-bot",
            statement_class="ddl",
            fingerprint="fp-drop",
            sql_redacted="DROP TABLE public.invoices",
            decision="HOLD",
            approval_id="ap-1",
            ts=t + h,
        ),
        stmt(
            "st-3",
            session_id="sess-2",
            agent="billing-bot",
            fingerprint="fp-func",
            sql_redacted="SELECT pg_read_file('?')",
            decision="BLOCK",
            reasons=("function pg_read_file is not allowed",),
            sqlstate="42501",
            ts=t + h,
        ),
        stmt(
            "st-4",
            statement_class="privilege",
            sql_redacted="GRANT SELECT ON public.patients TO billing",
            decision="HOLD",
            approval_id="ap-2",
            ts=t + 2 * h,
        ),
        ApprovalEvent(
            "ap-1",
            t + h,
            "created",
            "st-2",
            "billing-bot",
            detail={"expires_at": (t + 2 * h).isoformat()},
        ),
        ApprovalEvent("ap-1", t + h + timedelta(minutes=5), "viewed", "st-2", "billing-bot"),
        ApprovalEvent(
            "ap-1",
            t + h + timedelta(minutes=7),
            "denied",
            "st-2",
            "billing-bot",
            actor="alice@example.org",
            reason="no DDL on billing tables",
        ),
        ApprovalEvent(
            "ap-2",
            t + 2 * h,
            "created",
            "st-4",
            "triage-bot",
            detail={"expires_at": (t + 3 * h).isoformat()},
        ),
        ApprovalEvent(
            "ap-3",
            t + 2 * h,
            "created",
            "st-9",
            "triage-bot",
            detail={"expires_at": (t + 4 * h).isoformat()},
        ),
        ApprovalEvent(
            "ap-3",
            t + 2 * h + timedelta(minutes=2),
            "approved",
            "st-9",
            "triage-bot",
            actor="bob@example.org",
        ),
        ApprovalEvent("ap-3", t + 2 * h + timedelta(minutes=3), "executed", "st-9", "triage-bot"),
        SessionEnded("sess-1", t + 3 * h, 1200, 5400, "client closed"),
        SessionEnded("sess-3", t + h, 80, 120, "authentication failed"),
        PolicyEvent(t + 3 * h, "reload_failed", "rules/agents.yaml:4: unknown key"),
    ]


async def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def snapshot(db: Path, into: Path) -> duckdb.DuckDBPyConnection:
    """Copy what is on disk now (file + WAL) and open the copy: proves what a crash keeps."""
    into.mkdir(parents=True, exist_ok=True)
    copy = into / db.name
    for suffix in ("", ".wal"):
        src = Path(str(db) + suffix)
        if src.exists():
            shutil.copyfile(src, Path(str(copy) + suffix))
    return duckdb.connect(str(copy))


def child_pids(pid: int) -> list[int]:
    """The direct children of ``pid`` (Linux ``/proc/<pid>/task/*/children``)."""
    out: list[int] = []
    for f in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            out += [int(p) for p in f.read_text().split()]
    return out


def process_gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie nobody reaped yet counts as exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def wait_process_gone(pid: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not process_gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def writer_processes() -> list[int]:
    """This process's audit writer children that have not exited."""
    out = []
    for pid in child_pids(os.getpid()):
        with contextlib.suppress(OSError):
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"pgproxy.audit.writer" in cmd and not process_gone(pid):
                out.append(pid)
    return out


@pytest.fixture(autouse=True)
def no_orphan_writer_processes() -> object:
    """Every audit test ends without an audit writer process left running."""
    before = set(writer_processes())
    yield
    left = set(writer_processes()) - before
    assert not left, f"audit writer processes left running: {sorted(left)}"
