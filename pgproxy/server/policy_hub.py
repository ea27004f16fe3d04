"""Shared policy state for all sessions: rules, the upstream catalog, the mask catalog.

The catalog is read from the upstream over a control connection (asyncpg) at start, after DDL
that went through the proxy, and on rules reload; every live session's engine is pointed at the
new catalog (their verdict caches are keyed by catalog version, so nothing stale is reused).
Until a catalog has been read, every statement is blocked: the policy cannot prove anything safe
without knowing what the names mean.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import weakref

import asyncpg

from pgproxy.policy.catalog import Catalog
from pgproxy.policy.decide import PolicyEngine
from pgproxy.policy.operators import MaskCatalog
from pgproxy.policy.seam import Action, SessionPolicy, StatementContext, Verdict
from pgproxy.rules import Rules
from pgproxy.server.catalog_loader import load_catalog
from pgproxy.server.session import SessionInfo

log = logging.getLogger("pgproxy.policy")

_NO_CATALOG = "the database catalog could not be read yet; nothing can be proven safe"


class _Unavailable:
    """The policy while no catalog is known: block everything, drop notifications."""

    def statement(self, sql: str, ctx: StatementContext) -> Verdict:
        return Verdict(Action.BLOCK, (_NO_CATALOG,), message=f"statement blocked: {_NO_CATALOG}")

    def revalidate(self, sql: str, verdict: Verdict, ctx: StatementContext) -> Verdict:
        return self.statement(sql, ctx)

    def function_call(self, function_oid: int, ctx: StatementContext) -> Verdict:
        return self.statement("", ctx)

    def notification(self, channel: str, payload: str) -> str | None:
        return None

    def scrub_error(self, fields: dict[str, str], verdict: Verdict | None) -> dict[str, str]:
        from pgproxy.policy.decide import scrub_error

        return scrub_error(fields, None)


class PolicyHub:
    def __init__(self, rules: Rules, upstream_dsn: str, pseudonym_key: bytes | None = None) -> None:
        self.rules = rules
        self.upstream_dsn = upstream_dsn
        self.pseudonym_key = pseudonym_key
        self.masks = MaskCatalog(rules, pseudonym_key)
        self.catalog: Catalog | None = None
        self._engines: weakref.WeakSet[PolicyEngine] = weakref.WeakSet()
        self._lock = asyncio.Lock()
        self._refresh_task: asyncio.Task[bool] | None = None
        self._estimate_conn: asyncpg.Connection | None = None
        self._estimate_lock = asyncio.Lock()

    async def refresh(self) -> bool:
        """Read the catalog again; True if it worked."""
        async with self._lock:
            try:
                conn = await asyncpg.connect(self.upstream_dsn, timeout=10)
            except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
                log.error("cannot read the catalog: %s", type(exc).__name__)
                return False
            try:
                catalog = await load_catalog(conn, self.rules)
            except (OSError, asyncpg.PostgresError) as exc:
                log.error("reading the catalog failed: %s", type(exc).__name__)
                return False
            finally:
                with contextlib.suppress(Exception):
                    await conn.close()
            self.catalog = catalog
            for engine in list(self._engines):
                engine.catalog = catalog
            return True

    async def estimate_rows(self, sql: str) -> int | None:
        """The planner's row estimate for ``sql`` (EXPLAIN on the control connection)."""
        async with self._estimate_lock:
            conn = self._estimate_conn
            if conn is None or conn.is_closed():
                conn = self._estimate_conn = await asyncpg.connect(self.upstream_dsn, timeout=10)
            try:
                plan = await conn.fetchval("EXPLAIN (FORMAT JSON) " + sql, timeout=5)
            except asyncpg.PostgresError:
                return None
        doc = json.loads(plan) if isinstance(plan, str) else plan
        return int(doc[0]["Plan"]["Plan Rows"])

    async def close(self) -> None:
        """Finish a catalog read in flight and close the control connection."""
        task = self._refresh_task
        if task is not None and not task.done():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 10)
        if self._estimate_conn is not None:
            with contextlib.suppress(Exception):
                await self._estimate_conn.close()

    def schedule_refresh(self) -> None:
        """Refresh soon, coalescing bursts of DDL into one read."""
        if self._refresh_task is None or self._refresh_task.done():
            self._refresh_task = asyncio.create_task(self.refresh())

    async def wait_refreshed(self) -> None:
        if self._refresh_task is not None:
            with contextlib.suppress(Exception):
                await self._refresh_task

    def update_rules(self, rules: Rules) -> None:
        """New rules (already validated): masks now, tags with the next catalog read."""
        self.masks = MaskCatalog(rules, self.pseudonym_key)
        self.rules = rules
        self.schedule_refresh()

    def session_policy(self, info: SessionInfo) -> SessionPolicy:
        if self.catalog is None:
            return _Unavailable()
        engine = PolicyEngine(self.rules, self.catalog, self.masks, info.agent)
        self._engines.add(engine)
        return engine
