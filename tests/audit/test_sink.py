"""DuckDBSink behaviour: durability, flush interval, spill, fault handling, start errors."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from pgproxy.audit import schema, wire
from pgproxy.audit.records import PolicyEvent, StatementRecord
from pgproxy.audit.sink import AuditUnavailable, DuckDBSink
from pgproxy.audit.verify import verify

from .conftest import KEY, T0, snapshot, stmt, wait_until


def _ids(conn: duckdb.DuckDBPyConnection) -> list[str]:
    return [
        r[0] for r in conn.execute("SELECT statement_id FROM log_statement ORDER BY seq").fetchall()
    ]


async def test_emit_durable_is_on_disk_when_it_returns(tmp_path: Path) -> None:
    path = tmp_path / "a.duckdb"
    sink = DuckDBSink(path, signing_key=KEY, flush_interval=30)
    await sink.start()
    try:
        await sink.emit(stmt("ordinary-1"))
        await sink.emit_durable(stmt("durable-1"))
        await sink.emit(stmt("ordinary-2"))  # after the durable one: not yet committed
        with snapshot(path, tmp_path / "snap") as conn:
            # the durable record and everything queued before it is on disk
            assert _ids(conn) == ["ordinary-1", "durable-1"]
    finally:
        await sink.close()


async def test_ordinary_records_reach_disk_within_flush_interval(tmp_path: Path) -> None:
    path = tmp_path / "a.duckdb"
    sink = DuckDBSink(path, signing_key=KEY, flush_interval=0.2)
    await sink.start()
    try:
        await sink.emit(stmt("ordinary-1"))
        with snapshot(path, tmp_path / "before") as conn:
            assert _ids(conn) == []  # buffered, not yet written: the snapshot can tell
        i = 0

        def on_disk() -> bool:
            nonlocal i
            i += 1
            with snapshot(path, tmp_path / f"poll{i}") as conn:
                return _ids(conn) == ["ordinary-1"]

        await wait_until(on_disk, timeout=5)  # bounded; the interval itself is 0.2 s
    finally:
        await sink.close()


async def test_close_flushes_everything_and_checkpoints(tmp_path: Path) -> None:
    path = tmp_path / "a.duckdb"
    sink = DuckDBSink(path, signing_key=KEY, flush_interval=30, checkpoint_every=10_000)
    await sink.start()
    for i in range(50):
        await sink.emit(stmt(f"s{i}"))
    await sink.close()
    with duckdb.connect(str(path), read_only=True) as conn:
        assert _ids(conn) == [f"s{i}" for i in range(50)]
    cps = Path(f"{path}.checkpoints").read_text().splitlines()
    assert '"seq":50' in cps[-1]  # the close checkpoint covers the last row
    assert verify(path, KEY).ok
    with pytest.raises(AuditUnavailable):
        await sink.emit(stmt("late"))


async def test_spill_mode_keeps_every_record_in_order(tmp_path: Path) -> None:
    path = tmp_path / "a.duckdb"
    spill = tmp_path / "spill"
    sink = DuckDBSink(
        path, signing_key=KEY, queue_size=4, on_full="spill", spill_dir=spill, flush_interval=0.05
    )
    await sink.start()
    sink.inject_faults(hold=True)  # the disk is slow: commits wait until released
    for i in range(200):
        record = stmt(f"s{i:03d}", rows=i)
        if i % 2:  # as the fast lane hands statements over: already encoded
            assert sink.offer_encoded(wire.encode_record(record))
        else:
            await sink.emit(record)  # never waits
    assert sink.spilled_total > 100
    assert list(spill.glob("*.spill.*.jsonl"))
    sink.inject_faults(hold=False)
    await sink.close()
    with duckdb.connect(str(path), read_only=True) as conn:
        assert _ids(conn) == [f"s{i:03d}" for i in range(200)]
        rows = conn.execute("SELECT rows, ts, agent FROM statements ORDER BY rows").fetchall()
    assert rows == [(i, T0.replace(tzinfo=None), "triage-bot") for i in range(200)]
    assert not list(spill.glob("*.jsonl"))
    assert verify(path, KEY).ok


async def test_emit_durable_while_spilling_waits_for_older_spilled_records(tmp_path: Path) -> None:
    path = tmp_path / "a.duckdb"
    sink = DuckDBSink(
        path, signing_key=KEY, queue_size=2, on_full="spill", spill_dir=tmp_path, flush_interval=30
    )
    await sink.start()
    sink.inject_faults(hold=True)
    for i in range(20):
        await sink.emit(stmt(f"s{i:02d}"))
    assert sink.spilling
    durable = asyncio.create_task(sink.emit_durable(stmt("durable")))
    await asyncio.sleep(0.05)
    assert not durable.done()
    sink.inject_faults(hold=False)
    await asyncio.wait_for(durable, 10)
    with snapshot(path, tmp_path / "snap") as conn:
        assert _ids(conn) == [*(f"s{i:02d}" for i in range(20)), "durable"]
    await sink.close()


async def test_spill_left_by_a_previous_run_is_replayed_at_start(tmp_path: Path) -> None:
    path = tmp_path / "a.duckdb"
    (tmp_path / "a.duckdb.spill.3.jsonl").write_text(
        "".join(schema.record_to_json(stmt(f"old{i}")) + "\n" for i in range(5))
    )
    sink = DuckDBSink(path, signing_key=KEY, on_full="spill", spill_dir=tmp_path)
    await sink.start()
    await sink.emit_durable(stmt("new"))
    await sink.close()
    with duckdb.connect(str(path), read_only=True) as conn:
        assert sorted(_ids(conn)) == sorted([*(f"old{i}" for i in range(5)), "new"])
    assert not (tmp_path / "a.duckdb.spill.3.jsonl").exists()


async def test_wait_mode_applies_backpressure(tmp_path: Path) -> None:
    sink = DuckDBSink(tmp_path / "a.duckdb", signing_key=KEY, queue_size=2, flush_interval=30)
    await sink.start()
    sink.inject_faults(hold=True)
    blocked = asyncio.create_task(_emit_many(sink, 40))
    await asyncio.sleep(0.1)
    assert not blocked.done()  # emit waits: fail closed, nothing dropped
    sink.inject_faults(hold=False)
    await asyncio.wait_for(blocked, 10)
    await sink.close()
    with duckdb.connect(str(tmp_path / "a.duckdb"), read_only=True) as conn:
        assert len(_ids(conn)) == 40


async def test_offer_takes_what_fits_and_declines_the_rest(tmp_path: Path) -> None:
    """``offer`` is ``emit`` for callers that cannot wait: it never drops a record silently."""
    sink = DuckDBSink(tmp_path / "a.duckdb", signing_key=KEY, queue_size=2, flush_interval=30)
    await sink.start()
    sink.inject_faults(hold=True)
    taken: list[str] = []
    declined = 0
    for _ in range(40):  # until the held writer has taken all it can and the queue is full
        if sink.offer(stmt(f"s{len(taken)}")):
            taken.append(f"s{len(taken)}")
            declined = 0
        else:
            declined += 1
            if declined == 3:
                break
            await asyncio.sleep(0.1)
    assert declined == 3 and 0 < len(taken) < 40
    waiting = asyncio.create_task(sink.emit(stmt("late")))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    sink.inject_faults(hold=False)
    await asyncio.wait_for(waiting, 10)
    await sink.close()
    with duckdb.connect(str(tmp_path / "a.duckdb"), read_only=True) as conn:
        assert _ids(conn) == [*taken, "late"]


async def _emit_many(sink: DuckDBSink, n: int) -> None:
    for i in range(n):
        await sink.emit(stmt(f"s{i}"))


async def test_write_errors_degrade_then_recover(tmp_path: Path) -> None:
    path = tmp_path / "a.duckdb"
    sink = DuckDBSink(path, signing_key=KEY, flush_interval=0.02, retry_initial=0.3, retry_max=0.3)
    await sink.start()
    sink.inject_faults(fail_next=3)  # disk full for three commits
    await sink.emit(stmt("kept-1"))
    await wait_until(lambda: sink.degraded)
    assert "No space left" in sink.last_error
    with pytest.raises(AuditUnavailable):
        await sink.emit_durable(stmt("refused"))  # the server fails closed meanwhile
    await sink.emit(stmt("kept-2"))  # ordinary records still queue
    await wait_until(lambda: not sink.degraded, timeout=10)
    await sink.emit_durable(stmt("after"))
    await sink.close()
    assert sink.write_failures == 3
    with duckdb.connect(str(path), read_only=True) as conn:
        assert _ids(conn) == ["kept-1", "kept-2", "after"]
    assert verify(path, KEY).ok


async def test_durable_waiter_in_a_failing_batch_gets_audit_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "a.duckdb"
    sink = DuckDBSink(path, signing_key=KEY, retry_initial=0.05, retry_max=0.05)
    await sink.start()
    sink.inject_faults(fail_next=2)
    with pytest.raises(AuditUnavailable):
        await sink.emit_durable(stmt("d"))
    await wait_until(lambda: not sink.degraded)
    await sink.close()
    with duckdb.connect(str(path), read_only=True) as conn:
        assert _ids(conn) == ["d"]  # written on retry, never lost


async def test_error_after_commit_does_not_duplicate_rows(tmp_path: Path) -> None:
    path = tmp_path / "a.duckdb"
    sink = DuckDBSink(path, signing_key=KEY, retry_initial=0.01, flush_interval=0.02)
    await sink.start()
    sink.inject_faults(fail_next=1, after_commit=True)  # committed, then the error
    await sink.emit(stmt("once"))
    await wait_until(lambda: sink.rows_written == 1)
    assert not sink.degraded
    await sink.close()
    with duckdb.connect(str(path), read_only=True) as conn:
        assert _ids(conn) == ["once"]
    assert verify(path, KEY).ok


async def test_close_timeout_moves_unwritten_records_to_spill(tmp_path: Path) -> None:
    path = tmp_path / "a.duckdb"
    sink = DuckDBSink(
        path, signing_key=KEY, spill_dir=tmp_path / "spill", retry_initial=0.05, retry_max=0.05
    )
    await sink.start()
    sink.inject_faults(fail_next=10**6)
    await sink.emit(stmt("stuck"))
    with pytest.raises(AuditUnavailable, match="spill"):
        await sink.close(timeout=0.5)
    # the next run replays it
    sink2 = DuckDBSink(path, signing_key=KEY, spill_dir=tmp_path / "spill")
    await sink2.start()
    await sink2.close()
    with duckdb.connect(str(path), read_only=True) as conn:
        assert _ids(conn) == ["stuck"]
    assert verify(path, KEY).ok


async def test_malformed_record_is_recorded_as_rejected_not_wedging(tmp_path: Path) -> None:
    path = tmp_path / "a.duckdb"
    sink = DuckDBSink(path, signing_key=KEY)
    await sink.start()
    bad = StatementRecord("bad\ud800", "s", T0, "a", "select", "f", "SELECT 1", "ALLOW")
    await sink.emit(bad)
    await sink.emit_durable(stmt("good"))
    await sink.close()
    with duckdb.connect(str(path), read_only=True) as conn:
        assert _ids(conn) == ["good"]
        ev = conn.execute("SELECT event, detail FROM policy_events").fetchall()
    assert ev == [("audit_record_rejected", "StatementRecord: UnicodeEncodeError")]
    assert verify(path, KEY).ok


async def test_locked_file_is_audit_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "a.duckdb"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); print('ready', flush=True);"
         " time.sleep(30)", str(path)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "ready"
        sink = DuckDBSink(path, signing_key=KEY)
        with pytest.raises(AuditUnavailable, match="lock"):
            await sink.start()
    finally:
        holder.kill()
        holder.wait()


async def test_unwritable_location_is_audit_unavailable(tmp_path: Path) -> None:
    (tmp_path / "not-a-dir").write_text("x")
    sink = DuckDBSink(tmp_path / "not-a-dir" / "a.duckdb", signing_key=KEY)
    with pytest.raises(AuditUnavailable, match="cannot open audit file"):
        await sink.start()


async def test_policy_event_roundtrip_and_views(tmp_path: Path) -> None:
    path = tmp_path / "a.duckdb"
    async with DuckDBSink(path, signing_key=KEY) as sink:
        await sink.emit(PolicyEvent(T0, "loaded", "3 files"))
    with duckdb.connect(str(path), read_only=True) as conn:
        assert conn.execute("SELECT ts, event, detail FROM policy_events").fetchall() == [
            (T0.replace(tzinfo=None), "loaded", "3 files")
        ]


async def test_a_large_backlog_is_written_without_degrading(tmp_path: Path) -> None:
    """A burst far larger than one batch (queue full, emitters waiting) is written whole: the
    writer must not fail big batches (a capped DuckDB once did, and stalled every session)."""
    n = 300_000
    async with DuckDBSink(tmp_path / "a.duckdb", signing_key=KEY) as sink:
        for i in range(n):
            await sink.emit(
                stmt(
                    f"s{i:09d}",
                    session_id=f"sess-{i % 64}",
                    reasons=("masked by tag ssn", "no tagged column shapes the rows"),
                    relations=("public.patients",),
                    columns=("public.patients.ssn", "public.patients.first_name"),
                    tags=("name", "ssn"),
                    masked_columns=("1:ssn:ssn:replace", "0:first_name:name:replace"),
                    rows=i % 100,
                )
            )
        assert not sink.degraded, sink.last_error
    with duckdb.connect(str(tmp_path / "a.duckdb"), read_only=True) as conn:
        assert conn.execute("SELECT count(*) FROM statements").fetchone() == (n,)
    assert verify(tmp_path / "a.duckdb", KEY).ok
