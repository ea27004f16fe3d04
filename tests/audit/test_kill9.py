"""kill -9 in the middle of a load: the audit writer process commits what it received and exits
(no orphan), the audit verifies and every record whose ``emit_durable`` returned is there."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import duckdb

from pgproxy.audit.verify import verify

from .conftest import KEY, child_pids, wait_process_gone

WRITER = r"""
import asyncio, sys
from datetime import UTC, datetime
from pgproxy.audit.records import StatementRecord
from pgproxy.audit.sink import DuckDBSink

def rec(sid):
    return StatementRecord(sid, "sess", datetime.now(UTC), "triage-bot", "select", "fp",
                           "SELECT 1", "ALLOW")

async def main(path, key):
    sink = DuckDBSink(path, signing_key=key, flush_interval=0.01, checkpoint_every=100)
    await sink.start()
    i = 0
    while True:
        for _ in range(50):
            i += 1
            await sink.emit(rec(f"o{i}"))
        i += 1
        await sink.emit_durable(rec(f"d{i}"))
        print(f"d{i}", flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2].encode()))
"""


def test_sigkill_mid_load_keeps_durable_records_and_chain(tmp_path: Path) -> None:
    path = tmp_path / "a.duckdb"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), KEY.decode()],
        stdout=subprocess.PIPE,
        text=True,
    )
    durable: list[str] = []
    enough = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            durable.append(line.strip())
            if len(durable) >= 300:
                enough.set()
        enough.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert enough.wait(60), "writer produced too little"
        assert proc.poll() is None, "writer exited by itself"
        writers = child_pids(proc.pid)
        assert len(writers) == 1, writers  # the audit writer process
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(10)
    reader.join(10)
    assert proc.returncode == -signal.SIGKILL
    assert len(durable) >= 300
    # its input closed, the writer process finishes and exits by itself
    assert wait_process_gone(writers[0]), "audit writer process outlived the proxy"

    result = verify(path, KEY)
    assert result.ok, result.first_bad
    with duckdb.connect(str(path), read_only=True) as conn:
        stored = {r[0] for r in conn.execute("SELECT statement_id FROM statements").fetchall()}
        max_seq = conn.execute("SELECT max(seq) FROM audit_rows").fetchone()
    assert set(durable) <= stored
    assert max_seq is not None and max_seq[0] == result.rows  # no gaps after recovery
