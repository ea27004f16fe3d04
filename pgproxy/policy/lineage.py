"""Column lineage: which catalog columns each result column and each row-shaping clause reads.

Input is one statement's SQL as Postgres' own parser understood it (the decision engine passes
pglast's deparse, so sqlglot never sees the agent's original spelling) and a ``Catalog``. Output
is a ``StatementLineage``:

* ``columns``: every result column (SELECT list or RETURNING), the catalog columns it derives
  from and whether it is the bare column ("direct") or computed from it;
* ``shape``: every clause that uses catalog columns to choose, order, group or count rows
  (WHERE, JOIN, GROUP BY, HAVING, ORDER BY, DISTINCT, window specs, FILTER, CASE WHEN, LIMIT,
  TABLESAMPLE, deduplicating set operations, arguments of set-returning functions and of
  functions in FROM), every result or written value computed by something that can raise
  an error on its input, and every check Postgres makes against stored values when a row is
  written (unique indexes, foreign keys, CHECK constraints, triggers: ``check_uses``) -- the
  inference channels;
* ``writes``: for INSERT/UPDATE, which target column receives data derived from which columns.

The walk is scope based over sqlglot's tree and deliberately conservative: whole-row references
(``p``, ``p.*`` inside a function, ``p::text``) expand to every column of ``p``; a name that
cannot be resolved taints the column with every tagged column of every relation the statement
touches; an unknown relation, an opaque view or a construct the walk does not understand raises
``LineageError`` (the engine then blocks).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import sqlglot
from sqlglot import exp

from pgproxy.policy.catalog import Catalog, Column, Ref, Relation

#: Set-returning built-ins (the allowlisted ones): how many rows they return depends on their
#: arguments, so a tagged argument is a row-count inference channel wherever the call appears.
SET_RETURNING: frozenset[str] = frozenset(
    {
        "generate_series",
        "generate_subscripts",
        "unnest",
        "regexp_matches",
        "regexp_split_to_table",
        "string_to_table",
        "json_each",
        "json_each_text",
        "jsonb_each",
        "jsonb_each_text",
        "json_array_elements",
        "json_array_elements_text",
        "jsonb_array_elements",
        "jsonb_array_elements_text",
        "json_object_keys",
        "jsonb_object_keys",
        "jsonb_path_query",
    }
)
#: how sqlglot spells some of them
_SET_RETURNING_NODES: tuple[type, ...] = (
    exp.Explode,
    exp.ExplodeOuter,
    exp.ExplodingGenerateSeries,
    exp.GenerateSeries,
    exp.Posexplode,
    exp.PosexplodeOuter,
    exp.Unnest,
)


def is_set_returning(e: object) -> bool:
    """Whether a sqlglot node is a call of a set-returning function."""
    if isinstance(e, _SET_RETURNING_NODES):
        return True
    return isinstance(e, exp.Anonymous) and str(e.this).lower() in SET_RETURNING


FALLIBLE = "an expression that can fail on the data"

# -- error channels --------------------------------------------------------------------------
#
# Whether a statement fails is one bit the agent always sees, scrubbed message or not: a result
# column computed from tagged data by something that can raise on its input (``ssn::int``,
# ``1 / (ascii(ssn) - 57)``, ``to_date(ssn, …)``, a pattern built from data) is an oracle. Such a
# column is recorded as a row-shaping use ("an expression that can fail on the data"). What never
# raises is listed; everything else is assumed to.

#: nodes that never raise, whatever their arguments
_TOTAL_NODES: tuple[type[exp.Expression], ...] = (
    exp.Alias, exp.Paren, exp.Column, exp.Literal, exp.Null, exp.Boolean, exp.Star,
    exp.Identifier, exp.Var, exp.DataType, exp.DataTypeParam, exp.Tuple, exp.Array,
    exp.Bracket, exp.Distinct, exp.Order, exp.Ordered, exp.Window, exp.WindowSpec, exp.Filter,
    exp.Case, exp.If, exp.Is, exp.Not, exp.And, exp.Or, exp.EQ, exp.NEQ, exp.GT, exp.GTE,
    exp.LT, exp.LTE, exp.NullSafeEQ, exp.NullSafeNEQ, exp.In, exp.Between, exp.Any, exp.All,
    exp.Exists, exp.DPipe, exp.Concat, exp.ConcatWs, exp.Coalesce, exp.Nullif, exp.Greatest,
    exp.Least, exp.Upper, exp.Lower, exp.Initcap, exp.Length, exp.MD5, exp.SHA, exp.SHA2,
    exp.SHA2Digest, exp.Reverse, exp.Trim, exp.Replace, exp.Translate, exp.StrPosition,
    exp.StartsWith, exp.ArrayAgg, exp.JSONArrayAgg, exp.GroupConcat, exp.Count, exp.Min,
    exp.Max, exp.Sum, exp.Avg, exp.Ascii, exp.Neg, exp.LogicalAnd, exp.LogicalOr,
    exp.Stddev, exp.StddevPop, exp.StddevSamp, exp.Variance, exp.VariancePop,
    exp.StringToArray, exp.ArrayToString, exp.ArraySize, exp.Collate, exp.Dot,
    exp.JSONExtract, exp.JSONExtractScalar, exp.JSONBExtract, exp.JSONBExtractScalar,
    exp.JSONPath, exp.JSONPathKey, exp.JSONPathRoot, exp.JSONPathSubscript,
    exp.CurrentDate, exp.CurrentTimestamp, exp.CurrentTime,
    exp.Placeholder, exp.Parameter,
    # query structure: a subquery's own columns are checked where they are projected
    exp.Subquery, exp.Select, exp.From, exp.Where, exp.Table, exp.TableAlias, exp.Join,
    exp.Limit, exp.Offset, exp.Group, exp.Having, exp.Union, exp.Intersect, exp.Except,
    exp.With, exp.CTE, exp.Lateral, exp.Values,
)  # fmt: skip

#: nodes that raise only on their control arguments (a pattern, a format, a length, a unit):
#: total when those are constants; the value is the named argument
_DATA_ARG: dict[type[exp.Expression], str] = {
    exp.TimeToStr: "this",  # to_char(value, format)
    exp.Substring: "this",
    exp.Left: "this",
    exp.Right: "this",
    exp.Pad: "this",
    exp.RegexpReplace: "this",
    exp.RegexpLike: "this",
    exp.RegexpILike: "this",
    exp.RegexpCount: "this",
    exp.Like: "this",
    exp.ILike: "this",
    exp.SimilarTo: "this",
    exp.SplitPart: "this",
    exp.TimestampTrunc: "this",
    exp.DateTrunc: "this",
    exp.Extract: "expression",
    exp.Encode: "this",
    exp.Format: "expressions",
}

#: built-ins sqlglot leaves anonymous: never raise
_TOTAL_FUNCTIONS: frozenset[str] = frozenset(
    """
    to_json to_jsonb row_to_json json_build_object jsonb_build_object json_build_array
    jsonb_build_array jsonb_agg json_agg octet_length bit_length char_length character_length
    quote_literal quote_nullable quote_ident age cardinality jsonb_typeof json_typeof isfinite
    jsonb_strip_nulls json_strip_nulls array_append array_prepend array_cat array_position
    array_positions array_remove array_replace array_length btrim ltrim rtrim md5 sha224 sha256
    sha384 sha512 upper lower initcap length concat concat_ws strpos starts_with row
    json_extract_path json_extract_path_text jsonb_extract_path jsonb_extract_path_text
    bool_and bool_or every any_value
    """.split()  # noqa: SIM905
)

#: built-ins sqlglot leaves anonymous that raise only on control arguments: which positions
#: may carry data
_FIRST_ARG_DATA: frozenset[str] = frozenset(
    """
    regexp_match regexp_matches regexp_count regexp_instr regexp_substr regexp_like
    regexp_split_to_array regexp_split_to_table substr substring left right lpad rpad
    split_part to_char encode replace translate position
    """.split()  # noqa: SIM905
)
_DATA_POSITIONS: dict[str, tuple[int, ...]] = {
    **dict.fromkeys(_FIRST_ARG_DATA, (0,)),
    "date_trunc": (1,),
    "date_part": (1,),
    "timezone": (1,),
}

_TEXT_TYPES: frozenset[object] = frozenset(
    {
        exp.DataType.Type.TEXT,
        exp.DataType.Type.VARCHAR,
        exp.DataType.Type.CHAR,
        exp.DataType.Type.NCHAR,
        exp.DataType.Type.NVARCHAR,
        exp.DataType.Type.BPCHAR,
        exp.DataType.Type.NAME,
    }
)


def _constant_arg(e: exp.Expression) -> bool:
    while isinstance(e, exp.Cast | exp.Paren | exp.Neg):
        e = e.this
    return isinstance(e, exp.Literal | exp.Null | exp.Var | exp.Boolean | exp.Placeholder)


def _node_total(e: exp.Expression) -> bool:
    """Whether ``e`` itself (not its children) cannot raise on the values it is given."""
    if isinstance(e, exp.Anonymous):
        name = str(e.this).lower()
        if name in _TOTAL_FUNCTIONS:
            return True
        positions = _DATA_POSITIONS.get(name)
        if positions is None:
            return False
        return all(_constant_arg(a) for i, a in enumerate(e.expressions) if i not in positions)
    data = _DATA_ARG.get(type(e))
    if data is not None:
        return all(
            _constant_arg(child)
            for key, value in e.args.items()
            if key != data
            for child in (value if isinstance(value, list) else [value])
            if isinstance(child, exp.Expression)
        )
    if isinstance(e, exp.Cast):
        to = e.args.get("to")
        return isinstance(to, exp.DataType) and to.this in _TEXT_TYPES
    if isinstance(e, exp.Div | exp.Mod):
        # a positive integer written as such: neither zero nor -1 (INT_MIN / -1 overflows),
        # and a value the shape key keeps or never confuses with one of those
        divisor = e.expression
        return (
            isinstance(divisor, exp.Literal)
            and not divisor.is_string
            and divisor.name.isdigit()
            and int(divisor.name) > 0
        )
    return isinstance(e, _TOTAL_NODES)


_LITERAL_NODES: tuple[type[exp.Expression], ...] = (
    exp.Literal, exp.Null, exp.Boolean, exp.Var, exp.DataType, exp.DataTypeParam, exp.Paren,
    exp.Neg, exp.Cast, exp.Identifier, exp.Dot, exp.Interval, exp.Add, exp.Sub, exp.Mul,
    exp.Div, exp.Mod,
)  # fmt: skip


#: nodes whose result may be NULL depending on a value (not only on a column being NULL)
_NULL_MAKERS: tuple[type, ...] = (
    exp.Nullif, exp.Case, exp.If, exp.Bracket, exp.JSONExtract, exp.JSONExtractScalar,
    exp.JSONBExtract, exp.JSONBExtractScalar, exp.Subquery, exp.Anonymous, exp.Window,
)  # fmt: skip

#: nodes that cannot raise whatever constants stand beside a NULL or non-NULL argument
_NULL_SAFE: tuple[type, ...] = (
    exp.Alias, exp.Paren, exp.Is, exp.Not, exp.And, exp.Or, exp.EQ, exp.NEQ, exp.GT, exp.GTE,
    exp.LT, exp.LTE, exp.NullSafeEQ, exp.NullSafeNEQ, exp.In, exp.Between, exp.Coalesce,
    exp.Nullif, exp.Case, exp.If, exp.Concat, exp.ConcatWs, exp.Greatest, exp.Least, exp.Count,
    exp.Min, exp.Max, exp.ArrayAgg, exp.GroupConcat, exp.JSONArrayAgg, exp.Array, exp.Tuple,
    exp.Upper, exp.Lower, exp.Length, exp.MD5, exp.Distinct, exp.Order, exp.Ordered,
)  # fmt: skip


def _makes_null(node: exp.Expression) -> bool:
    if isinstance(node, exp.Anonymous):
        return str(node.this).lower() not in _NULL_FAITHFUL_FUNCTIONS
    return isinstance(node, _NULL_MAKERS)


#: built-ins sqlglot leaves anonymous whose result is NULL exactly when an argument is
_NULL_FAITHFUL_FUNCTIONS: frozenset[str] = frozenset(
    """
    to_json to_jsonb row_to_json json_build_object jsonb_build_object json_build_array
    jsonb_build_array octet_length bit_length char_length character_length quote_literal
    quote_nullable quote_ident age btrim ltrim rtrim md5 sha224 sha256 sha384 sha512 upper
    lower initcap length concat concat_ws starts_with strpos isfinite row
    """.split()  # noqa: SIM905
)


def _null_safe(node: exp.Expression) -> bool:
    if isinstance(node, exp.Cast):
        to = node.args.get("to")
        return isinstance(to, exp.DataType) and to.this in _TEXT_TYPES
    if isinstance(node, exp.Anonymous):
        return str(node.this).lower() in _NULL_SAFE_FUNCTIONS
    return isinstance(node, _NULL_SAFE)


_NULL_SAFE_FUNCTIONS: frozenset[str] = frozenset(
    """
    to_json to_jsonb json_build_object jsonb_build_object json_build_array jsonb_build_array
    jsonb_agg json_agg row
    """.split()  # noqa: SIM905
)


def can_fail(e: exp.Expression) -> bool:
    """Whether evaluating ``e`` may raise depending on the values it reads (conservative).

    Expressions of literals only are folded when Postgres plans the statement, so whether they
    raise does not depend on any row: they are skipped. Strict functions skip NULL arguments,
    so a bad constant (``substr(x, 1, -1)``, an invalid pattern or unit) raises exactly when the
    argument is not NULL: harmless for a column (whether it is NULL is not protected), an oracle
    under ``nullif(ssn, '…')``, a CASE or anything else whose NULL depends on a value. Such a
    node may therefore only sit under nodes that cannot raise whatever their constants are."""
    stack: list[tuple[exp.Expression, bool]] = [(e, False)]
    while stack:
        node, strict_above = stack.pop()
        if all(isinstance(n, _LITERAL_NODES) for n in node.walk()):
            continue
        if not _node_total(node):
            return True
        if strict_above and _makes_null(node) and not _literal_free_of_data(node):
            return True
        below = strict_above or not _null_safe(node)
        stack.extend((child, below) for child in node.iter_expressions())
    return False


def _literal_free_of_data(node: exp.Expression) -> bool:
    """A subtree that reads no column (its NULL cannot depend on data)."""
    return not any(True for _ in node.find_all(exp.Column))


#: a placeholder source meaning "could be anything tagged in this statement"
_TAINT: Ref = (-1, -1)
_NO_REFS: frozenset[Ref] = frozenset()


class LineageError(Exception):
    """The statement cannot be traced; the message never contains data values."""


@dataclass(frozen=True, slots=True)
class Flow:
    """Where a value comes from: catalog columns, and whether it is one of them unchanged."""

    refs: frozenset[Ref] = _NO_REFS
    direct: bool = False


_EMPTY = Flow()


def _union(flows: Iterable[Flow]) -> Flow:
    refs: set[Ref] = set()
    for f in flows:
        refs |= f.refs
    return Flow(frozenset(refs), False)


@dataclass(frozen=True, slots=True)
class OutputColumn:
    name: str
    sources: frozenset[Ref]
    direct: bool


@dataclass(frozen=True, slots=True)
class ShapeUse:
    """Catalog columns used to shape rows in ``clause``; ``lookup`` marks ``col = $1``/literal."""

    clause: str
    sources: frozenset[Ref]
    lookup: bool = False


@dataclass(frozen=True, slots=True)
class WriteFlow:
    target: Ref
    sources: frozenset[Ref]


@dataclass(frozen=True, slots=True)
class StatementLineage:
    columns: tuple[OutputColumn, ...]
    shape: tuple[ShapeUse, ...]
    writes: tuple[WriteFlow, ...]
    relations: frozenset[int]
    tainted: bool
    #: how many set-returning calls sqlglot's tree has (the engine compares with Postgres')
    set_returning: int = 0


@dataclass(slots=True)
class _Source:
    name: str
    columns: list[tuple[str, Flow]]
    #: for table functions: what any of its columns carries
    func_flow: Flow | None = None

    def column(self, name: str) -> Flow | None:
        for col, flow in self.columns:
            if col == name:
                return flow
        if self.func_flow is not None and name == self.name:
            return self.func_flow
        return None

    def whole(self) -> Flow:
        flows = [f for _, f in self.columns]
        if self.func_flow is not None:
            flows.append(self.func_flow)
        return _union(flows)


@dataclass(slots=True)
class _Scope:
    parent: _Scope | None
    ctes: dict[str, list[tuple[str, Flow]]] = field(default_factory=dict)
    sources: list[_Source] = field(default_factory=list)
    #: what ``*`` expands to, join USING/NATURAL merges applied
    star: list[tuple[str, Flow]] = field(default_factory=list)

    def cte(self, name: str) -> list[tuple[str, Flow]] | None:
        scope: _Scope | None = self
        while scope is not None:
            if name in scope.ctes:
                return scope.ctes[name]
            scope = scope.parent
        return None

    def source(self, name: str) -> _Source | None:
        return next((s for s in reversed(self.sources) if s.name == name), None)


def ident(node: exp.Expression | str | None) -> str:
    """An identifier as Postgres folds it: quoted kept, unquoted lower-cased."""
    if node is None:
        return ""
    if isinstance(node, str):
        return node.lower()
    if isinstance(node, exp.Identifier):
        return str(node.this) if node.args.get("quoted") else str(node.this).lower()
    return node.name.lower()


def _arg(node: exp.Expression, *names: str) -> exp.Expression | None:
    for name in names:
        value = node.args.get(name)
        if isinstance(value, exp.Expression):
            return value
    return None


def _args(node: exp.Expression, name: str) -> list[exp.Expression]:
    value = node.args.get(name)
    return [v for v in value if isinstance(v, exp.Expression)] if isinstance(value, list) else []


def _output_name(e: exp.Expression) -> str:
    if isinstance(e, exp.Alias):
        return ident(e.args.get("alias"))
    if isinstance(e, exp.Column):
        return ident(e.this)
    if isinstance(e, exp.Cast):
        return _output_name(e.this)
    if isinstance(e, exp.Anonymous):
        return str(e.this).lower()
    if isinstance(e, exp.Case):
        return "case"
    if isinstance(e, exp.Func):
        return e.sql_name().lower()
    return "?column?"


def _is_constant(e: exp.Expression) -> bool:
    """A literal or a parameter, possibly cast: what ``col = $1`` compares against."""
    while isinstance(e, exp.Cast | exp.Paren):
        e = e.this
    return isinstance(e, exp.Literal | exp.Parameter | exp.Placeholder | exp.Null)


def _conjuncts(e: exp.Expression) -> list[exp.Expression]:
    while isinstance(e, exp.Paren):
        e = e.this
    if isinstance(e, exp.And):
        return [*_conjuncts(e.this), *_conjuncts(e.expression)]
    return [e]


class _Walker:
    def __init__(self, catalog: Catalog, search_path: Sequence[str]) -> None:
        self.catalog = catalog
        self.search_path = tuple(search_path)
        self.shape: list[ShapeUse] = []
        self.writes: list[WriteFlow] = []
        self.relations: set[int] = set()
        self.tainted = False
        self.depth = 0

    # -- helpers ------------------------------------------------------------------------------

    def _taint(self) -> Flow:
        self.tainted = True
        return Flow(frozenset({_TAINT}), False)

    def _record(self, clause: str, flow: Flow, lookup: bool = False) -> None:
        if flow.refs:
            self.shape.append(ShapeUse(clause, flow.refs, lookup))

    def _value(self, e: exp.Expression, scope: _Scope) -> Flow:
        """A value that reaches a result or a table: whether it can fail is an inference
        channel too (see ``can_fail``)."""
        flow = self.expr(e, scope)
        if flow.refs and not flow.direct and can_fail(e):
            self._record(FALLIBLE, flow)
        return flow

    def _relation(self, table: exp.Table) -> Relation:
        name = ident(table.this)
        schema = ident(table.args.get("db")) if table.args.get("db") else None
        rel = self.catalog.relation(schema, name, self.search_path)
        if rel is None:
            raise LineageError("unknown relation")
        if rel.oid in self.catalog.opaque:
            raise LineageError(f"view {rel.qualified} cannot be traced")
        self.relations.add(rel.oid)
        # a partition holds the rows whose key falls in its bounds: naming it is a WHERE on
        # the key
        self._record("the choice of a partition", Flow(self.catalog.partition_keys_above(rel.oid)))
        self._record(
            f"the definition of view {rel.qualified}", Flow(self.catalog.shaped_by(rel.oid))
        )
        return rel

    # -- queries ------------------------------------------------------------------------------

    def query(self, q: exp.Expression, outer: _Scope | None) -> list[tuple[str, Flow]]:
        self.depth += 1
        if self.depth > 200:
            raise LineageError("statement nested too deeply")
        try:
            return self._query(q, outer)
        finally:
            self.depth -= 1

    def _query(self, q: exp.Expression, outer: _Scope | None) -> list[tuple[str, Flow]]:
        if isinstance(q, exp.Subquery):
            inner = self.query(q.this, outer)
            return self._order_limit(q, _Scope(outer), inner)
        if isinstance(q, exp.Paren):
            return self.query(q.this, outer)
        if isinstance(q, exp.Select):
            return self._select(q, outer)
        if isinstance(q, exp.SetOperation):
            return self._setop(q, outer)
        if isinstance(q, exp.Values):
            return self._values(q, outer)
        if isinstance(q, exp.Insert | exp.Update | exp.Delete):
            return self.write(q, outer)
        raise LineageError(f"cannot trace {type(q).__name__}")

    def _with(self, q: exp.Expression, outer: _Scope | None) -> _Scope:
        scope = _Scope(outer)
        with_ = _arg(q, "with_", "with")
        if with_ is None:
            return scope
        recursive = bool(with_.args.get("recursive"))
        for cte in _args(with_, "expressions"):
            alias = cte.args.get("alias")
            name = ident(alias.this if isinstance(alias, exp.TableAlias) else alias)
            renames = [ident(c) for c in _args(alias, "columns")] if alias is not None else []
            body = cte.this
            if recursive and isinstance(body, exp.SetOperation):
                seed = self.query(body.this, scope)
                scope.ctes[name] = _rename(seed, renames)
                for _ in range(4):
                    outs = _rename(self.query(body, scope), renames)
                    if _same(outs, scope.ctes[name]):
                        break
                    scope.ctes[name] = _merge(scope.ctes[name], outs)
            else:
                scope.ctes[name] = _rename(self.query(body, scope), renames)
        return scope

    def _select(self, sel: exp.Select, outer: _Scope | None) -> list[tuple[str, Flow]]:
        if sel.args.get("into"):
            raise LineageError("SELECT INTO creates a table")
        scope = self._with(sel, outer)
        self._from(sel, scope)
        outputs = self._projections(sel.expressions, scope)
        where = _arg(sel, "where")
        if where is not None:
            self._where(where.this, scope)
        group = _arg(sel, "group")
        if group is not None:
            for key in group.iter_expressions():
                self._record("GROUP BY", self._key(key, scope, outputs))
        having = _arg(sel, "having")
        if having is not None:
            self._record("HAVING", self.expr(having.this, scope))
        distinct = _arg(sel, "distinct")
        if distinct is not None:
            on = distinct.args.get("on")
            if isinstance(on, exp.Expression):
                keys = on.expressions if isinstance(on, exp.Tuple) else [on]
                for key in keys:
                    self._record("DISTINCT ON", self._key(key, scope, outputs))
            else:
                self._record("DISTINCT", _union(f for _, f in outputs))
        for window in _args(sel, "windows"):
            self.expr(window, scope)
        return self._order_limit(sel, scope, outputs)

    def _order_limit(
        self, q: exp.Expression, scope: _Scope, outputs: list[tuple[str, Flow]]
    ) -> list[tuple[str, Flow]]:
        order = _arg(q, "order")
        if order is not None:
            for ordered in order.expressions:
                key = ordered.this if isinstance(ordered, exp.Ordered) else ordered
                self._record("ORDER BY", self._key(key, scope, outputs))
        for clause in ("limit", "offset"):
            node = _arg(q, clause)
            if node is not None:
                for child in node.iter_expressions():
                    self._record(clause.upper(), self.expr(child, scope))
        return outputs

    def _key(self, key: exp.Expression, scope: _Scope, outputs: list[tuple[str, Flow]]) -> Flow:
        """An ORDER BY / GROUP BY / DISTINCT ON key: an ordinal, an output name or an expression."""
        if isinstance(key, exp.Literal) and not key.is_string:
            try:
                index = int(key.this)
            except ValueError:
                return _EMPTY
            if 1 <= index <= len(outputs):
                return outputs[index - 1][1]
            raise LineageError("position out of range")
        if isinstance(key, exp.Column) and not key.args.get("table"):
            name = ident(key.this)
            named = [f for n, f in outputs if n == name]
            if named:
                found = self._resolve(key, scope, taint=False)
                return _union([*named, *([found] if found else [])])
        return self.expr(key, scope)

    def _setop(self, q: exp.SetOperation, outer: _Scope | None) -> list[tuple[str, Flow]]:
        scope = self._with(q, outer)
        left = self.query(q.this, scope)
        right = self.query(q.expression, scope)
        if len(left) != len(right):
            raise LineageError("set operation branches differ in column count")
        outputs = [
            (name, Flow(lf.refs | rf.refs, lf.direct and rf.direct))
            for (name, lf), (_, rf) in zip(left, right, strict=True)
        ]
        deduplicates = not isinstance(q, exp.Union) or bool(q.args.get("distinct"))
        if deduplicates:
            self._record(type(q).__name__.upper(), _union(f for _, f in outputs))
        return self._order_limit(q, scope, outputs)

    def _values(self, q: exp.Values, outer: _Scope | None) -> list[tuple[str, Flow]]:
        scope = _Scope(outer)
        columns: list[list[Flow]] = []
        for row in q.expressions:
            items = row.expressions if isinstance(row, exp.Tuple) else [row]
            for i, item in enumerate(items):
                if i == len(columns):
                    columns.append([])
                columns[i].append(self._value(item, scope))
        return [(f"column{i + 1}", _union(flows)) for i, flows in enumerate(columns)]

    # -- FROM -----------------------------------------------------------------------------------

    def _from(self, sel: exp.Expression, scope: _Scope) -> None:
        frm = _arg(sel, "from_", "from")
        if frm is not None:
            self._add_source(frm.this, scope)
            scope.star = list(scope.sources[-1].columns)
        for join in _args(sel, "joins"):
            self._join(join, scope)

    def _join(self, join: exp.Expression, scope: _Scope) -> None:
        left_names = {n for n, _ in scope.star}
        self._add_source(join.this, scope)
        right = scope.sources[-1]
        on = join.args.get("on")
        if isinstance(on, exp.Expression):
            self._record("JOIN", self.expr(on, scope))
        using = [ident(u) for u in _args(join, "using")]
        if str(join.args.get("method") or "").upper() == "NATURAL":
            using = [n for n, _ in right.columns if n in left_names]
        if not using:
            scope.star = [*scope.star, *right.columns]
            return
        merged: list[tuple[str, Flow]] = []
        for name in using:
            lf = next((f for n, f in scope.star if n == name), None)
            rf = right.column(name)
            if lf is None or rf is None:
                raise LineageError("join USING names a missing column")
            both = Flow(lf.refs | rf.refs, lf.direct and rf.direct)
            merged.append((name, both))
            self._record("JOIN", both)
        rest_left = [(n, f) for n, f in scope.star if n not in using]
        rest_right = [(n, f) for n, f in right.columns if n not in using]
        scope.star = [*merged, *rest_left, *rest_right]

    def _add_source(self, item: exp.Expression, scope: _Scope) -> None:
        alias = item.args.get("alias")
        alias_name = ident(alias.this) if isinstance(alias, exp.TableAlias) and alias.this else ""
        renames = [ident(c) for c in _args(alias, "columns")] if alias is not None else []
        if isinstance(item, exp.Lateral):
            inner = item.this
            if isinstance(inner, exp.Subquery) and not inner.args.get("alias") and alias_name:
                inner = inner.copy()
                inner.set("alias", alias)
            self._add_source(inner, scope)
            return
        sample = item.args.get("sample")
        if isinstance(sample, exp.Expression):
            fraction = _union(self.expr(a, scope) for a in sample.iter_expressions())
            self._record("TABLESAMPLE", fraction)
        if isinstance(item, exp.Table) and isinstance(item.this, exp.Identifier):
            name = ident(item.this)
            cte = scope.cte(name) if not item.args.get("db") else None
            if cte is not None:
                columns = _rename(cte, renames)
            else:
                rel = self._relation(item)
                columns = [
                    (c.name, Flow(frozenset({(rel.oid, c.attnum)}), True)) for c in rel.columns
                ]
                columns = _rename(columns, renames)
            scope.sources.append(_Source(alias_name or name, columns))
            return
        if isinstance(item, exp.Subquery) and isinstance(item.this, exp.Values):
            outputs = self._values(item.this, scope)
            scope.sources.append(_Source(alias_name, _rename(outputs, renames)))
            return
        if isinstance(item, exp.Subquery):
            if not isinstance(item.this, exp.Query):
                raise LineageError("parenthesised joins are not traced")
            outputs = self.query(item, scope)
            scope.sources.append(_Source(alias_name, _rename(outputs, renames)))
            return
        if isinstance(item, exp.Values):
            outputs = self._values(item, scope)
            scope.sources.append(_Source(alias_name, _rename(outputs, renames)))
            return
        func = item.this if isinstance(item, exp.Table) else item
        if isinstance(func, exp.Expression) and isinstance(func, exp.Func):
            flow = _union(self.expr(a, scope) for a in func.iter_expressions())
            self._record("a function in FROM", flow)
            name = alias_name or _output_name(func)
            columns = [(n, flow) for n in renames] or [(name, flow)]
            scope.sources.append(_Source(name, columns, func_flow=flow))
            return
        raise LineageError(f"cannot trace FROM item {type(item).__name__}")

    # -- expressions ------------------------------------------------------------------------------

    def _resolve(self, col: exp.Column, scope: _Scope, *, taint: bool = True) -> Flow | None:
        name = ident(col.this)
        table = ident(col.args.get("table")) if col.args.get("table") else None
        current: _Scope | None = scope
        while current is not None:
            if table is not None:
                src = current.source(table)
                if src is not None:
                    found = src.column(name)
                    return found if found is not None else (self._taint() if taint else None)
            else:
                hits = [f for s in current.sources if (f := s.column(name)) is not None]
                if len(hits) == 1:
                    return hits[0]
                if hits:
                    return _union(hits)
                whole = current.source(name)
                if whole is not None:
                    return whole.whole()
            current = current.parent
        return self._taint() if taint else None

    def expr(self, e: exp.Expression, scope: _Scope) -> Flow:
        self.depth += 1
        if self.depth > 400:
            raise LineageError("expression nested too deeply")
        try:
            return self._expr(e, scope)
        finally:
            self.depth -= 1

    def _expr(self, e: exp.Expression, scope: _Scope) -> Flow:
        if isinstance(e, exp.Alias | exp.Paren):
            return self.expr(e.this, scope)
        if isinstance(e, exp.Column):
            if isinstance(e.this, exp.Star):
                src = scope.source(ident(e.args.get("table")))
                return src.whole() if src is not None else self._taint()
            found = self._resolve(e, scope)
            assert found is not None
            return found
        if isinstance(e, exp.Query | exp.Insert | exp.Update | exp.Delete):
            return _union(f for _, f in self.query(e, scope))
        if isinstance(e, exp.Count):
            arg = e.this
            if isinstance(arg, exp.Distinct):
                # how many distinct values there are compares the rows' values with each
                # other: after inserting a guess, whether a stored value equals it
                self._record(
                    "count(DISTINCT)", _union(self.expr(a, scope) for a in arg.expressions)
                )
                if len(arg.expressions) == 1:
                    arg = arg.expressions[0]
            if arg is None or isinstance(arg, exp.Star):
                return _EMPTY
            if isinstance(arg, exp.Column):
                # counts the non-null values of a bare column; a column of a subquery may be
                # computed (NULLIF(ssn, '…')), and then its nulls are the data
                flow = self.expr(arg, scope)
                return _EMPTY if flow.direct or not flow.refs else flow
        if is_set_returning(e):
            flow = _union(self.expr(child, scope) for child in e.iter_expressions())
            self._record("a set-returning function", flow)
            return flow
        if isinstance(e, exp.Case):
            operand = e.this
            if isinstance(operand, exp.Expression):  # CASE operand WHEN value: a comparison
                self._record("CASE WHEN", self.expr(operand, scope))
            for branch in _args(e, "ifs"):
                self._record("CASE WHEN", self.expr(branch.this, scope))
        if isinstance(e, exp.Window):
            for key in _args(e, "partition_by"):
                self._record("PARTITION BY", self.expr(key, scope))
            order = _arg(e, "order")
            if order is not None:
                self._record("window ORDER BY", self.expr(order, scope))
            inner = e.this
            return (
                _union([self.expr(inner, scope)]) if isinstance(inner, exp.Expression) else _EMPTY
            )
        if isinstance(e, exp.Filter):
            cond = _arg(e, "expression")
            if cond is not None:
                self._record("FILTER", self.expr(cond, scope))
            return _union([self.expr(e.this, scope)])
        if isinstance(e, exp.Order):
            self._record("ORDER BY", _union(self.expr(o, scope) for o in e.expressions))
            inner = e.this
            return (
                _union([self.expr(inner, scope)]) if isinstance(inner, exp.Expression) else _EMPTY
            )
        return _union(self.expr(child, scope) for child in e.iter_expressions())

    def _where(self, cond: exp.Expression, scope: _Scope) -> None:
        for part in _conjuncts(cond):
            if isinstance(part, exp.EQ):
                sides = (part.this, part.expression)
                for col, other in (sides, sides[::-1]):
                    if isinstance(col, exp.Column) and _is_constant(other):
                        flow = self.expr(col, scope)
                        if flow.direct:
                            self._record("WHERE", flow, lookup=True)
                            break
                else:
                    self._record("WHERE", self.expr(part, scope))
                continue
            self._record("WHERE", self.expr(part, scope))

    # -- writes -----------------------------------------------------------------------------------

    def write(self, w: exp.Expression, outer: _Scope | None) -> list[tuple[str, Flow]]:
        scope = self._with(w, outer)
        target = w.this
        names: list[str] = []
        if isinstance(target, exp.Schema):
            names = [ident(c) for c in target.expressions]
            target = target.this
        if not isinstance(target, exp.Table) or not isinstance(target.this, exp.Identifier):
            raise LineageError("write target is not a table")
        rel = self._relation(target)
        alias = target.args.get("alias")
        alias_name = ident(alias.this) if isinstance(alias, exp.TableAlias) and alias.this else ""
        target_cols = [(c.name, Flow(frozenset({(rel.oid, c.attnum)}), True)) for c in rel.columns]
        if isinstance(w, exp.Insert):
            inserted, updated = self._insert(w, rel, names, alias_name, target_cols, scope)
            self._checks(rel, "insert", inserted)
            if updated is not None:
                self._checks(rel, "update", updated)
        else:
            scope.sources.append(_Source(alias_name or rel.name, target_cols))
            scope.star = list(target_cols)
            for item in _args(w, "using"):
                self._add_source(item, scope)
                scope.star = [*scope.star, *scope.sources[-1].columns]
            self._from(w, scope)
            written: dict[str, Flow] = {}
            if isinstance(w, exp.Update):
                for assignment in w.expressions:
                    written.update(self._assign(assignment, rel, scope))
            where = _arg(w, "where")
            if where is not None:
                self._where(where.this, scope)
            self._checks(rel, "update" if isinstance(w, exp.Update) else "delete", written)
        return self._returning(w, scope)

    def _checks(self, rel: Relation, op: str, written: dict[str, Flow]) -> None:
        for use in check_uses(self.catalog, rel, op, {n: f.refs for n, f in written.items()}):
            self.shape.append(use)

    def _written(self, rel: Relation, name: str, flow: Flow) -> WriteFlow:
        """Record ``flow`` written into ``rel.name``; a value the column may reject (NOT NULL,
        a CHECK, a length, a domain) depending on tagged data is an error channel: anything
        computed, or a column copied into one of another type."""
        col = rel.column(name)
        if col is None:
            raise LineageError("the write names an unknown column")
        target = (rel.oid, col.attnum)
        if flow.refs and not (flow.direct and all(self._fits(ref, col) for ref in flow.refs)):
            self._record("a value written into a column that may reject it", flow)
        return WriteFlow(target, flow.refs)

    def _fits(self, ref: Ref, col: Column) -> bool:
        """Whether every value of column ``ref`` is a valid value of ``col`` as it is."""
        src_rel = self.catalog.relation_by_oid(ref[0])
        src = next((c for c in src_rel.columns if c.attnum == ref[1]), None) if src_rel else None
        return src is not None and src.type_oid == col.type_oid and col.typmod in (-1, src.typmod)

    def _insert(
        self,
        w: exp.Insert,
        rel: Relation,
        names: list[str],
        alias_name: str,
        target_cols: list[tuple[str, Flow]],
        scope: _Scope,
    ) -> tuple[dict[str, Flow], dict[str, Flow] | None]:
        """What the INSERT writes, and what its ON CONFLICT DO UPDATE writes (if any)."""
        if not names:
            names = [c.name for c in rel.columns]
        source = w.expression
        incoming: list[tuple[str, Flow]] = []
        if isinstance(source, exp.Expression):
            outputs = self.query(source, scope)
            if len(outputs) > len(names):
                raise LineageError("INSERT has more expressions than target columns")
            for name, (_, flow) in zip(names, outputs, strict=False):
                self.writes.append(self._written(rel, name, flow))
                incoming.append((name, flow))
        inserted = dict(incoming)
        for name in names:
            inserted.setdefault(name, _EMPTY)
        scope.sources.append(_Source(alias_name or rel.name, target_cols))
        scope.star = list(target_cols)
        conflict = _arg(w, "conflict")
        updated: dict[str, Flow] | None = None
        if conflict is not None:
            # whether a row conflicts (and is skipped or updated) is an equality test of the
            # written values against the arbiter columns; without named columns every unique
            # index may be the arbiter, so every written column is tested
            keys = _args(conflict, "conflict_keys")
            for key in keys:
                self._record("ON CONFLICT", self.expr(key, scope))
            if not keys:
                written = {(rel.oid, c.attnum) for n in names if (c := rel.column(n)) is not None}
                self._record("ON CONFLICT", Flow(frozenset(written), False))
            scope.sources.append(_Source("excluded", incoming))
            assignments = _args(conflict, "expressions")
            if assignments:
                updated = {}
                for assignment in assignments:
                    updated.update(self._assign(assignment, rel, scope))
            for key in conflict.find_all(exp.Where):
                self._record("ON CONFLICT WHERE", self.expr(key.this, scope))
            scope.sources.pop()
        return inserted, updated

    def _assign(self, assignment: exp.Expression, rel: Relation, scope: _Scope) -> dict[str, Flow]:
        if not isinstance(assignment, exp.EQ):
            raise LineageError("unsupported assignment")
        lhs, rhs = assignment.this, assignment.expression
        targets = lhs.expressions if isinstance(lhs, exp.Tuple) else [lhs]
        flow = self._value(rhs, scope)
        out: dict[str, Flow] = {}
        for t in targets:
            if not isinstance(t, exp.Column):
                raise LineageError("unsupported assignment target")
            name = ident(t.this)
            self.writes.append(self._written(rel, name, flow))
            out[name] = flow
        return out

    def _returning(self, w: exp.Expression, scope: _Scope) -> list[tuple[str, Flow]]:
        ret = _arg(w, "returning")
        if ret is None:
            return []
        return self._projections(ret.expressions, scope)

    def _projections(
        self, projections: list[exp.Expression], scope: _Scope
    ) -> list[tuple[str, Flow]]:
        """Output columns of a target list (SELECT or RETURNING), stars expanded."""
        outputs: list[tuple[str, Flow]] = []
        for proj in projections:
            if isinstance(proj, exp.Star):
                outputs.extend(scope.star)
            elif isinstance(proj, exp.Column) and isinstance(proj.this, exp.Star):
                src = scope.source(ident(proj.args.get("table")))
                if src is None:
                    raise LineageError("star of an unknown source")
                outputs.extend(src.columns)
            else:
                outputs.append((_output_name(proj), self._value(proj, scope)))
        return outputs


def _rename(columns: list[tuple[str, Flow]], renames: list[str]) -> list[tuple[str, Flow]]:
    if len(renames) > len(columns):
        raise LineageError("more column aliases than columns")
    return [
        (renames[i] if i < len(renames) else name, flow) for i, (name, flow) in enumerate(columns)
    ]


def _same(a: list[tuple[str, Flow]], b: list[tuple[str, Flow]]) -> bool:
    return [f.refs for _, f in a] == [f.refs for _, f in b]


def _merge(a: list[tuple[str, Flow]], b: list[tuple[str, Flow]]) -> list[tuple[str, Flow]]:
    if len(a) != len(b):
        raise LineageError("recursive CTE branches differ in column count")
    return [(n, Flow(fa.refs | fb.refs, False)) for (n, fa), (_, fb) in zip(a, b, strict=True)]


def parse(sql: str) -> exp.Expression:
    """One statement as sqlglot reads it (Postgres dialect)."""
    try:
        trees = [
            t for t in sqlglot.parse(sql.strip().rstrip(";"), read="postgres") if t is not None
        ]
    except Exception as exc:  # sqlglot raises several types; none may pass
        raise LineageError("the lineage parser cannot read this statement") from exc
    if len(trees) != 1:
        raise LineageError("the lineage parser sees a different number of statements")
    tree = trees[0]
    if not isinstance(tree, exp.Expression):
        raise LineageError("the lineage parser returned no statement")
    return tree


def analyze(
    sql: str, catalog: Catalog, search_path: Sequence[str] = ("public",)
) -> StatementLineage:
    """The lineage of one SELECT/VALUES/set operation, INSERT, UPDATE or DELETE."""
    return analyze_tree(parse(sql), catalog, search_path)


def analyze_tree(
    tree: exp.Expression, catalog: Catalog, search_path: Sequence[str] = ("public",)
) -> StatementLineage:
    walker = _Walker(catalog, search_path)
    try:
        outputs = walker.query(tree, None)
    except RecursionError as exc:
        raise LineageError("statement nested too deeply") from exc
    relations = frozenset(walker.relations)
    tagged: set[Ref] = set()
    for oid in relations:
        tagged |= catalog.tagged_refs_of(oid)
    everything = frozenset(tagged)

    def settle(refs: frozenset[Ref]) -> frozenset[Ref]:
        return (refs - {_TAINT}) | everything if _TAINT in refs else refs

    columns = tuple(
        OutputColumn(name, settle(f.refs), f.direct and _TAINT not in f.refs) for name, f in outputs
    )
    shape = tuple(
        dict.fromkeys(ShapeUse(s.clause, settle(s.sources), s.lookup) for s in walker.shape)
    )
    writes = tuple(WriteFlow(w.target, settle(w.sources)) for w in walker.writes)
    srf = sum(1 for n in tree.walk() if is_set_returning(n))
    return StatementLineage(columns, shape, writes, relations, walker.tainted, srf)


def check_uses(
    catalog: Catalog,
    rel: Relation,
    op: str,
    written: dict[str, frozenset[Ref]],
    depth: int = 0,
) -> list[ShapeUse]:
    """The checks an ``op`` ("insert", "update", "delete") on ``rel`` makes against stored
    values, as row-shaping uses of the columns that decide them (``RowCheck``).

    ``written`` maps the column names the statement writes to the sources of the values
    written; an INSERT also writes every column with a default. The checks of partitions and
    inheritance children count (rows are routed to them, UPDATE and DELETE reach them); a view
    writes its base relations, each as if every column were written."""
    if depth > 32:
        raise LineageError("views nested too deeply")
    uses: list[ShapeUse] = []
    if rel.is_view:
        flows = frozenset(r for refs in written.values() for r in refs)
        bases = {ref[0] for refs, _ in view_lineage(catalog, rel) for ref in refs}
        for oid in sorted(bases):
            base = catalog.relation_by_oid(oid)
            if base is not None and base.oid != rel.oid:
                every = {c.name: flows for c in base.columns}
                uses += check_uses(catalog, base, op, every, depth + 1)
    for target in catalog.descendants(rel.oid):
        names = set(written)
        attnums = frozenset(
            c.attnum
            for c in target.columns
            if c.name in names
            or (op == "insert" and c.has_default)
            or (op == "update" and c.generated_from)
        )
        names_of = {c.attnum: c.name for c in target.columns}
        for check in target.checks:
            if not check.fired_by(op, attnums):
                continue
            values = frozenset(
                r for a in (check.columns or attnums) for r in written.get(names_of.get(a, ""), ())
            )
            if check.kind == "trigger or rule":
                sources = frozenset(catalog.tagged) | values
            elif check.kind == "check constraint" and op == "insert":
                sources = values  # a new row: only what is written into it is tested
            else:
                sources = check.tested | values
            if sources:
                uses.append(ShapeUse(f"a {check.kind} of {target.qualified}", sources))
    return uses


def view_analysis(catalog: Catalog, view: Relation) -> StatementLineage:
    """The lineage of a view's or materialized view's definition.

    The definition is pg_get_viewdef's text, written with names qualified as needed for an empty
    search_path (the loader asks for it that way)."""
    if not view.view_sql:
        raise LineageError(f"view {view.qualified} has no definition")
    result = analyze(view.view_sql, catalog, ())
    if len(result.columns) != len(view.columns):
        raise LineageError(f"view {view.qualified} definition does not match its columns")
    return result


def view_lineage(catalog: Catalog, view: Relation) -> list[tuple[frozenset[Ref], bool]]:
    """Per column of a view or materialized view: its source columns and whether direct."""
    return [(c.sources, c.direct) for c in view_analysis(catalog, view).columns]
