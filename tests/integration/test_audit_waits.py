"""A full audit queue holds the session back: no answer reaches the agent before its record is
queued (fail closed), and the session goes on once there is room."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from pgproxy.audit.records import AuditRecord, MemorySink, StatementRecord
from tests.integration.conftest import AGENT, AGENT_PASSWORD, ProxyThread, start_proxy


class FullSink(MemorySink):
    """A sink whose queue is full until ``room`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.room: asyncio.Event | None = None
        self.waiting = 0

    def offer(self, record: AuditRecord) -> bool:
        closed = self.room is not None and not self.room.is_set()
        if isinstance(record, StatementRecord) and closed:
            return False
        return super().offer(record)

    async def emit(self, record: AuditRecord) -> None:
        if isinstance(record, StatementRecord) and self.room is not None:
            self.waiting += 1
            await self.room.wait()
        self.records.append(record)


@pytest.fixture
def gated(pg_dsn: str, rules_dir: Path) -> Iterator[tuple[ProxyThread, FullSink]]:
    thread, _ = start_proxy(pg_dsn, rules_dir)
    sink = FullSink()
    thread.proxy.audit = sink
    try:
        yield thread, sink
    finally:
        thread.stop()


def test_the_answer_waits_for_room_in_the_audit(gated: tuple[ProxyThread, FullSink]) -> None:
    thread, sink = gated
    dsn = f"postgresql://{AGENT}:{AGENT_PASSWORD}@{thread.host}:{thread.port}/postgres"

    async def close_the_queue() -> None:
        sink.room = asyncio.Event()

    asyncio.run_coroutine_threadsafe(close_the_queue(), thread.loop).result(10)
    with (
        psycopg.connect(dsn, autocommit=True) as conn,
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        pending = pool.submit(lambda: conn.execute("SELECT 7 * 6").fetchone())
        # the statement ran, but its answer is kept until the record is queued
        for _ in range(200):
            if sink.waiting:
                break
            concurrent.futures.wait([pending], timeout=0.05)
        assert sink.waiting == 1
        assert not pending.done()
        assert not any(isinstance(r, StatementRecord) for r in sink.records)
        thread.loop.call_soon_threadsafe(sink.room.set)  # type: ignore[union-attr]
        assert pending.result(timeout=10) == (42,)
        assert conn.execute("SELECT 1").fetchone() == (1,)
    finished = [r for r in sink.records if isinstance(r, StatementRecord)]
    assert [r.rows for r in finished] == [1, 1]  # both recorded, in order
