"""Load the policy ``Catalog`` from a live database.

Reads relations (pg_class/pg_namespace), their live columns (pg_attribute; defaults, generated
expressions), view and materialized view definitions (pg_get_viewdef), inheritance, partitioning
and partition keys (pg_inherits, pg_partitioned_table), functions (pg_proc) and the checks a
write makes against stored values (``RowCheck``: unique and exclusion indexes from pg_index,
foreign keys and CHECK constraints from pg_constraint, triggers and rewrite rules, and every
write into a foreign table), then resolves the rules' column tags over them (``Catalog.build``).

An index's columns are the ones its keys, expressions and predicate read (its definition is
parsed with Postgres' grammar); one whose definition cannot be read, or that reads a whole row,
covers every column of its table.

View definitions are read with ``search_path = pg_catalog`` so that every user relation in them
comes back schema-qualified: lineage then resolves them without guessing a path. Other sessions'
temporary schemas are skipped; a temporary table is therefore never in the catalog, and a query
naming one is blocked.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import asyncpg
import pglast
from pglast import ast

from pgproxy.policy.catalog import SYSTEM_SCHEMAS, Catalog, Column, Function, Relation, RowCheck
from pgproxy.policy.classify import walk_nodes
from pgproxy.rules import Rules

_RELATIONS = """
SELECT c.oid::int8 AS oid, n.nspname AS schema, c.relname AS name, c.relkind::text AS relkind,
       CASE WHEN c.relkind IN ('v', 'm') AND NOT (n.nspname = ANY($1::text[]))
            THEN pg_get_viewdef(c.oid) END AS viewdef
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind IN ('r', 'v', 'm', 'p', 'f')
   AND n.nspname !~ '^pg_(toast|temp_|toast_temp_)'
"""

_COLUMNS = """
SELECT a.attrelid::int8 AS relid, a.attnum::int4 AS attnum, a.attname AS name,
       a.atttypid::int8 AS type_oid, a.atttypmod::int4 AS typmod,
       (a.atthasdef OR a.attidentity <> '' OR a.attgenerated <> '') AS has_default
  FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
 WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'v', 'm', 'p', 'f')
 ORDER BY a.attrelid, a.attnum
"""

_INHERITS = "SELECT inhrelid::int8 AS child, inhparent::int8 AS parent FROM pg_inherits"

_INDEXES = """
SELECT i.indrelid::int8 AS relid, i.indkey::int2[]::int4[] AS keys,
       (i.indexprs IS NOT NULL OR i.indpred IS NOT NULL) AS computed,
       pg_get_indexdef(i.indexrelid) AS def
  FROM pg_index i
 WHERE i.indisunique OR i.indisexclusion
"""

_CONSTRAINTS = """
SELECT conrelid::int8 AS relid, confrelid::int8 AS frelid, contype::text AS kind,
       conkey::int4[] AS keys, confkey::int4[] AS fkeys, convalidated AS validated
  FROM pg_constraint
 WHERE contype IN ('f', 'c') AND conrelid <> 0
"""

_GENERATED = """
SELECT d.adrelid::int8 AS relid, d.adnum::int4 AS attnum, pg_get_expr(d.adbin, d.adrelid) AS expr
  FROM pg_attrdef d
  JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum
 WHERE a.attgenerated <> ''
"""

_PARTITION_KEYS = """
SELECT partrelid::int8 AS relid, partattrs::int2[]::int4[] AS keys,
       partexprs IS NOT NULL AS computed
  FROM pg_partitioned_table
"""

_CODE = """
SELECT tgrelid::int8 AS relid FROM pg_trigger WHERE NOT tgisinternal
UNION SELECT ev_class::int8 FROM pg_rewrite WHERE rulename <> '_RETURN'
"""

_FUNCTIONS = """
SELECT p.oid::int8 AS oid, n.nspname AS schema, p.proname AS name
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
"""


async def load_catalog(conn: asyncpg.Connection, rules: Rules) -> Catalog:
    """A catalog snapshot of the database ``conn`` is connected to, tagged by ``rules``."""
    async with conn.transaction(readonly=True):
        await conn.execute("SET LOCAL search_path = pg_catalog")
        rel_rows = await conn.fetch(_RELATIONS, sorted(SYSTEM_SCHEMAS))
        col_rows = await conn.fetch(_COLUMNS)
        inh_rows = await conn.fetch(_INHERITS)
        fn_rows = await conn.fetch(_FUNCTIONS)
        idx_rows = await conn.fetch(_INDEXES)
        con_rows = await conn.fetch(_CONSTRAINTS)
        code_rows = await conn.fetch(_CODE)
        gen_rows = await conn.fetch(_GENERATED)
        part_rows = await conn.fetch(_PARTITION_KEYS)
    return build_catalog(
        rel_rows,
        col_rows,
        inh_rows,
        fn_rows,
        rules,
        idx_rows,
        con_rows,
        code_rows,
        gen_rows,
        part_rows,
    )


def build_catalog(
    rel_rows: list[Any],
    col_rows: list[Any],
    inh_rows: list[Any],
    fn_rows: list[Any],
    rules: Rules,
    idx_rows: Iterable[Any] = (),
    con_rows: Iterable[Any] = (),
    code_rows: Iterable[Any] = (),
    gen_rows: Iterable[Any] = (),
    part_rows: Iterable[Any] = (),
) -> Catalog:
    """Assemble a ``Catalog`` from rows shaped like the loader's queries (mappings by name)."""
    columns: dict[int, list[Column]] = {}
    for row in col_rows:
        columns.setdefault(int(row["relid"]), []).append(
            Column(
                int(row["attnum"]),
                str(row["name"]),
                int(row["type_oid"]),
                bool(row.get("has_default", False)),
                int(row.get("typmod", -1)),
            )
        )
    for row in gen_rows:
        oid, attnum = int(row["relid"]), int(row["attnum"])
        cols = columns.get(oid, [])
        names = {c.name: c.attnum for c in cols}
        reads = _columns_read(f"SELECT {row['expr']}", names)
        for i, c in enumerate(cols):
            if c.attnum == attnum:
                cols[i] = replace(
                    c,
                    generated_from=frozenset(names.values()) if reads is None else reads,
                    generated=True,
                )
    keys: dict[int, frozenset[int]] = {}
    for row in part_rows:
        oid = int(row["relid"])
        every = frozenset(c.attnum for c in columns.get(oid, ()))
        direct = frozenset(int(k) for k in row["keys"] or () if int(k) > 0)
        keys[oid] = every if row["computed"] else direct  # an expression: every column
    # a foreign table's writes run in another server, whose constraints this one cannot see
    foreign = [{"relid": row["oid"]} for row in rel_rows if row["relkind"] == "f"]
    checks = _row_checks(columns, idx_rows, con_rows, [*code_rows, *foreign])
    parents: dict[int, list[int]] = {}
    for row in inh_rows:
        parents.setdefault(int(row["child"]), []).append(int(row["parent"]))
    relations = [
        Relation(
            oid=int(row["oid"]),
            schema=str(row["schema"]),
            name=str(row["name"]),
            relkind=str(row["relkind"]),
            columns=tuple(columns.get(int(row["oid"]), ())),
            view_sql=row["viewdef"],
            parent_oids=tuple(parents.get(int(row["oid"]), ())),
            checks=tuple(checks.get(int(row["oid"]), ())),
            partition_key=keys.get(int(row["oid"]), frozenset()),
        )
        for row in rel_rows
    ]
    functions = [Function(int(r["oid"]), str(r["schema"]), str(r["name"])) for r in fn_rows]
    return Catalog.build(relations, functions, rules.tags)


def _index_columns(row: Any, attnums: frozenset[int], names: dict[str, int]) -> frozenset[int]:
    """The columns a unique or exclusion index compares or filters on."""
    keys = frozenset(int(k) for k in row["keys"] or () if int(k) > 0)
    if not row["computed"]:
        return keys
    reads = _columns_read(str(row["def"]), names)
    return attnums if reads is None else keys | reads


def _columns_read(sql: str, names: dict[str, int]) -> frozenset[int] | None:
    """The attnums the column references of one statement (an index definition, a SELECT of
    an expression) name; None when it cannot be read or reads a whole row or an unknown name."""
    try:
        stmt = pglast.parse_sql(sql)[0].stmt
    except Exception:
        return None
    found: set[int] = set()
    for node in walk_nodes(stmt):
        if isinstance(node, ast.IndexElem) and node.name:
            ref: str | None = node.name
        elif isinstance(node, ast.ColumnRef):
            last = (node.fields or ())[-1] if node.fields else None
            ref = getattr(last, "sval", None)
        else:
            continue
        if ref is None or ref not in names:
            return None  # a whole row, a star or a name this snapshot does not know
        found.add(names[ref])
    return frozenset(found)


def _row_checks(
    columns: dict[int, list[Column]],
    idx_rows: Iterable[Any],
    con_rows: Iterable[Any],
    code_rows: Iterable[Any],
) -> dict[int, list[RowCheck]]:
    """Per relation oid, the checks a write of its rows makes against stored values."""
    out: dict[int, list[RowCheck]] = {}

    def every(oid: int) -> frozenset[int]:
        return frozenset(c.attnum for c in columns.get(oid, ()))

    def refs(oid: int, attnums: Iterable[int]) -> frozenset[tuple[int, int]]:
        return frozenset((oid, a) for a in attnums)

    for row in idx_rows:
        oid = int(row["relid"])
        names = {c.name: c.attnum for c in columns.get(oid, ())}
        cols = _index_columns(row, every(oid), names)
        out.setdefault(oid, []).append(RowCheck("unique index", cols, refs(oid, cols)))
    for row in con_rows:
        oid = int(row["relid"])
        keys = [int(k) for k in row["keys"] or ()]
        if row["kind"] == "f":
            foid = int(row["frelid"])
            fkeys = [int(k) for k in row["fkeys"] or ()]
            tested = refs(oid, keys) | refs(foid, fkeys)
            out.setdefault(oid, []).append(RowCheck("foreign key", frozenset(keys), tested))
            out.setdefault(foid, []).append(
                RowCheck(
                    "referenced key", frozenset(fkeys), tested, on_insert=False, on_delete=True
                )
            )
        else:
            # a whole-row reference is attnum 0; a constraint added NOT VALID may fail on
            # any stored row an UPDATE rewrites, whichever column it sets
            whole = not keys or 0 in keys or not row["validated"]
            cols = every(oid) if whole else frozenset(keys)
            out.setdefault(oid, []).append(
                RowCheck("check constraint", frozenset() if whole else cols, refs(oid, cols))
            )
    for row in code_rows:
        oid = int(row["relid"])
        out.setdefault(oid, []).append(
            RowCheck("trigger or rule", frozenset(), frozenset(), on_delete=True)
        )
    return out
