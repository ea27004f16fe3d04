"""What a session does with a held statement: ask the approval service and wait.

The relay has stopped reading the agent's messages at the held statement. This module turns the
hold into a durable approval request, tells the agent the approval id at once (NoticeResponse),
waits for the decision (or expiry), and answers whether the statement may run. A cancelled or
disconnected agent withdraws its request. With ``reply: error`` the agent is answered at once
and the identical statement (same text, parameters, agent, database) is released once after
approval, for agents whose client timeouts are shorter than a human's reaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from pgproxy.approvals.service import ApprovalService, HoldRequest
from pgproxy.protocol.relay import HoldRequested
from pgproxy.rules import Rules

log = logging.getLogger("pgproxy.holds")


@dataclass(frozen=True, slots=True)
class HoldOutcome:
    approved: bool
    #: for the agent when not approved (goes into the 42501 ErrorResponse)
    message: str
    approval_id: str = ""


@dataclass(frozen=True, slots=True)
class HoldContext:
    """What the handler needs to know about the session and the statement."""

    agent: str
    database: str
    session_id: str
    statement_id: str
    #: sends a NoticeResponse with this text to the agent now
    notice: Callable[[str], None]
    #: the planner's row estimate, when one was asked for
    estimated_rows: int | None = None


class HoldHandler(Protocol):
    async def hold(self, ctx: HoldContext, held: HoldRequested) -> HoldOutcome: ...

    async def executed(self, approval_id: str, rows: int, sqlstate: str) -> None: ...


class DenyHolds:
    """Used when no approval service is configured: a held statement can never run."""

    async def hold(self, ctx: HoldContext, held: HoldRequested) -> HoldOutcome:
        return HoldOutcome(
            False, "statement requires approval, and no approval service is configured"
        )

    async def executed(self, approval_id: str, rows: int, sqlstate: str) -> None:
        return None


class ApprovalHolds:
    def __init__(self, service: ApprovalService, rules: Callable[[], Rules]) -> None:
        self.service = service
        self.rules = rules

    def _request(self, ctx: HoldContext, held: HoldRequested) -> HoldRequest:
        v = held.verdict
        agent = self.rules().agent(ctx.agent)
        return HoldRequest(
            agent=ctx.agent,
            owner=agent.owner if agent is not None else None,
            database=ctx.database,
            session_id=ctx.session_id,
            statement_id=ctx.statement_id,
            sql=held.sql,
            params=held.params,
            statement_class=v.statement_class,
            hold_class=v.hold_class or "unknown",
            reasons=v.reasons,
            relations=v.relations,
            estimated_rows=ctx.estimated_rows,
            masking=tuple(f"{m.column}: {m.tag} → {m.operator}" for m in v.masks),
        )

    async def hold(self, ctx: HoldContext, held: HoldRequested) -> HoldOutcome:
        req = self._request(ctx, held)
        settings = self.rules().approvals
        if settings.reply == "error":
            claimed = await self.service.claim_released(req)
            if claimed is not None:
                return HoldOutcome(True, "", claimed)
        pending = await self.service.submit(req)
        aid = pending.approval_id
        expires = pending.expires_at.isoformat(timespec="seconds")
        if settings.reply == "error":
            return HoldOutcome(
                False,
                f"approval {aid} requested ({held.verdict.hold_class}): reviewers have been "
                f"notified; run the identical statement again after it is approved "
                f"(before {expires})",
                aid,
            )
        ctx.notice(
            f"pgproxy: statement held for approval {aid} ({held.verdict.hold_class}); "
            f"reviewers have been notified; waiting until {expires}"
        )
        try:
            outcome = await self.service.wait(aid)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.service.withdraw(aid, "cancelled or disconnected"))
            raise
        status = str(outcome.status)
        if status == "approved":
            return HoldOutcome(True, "", aid)
        if status == "denied":
            who = f" by {outcome.decided_by}" if outcome.decided_by else ""
            return HoldOutcome(False, f"approval {aid} denied{who}: {outcome.reason}", aid)
        if status == "expired":
            return HoldOutcome(False, f"approval {aid} expired without a decision", aid)
        return HoldOutcome(False, f"approval {aid} {status}: {outcome.reason}", aid)

    async def executed(self, approval_id: str, rows: int, sqlstate: str) -> None:
        try:
            await self.service.executed(approval_id, rows, sqlstate)
        except Exception as exc:
            log.error("approval %s: could not record the execution: %s", approval_id, exc)
