"""Typed audit records: what the proxy tells the audit, and the sink interface it tells it through.

Records carry identifiers, classes, redacted SQL and counts — never parameter values, row values
or raw error text. ``AuditSink`` is the seam: the server emits records, a sink stores them. The
DuckDB sink lives in ``pgproxy.audit.sink``; tests may use ``MemorySink``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class SessionStarted:
    session_id: str
    agent: str
    client_addr: str
    database: str
    application_name: str
    started_at: datetime
    #: "ok", or why authentication failed ("unknown agent", "wrong password", ...)
    auth: str = "ok"
    tls: bool = False


@dataclass(frozen=True, slots=True)
class SessionEnded:
    session_id: str
    ended_at: datetime
    bytes_from_client: int
    bytes_to_client: int
    reason: str = ""


@dataclass(slots=True)  # not frozen: one is made per statement, and frozen init costs 3x
class StatementRecord:
    statement_id: str
    session_id: str
    ts: datetime
    agent: str
    statement_class: str
    fingerprint: str
    sql_redacted: str
    decision: str
    reasons: tuple[str, ...] = ()
    relations: tuple[str, ...] = ()
    columns: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    #: "ordinal:column:tag:operator" entries
    masked_columns: tuple[str, ...] = ()
    rows: int = 0
    duration_ms: float = 0.0
    sqlstate: str = ""
    approval_id: str = ""


@dataclass(frozen=True, slots=True)
class ApprovalEvent:
    approval_id: str
    ts: datetime
    #: created, notified, viewed, approved, denied, executed, expired, withdrawn
    event: str
    statement_id: str = ""
    agent: str = ""
    actor: str = ""
    reason: str = ""
    detail: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PolicyEvent:
    ts: datetime
    #: loaded, reloaded, reload_failed
    event: str
    detail: str = ""


AuditRecord = SessionStarted | SessionEnded | StatementRecord | ApprovalEvent | PolicyEvent

#: A ``StatementRecord`` already in the audit pipe's form (``audit.wire``: ``K_STATEMENT``, its
#: fields in order, ``ts`` as integer microseconds since the epoch in UTC). The relay's fast
#: lane builds these directly: no dataclass, no datetime per statement.
EncodedStatement = tuple[Any, ...]


class AuditSink(Protocol):
    """Where the proxy sends audit records.

    ``emit`` is for ordinary records: it may buffer, and only waits when the queue is full;
    ``offer`` is the same without the wait, for callers that cannot await.
    ``emit_durable`` returns once the record is on disk: used for decisions the client must
    not learn before they are recorded (holds, approvals, denials, blocks).
    """

    async def emit(self, record: AuditRecord) -> None: ...

    def offer(self, record: AuditRecord) -> bool:
        """``emit`` without waiting: True when the record was taken, False when the caller must
        ``await emit(record)`` instead (the queue is full)."""
        ...

    def offer_encoded(self, record: EncodedStatement) -> bool:
        """``offer`` of a statement in its encoded form; on False the caller emits
        ``audit.wire.decode_statement(record)``."""
        ...

    async def emit_durable(self, record: AuditRecord) -> None: ...


class MemorySink:
    """An in-memory sink for tests and for runs without an audit file."""

    def __init__(self) -> None:
        self.records: list[AuditRecord] = []

    async def emit(self, record: AuditRecord) -> None:
        self.records.append(record)

    def offer(self, record: AuditRecord) -> bool:
        self.records.append(record)
        return True

    def offer_encoded(self, record: EncodedStatement) -> bool:
        from pgproxy.audit.wire import decode_statement  # wire imports this module

        return self.offer(decode_statement(record))

    async def emit_durable(self, record: AuditRecord) -> None:
        self.records.append(record)
