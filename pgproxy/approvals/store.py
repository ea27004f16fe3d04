"""The durable approval store: requests, reviewer tokens (hashed), votes and the mail outbox.

``ApprovalStore`` is the seam; ``SqliteApprovalStore`` keeps everything in one SQLite file (WAL,
``synchronous=FULL``) so held requests, votes and unsent notifications survive a restart. All
SQLite work runs on one dedicated thread; each public method is one transaction, and the
conditional writes (``apply_vote``, ``transition``, ``claim``) re-check the state inside that
transaction so two racing decisions cannot both win.

Bound parameter values never reach this module: a request carries only the execution hash.
Reviewer tokens are stored as their SHA-256, never in clear. The statement text is stored (it is
shown to reviewers), so a new store file is created readable by its owner only.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol, TypeVar

from pgproxy.approvals.tokens import new_server_secret

__all__ = [
    "ApprovalRecord",
    "ApprovalStatus",
    "ApprovalStore",
    "OutboxItem",
    "Resolution",
    "ReviewerToken",
    "SqliteApprovalStore",
    "Vote",
    "VoteConflict",
]

T = TypeVar("T")


class ApprovalStatus(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    EXPIRED = "expired"
    WITHDRAWN = "withdrawn"


@dataclass(frozen=True, slots=True)
class ApprovalRecord:
    """One held statement and its fate. Times are POSIX seconds."""

    approval_id: str
    agent: str
    owner: str | None
    database: str
    session_id: str
    statement_id: str
    sql: str
    statement_class: str
    hold_class: str
    reasons: tuple[str, ...]
    relations: tuple[str, ...]
    estimated_rows: int | None
    masking: tuple[str, ...]
    execution_hash: str
    quorum: int
    requested_at: float
    expires_at: float
    status: ApprovalStatus = ApprovalStatus.PENDING
    decided_at: float | None = None
    decided_by: str = ""
    reason: str = ""
    consumed_at: float | None = None
    executed_at: float | None = None
    rows: int | None = None
    sqlstate: str = ""


@dataclass(frozen=True, slots=True)
class ReviewerToken:
    token_hash: str
    approval_id: str
    reviewer: str
    created_at: float
    used_at: float | None = None


@dataclass(frozen=True, slots=True)
class Vote:
    approval_id: str
    reviewer: str
    decision: str  # "approve" | "deny"
    reason: str
    ts: float


@dataclass(frozen=True, slots=True)
class Resolution:
    """The final status a vote brings the request to (quorum reached, or a deny)."""

    status: ApprovalStatus
    decided_by: str
    reason: str


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """One notification to one recipient, kept until delivered."""

    item_id: int
    approval_id: str
    recipient: str
    created_at: float
    next_attempt_at: float
    attempts: int = 0
    sent_at: float | None = None
    message_id: str = ""
    last_error: str = ""


class VoteConflict(Exception):
    """A vote could not be recorded because the state moved on; ``kind`` says how."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        #: "token_used", "already_voted" or "not_pending"
        self.kind = kind


class ApprovalStore(Protocol):
    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def server_secret(self) -> bytes: ...
    async def create(self, record: ApprovalRecord, recipients: Sequence[str]) -> None: ...
    async def get(self, approval_id: str) -> ApprovalRecord | None: ...
    async def list_requests(self, status: ApprovalStatus | None = None) -> list[ApprovalRecord]: ...
    async def due_expiry(self, now: float) -> list[ApprovalRecord]: ...
    async def next_expiry(self) -> float | None: ...
    async def votes(self, approval_id: str) -> list[Vote]: ...
    async def add_token(self, token: ReviewerToken) -> None: ...
    async def find_token(self, token_hash: str) -> ReviewerToken | None: ...
    async def apply_vote(
        self, vote: Vote, token_hash: str | None, resolution: Resolution | None
    ) -> None: ...
    async def transition(
        self,
        approval_id: str,
        to: ApprovalStatus,
        ts: float,
        actor: str = "",
        reason: str = "",
        from_: tuple[ApprovalStatus, ...] = (ApprovalStatus.PENDING,),
    ) -> bool: ...
    async def mark_executed(
        self, approval_id: str, rows: int, sqlstate: str, ts: float
    ) -> bool: ...
    async def claim(
        self, execution_hash: str, now: float, not_decided_before: float
    ) -> str | None: ...
    async def due_outbox(self, now: float, limit: int = 20) -> list[OutboxItem]: ...
    async def outbox(self, approval_id: str | None = None) -> list[OutboxItem]: ...
    async def next_outbox_due(self) -> float | None: ...
    async def outbox_sent(self, item_id: int, ts: float, message_id: str) -> None: ...
    async def outbox_failed(self, item_id: int, next_attempt_at: float, error: str) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS approvals (
    approval_id TEXT PRIMARY KEY,
    agent TEXT NOT NULL,
    owner TEXT,
    database TEXT NOT NULL,
    session_id TEXT NOT NULL,
    statement_id TEXT NOT NULL,
    sql TEXT NOT NULL,
    statement_class TEXT NOT NULL,
    hold_class TEXT NOT NULL,
    reasons TEXT NOT NULL,
    relations TEXT NOT NULL,
    estimated_rows INTEGER,
    masking TEXT NOT NULL,
    execution_hash TEXT NOT NULL,
    quorum INTEGER NOT NULL,
    requested_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    status TEXT NOT NULL,
    decided_at REAL,
    decided_by TEXT NOT NULL DEFAULT '',
    reason TEXT NOT NULL DEFAULT '',
    consumed_at REAL,
    executed_at REAL,
    rows INTEGER,
    sqlstate TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS approvals_status ON approvals (status, expires_at);
CREATE INDEX IF NOT EXISTS approvals_hash ON approvals (execution_hash);
CREATE TABLE IF NOT EXISTS tokens (
    token_hash TEXT PRIMARY KEY,
    approval_id TEXT NOT NULL REFERENCES approvals (approval_id),
    reviewer TEXT NOT NULL,
    created_at REAL NOT NULL,
    used_at REAL
);
CREATE TABLE IF NOT EXISTS votes (
    approval_id TEXT NOT NULL REFERENCES approvals (approval_id),
    reviewer TEXT NOT NULL,
    decision TEXT NOT NULL,
    reason TEXT NOT NULL,
    ts REAL NOT NULL,
    PRIMARY KEY (approval_id, reviewer)
);
CREATE TABLE IF NOT EXISTS outbox (
    item_id INTEGER PRIMARY KEY AUTOINCREMENT,
    approval_id TEXT NOT NULL REFERENCES approvals (approval_id),
    recipient TEXT NOT NULL,
    created_at REAL NOT NULL,
    next_attempt_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    sent_at REAL,
    message_id TEXT NOT NULL DEFAULT '',
    last_error TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (sent_at, next_attempt_at);
"""

_APPROVAL_COLUMNS = (
    "approval_id, agent, owner, database, session_id, statement_id, sql, statement_class, "
    "hold_class, reasons, relations, estimated_rows, masking, execution_hash, quorum, "
    "requested_at, expires_at, status, decided_at, decided_by, reason, consumed_at, "
    "executed_at, rows, sqlstate"
)
_OUTBOX_COLUMNS = (
    "item_id, approval_id, recipient, created_at, next_attempt_at, attempts, sent_at, "
    "message_id, last_error"
)


def _record(row: sqlite3.Row) -> ApprovalRecord:
    return ApprovalRecord(
        approval_id=row["approval_id"],
        agent=row["agent"],
        owner=row["owner"],
        database=row["database"],
        session_id=row["session_id"],
        statement_id=row["statement_id"],
        sql=row["sql"],
        statement_class=row["statement_class"],
        hold_class=row["hold_class"],
        reasons=tuple(json.loads(row["reasons"])),
        relations=tuple(json.loads(row["relations"])),
        estimated_rows=row["estimated_rows"],
        masking=tuple(json.loads(row["masking"])),
        execution_hash=row["execution_hash"],
        quorum=row["quorum"],
        requested_at=row["requested_at"],
        expires_at=row["expires_at"],
        status=ApprovalStatus(row["status"]),
        decided_at=row["decided_at"],
        decided_by=row["decided_by"],
        reason=row["reason"],
        consumed_at=row["consumed_at"],
        executed_at=row["executed_at"],
        rows=row["rows"],
        sqlstate=row["sqlstate"],
    )


def _outbox_item(row: sqlite3.Row) -> OutboxItem:
    return OutboxItem(**{k: row[k] for k in row.keys()})  # noqa: SIM118 - sqlite3.Row


class SqliteApprovalStore:
    """``ApprovalStore`` in a SQLite file; every call runs on the store's own thread."""

    def __init__(self, path: str | Path) -> None:
        self._path = str(path)
        self._executor: ThreadPoolExecutor | None = None
        self._db: sqlite3.Connection | None = None

    # -- plumbing ---------------------------------------------------------------------------

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._executor is None:
            raise RuntimeError("approval store is not open")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._call, fn)

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        assert self._db is not None
        return fn(self._db)

    @staticmethod
    def _tx(db: sqlite3.Connection, body: Callable[[sqlite3.Connection], T]) -> T:
        db.execute("BEGIN IMMEDIATE")
        try:
            result = body(db)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return result

    def _connect(self) -> None:
        if self._path != ":memory:":
            # statement text may carry literals worth protecting: owner-only from the start
            os.close(os.open(self._path, os.O_CREAT | os.O_RDWR, 0o600))
        db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        db.executescript(_SCHEMA)
        self._db = db

    async def open(self) -> None:
        if self._executor is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="approval-store")
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._connect)

    async def close(self) -> None:
        if self._executor is None:
            return

        def shut(db: sqlite3.Connection) -> None:
            db.close()

        await self._run(shut)
        self._executor.shutdown(wait=True)
        self._executor = None
        self._db = None

    # -- requests ---------------------------------------------------------------------------

    async def server_secret(self) -> bytes:
        def body(db: sqlite3.Connection) -> bytes:
            row = db.execute("SELECT value FROM meta WHERE key = 'secret'").fetchone()
            if row is not None:
                return bytes(row["value"])
            secret = new_server_secret()
            db.execute("INSERT INTO meta (key, value) VALUES ('secret', ?)", (secret,))
            return secret

        return await self._run(lambda db: self._tx(db, body))

    async def create(self, record: ApprovalRecord, recipients: Sequence[str]) -> None:
        r = record
        values: tuple[Any, ...] = (
            r.approval_id,
            r.agent,
            r.owner,
            r.database,
            r.session_id,
            r.statement_id,
            r.sql,
            r.statement_class,
            r.hold_class,
            json.dumps(list(r.reasons)),
            json.dumps(list(r.relations)),
            r.estimated_rows,
            json.dumps(list(r.masking)),
            r.execution_hash,
            r.quorum,
            r.requested_at,
            r.expires_at,
            r.status.value,
            r.decided_at,
            r.decided_by,
            r.reason,
            r.consumed_at,
            r.executed_at,
            r.rows,
            r.sqlstate,
        )

        def body(db: sqlite3.Connection) -> None:
            marks = ", ".join("?" * len(values))
            db.execute(f"INSERT INTO approvals ({_APPROVAL_COLUMNS}) VALUES ({marks})", values)
            db.executemany(
                "INSERT INTO outbox (approval_id, recipient, created_at, next_attempt_at) "
                "VALUES (?, ?, ?, ?)",
                [(r.approval_id, to, r.requested_at, r.requested_at) for to in recipients],
            )

        await self._run(lambda db: self._tx(db, body))

    async def get(self, approval_id: str) -> ApprovalRecord | None:
        def body(db: sqlite3.Connection) -> ApprovalRecord | None:
            row = db.execute(
                f"SELECT {_APPROVAL_COLUMNS} FROM approvals WHERE approval_id = ?", (approval_id,)
            ).fetchone()
            return None if row is None else _record(row)

        return await self._run(body)

    async def list_requests(self, status: ApprovalStatus | None = None) -> list[ApprovalRecord]:
        def body(db: sqlite3.Connection) -> list[ApprovalRecord]:
            if status is None:
                rows = db.execute(
                    f"SELECT {_APPROVAL_COLUMNS} FROM approvals ORDER BY requested_at"
                ).fetchall()
            else:
                rows = db.execute(
                    f"SELECT {_APPROVAL_COLUMNS} FROM approvals WHERE status = ? "
                    "ORDER BY requested_at",
                    (status.value,),
                ).fetchall()
            return [_record(r) for r in rows]

        return await self._run(body)

    async def due_expiry(self, now: float) -> list[ApprovalRecord]:
        def body(db: sqlite3.Connection) -> list[ApprovalRecord]:
            rows = db.execute(
                f"SELECT {_APPROVAL_COLUMNS} FROM approvals "
                "WHERE status = 'pending' AND expires_at <= ? ORDER BY expires_at",
                (now,),
            ).fetchall()
            return [_record(r) for r in rows]

        return await self._run(body)

    async def next_expiry(self) -> float | None:
        def body(db: sqlite3.Connection) -> float | None:
            row = db.execute(
                "SELECT min(expires_at) AS t FROM approvals WHERE status = 'pending'"
            ).fetchone()
            return None if row is None else row["t"]

        return await self._run(body)

    async def votes(self, approval_id: str) -> list[Vote]:
        def body(db: sqlite3.Connection) -> list[Vote]:
            rows = db.execute(
                "SELECT approval_id, reviewer, decision, reason, ts FROM votes "
                "WHERE approval_id = ? ORDER BY ts, rowid",
                (approval_id,),
            ).fetchall()
            return [Vote(**{k: r[k] for k in r.keys()}) for r in rows]  # noqa: SIM118

        return await self._run(body)

    # -- tokens and votes -------------------------------------------------------------------

    async def add_token(self, token: ReviewerToken) -> None:
        t = token

        def body(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO tokens (token_hash, approval_id, reviewer, created_at, used_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (t.token_hash, t.approval_id, t.reviewer, t.created_at, t.used_at),
            )

        await self._run(lambda db: self._tx(db, body))

    async def find_token(self, token_hash: str) -> ReviewerToken | None:
        def body(db: sqlite3.Connection) -> ReviewerToken | None:
            row = db.execute(
                "SELECT token_hash, approval_id, reviewer, created_at, used_at FROM tokens "
                "WHERE token_hash = ?",
                (token_hash,),
            ).fetchone()
            return None if row is None else ReviewerToken(**{k: row[k] for k in row.keys()})  # noqa: SIM118

        return await self._run(body)

    async def apply_vote(
        self, vote: Vote, token_hash: str | None, resolution: Resolution | None
    ) -> None:
        """Record ``vote`` (and spend ``token_hash``, and resolve) in one transaction.

        Raises ``VoteConflict`` and changes nothing when the request is no longer pending, the
        token was already used, or this reviewer already voted.
        """
        v = vote

        def body(db: sqlite3.Connection) -> None:
            row = db.execute(
                "SELECT status FROM approvals WHERE approval_id = ?", (v.approval_id,)
            ).fetchone()
            if row is None or row["status"] != ApprovalStatus.PENDING.value:
                raise VoteConflict("not_pending")
            if token_hash is not None:
                cur = db.execute(
                    "UPDATE tokens SET used_at = ? WHERE token_hash = ? AND approval_id = ? "
                    "AND used_at IS NULL",
                    (v.ts, token_hash, v.approval_id),
                )
                if cur.rowcount != 1:
                    raise VoteConflict("token_used")
            try:
                db.execute(
                    "INSERT INTO votes (approval_id, reviewer, decision, reason, ts) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (v.approval_id, v.reviewer, v.decision, v.reason, v.ts),
                )
            except sqlite3.IntegrityError:
                raise VoteConflict("already_voted") from None
            if resolution is not None:
                db.execute(
                    "UPDATE approvals SET status = ?, decided_at = ?, decided_by = ?, reason = ? "
                    "WHERE approval_id = ?",
                    (
                        resolution.status.value,
                        v.ts,
                        resolution.decided_by,
                        resolution.reason,
                        v.approval_id,
                    ),
                )

        await self._run(lambda db: self._tx(db, body))

    async def transition(
        self,
        approval_id: str,
        to: ApprovalStatus,
        ts: float,
        actor: str = "",
        reason: str = "",
        from_: tuple[ApprovalStatus, ...] = (ApprovalStatus.PENDING,),
    ) -> bool:
        """Move the request to ``to`` if it is in one of ``from_``; say whether it moved."""

        def body(db: sqlite3.Connection) -> bool:
            marks = ", ".join("?" * len(from_))
            cur = db.execute(
                "UPDATE approvals SET status = ?, decided_at = ?, decided_by = ?, reason = ? "
                f"WHERE approval_id = ? AND status IN ({marks})",
                (to.value, ts, actor, reason, approval_id, *(s.value for s in from_)),
            )
            return cur.rowcount == 1

        return await self._run(lambda db: self._tx(db, body))

    async def mark_executed(self, approval_id: str, rows: int, sqlstate: str, ts: float) -> bool:
        def body(db: sqlite3.Connection) -> bool:
            cur = db.execute(
                "UPDATE approvals SET executed_at = ?, rows = ?, sqlstate = ?, "
                "consumed_at = coalesce(consumed_at, ?) "
                "WHERE approval_id = ? AND status = 'approved' AND executed_at IS NULL",
                (ts, rows, sqlstate, ts, approval_id),
            )
            return cur.rowcount == 1

        return await self._run(lambda db: self._tx(db, body))

    async def claim(self, execution_hash: str, now: float, not_decided_before: float) -> str | None:
        """Spend the oldest approved, unspent request with this execution hash; return its id."""

        def body(db: sqlite3.Connection) -> str | None:
            row = db.execute(
                "SELECT approval_id FROM approvals WHERE execution_hash = ? "
                "AND status = 'approved' AND consumed_at IS NULL AND executed_at IS NULL "
                "AND decided_at >= ? ORDER BY decided_at LIMIT 1",
                (execution_hash, not_decided_before),
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE approvals SET consumed_at = ? WHERE approval_id = ?",
                (now, row["approval_id"]),
            )
            return str(row["approval_id"])

        return await self._run(lambda db: self._tx(db, body))

    # -- outbox -----------------------------------------------------------------------------

    async def due_outbox(self, now: float, limit: int = 20) -> list[OutboxItem]:
        def body(db: sqlite3.Connection) -> list[OutboxItem]:
            rows = db.execute(
                f"SELECT {_OUTBOX_COLUMNS} FROM outbox WHERE sent_at IS NULL "
                "AND next_attempt_at <= ? ORDER BY next_attempt_at, item_id LIMIT ?",
                (now, limit),
            ).fetchall()
            return [_outbox_item(r) for r in rows]

        return await self._run(body)

    async def outbox(self, approval_id: str | None = None) -> list[OutboxItem]:
        def body(db: sqlite3.Connection) -> list[OutboxItem]:
            if approval_id is None:
                rows = db.execute(f"SELECT {_OUTBOX_COLUMNS} FROM outbox ORDER BY item_id")
            else:
                rows = db.execute(
                    f"SELECT {_OUTBOX_COLUMNS} FROM outbox WHERE approval_id = ? ORDER BY item_id",
                    (approval_id,),
                )
            return [_outbox_item(r) for r in rows.fetchall()]

        return await self._run(body)

    async def next_outbox_due(self) -> float | None:
        def body(db: sqlite3.Connection) -> float | None:
            row = db.execute(
                "SELECT min(next_attempt_at) AS t FROM outbox WHERE sent_at IS NULL"
            ).fetchone()
            return None if row is None else row["t"]

        return await self._run(body)

    async def outbox_sent(self, item_id: int, ts: float, message_id: str) -> None:
        def body(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE outbox SET sent_at = ?, message_id = ?, attempts = attempts + 1, "
                "last_error = '' WHERE item_id = ?",
                (ts, message_id, item_id),
            )

        await self._run(lambda db: self._tx(db, body))

    async def outbox_failed(self, item_id: int, next_attempt_at: float, error: str) -> None:
        def body(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ?, last_error = ? "
                "WHERE item_id = ?",
                (next_attempt_at, error[:500], item_id),
            )

        await self._run(lambda db: self._tx(db, body))
