"""Statement classification with Postgres' own grammar (pglast / libpg_query).

This module answers one question per statement: *what kind of statement is this*, and, for the
approval hold, *which hold class does it belong to* ("ddl", "privilege", "bulk_export", "write").
It never decides; ``decide`` does, and it blocks ``OTHER``.

Rules that are easy to get wrong, and why they are here:

* ``SELECT ... INTO t`` creates a table: DDL, not SELECT.
* A data-modifying CTE (``WITH x AS (DELETE ...) SELECT ...``) is the write it hides, found by
  walking the whole tree, not only the top-level ``WITH``.
* ``EXPLAIN ANALYZE`` executes its statement, so it inherits that statement's hold class; a plain
  ``EXPLAIN`` does not run anything.
* ``PREPARE``/``DECLARE``/``COPY (query)``/``CREATE TABLE AS`` carry the wrapped statement in
  ``inner``; ``PREPARE`` inherits the hold class of what it prepares (fail closed: the decider may
  hold at PREPARE time rather than trust a later ``EXECUTE`` lookup).
* ``DO`` runs arbitrary procedural code and is held as "ddl"; ``CALL`` may write and is "write".
* ``unbounded_write``: an UPDATE/DELETE anywhere in the tree whose WHERE references no column
  (absent, ``WHERE true``, ``WHERE 1=1``, ``WHERE $1``); ``WHERE CURRENT OF`` is bounded.
  TRUNCATE is DDL and also unbounded.

Errors never carry SQL text: a parse failure becomes ``ClassifyError`` with the parser's reason
cut before any quoted fragment of the input.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from pglast import ast, parser
from pglast.stream import RawStream


class StatementClass(enum.StrEnum):
    SELECT = "select"
    INSERT = "insert"
    UPDATE = "update"
    DELETE = "delete"
    MERGE = "merge"
    COPY_TO = "copy_to"
    COPY_FROM = "copy_from"
    DDL = "ddl"
    PRIVILEGE = "privilege"
    TRANSACTION = "transaction"
    SESSION = "session"
    PREPARE = "prepare"
    EXECUTE = "execute"
    DEALLOCATE = "deallocate"
    DECLARE = "declare"
    FETCH = "fetch"
    CLOSE_CURSOR = "close_cursor"
    EXPLAIN = "explain"
    EXPLAIN_ANALYZE = "explain_analyze"
    LISTEN = "listen"
    NOTIFY = "notify"
    UNLISTEN = "unlisten"
    DO = "do"
    CALL = "call"
    MAINTENANCE = "maintenance"
    LOCK = "lock"
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class Classified:
    klass: StatementClass
    hold_class: str | None
    sql: str
    node: Any
    unbounded_write: bool
    inner: Classified | None = None


class ClassifyError(Exception):
    """The SQL could not be parsed. The message never contains SQL text."""


_DDL = "ddl"
_PRIVILEGE = "privilege"
_BULK_EXPORT = "bulk_export"
_WRITE = "write"

# Statement node -> (class, hold class). Statements needing a look inside are handled in code.
_SIMPLE: dict[type[ast.Node], tuple[StatementClass, str | None]] = {
    ast.TransactionStmt: (StatementClass.TRANSACTION, None),
    ast.ConstraintsSetStmt: (StatementClass.TRANSACTION, None),
    ast.VariableShowStmt: (StatementClass.SESSION, None),
    ast.DiscardStmt: (StatementClass.SESSION, None),
    ast.ExecuteStmt: (StatementClass.EXECUTE, None),
    ast.DeallocateStmt: (StatementClass.DEALLOCATE, None),
    ast.FetchStmt: (StatementClass.FETCH, None),
    ast.ClosePortalStmt: (StatementClass.CLOSE_CURSOR, None),
    ast.ListenStmt: (StatementClass.LISTEN, None),
    ast.NotifyStmt: (StatementClass.NOTIFY, None),
    ast.UnlistenStmt: (StatementClass.UNLISTEN, None),
    ast.DoStmt: (StatementClass.DO, _DDL),
    ast.CallStmt: (StatementClass.CALL, _WRITE),
    ast.LockStmt: (StatementClass.LOCK, None),
    ast.CheckPointStmt: (StatementClass.MAINTENANCE, None),
    ast.ClusterStmt: (StatementClass.MAINTENANCE, _DDL),
    ast.ReindexStmt: (StatementClass.MAINTENANCE, _DDL),
    ast.InsertStmt: (StatementClass.INSERT, _WRITE),
    ast.UpdateStmt: (StatementClass.UPDATE, _WRITE),
    ast.DeleteStmt: (StatementClass.DELETE, _WRITE),
    ast.MergeStmt: (StatementClass.MERGE, _WRITE),
}

_PRIVILEGE_NODES: frozenset[type[ast.Node]] = frozenset(
    {
        ast.GrantStmt,
        ast.GrantRoleStmt,
        ast.CreateRoleStmt,
        ast.AlterRoleStmt,
        ast.AlterRoleSetStmt,
        ast.DropRoleStmt,
        ast.AlterSystemStmt,
        ast.AlterDefaultPrivilegesStmt,
        ast.ReassignOwnedStmt,
        ast.DropOwnedStmt,
    }
)

# Every other catalog-changing statement. Anything not listed anywhere is OTHER (blocked).
_DDL_NODES: frozenset[type[ast.Node]] = frozenset(
    getattr(ast, name)
    for name in [
        "AlterCollationStmt",
        "AlterDatabaseRefreshCollStmt",
        "AlterDatabaseSetStmt",
        "AlterDatabaseStmt",
        "AlterDomainStmt",
        "AlterEnumStmt",
        "AlterEventTrigStmt",
        "AlterExtensionContentsStmt",
        "AlterExtensionStmt",
        "AlterFdwStmt",
        "AlterForeignServerStmt",
        "AlterFunctionStmt",
        "AlterObjectDependsStmt",
        "AlterObjectSchemaStmt",
        "AlterOpFamilyStmt",
        "AlterOperatorStmt",
        "AlterOwnerStmt",
        "AlterPolicyStmt",
        "AlterPublicationStmt",
        "AlterSeqStmt",
        "AlterStatsStmt",
        "AlterSubscriptionStmt",
        "AlterTSConfigurationStmt",
        "AlterTSDictionaryStmt",
        "AlterTableMoveAllStmt",
        "AlterTableSpaceOptionsStmt",
        "AlterTableStmt",
        "AlterTypeStmt",
        "AlterUserMappingStmt",
        "CommentStmt",
        "CompositeTypeStmt",
        "CreateAmStmt",
        "CreateCastStmt",
        "CreateConversionStmt",
        "CreateDomainStmt",
        "CreateEnumStmt",
        "CreateEventTrigStmt",
        "CreateExtensionStmt",
        "CreateFdwStmt",
        "CreateForeignServerStmt",
        "CreateForeignTableStmt",
        "CreateFunctionStmt",
        "CreateOpClassStmt",
        "CreateOpFamilyStmt",
        "CreatePLangStmt",
        "CreatePolicyStmt",
        "CreatePublicationStmt",
        "CreateRangeStmt",
        "CreateSchemaStmt",
        "CreateSeqStmt",
        "CreateStatsStmt",
        "CreateStmt",
        "CreateSubscriptionStmt",
        "CreateTableSpaceStmt",
        "CreateTransformStmt",
        "CreateTrigStmt",
        "CreateUserMappingStmt",
        "CreatedbStmt",
        "DefineStmt",
        "DropStmt",
        "DropSubscriptionStmt",
        "DropTableSpaceStmt",
        "DropUserMappingStmt",
        "DropdbStmt",
        "ImportForeignSchemaStmt",
        "IndexStmt",
        "RefreshMatViewStmt",
        "RenameStmt",
        "ReplicaIdentityStmt",
        "RuleStmt",
        "SecLabelStmt",
        "TruncateStmt",
        "ViewStmt",
    ]
    if hasattr(ast, name)
)

#: Settings whose change alters identity or bypasses triggers/rules: privilege, not session.
_PRIVILEGED_SETTINGS = frozenset({"role", "session_authorization", "session_replication_role"})

_WRITE_NODES: tuple[tuple[type[ast.Node], StatementClass], ...] = (
    (ast.DeleteStmt, StatementClass.DELETE),
    (ast.MergeStmt, StatementClass.MERGE),
    (ast.UpdateStmt, StatementClass.UPDATE),
    (ast.InsertStmt, StatementClass.INSERT),
)


def classify(sql: str) -> list[Classified]:
    """Classify every statement in ``sql``; ``[]`` when it holds none (empty, comments only)."""
    try:
        raw = parser.parse_sql(sql)
    except parser.ParseError as exc:
        raise ClassifyError(f"unparseable SQL: {_safe_reason(exc)}") from None
    except Exception:  # libpg_query limits (stack depth, memory): still no SQL in the message
        raise ClassifyError("unparseable SQL") from None
    out: list[Classified] = []
    for stmt in raw or ():
        start = stmt.stmt_location or 0
        end = start + stmt.stmt_len if stmt.stmt_len else len(sql)
        out.append(_classify_node(stmt.stmt, sql[start:end].strip()))
    return out


def _safe_reason(exc: parser.ParseError) -> str:
    """The parser's reason without the ``at or near "<input>"`` part that echoes SQL."""
    reason = str(exc.args[0]) if exc.args else "syntax error"
    for cut in (" at or near", '"', "'"):
        reason = reason.split(cut, 1)[0]
    location = exc.args[1] if len(exc.args) > 1 else None
    return f"{reason.strip()} at position {location}" if location is not None else reason.strip()


def _classify_node(node: Any, sql: str) -> Classified:
    kind = type(node)
    unbounded = _has_unbounded_write(node)

    if kind is ast.SelectStmt:
        if node.intoClause is not None:
            return Classified(StatementClass.DDL, _DDL, sql, node, unbounded)
        hidden = _hidden_write(node)
        if hidden is not None:
            return Classified(hidden, _WRITE, sql, node, unbounded)
        return Classified(StatementClass.SELECT, None, sql, node, unbounded)

    if kind in _SIMPLE:
        klass, hold = _SIMPLE[kind]
        return Classified(klass, hold, sql, node, unbounded)

    if kind is ast.VariableSetStmt:
        name = (node.name or "").lower()
        if name in _PRIVILEGED_SETTINGS:
            return Classified(StatementClass.PRIVILEGE, _PRIVILEGE, sql, node, unbounded)
        if name.startswith("transaction"):  # SET TRANSACTION ..., SET TRANSACTION SNAPSHOT
            return Classified(StatementClass.TRANSACTION, None, sql, node, unbounded)
        return Classified(StatementClass.SESSION, None, sql, node, unbounded)

    if kind in _PRIVILEGE_NODES:
        return Classified(StatementClass.PRIVILEGE, _PRIVILEGE, sql, node, unbounded)

    if kind is ast.TruncateStmt:
        return Classified(StatementClass.DDL, _DDL, sql, node, True)

    if kind in _DDL_NODES:
        return Classified(StatementClass.DDL, _DDL, sql, node, unbounded)

    if kind is ast.VacuumStmt:
        hold = _DDL if node.is_vacuumcmd and _option_on(node.options, "full") else None
        return Classified(StatementClass.MAINTENANCE, hold, sql, node, unbounded)

    if kind is ast.CopyStmt:
        inner = _inner(node.query, sql)
        if node.is_from:
            return Classified(StatementClass.COPY_FROM, _WRITE, sql, node, unbounded, inner)
        return Classified(StatementClass.COPY_TO, _BULK_EXPORT, sql, node, unbounded, inner)

    if kind is ast.ExplainStmt:
        inner = _inner(node.query, sql)
        if _option_on(node.options, "analyze"):
            hold = inner.hold_class if inner is not None else None
            return Classified(StatementClass.EXPLAIN_ANALYZE, hold, sql, node, unbounded, inner)
        return Classified(StatementClass.EXPLAIN, None, sql, node, False, inner)

    if kind is ast.PrepareStmt:
        inner = _inner(node.query, sql)
        hold = inner.hold_class if inner is not None else None
        return Classified(StatementClass.PREPARE, hold, sql, node, unbounded, inner)

    if kind is ast.DeclareCursorStmt:
        inner = _inner(node.query, sql)
        hold = inner.hold_class if inner is not None else None
        return Classified(StatementClass.DECLARE, hold, sql, node, unbounded, inner)

    if kind is ast.CreateTableAsStmt:
        inner = _inner(node.query, sql)
        return Classified(StatementClass.DDL, _DDL, sql, node, unbounded, inner)

    return Classified(StatementClass.OTHER, None, sql, node, unbounded)


def _inner(query: Any, outer_sql: str) -> Classified | None:
    """Classify a wrapped statement; its ``sql`` is pglast's deparse, else the outer text."""
    if not isinstance(query, ast.Node):
        return None
    try:
        text = RawStream()(query)
    except Exception:
        text = outer_sql
    return _classify_node(query, text)


def _option_on(options: Any, name: str) -> bool:
    """Whether a DefElem option list turns ``name`` on (``ANALYZE``, ``(ANALYZE true)``...)."""
    for opt in options or ():
        if not isinstance(opt, ast.DefElem) or (opt.defname or "").lower() != name:
            continue
        arg = opt.arg
        if arg is None:
            return True
        value = getattr(arg, "sval", None)
        if value is None:
            value = getattr(arg, "boolval", None)
        if value is None:
            value = getattr(arg, "ival", None)
        return str(value).lower() not in {"false", "off", "0", "no"}
    return False


def walk_nodes(node: Any) -> Iterator[Any]:
    """Every pglast ``ast.Node`` below (and including) ``node``, in no particular order."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, ast.Node):
            yield item
            slots: Iterable[str] = getattr(type(item), "__slots__", ())
            stack.extend(getattr(item, attr, None) for attr in slots)
        elif isinstance(item, list | tuple):
            stack.extend(item)


def _hidden_write(node: Any) -> StatementClass | None:
    """The most severe data-modifying statement nested anywhere in a SELECT, if any."""
    found = {type(n) for n in walk_nodes(node)}
    for write_kind, klass in _WRITE_NODES:
        if write_kind in found:
            return klass
    return None


def _has_unbounded_write(node: Any) -> bool:
    for n in walk_nodes(node):
        if isinstance(n, ast.UpdateStmt | ast.DeleteStmt) and _unbounded_where(n.whereClause):
            return True
    return False


def _unbounded_where(where: Any) -> bool:
    """A WHERE that cannot tell rows apart: absent, or referencing no column at all."""
    if where is None:
        return True
    return not any(isinstance(n, ast.ColumnRef | ast.CurrentOfExpr) for n in walk_nodes(where))
