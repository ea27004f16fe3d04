"""The database catalog as the policy sees it: relations, columns, functions and column tags.

A ``Catalog`` is an immutable snapshot (built by ``pgproxy.server.catalog_loader`` from a live
database, or by hand in tests). It answers three questions the decision engine asks:

* which relation or function does a name mean under a ``search_path`` (with Postgres' implicit
  ``pg_temp`` and ``pg_catalog`` rules);
* which PHI tag, if any, a column ``(relation oid, attnum)`` carries;
* which snapshot this is (``version``, a hash of the contents, part of the verdict cache key);
* which checks Postgres makes when a row of a relation is written (``RowCheck``: unique and
  exclusion indexes, foreign keys at both ends, CHECK constraints, triggers and rules): their
  outcome can depend on stored values, so writing a guess is a question about them.

Tags come from the rules' ``tags`` globs (``schema.table.column``; two parts mean schema
``public``). They are carried to generated columns computed from tagged ones ("derived"), to
partitions and inheritance children (by column name) and to views
and materialized views through the lineage of their definitions: a view column that passes a
tagged column through unchanged is tagged "direct", one computed from it is tagged "derived". A
view whose definition cannot be traced is *opaque*: querying it is blocked. The columns a view's
definition uses to choose, group or order its rows (``shaped_by``) shape every query of the view.
"""

from __future__ import annotations

import fnmatch
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

#: schemas whose objects are Postgres' own (never tagged by globs, never expanded as views).
SYSTEM_SCHEMAS: frozenset[str] = frozenset({"pg_catalog", "information_schema"})

#: (relation oid, attnum): one column of one relation.
Ref = tuple[int, int]


@dataclass(frozen=True, slots=True)
class Column:
    attnum: int
    name: str
    type_oid: int
    #: a default, identity or generated expression fills it when a write does not name it
    has_default: bool = False
    #: the type modifier (varchar's length, numeric's precision); -1 when none
    typmod: int = -1
    #: for a generated column, the attnums its expression reads
    generated_from: frozenset[int] = frozenset()
    #: a generated column (``COPY rel TO`` leaves it out), even one that reads no column
    generated: bool = False


@dataclass(frozen=True, slots=True)
class RowCheck:
    """A check Postgres makes when a row of its relation is written, whose outcome (a 23505,
    23503, 23514 or a trigger's error) may depend on stored values.

    ``kind`` says what it is: "unique index" (also primary keys, unique and exclusion
    constraints: the written values are compared with every other row's), "foreign key" (the
    referencing row's values looked up in the referenced table), "referenced key" (the same
    foreign key seen from the referenced table: deleting or changing a key fails while rows
    refer to it), "check constraint" (the new row's own values) or "trigger or rule" (code the
    policy cannot read; any write fires it, and it may read anything). ``columns`` are the
    attnums whose write fires the check (empty: every write); ``tested`` the columns, of any
    relation, whose stored values decide it.
    """

    kind: str
    columns: frozenset[int]
    tested: frozenset[Ref]
    on_insert: bool = True
    on_update: bool = True
    on_delete: bool = False

    def fired_by(self, op: str, written: frozenset[int]) -> bool:
        """Whether an ``op`` ("insert", "update", "delete") writing ``written`` runs it."""
        if op == "delete":
            return self.on_delete
        if not (self.on_insert if op == "insert" else self.on_update):
            return False
        return not self.columns or bool(self.columns & written)


@dataclass(frozen=True, slots=True)
class Relation:
    """A table, view, materialized view, partitioned/foreign table (``relkind`` as pg_class)."""

    oid: int
    schema: str
    name: str
    relkind: str
    columns: tuple[Column, ...]
    view_sql: str | None = None
    parent_oids: tuple[int, ...] = ()
    checks: tuple[RowCheck, ...] = ()
    #: for a partitioned table, the attnums its partition key reads: which partition holds a
    #: row says something about them
    partition_key: frozenset[int] = frozenset()

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def is_view(self) -> bool:
        return self.relkind in ("v", "m")

    @property
    def is_system(self) -> bool:
        return self.schema in SYSTEM_SCHEMAS or self.schema.startswith("pg_toast")

    def column(self, name: str) -> Column | None:
        return next((c for c in self.columns if c.name == name), None)


@dataclass(frozen=True, slots=True)
class Function:
    oid: int
    schema: str
    name: str

    @property
    def is_builtin(self) -> bool:
        return self.schema == "pg_catalog"


@dataclass(frozen=True, slots=True)
class ColumnTag:
    """The PHI tags of one column; ``derived`` when the column computes over tagged data."""

    tags: frozenset[str]
    derived: bool = False

    @property
    def single(self) -> str | None:
        """The tag when the column is a direct copy of exactly one tag, else None."""
        if self.derived or len(self.tags) != 1:
            return None
        return next(iter(self.tags))


def _is_temp_schema(schema: str) -> bool:
    return schema.startswith("pg_temp_")


def effective_path(search_path: Iterable[str], *, relations: bool) -> tuple[str, ...]:
    """The schemas searched, in order: implicit ``pg_temp`` (relations only) and ``pg_catalog``
    come first unless the path names them explicitly."""
    path = tuple(search_path)
    head: list[str] = []
    if relations and "pg_temp" not in path:
        head.append("pg_temp")
    if "pg_catalog" not in path:
        head.append("pg_catalog")
    return (*head, *path)


class Catalog:
    """An immutable catalog snapshot with resolved column tags."""

    __slots__ = (
        "_by_name", "_children", "_funcs", "_funcs_by_oid", "_names", "_rels", "_shaped", "_tags",
        "opaque", "version",
    )  # fmt: skip

    def __init__(
        self,
        relations: Iterable[Relation],
        functions: Iterable[Function] = (),
        tags: Mapping[Ref, ColumnTag] | None = None,
        opaque: Iterable[int] = (),
        shaped: Mapping[int, frozenset[Ref]] | None = None,
    ) -> None:
        self._rels: dict[int, Relation] = {r.oid: r for r in relations}
        self._by_name: dict[tuple[str, str], Relation] = {
            (r.schema, r.name): r for r in self._rels.values()
        }
        funcs = tuple(functions)
        self._funcs: dict[tuple[str, str], tuple[Function, ...]] = {}
        for f in funcs:
            self._funcs[(f.schema, f.name)] = (*self._funcs.get((f.schema, f.name), ()), f)
        self._funcs_by_oid = {f.oid: f for f in funcs}
        self._tags: dict[Ref, ColumnTag] = dict(tags or {})
        self._names: frozenset[str] | None = None
        self._children: dict[int, list[int]] | None = None
        self.opaque: frozenset[int] = frozenset(opaque)
        self._shaped: dict[int, frozenset[Ref]] = {k: v for k, v in (shaped or {}).items() if v}
        digest = hashlib.sha256()
        for r in sorted(self._rels.values(), key=lambda r: r.oid):
            digest.update(repr(r).encode())
        for f in sorted(funcs, key=lambda f: f.oid):
            digest.update(repr(f).encode())
        for ref, tag in sorted(self._tags.items()):
            digest.update(repr((ref, sorted(tag.tags), tag.derived)).encode())
        digest.update(repr(sorted(self.opaque)).encode())
        digest.update(repr(sorted((k, sorted(v)) for k, v in self._shaped.items())).encode())
        self.version: str = digest.hexdigest()[:16]

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        relations: Iterable[Relation],
        functions: Iterable[Function],
        tag_globs: Mapping[str, str],
    ) -> Catalog:
        """A catalog whose tags are resolved from ``tag_globs`` and propagated to partitions,
        inheritance children, views and materialized views."""
        rels = tuple(relations)
        funcs = tuple(functions)
        tags = resolve_glob_tags(rels, tag_globs)
        _generated_tags(rels, tags)
        _inherit_tags(rels, tags)
        base = cls(rels, funcs, tags)
        return _propagate_view_tags(base, rels, funcs, tags)

    # -- lookups ----------------------------------------------------------------------------

    @property
    def relations(self) -> tuple[Relation, ...]:
        return tuple(self._rels.values())

    def relation_by_oid(self, oid: int) -> Relation | None:
        return self._rels.get(oid)

    def relation(
        self, schema: str | None, name: str, search_path: Iterable[str] = ("public",)
    ) -> Relation | None:
        """Resolve a possibly unqualified relation name as Postgres would."""
        schemas = (schema,) if schema is not None else effective_path(search_path, relations=True)
        for s in schemas:
            if s == "pg_temp":
                hit = next(
                    (
                        r
                        for (rs, rn), r in self._by_name.items()
                        if rn == name and _is_temp_schema(rs)
                    ),
                    None,
                )
            else:
                hit = self._by_name.get((s, name))
            if hit is not None:
                return hit
        return None

    def functions(
        self, schema: str | None, name: str, search_path: Iterable[str] = ("public",)
    ) -> tuple[Function, ...]:
        """Every function the name may mean: those of the first schema on the path that has one."""
        schemas = (schema,) if schema is not None else effective_path(search_path, relations=False)
        for s in schemas:
            hit = self._funcs.get((s, name))
            if hit:
                return hit
        return ()

    def function_by_oid(self, oid: int) -> Function | None:
        return self._funcs_by_oid.get(oid)

    def tag(self, ref: Ref) -> ColumnTag | None:
        return self._tags.get(ref)

    @property
    def tagged(self) -> Mapping[Ref, ColumnTag]:
        return self._tags

    def tagged_refs_of(self, oid: int) -> frozenset[Ref]:
        return frozenset(ref for ref in self._tags if ref[0] == oid)

    def shaped_by(self, oid: int) -> frozenset[Ref]:
        """The columns a view's definition uses to choose, group or order its rows (WHERE,
        JOIN, GROUP BY, …, views below it included): which rows it has says something about
        them."""
        return self._shaped.get(oid, frozenset())

    def partition_keys_above(self, oid: int) -> frozenset[Ref]:
        """The partition key columns of every partitioned table ``oid``'s relation is a
        partition of (at any depth): reading the partition itself selects rows by them."""
        out: set[Ref] = set()
        todo, seen = [oid], set()
        while todo:
            rel = self._rels.get(todo.pop())
            if rel is None or rel.oid in seen:
                continue
            seen.add(rel.oid)
            for parent_oid in rel.parent_oids:
                parent = self._rels.get(parent_oid)
                if parent is not None:
                    out |= {(parent.oid, a) for a in parent.partition_key}
                    todo.append(parent_oid)
        return frozenset(out)

    def descendants(self, oid: int) -> list[Relation]:
        """``oid``'s relation and every partition or inheritance child below it."""
        if self._children is None:
            children: dict[int, list[int]] = {}
            for r in self._rels.values():
                for parent in r.parent_oids:
                    children.setdefault(parent, []).append(r.oid)
            self._children = children
        out: list[Relation] = []
        todo, seen = [oid], set()
        while todo:
            cur = todo.pop()
            rel = self._rels.get(cur)
            if cur in seen or rel is None:
                continue
            seen.add(cur)
            out.append(rel)
            todo.extend(self._children.get(cur, ()))
        return out

    def names(self) -> frozenset[str]:
        """Every schema, relation, column and function name the catalog knows."""
        if self._names is None:
            names: set[str] = set()
            for r in self._rels.values():
                names.update((r.schema, r.name), (c.name for c in r.columns))
            names.update(s for s, _ in self._funcs)
            names.update(n for _, n in self._funcs)
            self._names = frozenset(names)
        return self._names

    def column_type(self, ref: Ref) -> int | None:
        """The type OID of a column, or None if unknown."""
        rel = self._rels.get(ref[0])
        col = next((c for c in rel.columns if c.attnum == ref[1]), None) if rel else None
        return col.type_oid if col is not None else None

    def column_name(self, ref: Ref) -> str:
        rel = self._rels.get(ref[0])
        if rel is None:
            return f"{ref[0]}.{ref[1]}"
        col = next((c for c in rel.columns if c.attnum == ref[1]), None)
        return f"{rel.qualified}.{col.name if col else ref[1]}"


def _glob_key(pattern: str) -> str:
    return pattern if pattern.count(".") == 2 else f"public.{pattern}"


def resolve_glob_tags(
    relations: Iterable[Relation], globs: Mapping[str, str]
) -> dict[Ref, ColumnTag]:
    """Tags from the rules: exact names win over globs; among globs the first listed wins."""
    patterns = [(_glob_key(p), tag) for p, tag in globs.items()]
    exact = {p: t for p, t in patterns if not any(ch in p for ch in "*?[")}
    wild = [(p, t) for p, t in patterns if p not in exact]
    out: dict[Ref, ColumnTag] = {}
    for rel in relations:
        if rel.is_system:
            continue
        for col in rel.columns:
            key = f"{rel.schema}.{rel.name}.{col.name}"
            tag = exact.get(key)
            if tag is None:
                tag = next((t for p, t in wild if fnmatch.fnmatchcase(key, p)), None)
            if tag is not None:
                out[(rel.oid, col.attnum)] = ColumnTag(frozenset({tag}))
    return out


def _generated_tags(relations: tuple[Relation, ...], tags: dict[Ref, ColumnTag]) -> None:
    """A generated column computed from tagged columns carries their tags, derived."""
    for rel in relations:
        for col in rel.columns:
            found: set[str] = set()
            for attnum in col.generated_from:
                src = tags.get((rel.oid, attnum))
                if src is not None:
                    found |= src.tags
            if found:
                mine = tags.get((rel.oid, col.attnum))
                tags[(rel.oid, col.attnum)] = ColumnTag(
                    frozenset(found | (mine.tags if mine else set())), True
                )


def _inherit_tags(relations: tuple[Relation, ...], tags: dict[Ref, ColumnTag]) -> None:
    """Partitions and inheritance children take their parents' column tags by column name."""
    by_oid = {r.oid: r for r in relations}
    done: set[int] = set()

    def visit(rel: Relation, seen: frozenset[int]) -> None:
        if rel.oid in done or rel.oid in seen:
            return
        for parent_oid in rel.parent_oids:
            parent = by_oid.get(parent_oid)
            if parent is None:
                continue
            visit(parent, seen | {rel.oid})
            for pcol in parent.columns:
                ptag = tags.get((parent.oid, pcol.attnum))
                ccol = rel.column(pcol.name)
                if ptag is None or ccol is None:
                    continue
                mine = tags.get((rel.oid, ccol.attnum))
                merged = ptag if mine is None else ColumnTag(mine.tags | ptag.tags, mine.derived)
                tags[(rel.oid, ccol.attnum)] = merged
        done.add(rel.oid)

    for rel in relations:
        visit(rel, frozenset())


def _propagate_view_tags(
    base: Catalog,
    relations: tuple[Relation, ...],
    functions: tuple[Function, ...],
    tags: dict[Ref, ColumnTag],
) -> Catalog:
    """Trace every user view's definition and tag its columns; repeat until stable so that
    views over views pick up their sources' tags."""
    from pgproxy.policy.lineage import LineageError, view_analysis  # lineage needs Catalog

    views = [r for r in relations if r.is_view and not r.is_system]
    opaque: set[int] = set()
    shaped: dict[int, frozenset[Ref]] = {}
    current = base
    for _ in range(len(views) + 1):
        changed = False
        for view in views:
            if view.oid in opaque:
                continue
            try:
                analysis = view_analysis(current, view)
            except LineageError:
                opaque.add(view.oid)
                changed = True
                continue
            shape = frozenset(r for use in analysis.shape for r in use.sources)
            if shape != shaped.get(view.oid, frozenset()):
                shaped[view.oid] = shape
                changed = True
            flows = [(c.sources, c.direct) for c in analysis.columns]
            for col, (refs, direct) in zip(view.columns, flows, strict=False):
                found: set[str] = set()
                derived = not direct
                for ref in refs:
                    src = current.tag(ref)
                    if src is not None:
                        found |= src.tags
                        derived = derived or src.derived
                if not found:
                    continue
                ref = (view.oid, col.attnum)
                explicit = tags.get(ref)
                new = ColumnTag(frozenset(found), derived)
                if (
                    explicit is not None
                    and explicit.tags >= new.tags
                    and explicit.derived >= derived
                ):
                    continue
                if explicit is not None:
                    new = ColumnTag(explicit.tags | new.tags, explicit.derived or derived)
                tags[ref] = new
                changed = True
        current = Catalog(relations, functions, tags, opaque, shaped)
        if not changed:
            break
    return current
