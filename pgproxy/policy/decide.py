"""The decision: one ``Verdict`` (ALLOW, MASK, HOLD or BLOCK) per statement text, with reasons.

``PolicyEngine`` is the ``SessionPolicy`` of one agent session. For each statement of a Query or
Parse text it combines:

* the statement class (``classify``): reads, writes, transaction and harmless session commands
  run; classes listed in ``approvals.hold`` are held; anything else is blocked;
* a scan of Postgres' own parse tree: every relation must be in the catalog and not a statistics
  or activity view; every function must be an allowlisted built-in (``functions``);
* lineage (``lineage``, over pglast's deparse of the statement): tagged columns in row-shaping
  clauses are inference channels (HOLD "inference" when the agent has approvers, else BLOCK);
  tagged data written into columns without that tag is laundering (BLOCK); tagged result columns
  are masked -- with their tag's operator when projected bare, redacted whole when computed.

A text of several statements is blocked if any is blocked, else held if any is held. Verdicts of
texts that do not depend on session state are cached by (text, search_path, catalog version,
agent). Any exception inside becomes BLOCK "internal policy error": the engine fails closed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from pglast import ast, enums
from pglast.stream import RawStream

from pgproxy.policy.catalog import Catalog, Ref
from pgproxy.policy.classify import Classified, ClassifyError, StatementClass, classify
from pgproxy.policy.classify import walk_nodes as _walk
from pgproxy.policy.functions import DENIED_RELATIONS, FunctionVerdict, is_denied, judge_builtin
from pgproxy.policy.lineage import (
    SET_RETURNING,
    LineageError,
    StatementLineage,
    analyze,
    check_uses,
)
from pgproxy.policy.operators import MaskCatalog
from pgproxy.policy.redact import fingerprint, redact
from pgproxy.policy.seam import (
    PASS_COPY,
    PASS_ROWS,
    Action,
    CellRewriter,
    ColumnMask,
    CopyPlan,
    FieldInfo,
    ResultPolicy,
    RowPlan,
    StatementContext,
    Verdict,
)
from pgproxy.policy.shape import SHARED_CLASSES
from pgproxy.policy.shape import key as shape_key
from pgproxy.rules import Rules

INTERNAL_ERROR = "internal policy error"
K = StatementClass

#: parse-tree nodes allowed in EXECUTE parameters: constants, casts and parameters only
_CONSTANT_NODES = (
    ast.A_Const,
    ast.TypeCast,
    ast.TypeName,
    ast.ParamRef,
    ast.String,
    ast.Integer,
    ast.Float,
    ast.Boolean,
)

#: Settings an agent may change: formatting, timeouts, client identity. Not search_path, role.
SAFE_SETTINGS: frozenset[str] = frozenset(
    {
        "application_name",
        "client_min_messages",
        "datestyle",
        "intervalstyle",
        "timezone",
        "time zone",
        "extra_float_digits",
        "bytea_output",
        "statement_timeout",
        "lock_timeout",
        "idle_in_transaction_session_timeout",
        "idle_session_timeout",
        "default_transaction_isolation",
        "default_transaction_read_only",
        "transaction_isolation",
        "transaction_read_only",
        "work_mem",
        "jit",
        "enable_seqscan",
        "enable_indexscan",
        "enable_bitmapscan",
        "enable_hashjoin",
        "enable_mergejoin",
        "enable_nestloop",
        "random_page_cost",
        "lc_messages",
        "lc_monetary",
        "lc_numeric",
        "lc_time",
        "xmloption",
        "xmlbinary",
        "geqo",
        "max_parallel_workers_per_gather",
        "row_security",
    }
)

#: ErrorResponse fields kept when diagnostics are scrubbed: severity and SQLSTATE only.
_KEPT_FIELDS = ("S", "V", "C")

_CLASS_MESSAGES: dict[str, tuple[str, str]] = {
    "22": ("invalid data value", "check the types and formats of the values you compare or cast"),
    "23": ("integrity constraint violated", "the row conflicts with a constraint; change it"),
    "42": ("syntax error or access rule violation", "check names, types and syntax"),
    "40": ("transaction rolled back", "retry the transaction"),
    "25": ("invalid transaction state", "end the current transaction and retry"),
    "53": ("insufficient resources", "retry later or ask for less data"),
    "57": ("operator intervention", "retry later"),
    "0A": ("feature not supported", "rewrite the statement"),
    "21": ("cardinality violation", "make the subquery return at most one row"),
    "P0": ("procedural error", "check the statement"),
}


# -- results ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ColumnPlan:
    """How one result column is treated: passed, masked by ``tag``'s operator, or redacted."""

    name: str
    sources: frozenset[Ref]
    direct: bool
    tag: str | None = None
    redact_tags: tuple[str, ...] = ()

    @property
    def masked(self) -> bool:
        return self.tag is not None or bool(self.redact_tags)


class LineageResult:
    """The ``ResultPolicy`` of one statement: checks each RowDescription against the lineage."""

    __slots__ = (
        "_catalog", "_masks", "_max_rows", "_memo", "_profile", "_scrub", "columns",
        "copy_format", "copy_header",
    )  # fmt: skip

    def __init__(
        self,
        columns: tuple[ColumnPlan, ...],
        catalog: Catalog,
        masks: MaskCatalog,
        profile: str,
        scrub: bool,
        max_rows: int | None,
    ) -> None:
        self.columns = columns
        self._catalog = catalog
        self._masks = masks
        self._profile = profile
        self._scrub = scrub
        self._max_rows = max_rows
        self._memo: dict[tuple[FieldInfo, ...], RowPlan] = {}
        self.copy_format = "text"
        self.copy_header = False

    @property
    def scrub_diagnostics(self) -> bool:
        return self._scrub

    def copy_plan(self, index: int = 0) -> CopyPlan:
        """COPY rows carry no RowDescription: mask by the lineage alone. A directly projected
        column is masked as its source column's type; anything derived is redacted."""
        try:
            rewriters: dict[int, CellRewriter] = {}
            masks: list[ColumnMask] = []
            for i, col in enumerate(self.columns):
                if not col.masked:
                    continue
                type_oid = 25
                if col.direct and len(col.sources) == 1:
                    type_oid = self._catalog.column_type(next(iter(col.sources))) or 25
                f = FieldInfo(col.name, 0, 0, type_oid, -1, -1, 0)
                if col.tag is not None:
                    rewriters[i] = self._masks.rewriter(col.tag, f, self._profile)
                    masks.append(
                        ColumnMask(
                            i, col.name, col.tag, self._masks.operator_name(col.tag, self._profile)
                        )
                    )
                else:
                    rewriters[i] = self._masks.redact_cell(f)
                    masks.append(ColumnMask(i, col.name, ",".join(col.redact_tags), "redact"))
            if rewriters and self.copy_format == "binary":
                return CopyPlan(
                    RowPlan(block="binary COPY of tagged data cannot be masked"), "binary"
                )
            return CopyPlan(
                RowPlan(rewriters, tuple(masks)),
                self.copy_format,
                self.copy_header,
                len(self.columns),
            )
        except Exception:
            return CopyPlan(RowPlan(block=INTERNAL_ERROR))

    @property
    def max_rows(self) -> int | None:
        return self._max_rows

    def plan(self, fields: Sequence[FieldInfo], index: int = 0) -> RowPlan:
        key = tuple(fields)
        hit = self._memo.get(key)
        if hit is not None:
            return hit
        try:
            result = self._plan(key)
        except Exception:
            return RowPlan(block=INTERNAL_ERROR)
        if len(self._memo) < 64:
            self._memo[key] = result
        return result

    def _plan(self, fields: tuple[FieldInfo, ...]) -> RowPlan:
        if len(fields) != len(self.columns):
            return RowPlan(block="the result does not have the columns the policy analysed")
        rewriters: dict[int, CellRewriter] = {}
        masks: list[ColumnMask] = []
        for i, (f, col) in enumerate(zip(fields, self.columns, strict=True)):
            if f.table_oid:
                origin = (f.table_oid, f.attnum)
                if col.direct and origin not in col.sources:
                    return RowPlan(block="a result column does not come from where it should")
                if self._catalog.tag(origin) is not None and origin not in col.sources:
                    return RowPlan(block="a result column carries tagged data unexpectedly")
            if col.tag is not None:
                rewriters[i] = self._masks.rewriter(col.tag, f, self._profile)
                op = self._masks.operator_name(col.tag, self._profile)
                masks.append(ColumnMask(i, f.name, col.tag, op))
            elif col.redact_tags:
                rewriters[i] = self._masks.redact_cell(f)
                masks.append(ColumnMask(i, f.name, ",".join(col.redact_tags), "redact"))
        return RowPlan(rewriters, tuple(masks))


class StatementResults:
    """Results of a multi-statement Query: the relay says which statement a RowDescription
    belongs to (``index``); statements without a lineage policy pass rows that carry no tagged
    column."""

    __slots__ = ("_catalog", "_parts")

    def __init__(self, parts: tuple[LineageResult | None, ...], catalog: Catalog) -> None:
        self._parts = parts
        self._catalog = catalog

    @property
    def scrub_diagnostics(self) -> bool:
        return any(p.scrub_diagnostics for p in self._parts if p is not None)

    @property
    def max_rows(self) -> int | None:
        limits = [p.max_rows for p in self._parts if p is not None and p.max_rows is not None]
        return min(limits) if limits else None

    def copy_plan(self, index: int = 0) -> CopyPlan:
        if not 0 <= index < len(self._parts):
            return CopyPlan(
                RowPlan(block="a result arrived for a statement the policy did not see")
            )
        part = self._parts[index]
        return part.copy_plan() if part is not None else PASS_COPY

    def plan(self, fields: Sequence[FieldInfo], index: int = 0) -> RowPlan:
        if not 0 <= index < len(self._parts):
            return RowPlan(block="a result arrived for a statement the policy did not see")
        part = self._parts[index]
        if part is not None:
            return part.plan(fields)
        if any(f.table_oid and self._catalog.tag((f.table_oid, f.attnum)) for f in fields):
            return RowPlan(block="a result column carries tagged data unexpectedly")
        return PASS_ROWS


def _shareable(statement_class: str) -> bool:
    """Whether a verdict may be reused for statements of the same shape (``shape``)."""
    return all(k in SHARED_CLASSES for k in statement_class.split(";"))


def _copy_options(node: Any) -> tuple[str, bool, str]:
    """(format, header, first option the COPY masker does not handle or "")."""
    fmt, header, other = "text", False, ""
    for opt in node.options or ():
        name = opt.defname
        arg = opt.arg
        value = getattr(arg, "sval", None) if arg is not None else None
        if name == "format":
            fmt = str(value).lower()
        elif name == "header":
            if arg is None:
                header = True
            elif hasattr(arg, "boolval"):
                header = bool(arg.boolval)
            else:
                header = str(value).lower() in ("true", "on", "1", "match")
        elif name == "encoding" and str(value).upper().replace("-", "") == "UTF8":
            continue
        elif not other:
            other = name
    return fmt, header, other


# -- one statement's decision ----------------------------------------------------------------------


@dataclass(slots=True)
class _Decision:
    action: Action
    klass: str
    reasons: list[str] = field(default_factory=list)
    hold_class: str | None = None
    result: LineageResult | None = None
    relations: set[str] = field(default_factory=set)
    columns: set[str] = field(default_factory=set)
    tags: set[str] = field(default_factory=set)
    masks: tuple[ColumnMask, ...] = ()
    session_dependent: bool = False


def _block(klass: str, reason: str, **kw: Any) -> _Decision:
    return _Decision(Action.BLOCK, klass, [reason], **kw)


def _names(parts: Any) -> list[str]:
    return [str(p.sval) for p in parts or () if isinstance(p, ast.String)]


def _target_count(node: Any) -> int | None:
    """How many result columns Postgres' parse tree has (None when a ``*`` must be expanded)."""
    if isinstance(node, ast.SelectStmt):
        if node.op != enums.SetOperation.SETOP_NONE:
            return _target_count(node.larg)
        if node.valuesLists:
            return len(node.valuesLists[0])
        targets = node.targetList or ()
    elif isinstance(node, ast.InsertStmt | ast.UpdateStmt | ast.DeleteStmt):
        clause = getattr(node, "returningClause", None)
        targets = getattr(clause, "exprs", None) or ()
    else:
        return None
    for t in targets:
        val = getattr(t, "val", None)
        if isinstance(val, ast.ColumnRef) and any(
            isinstance(f, ast.A_Star) for f in val.fields or ()
        ):
            return None
    return len(targets)


def _set_returning_calls(node: Any) -> int:
    """How many calls of set-returning built-ins Postgres' parse tree has."""
    return sum(
        1
        for n in _walk(node)
        if isinstance(n, ast.FuncCall) and (_names(n.funcname) or [""])[-1] in SET_RETURNING
    )


class PolicyEngine:
    """The policy of one agent session (implements ``SessionPolicy``)."""

    def __init__(
        self,
        rules: Rules,
        catalog: Catalog,
        masks: MaskCatalog,
        agent: str,
        search_path: tuple[str, ...] = ("public",),
        cache_size: int = 2048,
    ) -> None:
        self.rules = rules
        self.catalog = catalog
        self.masks = masks
        self.agent = agent
        self.search_path = tuple(search_path)
        a = rules.agent(agent)
        self.profile = a.profile if a is not None else "safe_harbor"
        self.approvers = rules.approvers_for(agent)
        self.hold = frozenset(rules.approvals.hold)
        self._cache: OrderedDict[tuple[str, tuple[str, ...], str, str], Verdict] = OrderedDict()
        self._cache_size = cache_size
        self._shapes: dict[tuple[str, tuple[str, ...], str, str], Verdict] = {}
        self._prepared: dict[str, Verdict] = {}
        self._prepared_sql: dict[str, str] = {}
        self._cursors: dict[str, Verdict] = {}

    # -- SessionPolicy ----------------------------------------------------------------------------

    def statement(self, sql: str, ctx: StatementContext) -> Verdict:
        key = (sql, self.search_path, self.catalog.version, self.agent)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        # Statements that differ only in literals the decision cannot depend on share it
        # (see ``shape``: column positions such as ORDER BY 2 stay in the key).
        shape = shape_key(sql)
        skey = (shape or "", self.search_path, self.catalog.version, self.agent)
        if shape is not None:
            hit = self._shapes.get(skey)
            if hit is not None:  # not remembered by text too: the key costs about a lookup
                return hit
        try:
            verdict, cacheable = self._decide_text(sql)
        except Exception:
            return Verdict(
                Action.BLOCK,
                (INTERNAL_ERROR,),
                message=_message([INTERNAL_ERROR]),
                sql_redacted=_safe_redact(sql),
                fingerprint=_safe_fingerprint(sql),
            )
        if cacheable:
            self._remember(key, verdict)
            if shape is not None and _shareable(verdict.statement_class):
                self._shapes[skey] = verdict
                if len(self._shapes) > self._cache_size:
                    self._shapes.pop(next(iter(self._shapes)))
        return verdict

    def _remember(self, key: tuple[str, tuple[str, ...], str, str], verdict: Verdict) -> None:
        self._cache[key] = verdict
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def revalidate(self, sql: str, verdict: Verdict, ctx: StatementContext) -> Verdict:
        if verdict.catalog_version in ("", self.catalog.version):
            return verdict
        return self.statement(sql, ctx)  # DDL since Parse: decide again on today's catalog

    def function_call(self, function_oid: int, ctx: StatementContext) -> Verdict:
        fn = self.catalog.function_by_oid(function_oid)
        if fn is None or not fn.is_builtin or judge_builtin(fn.name) is not FunctionVerdict.ALLOWED:
            reason = "function call of a function that is not an allowlisted built-in"
            return Verdict(
                Action.BLOCK, (reason,), statement_class="function_call", message=_message([reason])
            )
        return Verdict(Action.ALLOW, (f"built-in {fn.name} is allowlisted",), "function_call")

    def notification(self, channel: str, payload: str) -> str | None:
        return payload if channel in self.rules.notify_channels else None

    def scrub_error(self, fields: dict[str, str], verdict: Verdict | None) -> dict[str, str]:
        return scrub_error(fields, verdict)

    # -- deciding --------------------------------------------------------------------------------

    def _decide_text(self, sql: str) -> tuple[Verdict, bool]:
        try:
            items = classify(sql)
        except ClassifyError as exc:
            reason = str(exc)
            return self._verdict(sql, [_block("unknown", reason)]), True
        if not items:
            return Verdict(Action.ALLOW, ("empty statement",), "empty"), True
        decisions = [self._decide(c) for c in items]
        cacheable = not any(d.session_dependent for d in decisions)
        return self._verdict(sql, decisions), cacheable

    def _verdict(self, sql: str, decisions: list[_Decision]) -> Verdict:
        blocked = [d for d in decisions if d.action is Action.BLOCK]
        held = [d for d in decisions if d.action is Action.HOLD]
        chosen = blocked or held or decisions
        reasons = [r for d in chosen for r in d.reasons]
        if blocked:
            action = Action.BLOCK
        elif held:
            action = Action.HOLD
        elif any(d.action is Action.MASK for d in decisions):
            action = Action.MASK
        else:
            action = Action.ALLOW
        result: ResultPolicy | None = None
        if action is not Action.BLOCK and any(d.result is not None for d in decisions):
            if len(decisions) == 1:
                result = decisions[0].result
            else:
                result = StatementResults(tuple(d.result for d in decisions), self.catalog)
        masks = tuple(m for d in decisions for m in d.masks)
        return Verdict(
            action,
            tuple(dict.fromkeys(reasons)),
            statement_class=";".join(d.klass for d in decisions),
            message=_message(reasons) if action is Action.BLOCK else "",
            hold_class=held[0].hold_class if action is Action.HOLD else None,
            result=result,
            fingerprint=_safe_fingerprint(sql),
            sql_redacted=_safe_redact(sql, self.catalog),
            relations=tuple(sorted({r for d in decisions for r in d.relations})),
            columns=tuple(sorted({c for d in decisions for c in d.columns})),
            tags=tuple(sorted({t for d in decisions for t in d.tags})),
            masks=masks,
            catalog_version=self.catalog.version,
        )

    def _held(self, hold_class: str) -> bool:
        return hold_class in self.hold

    def _decide(self, c: Classified) -> _Decision:
        klass = str(c.klass)
        denied = self._denied_functions(c.node)
        if denied:
            return _block(klass, denied)
        k = c.klass
        if k in (K.SELECT, K.INSERT, K.UPDATE, K.DELETE):
            d = self._traced(c.node, klass)
            if k is not K.SELECT and d.action is not Action.BLOCK:
                self._write_hold(c, d)
            return d
        if k is K.MERGE:
            return self._merge(c, klass)
        if k is K.COPY_TO:
            return self._copy_to(c, klass)
        if k is K.COPY_FROM:
            return self._copy_from(c, klass)
        if k is K.TRANSACTION:
            return _Decision(Action.ALLOW, klass, ["transaction control"])
        if k is K.SESSION:
            return self._session(c.node, klass)
        if k in (K.PREPARE, K.DECLARE):
            return self._prepare(c, klass)
        if k in (K.EXECUTE, K.FETCH):
            return self._execute(c, klass)
        if k in (K.DEALLOCATE, K.CLOSE_CURSOR):
            return self._release(c, klass)
        if k in (K.EXPLAIN, K.EXPLAIN_ANALYZE):
            return self._explain(c, klass)
        if k is K.LISTEN:
            channel = getattr(c.node, "conditionname", "")
            if channel in self.rules.notify_channels:
                return _Decision(Action.ALLOW, klass, ["LISTEN on an allowed channel"])
            return _block(
                klass, "LISTEN is a side channel; only rules' notify_channels may be used"
            )
        if k is K.UNLISTEN:
            return _Decision(Action.ALLOW, klass, ["UNLISTEN"])
        if k is K.NOTIFY:
            return _block(klass, "NOTIFY is a side channel and is not allowed")
        if k in (K.DO, K.CALL):
            return _block(klass, f"{k.name} runs procedural code the policy cannot inspect")
        if k is K.DDL:
            return self._ddl(c, klass)
        if c.hold_class is not None and self._held(c.hold_class):
            return _Decision(
                Action.HOLD, klass, [f"{c.hold_class} statements need approval"], c.hold_class
            )
        return _block(klass, f"{klass} statements are not allowed for agents")

    # -- checks on Postgres' parse tree ----------------------------------------------------------

    def _denied_functions(self, node: Any) -> str | None:
        for n in _walk(node):
            if isinstance(n, ast.FuncCall):
                name = _names(n.funcname)
                if name and is_denied(name[-1].lower()):
                    return f"function {name[-1]} is not allowed (side channel or side effect)"
        return None

    def _scan(self, node: Any, d: _Decision) -> str | None:
        """Every relation known and allowed, every function an allowlisted built-in."""
        ctes = {n.ctename for n in _walk(node) if isinstance(n, ast.CommonTableExpr) and n.ctename}
        for n in _walk(node):
            if isinstance(n, ast.RangeVar):
                if n.relname in DENIED_RELATIONS:
                    return f"relation {n.relname} exposes statistics or other sessions' data"
                if n.schemaname is None and n.relname in ctes:
                    continue
                rel = self.catalog.relation(n.schemaname, n.relname or "", self.search_path)
                if rel is None:
                    return "relation is not in the policy catalog (temporary or unknown)"
                if rel.oid in self.catalog.opaque:
                    return f"view {rel.qualified} cannot be traced"
                d.relations.add(rel.qualified)
            elif isinstance(n, ast.FuncCall):
                parts = _names(n.funcname)
                schema = parts[-2] if len(parts) > 1 else None
                name = parts[-1] if parts else ""
                funcs = self.catalog.functions(schema, name, self.search_path)
                if not funcs:
                    return f"function {name} is not in the policy catalog"
                if not all(f.is_builtin for f in funcs):
                    return f"function {name} is user-defined; its body cannot be inspected"
                if judge_builtin(name) is not FunctionVerdict.ALLOWED:
                    return f"function {name} is not on the built-in allowlist"
        return None

    # -- traced statements ---------------------------------------------------------------------

    def _traced(self, node: Any, klass: str) -> _Decision:
        d = _Decision(Action.ALLOW, klass)
        problem = self._scan(node, d)
        if problem:
            return _block(klass, problem, relations=d.relations)
        try:
            text = RawStream()(node)
            lineage = analyze(text, self.catalog, self.search_path)
        except LineageError as exc:
            return _block(klass, f"cannot trace column lineage: {exc}", relations=d.relations)
        expected = _target_count(node)
        if expected is not None and expected != len(lineage.columns):
            return _block(klass, "parsers disagree about the result columns", relations=d.relations)
        if _set_returning_calls(node) != lineage.set_returning:
            return _block(
                klass, "parsers disagree about set-returning functions", relations=d.relations
            )
        self._judge(lineage, d)
        return d

    def _judge(self, lineage: StatementLineage, d: _Decision) -> None:
        cat = self.catalog
        for oid in lineage.relations:
            rel = cat.relation_by_oid(oid)
            if rel is not None:
                d.relations.add(rel.qualified)
        inference: list[str] = []
        for use in lineage.shape:
            tagged = {ref: cat.tag(ref) for ref in use.sources if cat.tag(ref) is not None}
            if not tagged:
                continue
            tags = {t for ct in tagged.values() if ct is not None for t in ct.tags}
            if use.lookup and tags <= set(self.rules.equality_lookup_tags):
                continue
            for ref in tagged:
                d.columns.add(cat.column_name(ref))
            d.tags |= tags
            names = ", ".join(sorted(cat.column_name(r) for r in tagged))
            inference.append(
                f"tagged column {names} ({', '.join(sorted(tags))}) used in {use.clause}"
            )
        laundering: list[str] = []
        for w in lineage.writes:
            src_tags = {t for ref in w.sources if (ct := cat.tag(ref)) for t in ct.tags}
            if not src_tags:
                continue
            target = cat.tag(w.target)
            if target is None or not src_tags <= target.tags:
                laundering.append(
                    f"copies tagged data ({', '.join(sorted(src_tags))}) into "
                    f"{cat.column_name(w.target)}, which does not carry that tag"
                )
        plans: list[ColumnPlan] = []
        for col in lineage.columns:
            plans.append(self._column_plan(col.name, col.sources, col.direct, d))
        scrub = any(cat.tagged_refs_of(oid) for oid in lineage.relations)
        returns_tagged = any(p.masked for p in plans)
        max_rows = (
            self.rules.approvals.bulk_export_rows
            if (returns_tagged and self._held("bulk_export"))
            else None
        )
        # A statement that reads no tagged relation needs nothing done to its rows.
        if scrub or returns_tagged:
            d.result = LineageResult(tuple(plans), cat, self.masks, self.profile, scrub, max_rows)
        d.masks = tuple(
            ColumnMask(
                i,
                p.name,
                p.tag or ",".join(p.redact_tags),
                self.masks.operator_name(p.tag, self.profile) if p.tag else "redact",
            )
            for i, p in enumerate(plans)
            if p.masked
        )
        if laundering:
            d.action = Action.BLOCK
            d.reasons = laundering
        elif inference:
            if self.approvers:
                d.action, d.hold_class = Action.HOLD, "inference"
                d.reasons = [*inference, "inference channels need approval"]
            else:
                d.action = Action.BLOCK
                d.reasons = [*inference, "no approvers are configured for this agent"]
        elif returns_tagged:
            d.action = Action.MASK
            d.reasons = [f"masked {m.column} ({m.tag}: {m.operator})" for m in d.masks]
        else:
            d.action = Action.ALLOW
            d.reasons = ["no tagged column reaches the result or shapes it"]

    def _column_plan(
        self, name: str, sources: frozenset[Ref], direct: bool, d: _Decision
    ) -> ColumnPlan:
        cat = self.catalog
        tagged = [(ref, ct) for ref in sources if (ct := cat.tag(ref)) is not None]
        if not tagged:
            return ColumnPlan(name, sources, direct)
        tags = sorted({t for _, ct in tagged for t in ct.tags})
        d.tags |= set(tags)
        for ref, _ in tagged:
            d.columns.add(cat.column_name(ref))
        singles = {ct.single for _, ct in tagged}
        if direct and len(tagged) == len(sources) and len(singles) == 1 and None not in singles:
            return ColumnPlan(name, sources, direct, tag=tags[0])
        return ColumnPlan(name, sources, direct, redact_tags=tuple(tags))

    def _write_hold(self, c: Classified, d: _Decision) -> None:
        hold = None
        if c.hold_class is not None and self._held(c.hold_class):
            hold = c.hold_class
        elif c.unbounded_write and self._held("write_unbounded"):
            hold = "write_unbounded"
        if hold is not None:
            d.action, d.hold_class = Action.HOLD, hold
            d.reasons = [*d.reasons, f"{hold} statements need approval"]

    def _merge(self, c: Classified, klass: str) -> _Decision:
        d = _Decision(Action.ALLOW, klass, ["MERGE over untagged relations"])
        problem = self._scan(c.node, d)
        if problem:
            return _block(klass, problem)
        for n in _walk(c.node):
            if isinstance(n, ast.RangeVar):
                rel = self.catalog.relation(n.schemaname, n.relname or "", self.search_path)
                if rel is not None and self.catalog.tagged_refs_of(rel.oid):
                    return _block(klass, "MERGE over tagged relations cannot be traced")
        target = c.node.relation
        rel = self.catalog.relation(target.schemaname, target.relname or "", self.search_path)
        if rel is None:
            return _block(klass, "relation is not in the policy catalog (temporary or unknown)")
        every = {col.name: frozenset[Ref]() for col in rel.columns}
        for op in ("insert", "update", "delete"):
            for use in check_uses(self.catalog, rel, op, every):
                if any(self.catalog.tag(ref) is not None for ref in use.sources):
                    return _block(klass, f"MERGE fires {use.clause}, which tests tagged data")
        self._write_hold(c, d)
        return d

    def _copy_to(self, c: Classified, klass: str) -> _Decision:
        node = c.node
        if node.filename is not None or node.is_program:
            return _block(klass, "COPY to a server file or program is not allowed")
        if node.query is not None:
            d = self._traced(node.query, klass)
        else:
            rel = node.relation
            names = _names(node.attlist) or self._copied_columns(rel)
            cols = ", ".join(_quote(a) for a in names) or "*"
            name = (
                f"{_quote(rel.schemaname)}.{_quote(rel.relname)}"
                if rel.schemaname
                else _quote(rel.relname)
            )
            select = classify(f"SELECT {cols} FROM {name}")[0]
            d = self._traced(select.node, klass)
        if d.action is Action.BLOCK:
            return d
        tagged = d.result is not None and any(p.masked for p in d.result.columns)
        fmt, header, other = _copy_options(node)
        if tagged and (other or fmt == "binary"):
            why = "binary format" if fmt == "binary" else f"option {other}"
            return _block(klass, f"COPY of tagged data with {why} cannot be masked")
        if d.result is not None:
            d.result.copy_format, d.result.copy_header = fmt, header
        if tagged and self._held("bulk_export"):
            d.action, d.hold_class = Action.HOLD, "bulk_export"
            d.reasons = [*d.reasons, "COPY of tagged data is a bulk export"]
        return d

    def _copied_columns(self, rv: Any) -> list[str]:
        """The columns ``COPY rel TO`` writes: every column but the generated ones, which
        ``SELECT *`` would include. (Should the catalog not know a column as generated, the
        relay sees more columns planned than the CopyOutResponse announces and blocks.)
        Unknown relation: [] (``*``)."""
        rel = self.catalog.relation(rv.schemaname, rv.relname or "", self.search_path)
        if rel is None:
            return []
        return [col.name for col in rel.columns if not (col.generated or col.generated_from)]

    def _copy_from(self, c: Classified, klass: str) -> _Decision:
        node = c.node
        if node.filename is not None or node.is_program:
            return _block(klass, "COPY from a server file or program is not allowed")
        d = _Decision(Action.ALLOW, klass, ["COPY FROM STDIN into a known table"])
        problem = self._scan(node, d)
        if problem:
            return _block(klass, problem)
        rv = node.relation
        rel = self.catalog.relation(rv.schemaname, rv.relname or "", self.search_path)
        if rel is None:
            return _block(klass, "relation is not in the policy catalog (temporary or unknown)")
        # the rows are the agent's constants, but unique indexes, foreign keys and triggers
        # test them against stored values as an INSERT would
        names = _names(node.attlist) or [col.name for col in rel.columns]
        uses = check_uses(self.catalog, rel, "insert", {n: frozenset() for n in names})
        self._judge(StatementLineage((), tuple(uses), (), frozenset({rel.oid}), False), d)
        d.result, d.masks = None, ()  # nothing comes back but the command tag
        if d.action is Action.ALLOW:
            d.reasons = ["COPY FROM STDIN into a known table"]
            self._write_hold(c, d)
        return d

    def _session(self, node: Any, klass: str) -> _Decision:
        if isinstance(node, ast.VariableSetStmt):
            if node.kind == enums.VariableSetKind.VAR_RESET_ALL:
                return _Decision(Action.ALLOW, klass, ["RESET ALL"])
            name = (node.name or "").lower()
            if name in SAFE_SETTINGS:
                return _Decision(Action.ALLOW, klass, [f"setting {name} is harmless"])
            return _block(
                klass,
                f"changing {name or 'this setting'} is not allowed"
                + ("; schema-qualify names instead" if name == "search_path" else ""),
            )
        return _Decision(Action.ALLOW, klass, ["session command"])

    def _inner(self, c: Classified) -> _Decision:
        if c.inner is None:
            return _block(str(c.klass), "cannot find the wrapped statement")
        return self._decide(c.inner)

    def _prepare(self, c: Classified, klass: str) -> _Decision:
        """PREPARE and DECLARE run nothing yet: remember the wrapped statement's verdict for
        EXECUTE/FETCH, and block now only if it would be blocked."""
        inner = self._inner(c)
        name = getattr(c.node, "name", None) or getattr(c.node, "portalname", None) or ""
        store = self._prepared if c.klass is K.PREPARE else self._cursors
        if inner.action is Action.BLOCK:
            store.pop(name, None)
            return replace(inner, klass=klass, session_dependent=True)
        inner_sql = c.inner.sql if c.inner is not None else c.sql
        store[name] = self._verdict(inner_sql, [inner])
        if c.klass is K.PREPARE:
            self._prepared_sql[name] = inner_sql
        reason = f"{klass} only defines {name}; its rows are decided at EXECUTE/FETCH"
        return _Decision(
            Action.ALLOW,
            klass,
            [reason],
            relations=set(inner.relations),
            tags=set(inner.tags),
            session_dependent=True,
        )

    def _execute(self, c: Classified, klass: str) -> _Decision:
        node = c.node
        if c.klass is K.EXECUTE:
            for param in node.params or ():
                if any(not isinstance(n, _CONSTANT_NODES) for n in _walk(param)):
                    return _block(
                        klass, "EXECUTE parameters must be constants", session_dependent=True
                    )
            stored = self._prepared.get(node.name or "")
            sql = self._prepared_sql.get(node.name or "")
            if stored is not None and sql and stored.catalog_version != self.catalog.version:
                # Postgres plans a prepared statement again after DDL (a view redefined, a
                # column added): decide it again on today's catalog too
                stored = self._verdict(sql, [self._decide(c) for c in classify(sql)])
                self._prepared[node.name or ""] = stored
        else:
            stored = self._cursors.get(node.portalname or "")
            # MOVE returns no rows but says how many it passed: a count of the cursor's rows,
            # as much an inference as the rows themselves when they are held
            if node.ismove and stored is not None and stored.admits:
                return _Decision(Action.ALLOW, klass, ["MOVE"], session_dependent=True)
        if stored is None:
            return _block(klass, "unknown prepared statement or cursor", session_dependent=True)
        return _Decision(
            stored.action,
            klass,
            list(stored.reasons),
            hold_class=stored.hold_class,
            result=stored.result if isinstance(stored.result, LineageResult) else None,
            relations=set(stored.relations),
            columns=set(stored.columns),
            tags=set(stored.tags),
            masks=stored.masks,
            session_dependent=True,
        )

    def _release(self, c: Classified, klass: str) -> _Decision:
        node = c.node
        store = self._prepared if c.klass is K.DEALLOCATE else self._cursors
        name = getattr(node, "name", None) or getattr(node, "portalname", None)
        if name is None:
            store.clear()
        else:
            store.pop(name, None)
        return _Decision(
            Action.ALLOW, klass, ["releases a prepared statement or cursor"], session_dependent=True
        )

    def _explain(self, c: Classified, klass: str) -> _Decision:
        inner = self._inner(c)
        if inner.action is Action.BLOCK:
            return replace(inner, klass=klass)
        touches_tagged = inner.result is not None and inner.result.scrub_diagnostics
        if c.klass is K.EXPLAIN_ANALYZE and (touches_tagged or inner.tags):
            return _block(klass, "EXPLAIN ANALYZE over tagged relations is a side channel")
        d = replace(inner, klass=klass, result=None, masks=())
        if d.action is Action.HOLD and (
            c.klass is K.EXPLAIN_ANALYZE or d.hold_class == "inference"
        ):
            return d
        d.action, d.hold_class = Action.ALLOW, None
        d.reasons = ["EXPLAIN shows the plan, not the data"]
        return d

    def _shadowing(self, node: Any) -> str | None:
        """A temporary relation (or a rename to a name) that would hide a catalog relation in
        this session: the catalog never holds temporary objects, so the policy would go on
        deciding the name by the relation it hides while Postgres reads the new one."""
        targets: list[Any] = []
        if isinstance(node, ast.RenameStmt) and node.newname:
            rel = node.relation
            if (
                rel is not None
                and self.catalog.relation(rel.schemaname, rel.relname or "", self.search_path)
                is None
            ):
                targets.append(ast.RangeVar(relname=node.newname, relpersistence="t"))
        for n in _walk(node):
            if isinstance(n, ast.RangeVar):
                targets.append(n)
        for rv in targets:
            temporary = rv.relpersistence == "t" or rv.schemaname == "pg_temp"
            if not temporary or not rv.relname:
                continue
            if self.catalog.relation(None, rv.relname, self.search_path) is not None:
                return (
                    f"a temporary relation named {rv.relname} would shadow a relation the "
                    "policy knows; choose another name"
                )
        return None

    def _ddl(self, c: Classified, klass: str) -> _Decision:
        shadow = self._shadowing(c.node)
        if shadow:
            return _block(klass, shadow)
        reasons: list[str] = []
        query = None
        if isinstance(c.node, ast.CreateTableAsStmt):
            query = c.node.query
        elif isinstance(c.node, ast.SelectStmt) and c.node.intoClause is not None:
            return _block(klass, "SELECT INTO copies data into a new table; it is not allowed")
        if query is not None:
            traced = self._traced(query, klass)
            if traced.action is Action.BLOCK:
                return traced
            if traced.tags:
                reasons.append("copies tagged columns into a new, untagged table (laundering)")
        if c.hold_class is not None and self._held(c.hold_class):
            return _Decision(
                Action.HOLD,
                klass,
                [*reasons, f"{c.hold_class} statements need approval"],
                c.hold_class,
            )
        return _block(klass, reasons[0] if reasons else "DDL is not allowed for agents")


def _quote(name: str | None) -> str:
    return '"' + (name or "").replace('"', '""') + '"'


def _message(reasons: Sequence[str]) -> str:
    shown = "; ".join(list(dict.fromkeys(reasons))[:3])
    return f"pgproxy policy blocked this statement: {shown}"


def _safe_redact(sql: str, catalog: Catalog | None = None) -> str:
    """The audit's copy of ``sql``: literals and identifiers the catalog does not know replaced."""
    try:
        if catalog is None:
            return redact(sql, lambda _name: False)
        names = catalog.names()
        return redact(sql, names.__contains__)
    except Exception:
        return ""


def _safe_fingerprint(sql: str) -> str:
    try:
        return fingerprint(sql)
    except Exception:
        return ""


#: Statement classes that evaluate expressions over stored rows the lineage does not trace
#: (an index build, ALTER … TYPE … USING, ADD CONSTRAINT): their errors quote those rows.
_UNTRACED_CLASSES = frozenset({"ddl", "maintenance", "call", "do"})


def scrub_error(fields: dict[str, str], verdict: Verdict | None) -> dict[str, str]:
    """Error/notice fields to forward: pass-through unless the statement touched tagged data,
    ran expressions over stored rows untraced (DDL) or is unknown; then only severity and
    SQLSTATE, with a generic message and hint."""
    touches = (
        verdict is None
        or bool(verdict.tags)
        or not _UNTRACED_CLASSES.isdisjoint(verdict.statement_class.split(";"))
        or (verdict.result is not None and verdict.result.scrub_diagnostics)
    )
    if not touches:
        return fields
    out = {k: fields[k] for k in _KEPT_FIELDS if k in fields}
    code = fields.get("C", "XX000")
    message, hint = _CLASS_MESSAGES.get(code[:2], ("error", "check the statement"))
    out["M"] = f"{message} (details withheld by pgproxy: the statement touches protected data)"
    out["H"] = hint
    return out


def explain(rules: Rules, catalog: Catalog, masks: MaskCatalog, agent: str, sql: str) -> str:
    """The decision about ``sql`` for ``agent`` as text, for ``pgproxy explain``."""
    engine = PolicyEngine(rules, catalog, masks, agent)
    ctx = StatementContext(agent=agent, database="", origin="query")
    v = engine.statement(sql, ctx)
    lines = [f"decision: {v.action.value}"]
    if v.hold_class:
        lines.append(f"hold class: {v.hold_class}")
    lines.append(f"statement class: {v.statement_class}")
    lines.extend(f"reason: {r}" for r in v.reasons)
    if v.relations:
        lines.append(f"relations: {', '.join(v.relations)}")
    if v.tags:
        lines.append(f"tags: {', '.join(v.tags)}")
    for m in v.masks:
        lines.append(f"column {m.ordinal + 1} {m.column}: {m.tag} -> {m.operator}")
    if v.result is not None:
        if v.result.max_rows is not None:
            lines.append(f"row limit: {v.result.max_rows}")
        if v.result.scrub_diagnostics:
            lines.append("errors and notices: scrubbed")
    return "\n".join(lines) + "\n"
