"""The audit writer process's lifecycle: it exits with the sink (no orphans), and when it dies
under a running proxy the sink fails closed, restarts it, and resends exactly the records the
file does not hold yet."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from pgproxy.audit.sink import AuditUnavailable, DuckDBSink
from pgproxy.audit.verify import verify

from .conftest import KEY, child_pids, process_gone, stmt, wait_process_gone, wait_until


def _ids(path: Path) -> list[str]:
    with duckdb.connect(str(path), read_only=True) as conn:
        rows = conn.execute("SELECT statement_id FROM log_statement ORDER BY seq").fetchall()
    return [r[0] for r in rows]


async def test_the_writer_is_a_child_process_and_exits_with_close(tmp_path: Path) -> None:
    sink = DuckDBSink(tmp_path / "a.duckdb", signing_key=KEY)
    await sink.start()
    pid = sink.writer_pid
    assert pid is not None and pid != os.getpid()
    assert pid in child_pids(os.getpid())
    await sink.emit_durable(stmt("x"))
    await sink.close()
    assert process_gone(pid)
    assert pid not in child_pids(os.getpid())


async def test_failed_close_kills_the_writer_too(tmp_path: Path) -> None:
    sink = DuckDBSink(tmp_path / "a.duckdb", signing_key=KEY, retry_initial=0.05, retry_max=0.05)
    await sink.start()
    pid = sink.writer_pid
    assert pid is not None
    sink.inject_faults(fail_next=10**6)
    await sink.emit(stmt("stuck"))
    with pytest.raises(AuditUnavailable):
        await sink.close(timeout=0.3)
    assert process_gone(pid)


async def test_a_start_failure_leaves_no_process(tmp_path: Path) -> None:
    before = set(child_pids(os.getpid()))
    (tmp_path / "not-a-dir").write_text("x")
    sink = DuckDBSink(tmp_path / "not-a-dir" / "a.duckdb", signing_key=KEY)
    with pytest.raises(AuditUnavailable, match="cannot open audit file"):
        await sink.start()
    assert all(process_gone(p) for p in set(child_pids(os.getpid())) - before)


async def test_writer_death_fails_closed_then_restarts_and_resends(tmp_path: Path) -> None:
    path = tmp_path / "a.duckdb"
    sink = DuckDBSink(path, signing_key=KEY, flush_interval=0.02, retry_initial=0.2)
    await sink.start()
    await sink.emit_durable(stmt("before"))
    first = sink.writer_pid
    assert first is not None
    sink.inject_faults(hold=True)  # the next batch reaches the writer but is not committed
    await sink.emit(stmt("in-flight"))
    await wait_until(lambda: sink.queue_depth == 0)
    os.kill(first, signal.SIGKILL)
    await wait_until(lambda: sink.degraded)
    assert "exited" in sink.last_error
    with pytest.raises(AuditUnavailable):
        await sink.emit_durable(stmt("refused"))  # fail closed while it is down
    await sink.emit(stmt("queued"))  # ordinary records still queue
    await wait_until(lambda: sink.restarts == 1 and not sink.degraded)
    assert sink.writer_pid not in (None, first)
    await sink.emit_durable(stmt("after"))
    await sink.close()
    assert _ids(path) == ["before", "in-flight", "queued", "after"]
    assert verify(path, KEY).ok


async def test_a_batch_committed_but_not_acknowledged_is_not_written_twice(
    tmp_path: Path,
) -> None:
    path = tmp_path / "a.duckdb"
    # the writer commits, reports an error, then sleeps 30 s before retrying: killed meanwhile
    sink = DuckDBSink(path, signing_key=KEY, flush_interval=0.02, retry_initial=30)
    await sink.start()
    first = sink.writer_pid
    assert first is not None
    sink.inject_faults(fail_next=1, after_commit=True)
    for i in range(5):
        await sink.emit(stmt(f"s{i}"))
    await wait_until(lambda: sink.write_failures == 1)
    assert sink.rows_written == 0  # not acknowledged
    os.kill(first, signal.SIGKILL)
    await wait_until(lambda: sink.restarts == 1 and not sink.degraded)
    assert sink.rows_written == 5  # found in the file by the new writer
    await sink.emit_durable(stmt("after"))
    await sink.close()
    assert _ids(path) == ["s0", "s1", "s2", "s3", "s4", "after"]
    assert verify(path, KEY).ok


async def test_a_writer_that_cannot_restart_keeps_trying(tmp_path: Path) -> None:
    """While the file is held by another process the restart fails (logged, backoff); once
    it is free the writer comes back and the held-back records are written."""
    path = tmp_path / "a.duckdb"
    sink = DuckDBSink(path, signing_key=KEY, flush_interval=0.02, retry_initial=0.05)
    await sink.start()
    pid = sink.writer_pid
    assert pid is not None
    sink.inject_faults(hold=True)
    await sink.emit(stmt("kept"))
    await wait_until(lambda: sink.queue_depth == 0)
    os.kill(pid, signal.SIGKILL)
    assert wait_process_gone(pid)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import duckdb, sys; c = duckdb.connect(sys.argv[1]); print('ready', flush=True);"
         " sys.stdin.read()", str(path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "ready"
        await wait_until(lambda: "lock" in sink.last_error)
        assert sink.degraded
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(10)
    await wait_until(lambda: sink.restarts == 1 and not sink.degraded)
    await sink.close()
    assert _ids(path) == ["kept"]
    assert verify(path, KEY).ok


async def test_the_writer_ignores_sigint_and_sigterm(tmp_path: Path) -> None:
    """Ctrl-C or a service manager's SIGTERM reach the whole process group; the writer must
    outlive them so the proxy can drain and flush the audit, then close its input."""
    path = tmp_path / "a.duckdb"
    sink = DuckDBSink(path, signing_key=KEY)
    await sink.start()
    pid = sink.writer_pid
    assert pid is not None
    await sink.emit_durable(stmt("before"))  # the writer is past start-up, handlers installed
    os.kill(pid, signal.SIGINT)
    os.kill(pid, signal.SIGTERM)
    await sink.emit_durable(stmt("after"))
    assert sink.writer_pid == pid and not sink.degraded
    await sink.close()
    assert _ids(path) == ["before", "after"]
