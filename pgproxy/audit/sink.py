"""The DuckDB audit sink: a bounded queue in the proxy, a writer process that owns the file.

The proxy's data path only ever touches the in-memory queue: ``emit`` appends a record and
returns (waiting only when the queue is full and ``on_full="wait"``; with ``on_full="spill"``
it appends the record to a spill file instead). One writer task drains the queue when
``flush_interval`` passes, when the queue is a quarter full, or when an ``emit_durable`` record
arrives, and sends the records as one compact batch (``wire``: marshalled tuples, no
serializing or hashing in the proxy) down a pipe to the audit writer process
(``pgproxy.audit.writer``, started by ``start``). That process owns the DuckDB connection, the
hash chain and the signed checkpoints, commits each batch in one transaction and acknowledges
it; analyst queries, ``verify`` and the Parquet export also run there, in order with the
writes. The proxy process never imports DuckDB: its Python layer and the per-row work would
otherwise compete with the event loop for the GIL. At most two batches are in flight (one
being chained while the previous one commits); beyond that records wait in the queue, so a
slow disk fills the queue and ``on_full`` applies. ``emit_durable`` returns once its batch is
acknowledged, so it is on disk together with everything queued before it.

Loss window: an ordinary record is on disk at most ``flush_interval`` plus one batch's write
time after ``emit`` returns; a crash of the proxy (kill -9) closes the pipe, and the writer
process commits every batch it received, checkpoints and exits, so only records still in the
proxy's queue are lost; a crash of the machine loses at most the records emitted since the last
commit. Never lost: a record whose ``emit_durable`` returned.

Faults: an unopenable or locked file at ``start`` raises ``AuditUnavailable``. A failing write
keeps the batch, sets ``degraded`` (``emit_durable`` then raises ``AuditUnavailable`` so the
server can fail closed), retries with exponential backoff and clears ``degraded`` once a write
succeeds. If the writer process dies, the sink is ``degraded`` likewise, logs it, and restarts
it with backoff; the new process resumes the chain from the file, and the batches not
acknowledged are sent again minus the records the file already holds (records map 1:1 to
seqs), so nothing is lost or written twice. The writer connection runs with DuckDB's external
access disabled (only ``export_dir`` is reachable), so analyst queries cannot read other files.
The signing key travels over the pipe, never on a command line or in the environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import marshal
import os
import pickle
import re
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO

from pgproxy.audit import chain, schema, wire
from pgproxy.audit.query import AuditQueryError, QueryRejected, QueryResult
from pgproxy.audit.records import AuditRecord, EncodedStatement
from pgproxy.audit.verify import VerifyResult

#: what the queue holds: records, and statements the fast lane encoded itself
_Queued = AuditRecord | EncodedStatement

log = logging.getLogger("pgproxy.audit")

OnFull = Literal["wait", "spill"]

_REPLAY_CHUNK = 20_000
#: batches sent to the writer process and not yet acknowledged
_MAX_IN_FLIGHT = 2


class AuditUnavailable(RuntimeError):
    """The audit cannot record right now (file locked or unwritable, writer degraded, closed).
    The server must fail closed: a statement whose record cannot be made durable does not run."""


@dataclass(slots=True)
class _Batch:
    batch_id: int
    records: list[_Queued]
    futures: list[asyncio.Future[None]] = field(default_factory=list)


class DuckDBSink:
    """An ``AuditSink`` writing to a DuckDB file. Use ``await start()`` … ``await close()``."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        flush_interval: float = 1.0,
        queue_size: int = 10000,
        on_full: OnFull = "wait",
        spill_dir: str | os.PathLike[str] | None = None,
        signing_key: bytes | None,
        checkpoint_every: int = 1000,
        export_dir: str | os.PathLike[str] | None = None,
        retry_initial: float = 0.05,
        retry_max: float = 5.0,
    ) -> None:
        if on_full not in ("wait", "spill"):
            raise ValueError("on_full must be 'wait' or 'spill'")
        if on_full == "spill" and spill_dir is None:
            raise ValueError("on_full='spill' needs spill_dir")
        self.path = Path(path)
        self.checkpoints_path = chain.checkpoints_path(self.path)
        self.flush_interval = flush_interval
        self.on_full: OnFull = on_full
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        self.export_dir = Path(export_dir) if export_dir is not None else None
        self.checkpoint_every = max(1, checkpoint_every)
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self._key = signing_key
        self._queue_size = max(1, queue_size)
        self._eager = max(1, queue_size // 4)
        self._pending: deque[tuple[_Queued, asyncio.Future[None] | None]] = deque()
        self._space = asyncio.Event()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._started = False
        self._stopping = False
        self._closed = False
        self._dead = False
        self._degraded = False
        self._last_error = ""
        # the writer process
        self._proc: asyncio.subprocess.Process | None = None
        self._live = False  # the current process is running and answering
        self._closing_proc = False
        self._reader: asyncio.Task[None] | None = None
        self._restart_task: asyncio.Task[None] | None = None
        self._restart_delay = 0.0
        self._in_flight: deque[_Batch] = deque()
        self._in_flight_changed = asyncio.Event()
        self._acked_seq = 0
        self._next_batch = 0
        self._requests: dict[int, asyncio.Future[tuple[bool, Any]]] = {}
        self._next_request = 0
        # spill state
        self._spill_file: Path | None = None
        self._spill_fh: TextIO | None = None
        self._spill_pending: list[Path] = []
        self._spill_next = 0
        self._spill_drained = asyncio.Event()
        self._spill_drained.set()
        self.spilled_total = 0
        self.rows_written = 0
        #: failed commit attempts reported by the writer process
        self.write_failures = 0
        #: times the writer process was restarted after dying
        self.restarts = 0

    # --- state the server may read ---------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        """Records waiting for the writer."""
        return len(self._pending)

    @property
    def degraded(self) -> bool:
        """True while writes fail; ``emit_durable`` raises ``AuditUnavailable`` meanwhile."""
        return self._degraded

    @property
    def last_error(self) -> str:
        return self._last_error

    @property
    def spilling(self) -> bool:
        return self._spill_fh is not None

    @property
    def writer_pid(self) -> int | None:
        """The audit writer process's pid (None when it is not running)."""
        return self._proc.pid if self._proc is not None and self._live else None

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        if self.spill_dir is not None:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            found = sorted(self._spill_glob(), key=lambda p: p[0])
            self._spill_pending = [p for _, p in found]
            self._spill_next = (found[-1][0] + 1) if found else 0
        self._acked_seq = await self._spawn()
        self._started = True
        self._task = asyncio.create_task(self._run(), name="pgproxy-audit-writer")
        self._task.add_done_callback(self._writer_done)

    def _writer_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        self._dead = True
        self._degraded = True
        self._last_error = f"writer stopped: {type(exc).__name__}"
        log.error("audit writer task died", exc_info=exc)

    async def close(self, timeout: float | None = None) -> None:
        """Write everything queued or spilled, checkpoint, close the file.

        With a ``timeout`` and a writer still failing when it passes, the unwritten records go
        to the spill file (when there is a ``spill_dir``) and ``AuditUnavailable`` is raised."""
        if self._closed:
            return
        self._closed = True
        self._stopping = True
        self._wake.set()
        assert self._task is not None
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except TimeoutError:
            self._task.cancel()
            left = self._rescue_unwritten()
            await self._stop_process(kill=True)
            raise AuditUnavailable(
                f"audit writer still failing at close ({self._last_error}); "
                f"{left} records moved to the spill file"
                if self.spill_dir
                else f"audit writer still failing at close ({self._last_error}); records lost"
            ) from None
        await self._stop_process(kill=False)

    async def __aenter__(self) -> DuckDBSink:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- AuditSink --------------------------------------------------------------------------

    async def emit(self, record: AuditRecord) -> None:
        while not self.offer(record):
            await self._wait_for_space()

    def offer(self, record: _Queued) -> bool:
        if not self._started or self._closed or self._dead:
            raise AuditUnavailable("audit sink is not running")
        if self._spill_fh is not None:
            self._spill(record)
            return True
        pending = self._pending
        if len(pending) >= self._queue_size:
            self._wake.set()
            if self.on_full == "spill":
                self._spill(record)
                return True
            return False
        pending.append((record, None))
        if len(pending) >= self._eager:
            self._wake.set()
        return True

    def offer_encoded(self, record: EncodedStatement) -> bool:
        return self.offer(record)  # queued as it is: the pipe's form already

    async def emit_durable(self, record: AuditRecord) -> None:
        if not self._started or self._closed or self._dead:
            raise AuditUnavailable("audit sink is not running")
        if self._degraded:
            raise AuditUnavailable(f"audit writer degraded: {self._last_error}")
        # Spilled records are older than this one: let the writer take them first.
        while self._spill_fh is not None:
            self._wake.set()
            await self._spill_drained.wait()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if len(self._pending) >= self._queue_size:
            self._wake.set()
            await self._wait_for_space()
        self._pending.append((record, fut))
        self._wake.set()
        await fut

    async def _wait_for_space(self) -> None:
        while len(self._pending) >= self._queue_size:
            self._space.clear()
            await self._space.wait()

    # --- served by the writer process, in order with the writes ------------------------------

    async def query(self, sql: str, *, max_rows: int | None = None) -> QueryResult:
        """A read-only analyst query on the live file, serialized with the writes."""
        result: QueryResult = await self._request(wire.QUERY, sql, max_rows)
        return result

    async def verify(self) -> VerifyResult:
        """Check the chain and checkpoints of the live file (committed rows), serialized with
        the writes."""
        result: VerifyResult = await self._request(wire.VERIFY)
        return result

    async def export_parquet(self, out_dir: str | os.PathLike[str]) -> list[str]:
        """Export the views as day-partitioned Parquet (``out_dir`` must be ``export_dir`` or
        inside it: the writer connection cannot reach other directories)."""
        result: list[str] = await self._request(wire.EXPORT, os.fspath(out_dir))
        return result

    async def _request(self, kind: int, *args: Any) -> Any:
        proc = self._proc
        if self._closed or not self._started or proc is None or proc.stdin is None:
            raise AuditUnavailable("audit sink is not running")
        if not self._live:
            raise AuditUnavailable(f"audit writer is restarting: {self._last_error}")
        self._next_request += 1
        rid = self._next_request
        fut: asyncio.Future[tuple[bool, Any]] = asyncio.get_running_loop().create_future()
        self._requests[rid] = fut
        try:
            proc.stdin.write(wire.frame(kind, marshal.dumps((rid, *args))))
            ok, result = await fut
        finally:
            self._requests.pop(rid, None)
        if ok:
            return result
        why, message = result
        if why == "rejected":
            raise QueryRejected(message)
        raise AuditQueryError(message)

    def inject_faults(
        self, *, fail_next: int = 0, after_commit: bool = False, hold: bool = False
    ) -> None:
        """Test hook (fault injection in the writer process): make the next ``fail_next``
        commits fail with ``OSError`` "No space left on device" (after committing, with
        ``after_commit``), and hold every commit until called again with ``hold=False``."""
        proc = self._proc
        assert proc is not None and proc.stdin is not None and self._live
        proc.stdin.write(
            wire.frame(wire.TEST_FAULTS, marshal.dumps((fail_next, after_commit, hold)))
        )

    # --- the writer process -----------------------------------------------------------------

    async def _spawn(self) -> int:
        """Start the writer process; returns the chain's head seq once the file is open."""
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "pgproxy.audit.writer",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
        except OSError as exc:
            raise AuditUnavailable(f"cannot start the audit writer process: {exc}") from exc
        assert proc.stdin is not None and proc.stdout is not None
        cfg = (
            os.fspath(self.path), self._key, self.checkpoint_every,
            os.fspath(self.export_dir) if self.export_dir is not None else None,
            self.retry_initial, self.retry_max,
        )  # fmt: skip
        try:
            proc.stdin.write(wire.frame(wire.CONFIG, marshal.dumps(cfg)))
            kind, payload = await _read_frame(proc.stdout)
        except (OSError, asyncio.IncompleteReadError):
            code = await proc.wait()
            raise AuditUnavailable(
                f"audit writer process for {self.path} exited at start (code {code})"
            ) from None
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        if kind != wire.HELLO:
            message = marshal.loads(payload)[0] if kind == wire.FATAL else "protocol error"
            with contextlib.suppress(OSError):
                proc.stdin.close()
            await proc.wait()
            raise AuditUnavailable(message)
        self._proc = proc
        self._live = True
        self._reader = asyncio.create_task(self._read_replies(proc), name="pgproxy-audit-replies")
        head: int = marshal.loads(payload)[0]
        return head

    async def _read_replies(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        try:
            while True:
                kind, payload = await _read_frame(proc.stdout)
                if kind == wire.ACK:
                    self._on_ack(*marshal.loads(payload))
                elif kind == wire.FAIL:
                    self._on_fail(*marshal.loads(payload))
                elif kind == wire.REPLY:
                    rid, ok, result = pickle.loads(payload)
                    fut = self._requests.get(rid)
                    if fut is not None and not fut.done():
                        fut.set_result((ok, result))
        except (asyncio.IncompleteReadError, OSError):
            pass
        code = await proc.wait()
        self._live = False
        for fut in self._requests.values():
            if not fut.done():
                fut.set_exception(AuditUnavailable("the audit writer process exited"))
        if self._closing_proc:
            return
        self._last_error = f"audit writer process exited with code {code}"
        self._degraded = True
        log.error("audit writer process died (exit code %s): degraded, restarting it", code)
        for b in self._in_flight:
            self._fail(b, self._last_error)
        self._restart_task = asyncio.create_task(self._restart(), name="pgproxy-audit-restart")

    async def _restart(self) -> None:
        """Start a new writer process: at once after a death, with backoff while it keeps
        failing to start or dying before it commits anything."""
        while True:
            await asyncio.sleep(self._restart_delay)
            self._restart_delay = min(
                max(self.retry_initial, self._restart_delay * 2), self.retry_max
            )
            if self._closing_proc:
                return
            try:
                head = await self._spawn()
            except AuditUnavailable as exc:
                self._last_error = str(exc)[:300]
                log.error("audit writer restart failed: %s", self._last_error)
                continue
            break
        self.restarts += 1
        # The file holds every batch committed before the process died: records map 1:1 to
        # seqs, so the first ``head - acked`` unacknowledged records are already there.
        committed = head - self._acked_seq
        self._acked_seq = head
        while committed > 0 and self._in_flight:
            b = self._in_flight[0]
            take = min(committed, len(b.records))
            del b.records[:take]
            committed -= take
            self.rows_written += take
            if not b.records:
                self._in_flight.popleft()
        self._in_flight_changed.set()
        log.warning("audit writer process restarted at seq %d", head)
        for b in self._in_flight:
            self._send(b)
        if not self._in_flight:
            self._degraded = False

    def _send(self, b: _Batch) -> None:
        proc = self._proc
        if proc is None or proc.stdin is None or not self._live:
            return  # re-sent by _restart
        proc.stdin.write(wire.encode_batch(b.batch_id, b.records))

    def _on_ack(self, batch_id: int, last_seq: int) -> None:
        while self._in_flight:
            b = self._in_flight.popleft()
            self.rows_written += len(b.records)
            for f in b.futures:
                if not f.done():
                    f.set_result(None)
            if b.batch_id == batch_id:
                break
        self._acked_seq = last_seq
        self._restart_delay = 0.0
        self._in_flight_changed.set()
        if self._degraded:
            log.warning("audit writes recovered")
        self._degraded = False

    def _on_fail(self, batch_id: int, error: str) -> None:
        self.write_failures += 1
        self._last_error = error
        if not self._degraded:
            log.error("audit write failed, degraded until it succeeds: %s", error)
        self._degraded = True
        for b in self._in_flight:
            if b.batch_id == batch_id:
                self._fail(b, error)

    @staticmethod
    def _fail(b: _Batch, error: str) -> None:
        for f in b.futures:
            if not f.done():
                f.set_exception(AuditUnavailable(f"audit write failed: {error}"))
        b.futures = []

    async def _stop_process(self, *, kill: bool) -> None:
        """Close the writer's input (it commits what it has, checkpoints and exits), or kill
        it; wait for it either way: no orphan outlives the sink."""
        self._closing_proc = True
        if self._restart_task is not None:
            self._restart_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._restart_task
        proc = self._proc
        if proc is None:
            return
        if kill:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        elif proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        await proc.wait()
        if self._reader is not None:
            await self._reader
        self._live = False

    # --- writer task (event loop) -----------------------------------------------------------

    async def _run(self) -> None:
        while True:
            if (
                not self._stopping
                and not self._pending
                and not self._spill_pending
                and not self.spilling
            ):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.flush_interval)
            self._wake.clear()
            items = list(self._pending)
            self._pending.clear()
            self._space.set()
            replay = self._rotate_spill()
            if items:
                await self._write([r for r, _ in items], [f for _, f in items if f is not None])
            for path in replay:
                await self._replay(path)
            if self._stopping and not (items or replay or self._pending or self.spilling):
                await self._committed()
                return

    async def _replay(self, path: Path) -> None:
        loop = asyncio.get_running_loop()
        try:
            records = await loop.run_in_executor(None, self._load_spill, path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Keep the file for a human; never loop on it.
            bad = path.with_name(path.name + ".unreadable")
            log.error("audit spill file %s unreadable (%s): kept as %s", path.name, exc, bad.name)
            path.rename(bad)
            self._spill_pending.remove(path)
            return
        for i in range(0, len(records), _REPLAY_CHUNK):
            await self._write(records[i : i + _REPLAY_CHUNK], [])
        await self._committed()
        path.unlink(missing_ok=True)
        if path in self._spill_pending:
            self._spill_pending.remove(path)
        log.info("audit spill file %s replayed (%d records)", path.name, len(records))

    @staticmethod
    def _load_spill(path: Path) -> list[_Queued]:
        out: list[_Queued] = []
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    out.append(schema.record_from_json(line))
        return out

    async def _write(self, records: list[_Queued], futures: list[asyncio.Future[None]]) -> None:
        """Send one batch once fewer than ``_MAX_IN_FLIGHT`` are unacknowledged."""
        while len(self._in_flight) >= _MAX_IN_FLIGHT:
            self._in_flight_changed.clear()
            await self._in_flight_changed.wait()
        self._next_batch += 1
        b = _Batch(self._next_batch, records, futures)
        self._in_flight.append(b)
        self._send(b)

    async def _committed(self) -> None:
        """Wait until every batch sent has been acknowledged."""
        while self._in_flight:
            self._in_flight_changed.clear()
            await self._in_flight_changed.wait()

    # --- spill (event loop only) ------------------------------------------------------------

    _SPILL_RE = re.compile(r"\.spill\.(\d+)\.jsonl$")

    def _spill_glob(self) -> list[tuple[int, Path]]:
        assert self.spill_dir is not None
        out = []
        for p in self.spill_dir.glob(f"{self.path.name}.spill.*.jsonl"):
            m = self._SPILL_RE.search(p.name)
            if m:
                out.append((int(m.group(1)), p))
        return out

    def _spill(self, record: _Queued) -> None:
        assert self.spill_dir is not None
        if self._spill_fh is None:
            self._spill_file = self.spill_dir / f"{self.path.name}.spill.{self._spill_next}.jsonl"
            self._spill_next += 1
            self._spill_fh = self._spill_file.open("a", encoding="utf-8")
            self._spill_drained.clear()
            log.warning("audit queue full: spilling to %s", self._spill_file.name)
        if isinstance(record, tuple):
            record = wire.decode_statement(record)
        self._spill_fh.write(schema.record_to_json(record) + "\n")
        self._spill_fh.flush()
        self.spilled_total += 1

    def _rotate_spill(self) -> list[Path]:
        """Called with the queue empty: close the active spill file and hand every pending
        spill file to the writer, oldest first."""
        if self._pending:
            return []
        if self._spill_fh is not None:
            self._spill_fh.close()
            assert self._spill_file is not None
            self._spill_pending.append(self._spill_file)
            self._spill_fh = None
            self._spill_file = None
            self._spill_drained.set()
        return list(self._spill_pending)

    def _rescue_unwritten(self) -> int:
        """At a failed close: move in-flight and queued records to the spill file."""
        records = [r for b in self._in_flight for r in b.records]
        for b in self._in_flight:
            self._fail(b, "audit closed before the record was written")
        self._in_flight.clear()
        while self._pending:
            rec, fut = self._pending.popleft()
            records.append(rec)
            if fut is not None and not fut.done():
                fut.set_exception(AuditUnavailable("audit closed before the record was written"))
        if self.spill_dir is None:
            return 0
        for rec in records:
            self._spill(rec)
        if self._spill_fh is not None:
            self._spill_fh.close()
            self._spill_fh = None
        return len(records)


async def _read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    size, kind = wire.HEADER.unpack(await reader.readexactly(wire.HEADER.size))
    return kind, await reader.readexactly(size)
