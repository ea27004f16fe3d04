"""The approval service: hold, notify, decide, expire, release — the seam the proxy session calls.

Lifecycle of a request: ``submit`` stores it (and one outbox row per eligible reviewer) durably
before returning; the outbox mails each reviewer a personal link; reviewers vote through the
review page or the JSON API (``decide_by_token`` / ``decide``); ``quorum`` distinct approvals
approve it, any deny (with a reason) denies it; nobody deciding before ``timeout_seconds`` expires
it; the session going away withdraws it. Each transition is written to the store first, then to
the audit with ``emit_durable``, and only then announced to ``wait``-ers, so the agent never
learns an outcome the audit has not recorded.

Separation of duties: the agent itself and its owner are never recipients and are refused at
decision time, whatever other role they have; eligibility is re-checked against the rules in
force at decision time (``update_rules``).

Bound parameter values enter only ``execution_hash``; they are never stored, logged or shown.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from pgproxy.approvals.mail import Backoff, Notification, Notifier, Outbox
from pgproxy.approvals.store import (
    ApprovalRecord,
    ApprovalStatus,
    ApprovalStore,
    OutboxItem,
    Resolution,
    ReviewerToken,
    Vote,
    VoteConflict,
)
from pgproxy.approvals.tokens import csrf_ok, csrf_tag, hash_token, new_approval_id, new_token
from pgproxy.audit.records import ApprovalEvent, AuditSink
from pgproxy.rules import Rules

__all__ = [
    "ApprovalService",
    "ApprovalStateError",
    "DecisionCode",
    "DecisionResult",
    "HoldRequest",
    "Outcome",
    "Pending",
    "Review",
    "execution_hash",
]

log = logging.getLogger(__name__)

DECISIONS = frozenset({"approve", "deny"})


@dataclass(frozen=True, slots=True)
class HoldRequest:
    """A statement the policy decided to HOLD, as the proxy session hands it over."""

    agent: str
    owner: str | None
    database: str
    session_id: str
    statement_id: str
    #: the exact statement text (stored; shown to reviewers)
    sql: str
    #: bound parameter values: never shown, never stored — only inside the execution hash
    params: tuple[bytes | None, ...]
    statement_class: str
    #: "ddl" | "privilege" | "bulk_export" | "write" | "inference"
    hold_class: str
    reasons: tuple[str, ...]
    relations: tuple[str, ...]
    estimated_rows: int | None
    #: human descriptions of the masks in effect
    masking: tuple[str, ...]

    def __repr__(self) -> str:  # keep parameter values out of tracebacks and logs
        return (
            f"HoldRequest(agent={self.agent!r}, database={self.database!r}, "
            f"statement_id={self.statement_id!r}, hold_class={self.hold_class!r}, "
            f"params=<{len(self.params)} hidden>)"
        )


@dataclass(frozen=True, slots=True)
class Pending:
    approval_id: str
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class Outcome:
    status: ApprovalStatus
    approval_id: str
    reason: str
    decided_by: str


class DecisionCode(StrEnum):
    #: the vote counts but the quorum is not reached yet
    RECORDED = "recorded"
    APPROVED = "approved"
    DENIED = "denied"
    #: not pending any more, or this reviewer / this link already voted
    ALREADY_DECIDED = "already_decided"
    EXPIRED = "expired"
    #: owner, the agent itself, or not an approver under the current rules
    NOT_ELIGIBLE = "not_eligible"
    REASON_REQUIRED = "reason_required"
    #: bad token, or a decision other than approve/deny
    INVALID = "invalid"
    NOT_FOUND = "not_found"


@dataclass(frozen=True, slots=True)
class DecisionResult:
    code: DecisionCode
    approval_id: str
    message: str
    status: ApprovalStatus | None = None
    approvals: int = 0
    quorum: int = 0

    @property
    def accepted(self) -> bool:
        return self.code in (DecisionCode.RECORDED, DecisionCode.APPROVED, DecisionCode.DENIED)


@dataclass(frozen=True, slots=True)
class Review:
    """What a reviewer's link shows."""

    record: ApprovalRecord
    reviewer: str
    votes: tuple[Vote, ...]
    token_used: bool
    eligible: bool
    expired: bool

    @property
    def can_decide(self) -> bool:
        return (
            self.record.status is ApprovalStatus.PENDING
            and not self.token_used
            and self.eligible
            and not self.expired
            and all(v.reviewer.casefold() != self.reviewer.casefold() for v in self.votes)
        )


class ApprovalStateError(Exception):
    """A call that does not fit the request's state (e.g. ``executed`` on a denied request)."""


def execution_hash(req: HoldRequest) -> str:
    """SHA-256 over the statement bytes, the bound parameters, the agent and the database.

    Every field is length-prefixed (NULL parameters get a distinct marker) so that different
    inputs can never hash the same by shifting bytes between fields.
    """
    h = hashlib.sha256(b"pgproxy-exec-v1\0")

    def put(value: bytes | None) -> None:
        if value is None:
            h.update(b"\xff\xff\xff\xff")
            return
        h.update(len(value).to_bytes(4, "big"))
        h.update(value)

    put(req.agent.encode("utf-8"))
    put(req.database.encode("utf-8"))
    put(req.sql.encode("utf-8"))
    h.update(len(req.params).to_bytes(4, "big"))
    for p in req.params:
        put(p)
    return h.hexdigest()


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)


def _iso(ts: float) -> str:
    return _dt(ts).isoformat()


def _outcome(rec: ApprovalRecord) -> Outcome:
    return Outcome(rec.status, rec.approval_id, rec.reason, rec.decided_by)


class ApprovalService:
    def __init__(
        self,
        store: ApprovalStore,
        rules: Rules,
        notifier: Notifier,
        audit: AuditSink,
        public_url: str,
        clock: Callable[[], float] = time.time,
        *,
        backoff: Backoff | None = None,
        outbox_poll_seconds: float = 5.0,
        expiry_poll_seconds: float = 1.0,
    ) -> None:
        self.store = store
        self.rules = rules
        self.notifier = notifier
        self.audit = audit
        self.public_url = public_url.rstrip("/")
        self.clock = clock
        self.expiry_poll_seconds = expiry_poll_seconds
        self.outbox = Outbox(
            store,
            notifier,
            self._compose,
            self._on_sent,
            clock,
            backoff=backoff or Backoff(),
            poll_seconds=outbox_poll_seconds,
        )
        self._secret: bytes | None = None
        self._lock = asyncio.Lock()
        self._waiters: dict[str, asyncio.Future[Outcome]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False
        self._stopping = False

    # -- lifecycle --------------------------------------------------------------------------

    def update_rules(self, rules: Rules) -> None:
        """Use these rules from now on (eligibility and quorum are checked at decision time)."""
        self.rules = rules

    async def start(self) -> None:
        """Open the store, withdraw requests left pending by a previous process, start tasks."""
        await self.store.open()
        self._started = True
        self._stopping = False
        self._secret = await self.store.server_secret()
        for rec in await self.store.list_requests(ApprovalStatus.PENDING):
            await self._finish(
                rec,
                ApprovalStatus.WITHDRAWN,
                "withdrawn",
                reason="proxy restarted: the session holding the statement is gone",
            )
        self._tasks = [
            asyncio.create_task(self.outbox.run(), name="approvals-outbox"),
            asyncio.create_task(self._expiry_loop(), name="approvals-expiry"),
        ]

    async def close(self, withdraw_pending: bool = True) -> None:
        """Stop the tasks; withdraw what is still pending (its sessions die with us); close."""
        if not self._started:
            return
        self._started = False
        self._stopping = True
        self.outbox.stop()
        tasks, self._tasks = self._tasks, []
        while tasks:
            for task in tasks:
                task.cancel()
            # re-cancel until done: a library may swallow one cancellation
            _, pending = await asyncio.wait(tasks, timeout=1.0)
            tasks = list(pending)
        if withdraw_pending:
            for rec in await self.store.list_requests(ApprovalStatus.PENDING):
                try:
                    await self.withdraw(rec.approval_id, "proxy shutting down")
                except Exception:
                    log.exception("could not withdraw %s at shutdown", rec.approval_id)
        for fut in self._waiters.values():
            if not fut.done():
                fut.cancel()
        self._waiters.clear()
        await self.store.close()

    # -- the proxy's side -------------------------------------------------------------------

    def recipients(self, agent: str, owner: str | None) -> tuple[str, ...]:
        """Eligible reviewers for ``agent``: its approvers minus itself and its owner."""
        out: list[str] = []
        seen: set[str] = set()
        for reviewer in self.rules.approvers_for(agent):
            key = reviewer.casefold()
            if key in seen or self._conflicted(reviewer, agent, owner):
                continue
            seen.add(key)
            out.append(reviewer)
        return tuple(out)

    def _conflicted(self, reviewer: str, agent: str, owner: str | None) -> bool:
        who = reviewer.casefold()
        owners = {owner}
        current = self.rules.agent(agent)
        if current is not None:
            owners.add(current.owner)
        return who == agent.casefold() or any(o is not None and who == o.casefold() for o in owners)

    def eligible(self, reviewer: str, rec: ApprovalRecord) -> bool:
        """May ``reviewer`` decide ``rec`` under the current rules?"""
        if self._conflicted(reviewer, rec.agent, rec.owner):
            return False
        who = reviewer.casefold()
        return any(who == a.casefold() for a in self.rules.approvers_for(rec.agent))

    def quorum_for(self, rec: ApprovalRecord) -> int:
        # the stricter of the quorum at submission and the one in force now
        return max(rec.quorum, self.rules.approvals.quorum)

    execution_hash = staticmethod(execution_hash)

    async def submit(self, req: HoldRequest) -> Pending:
        """Store the request durably, audit it, queue the notifications; return at once."""
        now = self.clock()
        settings = self.rules.approvals
        recipients = self.recipients(req.agent, req.owner)
        rec = ApprovalRecord(
            approval_id=new_approval_id(),
            agent=req.agent,
            owner=req.owner,
            database=req.database,
            session_id=req.session_id,
            statement_id=req.statement_id,
            sql=req.sql,
            statement_class=req.statement_class,
            hold_class=req.hold_class,
            reasons=tuple(req.reasons),
            relations=tuple(req.relations),
            estimated_rows=req.estimated_rows,
            masking=tuple(req.masking),
            execution_hash=execution_hash(req),
            quorum=settings.quorum,
            requested_at=now,
            expires_at=now + settings.timeout_seconds,
        )
        await self.store.create(rec, recipients)
        if len(recipients) < settings.quorum:
            log.warning(
                "approval %s for agent %s has %d eligible reviewer(s) for a quorum of %d: "
                "it can only expire",
                rec.approval_id,
                req.agent,
                len(recipients),
                settings.quorum,
            )
        try:
            await self._event(
                rec,
                "created",
                detail={
                    "expires_at": _iso(rec.expires_at),
                    "requested_at": _iso(rec.requested_at),
                    "hold_class": rec.hold_class,
                    "statement_class": rec.statement_class,
                    "quorum": str(rec.quorum),
                    "recipients": str(len(recipients)),
                },
            )
        except BaseException:
            # fail closed: a hold the audit did not record must not be decidable
            await self.store.transition(
                rec.approval_id, ApprovalStatus.WITHDRAWN, self.clock(), reason="audit unavailable"
            )
            raise
        self.outbox.kick()
        return Pending(rec.approval_id, _dt(rec.expires_at))

    async def wait(self, approval_id: str) -> Outcome:
        """Return once the request is approved, denied, expired or withdrawn."""
        fut = self._waiters.get(approval_id)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self._waiters[approval_id] = fut
        rec = await self.store.get(approval_id)
        if rec is None:
            self._waiters.pop(approval_id, None)
            raise KeyError(approval_id)
        if rec.status is not ApprovalStatus.PENDING:
            self._waiters.pop(approval_id, None)
            return _outcome(rec)
        if rec.expires_at <= self.clock():
            await self.sweep()
        # shield: one cancelled waiter (client gone) must not cancel the others' future
        return await asyncio.shield(fut)

    async def withdraw(self, approval_id: str, why: str) -> None:
        """The client went away or cancelled: a pending request is withdrawn (else no-op)."""
        rec = await self.store.get(approval_id)
        if rec is not None:
            await self._finish(rec, ApprovalStatus.WITHDRAWN, "withdrawn", reason=why)

    async def executed(self, approval_id: str, rows: int, sqlstate: str) -> None:
        """The approved statement ran (once); record its row count and SQLSTATE."""
        ts = self.clock()
        if not await self.store.mark_executed(approval_id, rows, sqlstate, ts):
            raise ApprovalStateError(f"{approval_id} is not an approved, unexecuted request")
        rec = await self.store.get(approval_id)
        assert rec is not None
        await self._event(rec, "executed", detail={"rows": str(rows), "sqlstate": sqlstate})

    async def claim_released(self, req: HoldRequest) -> str | None:
        """``reply: error`` mode: spend an approved, unexecuted request for the same execution.

        The approval is single use, and only claimable for ``timeout_seconds`` after its
        decision.
        """
        now = self.clock()
        window = self.rules.approvals.timeout_seconds
        return await self.store.claim(execution_hash(req), now, now - window)

    # -- the reviewers' side ----------------------------------------------------------------

    @property
    def secret(self) -> bytes:
        if self._secret is None:
            raise RuntimeError("approval service is not started")
        return self._secret

    def csrf_tag(self, approval_id: str, token: str) -> str:
        return csrf_tag(self.secret, approval_id, token)

    def csrf_ok(self, approval_id: str, token: str, tag: str) -> bool:
        return csrf_ok(self.secret, approval_id, token, tag)

    async def token_owner(self, approval_id: str, token: str) -> ReviewerToken | None:
        """The reviewer token behind ``token`` if it was issued for ``approval_id``."""
        if not token:
            return None
        found = await self.store.find_token(hash_token(token))
        if found is None or found.approval_id != approval_id:
            return None
        return found

    async def review(self, approval_id: str, token: str, audit_view: bool = True) -> Review | None:
        """The review page's content for a link token (audited as ``viewed``); None if invalid.

        Never changes the request's state, however often called.
        """
        tok = await self.token_owner(approval_id, token)
        if tok is None:
            return None
        rec = await self.store.get(approval_id)
        if rec is None:
            return None
        if audit_view:
            await self._event(rec, "viewed", actor=tok.reviewer)
        return await self._review(rec, tok.reviewer, tok.used_at is not None)

    async def _review(self, rec: ApprovalRecord, reviewer: str, token_used: bool) -> Review:
        votes = tuple(await self.store.votes(rec.approval_id))
        return Review(
            record=rec,
            reviewer=reviewer,
            votes=votes,
            token_used=token_used,
            eligible=self.eligible(reviewer, rec),
            expired=rec.expires_at <= self.clock(),
        )

    async def requests_for(
        self, reviewer: str, status: ApprovalStatus | None = None
    ) -> list[Review]:
        """Requests ``reviewer`` may decide under the current rules (JSON API listing)."""
        out = []
        for rec in await self.store.list_requests(status):
            if self.eligible(reviewer, rec):
                out.append(await self._review(rec, reviewer, token_used=False))
        return out

    async def get(self, approval_id: str) -> ApprovalRecord | None:
        return await self.store.get(approval_id)

    async def link_token(self, token: str) -> ReviewerToken | None:
        """The reviewer token behind a bearer ``token``, whatever request it was issued for."""
        return await self.store.find_token(hash_token(token)) if token else None

    async def decide_by_token(
        self, approval_id: str, token: str, decision: str, reason: str
    ) -> DecisionResult:
        """A decision from a review link: the token names the reviewer and is spent by it."""
        tok = await self.token_owner(approval_id, token)
        if tok is None:
            return DecisionResult(DecisionCode.INVALID, approval_id, "this link is not valid")
        if tok.used_at is not None:
            rec = await self.store.get(approval_id)
            return DecisionResult(
                DecisionCode.ALREADY_DECIDED,
                approval_id,
                "this link was already used to decide",
                status=None if rec is None else rec.status,
            )
        return await self._decide(approval_id, tok.reviewer, decision, reason, tok.token_hash)

    async def decide(
        self, approval_id: str, reviewer: str, decision: str, reason: str
    ) -> DecisionResult:
        """A decision by an already authenticated reviewer (e.g. a configured API token)."""
        return await self._decide(approval_id, reviewer, decision, reason, None)

    async def _decide(
        self,
        approval_id: str,
        reviewer: str,
        decision: str,
        reason: str,
        token_hash: str | None,
    ) -> DecisionResult:
        reason = reason.strip()
        if decision not in DECISIONS:
            return DecisionResult(
                DecisionCode.INVALID, approval_id, "decision must be 'approve' or 'deny'"
            )
        async with self._lock:
            rec = await self.store.get(approval_id)
            if rec is None:
                return DecisionResult(DecisionCode.NOT_FOUND, approval_id, "no such request")
            if rec.status is ApprovalStatus.PENDING and rec.expires_at <= self.clock():
                await self._finish_locked(rec, ApprovalStatus.EXPIRED, "expired", _expiry(rec))
                rec = await self.store.get(approval_id)
                assert rec is not None
            if rec.status is ApprovalStatus.EXPIRED:
                return DecisionResult(
                    DecisionCode.EXPIRED,
                    approval_id,
                    "this request expired; the statement will not run",
                    status=rec.status,
                )
            if rec.status is not ApprovalStatus.PENDING:
                return DecisionResult(
                    DecisionCode.ALREADY_DECIDED,
                    approval_id,
                    f"this request is already {rec.status.value}",
                    status=rec.status,
                )
            if not self.eligible(reviewer, rec):
                log.warning("refused decision on %s by ineligible %s", approval_id, reviewer)
                return DecisionResult(
                    DecisionCode.NOT_ELIGIBLE,
                    approval_id,
                    "you may not decide this request (separation of duties or not an approver)",
                    status=rec.status,
                )
            if decision == "deny" and not reason:
                return DecisionResult(
                    DecisionCode.REASON_REQUIRED,
                    approval_id,
                    "a denial needs a reason",
                    status=rec.status,
                )
            votes = await self.store.votes(approval_id)
            if any(v.reviewer.casefold() == reviewer.casefold() for v in votes):
                return DecisionResult(
                    DecisionCode.ALREADY_DECIDED,
                    approval_id,
                    "you already decided this request",
                    status=rec.status,
                )
            now = self.clock()
            quorum = self.quorum_for(rec)
            approvers = [v for v in votes if v.decision == "approve"]
            resolution: Resolution | None
            if decision == "deny":
                resolution = Resolution(ApprovalStatus.DENIED, reviewer, reason)
            else:
                approvers.append(Vote(approval_id, reviewer, decision, reason, now))
                resolution = None
                if len(approvers) >= quorum:
                    resolution = Resolution(
                        ApprovalStatus.APPROVED,
                        ",".join(v.reviewer for v in approvers),
                        "; ".join(v.reason for v in approvers if v.reason),
                    )
            try:
                await self.store.apply_vote(
                    Vote(approval_id, reviewer, decision, reason, now), token_hash, resolution
                )
            except VoteConflict as exc:
                return DecisionResult(
                    DecisionCode.ALREADY_DECIDED,
                    approval_id,
                    "already decided" if exc.kind == "not_pending" else "you already decided",
                    status=rec.status,
                )
            count = len(approvers)
            detail = {"decision": decision, "approvals": f"{count}/{quorum}"}
            if resolution is None:
                await self._event(rec, "voted", actor=reviewer, reason=reason, detail=detail)
                return DecisionResult(
                    DecisionCode.RECORDED,
                    approval_id,
                    f"approval recorded ({count} of {quorum} needed)",
                    status=ApprovalStatus.PENDING,
                    approvals=count,
                    quorum=quorum,
                )
            event = "approved" if resolution.status is ApprovalStatus.APPROVED else "denied"
            detail["decided_by"] = resolution.decided_by
            await self._event(rec, event, actor=reviewer, reason=reason, detail=detail)
            final = await self.store.get(approval_id)
            assert final is not None
            self._resolve(final)
            return DecisionResult(
                DecisionCode.APPROVED if event == "approved" else DecisionCode.DENIED,
                approval_id,
                f"request {event}",
                status=resolution.status,
                approvals=count,
                quorum=quorum,
            )

    # -- expiry, transitions, notification --------------------------------------------------

    async def sweep(self) -> int:
        """Expire every pending request past its deadline; returns how many."""
        n = 0
        for rec in await self.store.due_expiry(self.clock()):
            if await self._finish(rec, ApprovalStatus.EXPIRED, "expired", _expiry(rec)):
                n += 1
        return n

    async def _expiry_loop(self) -> None:
        while not self._stopping:
            try:
                await self.sweep()
                nxt = await self.store.next_expiry()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("approval expiry sweep failed")
                nxt = None
            wait = self.expiry_poll_seconds
            if nxt is not None:
                wait = max(0.01, min(wait, nxt - self.clock()))
            await asyncio.sleep(wait)

    async def _finish(
        self, rec: ApprovalRecord, to: ApprovalStatus, event: str, reason: str
    ) -> bool:
        async with self._lock:
            return await self._finish_locked(rec, to, event, reason)

    async def _finish_locked(
        self, rec: ApprovalRecord, to: ApprovalStatus, event: str, reason: str
    ) -> bool:
        if not await self.store.transition(rec.approval_id, to, self.clock(), reason=reason):
            return False
        await self._event(rec, event, reason=reason)
        final = await self.store.get(rec.approval_id)
        assert final is not None
        self._resolve(final)
        return True

    def _resolve(self, rec: ApprovalRecord) -> None:
        fut = self._waiters.pop(rec.approval_id, None)
        if fut is not None and not fut.done():
            fut.set_result(_outcome(rec))

    async def _event(
        self,
        rec: ApprovalRecord,
        event: str,
        actor: str = "",
        reason: str = "",
        detail: dict[str, str] | None = None,
    ) -> None:
        await self.audit.emit_durable(
            ApprovalEvent(
                approval_id=rec.approval_id,
                ts=_dt(self.clock()),
                event=event,
                statement_id=rec.statement_id,
                agent=rec.agent,
                actor=actor,
                reason=reason,
                detail=detail or {},
            )
        )

    def link(self, approval_id: str, token: str) -> str:
        return f"{self.public_url}/approvals/{approval_id}?t={token}"

    async def _compose(self, item: OutboxItem) -> Notification:
        # a fresh token per delivery attempt: the clear token exists only in the message
        rec = await self.store.get(item.approval_id)
        if rec is None:
            raise ApprovalStateError(f"outbox row for unknown request {item.approval_id}")
        token = new_token()
        await self.store.add_token(
            ReviewerToken(hash_token(token), rec.approval_id, item.recipient, self.clock())
        )
        return Notification(
            approval_id=rec.approval_id,
            recipient=item.recipient,
            agent=rec.agent,
            owner=rec.owner,
            database=rec.database,
            sql=rec.sql,
            statement_class=rec.statement_class,
            hold_class=rec.hold_class,
            reasons=rec.reasons,
            relations=rec.relations,
            estimated_rows=rec.estimated_rows,
            masking=rec.masking,
            requested_at=_dt(rec.requested_at),
            expires_at=_dt(rec.expires_at),
            status=rec.status.value,
            quorum=rec.quorum,
            link=self.link(rec.approval_id, token),
        )

    async def _on_sent(self, item: OutboxItem, note: Notification, message_id: str) -> None:
        rec = await self.store.get(item.approval_id)
        if rec is not None:
            await self._event(
                rec, "notified", detail={"message_id": message_id, "to": note.recipient}
            )


def _expiry(rec: ApprovalRecord) -> str:
    return f"no decision within {rec.expires_at - rec.requested_at:g} seconds"
