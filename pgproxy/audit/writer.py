"""The audit writer process (``python -m pgproxy.audit.writer``), started by ``DuckDBSink``.

It owns everything that touches DuckDB: the connection, the hash chain, the signed checkpoints,
analyst queries, verify and the Parquet export. Keeping it out of the proxy process keeps the
per-row serializing, hashing and DuckDB's Python layer (which takes the GIL) from competing
with the proxy's event loop.

Protocol (``wire``): the first frame on stdin is the configuration; the writer opens the file
and answers ``HELLO`` with the chain's head seq (or ``FATAL`` with the reason, and exits). Then
a reader thread reads frames, chains each batch (seq, prev_hash, row_hash, canonical JSON) and
queues it; the main thread commits batches in order, answering ``ACK`` per committed batch or
``FAIL`` per failed attempt (it retries with exponential backoff, never skipping a batch), and
runs queries, verify and exports in the same order as the writes. When stdin closes (the sink
closed it, or the proxy died, even by kill -9) the writer commits what it received, appends a
final checkpoint and exits: it never outlives its input.
"""

from __future__ import annotations

import contextlib
import logging
import marshal
import os
import pickle
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Final

import duckdb
import numpy as np

from pgproxy.audit import chain, schema, wire
from pgproxy.audit.query import AuditQueryError, QueryRejected, run_query
from pgproxy.audit.records import PolicyEvent

log = logging.getLogger("pgproxy.audit.writer")

#: WAL size that triggers DuckDB's automatic checkpoint. The default (16 MB) checkpoints every
#: ~50k rows and nearly doubles the CPU per row (measured: 10.8 against 7.1 µs per row over 1M
#: rows); a larger WAL only costs a longer replay when a crashed writer's file is reopened.
_CHECKPOINT_THRESHOLD = "128MB"

#: DuckDB's buffer pool for the audit file (its cache of written blocks; queries spill past it)
_MEMORY_LIMIT = "256MB"

#: retries of a failing batch once the input has closed (nobody is waiting any more)
_RETRIES_AFTER_EOF = 8


class OpenFailed(Exception):
    """The audit file cannot be opened or used (the message goes back as ``FATAL``)."""


#: shapes remembered by the writer (``log_statement_shape`` ids by value); past this many the
#: memory starts over, and a shape seen again gets a new row (a duplicate shape is harmless)
_SHAPES_MAX = 10_000


@dataclass(frozen=True, slots=True)
class PreparedBatch:
    """Rows chained and serialized, ready for one transaction."""

    batch_id: int
    #: (table, seq, prev_hash, row_hash, canonical payload) per row
    rows: list[tuple[str, int, str, str, str]]
    #: the tables of the rows staged as JSON (every kind but statements)
    tables: frozenset[str]
    #: ``log_statement_row`` rows, and the ``log_statement_shape`` rows first used here
    statements: list[tuple[Any, ...]] = field(default_factory=list)
    shapes: list[tuple[Any, ...]] = field(default_factory=list)

    @property
    def last_seq(self) -> int:
        return self.rows[-1][1]

    @property
    def last_hash(self) -> str:
        return self.rows[-1][3]


def _append(conn: duckdb.DuckDBPyConnection, table: str, rows: list[Any]) -> None:
    appender = conn.appender(table)
    appender.append_rows(rows)
    appender.flush()


#: ``log_statement_row``'s columns and their NumPy types (``object``: Python str)
_STATEMENT_ROW_COLUMNS: Final = (
    ("seq", np.int64), ("prev_hash", object), ("row_hash", object), ("statement_id", object),
    ("session_id", object), ("ts_us", np.int64), ("shape_id", np.int64), ("rows", np.int64),
    ("duration_ms", np.float64), ("sqlstate", object), ("approval_id", object),
)  # fmt: skip


def _insert_statement_rows(conn: duckdb.DuckDBPyConnection, rows: list[tuple[Any, ...]]) -> None:
    """Insert ``log_statement_row`` rows as NumPy columns: DuckDB scans them in bulk, a third
    cheaper than the appender's conversion of one Python value at a time."""
    values = zip(*rows, strict=True)  # one tuple per column
    columns = {
        name: np.array(column, dtype=dtype)
        for (name, dtype), column in zip(_STATEMENT_ROW_COLUMNS, values, strict=True)
    }
    conn.register("audit_statement_columns", columns)
    try:
        conn.execute("INSERT INTO log_statement_row BY NAME SELECT * FROM audit_statement_columns")
    finally:
        conn.unregister("audit_statement_columns")


def write_batch(conn: duckdb.DuckDBPyConnection, batch: PreparedBatch) -> None:
    """Append ``batch`` in one transaction. Statements go straight into their two tables (the
    per-statement rows as NumPy columns, a shape row once); the rare kinds go as JSON
    payloads into a temp staging table and one ``INSERT … SELECT`` per table moves them into
    the typed base tables (one conversion in DuckDB instead of one per value in Python)."""
    conn.execute("BEGIN TRANSACTION")
    try:
        if batch.tables:
            _append(conn, "audit_stage", [r for r in batch.rows if r[0] in batch.tables])
            for name in sorted(batch.tables):
                conn.execute(schema.TABLE_BY_NAME[name].insert_from_stage_sql())
            conn.execute("DELETE FROM audit_stage")
        if batch.shapes:
            _append(conn, "log_statement_shape", batch.shapes)
        if batch.statements:
            _insert_statement_rows(conn, batch.statements)
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(duckdb.Error):
            conn.execute("ROLLBACK")
        raise


def _now_iso() -> str:
    return datetime.now(UTC).replace(tzinfo=None).isoformat()


class TestFaults:
    """The test hook (``wire.TEST_FAULTS``): fail the next N commits (optionally after
    committing), or hold every commit until released. Inert unless a test sends the message."""

    def __init__(self) -> None:
        self.fail_next = 0
        self.after_commit = False
        self.released = threading.Event()
        self.released.set()

    def set(self, fail_next: int, after_commit: bool, hold: bool) -> None:
        self.fail_next, self.after_commit = fail_next, after_commit
        if hold:
            self.released.clear()
        else:
            self.released.set()

    def write(self, conn: duckdb.DuckDBPyConnection, batch: PreparedBatch) -> None:
        self.released.wait(60)
        if self.fail_next > 0:
            self.fail_next -= 1
            if self.after_commit:
                write_batch(conn, batch)  # committed, then the error: a retry must not duplicate
            raise OSError(28, "No space left on device")
        write_batch(conn, batch)


class Writer:
    def __init__(self, cfg: tuple[Any, ...], out: BinaryIO) -> None:
        path, key, every, export_dir, retry_initial, retry_max = cfg
        self.path = Path(path)
        self.checkpoints_path = chain.checkpoints_path(self.path)
        self.key: bytes | None = key
        self.checkpoint_every = max(1, int(every))
        self.export_dir = Path(export_dir) if export_dir else None
        self.retry_initial = float(retry_initial)
        self.retry_max = float(retry_max)
        self.out = out
        self.faults = TestFaults()
        self.write: Callable[[duckdb.DuckDBPyConnection, PreparedBatch], None] = write_batch
        self.conn: duckdb.DuckDBPyConnection | None = None
        self.work: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.eof = False
        self.proxy_gone = False
        # chain state of the reader (prepare) thread
        self.seq = 0
        self.head = chain.GENESIS
        self.shapes: dict[tuple[Any, ...], tuple[str, int]] = {}
        self.next_shape = 1
        # commit state of the main thread
        self.committed_seq = 0
        self.committed_hash = chain.GENESIS
        self.checkpointed_seq = 0

    def send(self, kind: int, payload: bytes) -> None:
        if self.proxy_gone:
            return
        try:
            self.out.write(wire.frame(kind, payload))
            self.out.flush()
        except OSError:  # the proxy is gone (closed, killed): keep committing what was sent
            self.proxy_gone = True

    # --- open / close -----------------------------------------------------------------------

    def open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # one thread: the audit must not compete with the proxy for the cores. A memory
            # limit: without one DuckDB keeps every block it ever wrote cached (up to 80% of
            # the machine's RAM), so the writer's RSS grew with the audit's size. Batches are
            # bounded by the sink's queue (MBs), far below the limit.
            conn = duckdb.connect(
                str(self.path),
                config={
                    "threads": 1,
                    "checkpoint_threshold": _CHECKPOINT_THRESHOLD,
                    "memory_limit": _MEMORY_LIMIT,
                },
            )
        except (duckdb.Error, OSError) as exc:
            raise OpenFailed(f"cannot open audit file {self.path}: {exc}") from exc
        try:
            self._migrate(conn)
            for sql in schema.base_tables_sql():
                conn.execute(sql)
            for v in schema.VIEWS_SQL:
                conn.execute(v)
            conn.execute(schema.STAGE_SQL)
            row = conn.execute(
                "SELECT seq, row_hash FROM audit_rows ORDER BY seq DESC LIMIT 1"
            ).fetchone()
            if row is not None:
                self.seq, self.head = int(row[0]), str(row[1])
            found = conn.execute("SELECT max(shape_id) FROM log_statement_shape").fetchone()
            self.next_shape = int(found[0] or 0) + 1 if found else 1
            self.committed_seq, self.committed_hash = self.seq, self.head
            last_cp = self._last_checkpoint_seq()
            if last_cp > self.seq:
                raise OpenFailed(
                    f"audit file {self.path} ends at seq {self.seq} but its checkpoint file "
                    f"names seq {last_cp}: it was truncated (run `pgproxy audit verify`)"
                )
            self._checkpoint(self.seq, self.head)
            if self.export_dir is not None:
                self.export_dir.mkdir(parents=True, exist_ok=True)
                allowed = str(self.export_dir.resolve()).replace("'", "''") + "/"
                conn.execute(f"SET allowed_directories = ['{allowed}']")
            conn.execute("SET enable_external_access = false")
        except OpenFailed:
            conn.close()
            raise
        except (duckdb.Error, OSError) as exc:
            conn.close()
            raise OpenFailed(f"cannot use audit file {self.path}: {exc}") from exc
        self.conn = conn

    def _migrate(self, conn: duckdb.DuckDBPyConnection) -> None:
        """Split a ``log_statement`` base table (a file from before the split) in one
        transaction; nothing to do for a new or already split file."""
        found = conn.execute(
            "SELECT count(*) FROM duckdb_tables() WHERE table_name = 'log_statement'"
        ).fetchone()
        if not found or not found[0]:
            return
        conn.execute("BEGIN TRANSACTION")
        try:
            for sql in schema.STATEMENT_MIGRATION_SQL:
                conn.execute(sql)
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(duckdb.Error):
                conn.execute("ROLLBACK")
            raise
        log.info("audit file %s: statements moved to the split layout", self.path.name)

    def _last_checkpoint_seq(self) -> int:
        if not self.checkpoints_path.exists():
            return 0
        try:
            seqs = [cp.seq for _, cp in chain.read_checkpoints(self.checkpoints_path)]
        except chain.BadCheckpointLine as exc:
            raise OpenFailed(f"{self.checkpoints_path}: {exc}") from exc
        return max(seqs, default=0)

    def _checkpoint(self, seq: int, row_hash: str) -> None:
        cp = chain.make_checkpoint(self.key, seq, row_hash, _now_iso())
        chain.append_checkpoint(self.checkpoints_path, cp)
        self.checkpointed_seq = seq

    def shutdown(self) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        try:
            if self.committed_seq > self.checkpointed_seq:
                self._checkpoint(self.committed_seq, self.committed_hash)
            conn.execute("CHECKPOINT")
        finally:
            conn.close()

    # --- reader thread ----------------------------------------------------------------------

    def read_loop(self, inp: BinaryIO) -> None:
        try:
            while True:
                msg = read_frame(inp)
                if msg is None:
                    break
                kind, payload = msg
                if kind == wire.BATCH:
                    batch_id, records = marshal.loads(payload)
                    self.work.put(self.prepare(batch_id, records))
                elif kind == wire.TEST_FAULTS:
                    fail_next, after_commit, hold = marshal.loads(payload)
                    self.write = self.faults.write
                    self.faults.set(fail_next, after_commit, hold)
                else:
                    self.work.put((kind, marshal.loads(payload)))
        finally:
            self.eof = True
            self.faults.released.set()
            self.work.put(None)

    def prepare(self, batch_id: int, records: list[tuple[Any, ...]]) -> PreparedBatch:
        rows: list[tuple[str, int, str, str, str]] = []
        statements: list[tuple[Any, ...]] = []
        new_shapes: list[tuple[Any, ...]] = []
        seq, prev = self.seq, self.head
        canonical_row, row_hash = wire.canonical_row, chain.row_hash
        shapes, stmt, text = self.shapes, schema.STATEMENT.name, wire.statement_text
        as_int, as_float = schema._int, schema._float
        for rec in records:
            seq += 1
            try:
                if rec[0] == wire.K_STATEMENT:  # the proxy's statements: formatted here
                    new = None
                    try:
                        middle, shape_id = shapes[rec[4:14]]
                    except (KeyError, TypeError):  # new, or with lists (not hashable)
                        middle, shape_id, new = self._shape(rec[4:14])
                    n, dur = as_int(rec[14]), as_float(rec[15])
                    if type(rec[3]) is not int:
                        raise TypeError("ts")
                    table, canon = stmt, text(rec, seq, middle, n, dur)
                    h = row_hash(prev, canon)
                    if new is not None:  # only now: the row it came with is good
                        self._remember(new, middle, new_shapes)
                    statements.append(
                        (seq, prev, h, rec[1], rec[2], rec[3], shape_id, n, dur, rec[16], rec[17])
                    )
                else:
                    table, canon = canonical_row(rec, seq)
                    h = row_hash(prev, canon)
                    if table == stmt:  # a statement the proxy had to encode generically
                        f, shape = wire.statement_storage(rec[2])
                        middle, shape_id, new = self._shape(shape)
                        if new is not None:
                            self._remember(new, middle, new_shapes)
                        statements.append((seq, prev, h, f[0], f[1], f[2], shape_id, *f[3:]))
            except Exception as exc:  # a malformed record must not wedge the writer
                detail = (
                    exc.detail
                    if isinstance(exc, wire.RejectedRecord)
                    else f"{wire.record_type_name(rec)}: {type(exc).__name__}"
                )
                log.error("audit record rejected: %s", detail)
                bad = PolicyEvent(datetime.now(UTC), "audit_record_rejected", detail)
                table, values = schema.row_values(bad)
                canon = chain.canonical(table, seq, values)
                h = row_hash(prev, canon)
            rows.append((table, seq, prev, h, canon))
            prev = h
        self.seq, self.head = seq, prev
        staged = frozenset(r[0] for r in rows) - {stmt} if len(statements) < len(rows) else set()
        return PreparedBatch(batch_id, rows, frozenset(staged), statements, new_shapes)

    def _shape(self, shape: tuple[Any, ...]) -> tuple[str, int, tuple[Any, ...] | None]:
        """(canonical middle text, ``log_statement_shape`` id, the shape row to store or None
        when it is stored already) of ``shape``; TypeError for one the typed table cannot hold.
        A new shape is only remembered (``_remember``) once its statement's row is good, so
        no statement refers to a shape row that was never written."""
        shape = wire.check_shape(shape)
        found = self.shapes.get(shape)
        if found is not None:
            return (*found, None)
        return wire.middle_text(shape), self.next_shape, (self.next_shape, *shape)

    def _remember(
        self, row: tuple[Any, ...], middle: str, new_shapes: list[tuple[Any, ...]]
    ) -> None:
        if len(self.shapes) >= _SHAPES_MAX:
            self.shapes.clear()
        self.shapes[row[1:]] = (middle, row[0])
        self.next_shape = row[0] + 1
        new_shapes.append(row)

    # --- main thread ------------------------------------------------------------------------

    def run(self) -> None:
        while True:
            item = self.work.get()
            if item is None:
                return
            if isinstance(item, PreparedBatch):
                if not item.rows:
                    self.send(wire.ACK, marshal.dumps((item.batch_id, self.committed_seq)))
                    continue
                if not self.commit_with_retry(item):
                    return
            else:
                self.serve(*item)

    def commit_with_retry(self, batch: PreparedBatch) -> bool:
        delay, retry, failures = self.retry_initial, False, 0
        while True:
            try:
                self.commit(batch, retry)
                break
            except Exception as exc:
                retry = True
                failures += 1
                error = f"{type(exc).__name__}: {exc}"[:300]
                self.send(wire.FAIL, marshal.dumps((batch.batch_id, error)))
                if self.eof and failures > _RETRIES_AFTER_EOF:
                    log.error("audit writer giving up at exit: %s", error)
                    return False
                time.sleep(delay)
                delay = min(delay * 2, self.retry_max)
        self.send(wire.ACK, marshal.dumps((batch.batch_id, batch.last_seq)))
        return True

    def commit(self, batch: PreparedBatch, retry: bool) -> None:
        conn = self.conn
        assert conn is not None
        if not (retry and self._is_committed(batch)):
            self.write(conn, batch)
        self.committed_seq, self.committed_hash = batch.last_seq, batch.last_hash
        if batch.last_seq - self.checkpointed_seq >= self.checkpoint_every:
            self._checkpoint(batch.last_seq, batch.last_hash)

    def _is_committed(self, batch: PreparedBatch) -> bool:
        assert self.conn is not None
        table, seq = schema.chain_table(batch.rows[-1][0]), batch.last_seq
        try:
            row = self.conn.execute(f"SELECT count(*) FROM {table} WHERE seq = ?", [seq])
            found = row.fetchone()
        except duckdb.Error:
            return False
        return bool(found and found[0])

    def serve(self, kind: int, args: tuple[Any, ...]) -> None:
        from pgproxy.audit.export import export_parquet
        from pgproxy.audit.verify import verify_connection

        request_id = args[0]
        conn = self.conn
        assert conn is not None
        reply: tuple[Any, ...]
        try:
            if kind == wire.QUERY:
                reply = (request_id, True, run_query(conn, args[1], max_rows=args[2]))
            elif kind == wire.VERIFY:
                cur = conn.cursor()
                try:
                    reply = (request_id, True, verify_connection(cur, str(self.path), self.key))
                finally:
                    cur.close()
            elif kind == wire.EXPORT:
                reply = (request_id, True, export_parquet(conn, args[1]))
            else:
                reply = (request_id, False, ("error", f"unknown request {kind}"))
        except QueryRejected as exc:
            reply = (request_id, False, ("rejected", str(exc)))
        except AuditQueryError as exc:
            reply = (request_id, False, ("error", str(exc)))
        except Exception as exc:
            reply = (request_id, False, ("error", f"{type(exc).__name__}: {exc}"))
        try:
            payload = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            payload = pickle.dumps((request_id, False, ("error", f"unpicklable result: {exc}")))
        self.send(wire.REPLY, payload)


def read_frame(inp: BinaryIO) -> tuple[int, bytes] | None:
    """The next (type, payload), or None at end of input."""
    head = _read_exactly(inp, wire.HEADER.size)
    if head is None:
        return None
    size, kind = wire.HEADER.unpack(head)
    payload = _read_exactly(inp, size)
    if payload is None:
        return None
    return kind, payload


def _read_exactly(inp: BinaryIO, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = inp.read(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def main() -> int:
    # Ctrl-C and a service manager's SIGTERM reach the whole process group: the proxy then
    # drains and closes this writer's input, which is when it must exit, not before.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s pgproxy audit writer: %(message)s"
    )
    # the protocol owns the original stdout; anything else printed goes to stderr
    out = os.fdopen(os.dup(1), "wb", buffering=1 << 16)
    os.dup2(2, 1)
    inp = os.fdopen(0, "rb", buffering=1 << 16)
    first = read_frame(inp)
    if first is None or first[0] != wire.CONFIG:
        return 2
    writer = Writer(marshal.loads(first[1]), out)
    try:
        writer.open()
    except OpenFailed as exc:
        writer.send(wire.FATAL, marshal.dumps((str(exc),)))
        return 1
    writer.send(wire.HELLO, marshal.dumps((writer.seq,)))
    reader = threading.Thread(
        target=writer.read_loop, args=(inp,), name="pgproxy-audit-reader", daemon=True
    )
    reader.start()
    try:
        writer.run()
    finally:
        writer.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
