"""Load the policy ``Catalog`` from a live database.

Reads relations (pg_class/pg_namespace), their live columns (pg_attribute), view and
materialized view definitions (pg_get_viewdef), inheritance and partitioning (pg_inherits) and
functions (pg_proc), then resolves the rules' column tags over them (``Catalog.build``).

View definitions are read with ``search_path = pg_catalog`` so that every user relation in them
comes back schema-qualified: lineage then resolves them without guessing a path. Other sessions'
temporary schemas are skipped; a temporary table is therefore never in the catalog, and a query
naming one is blocked.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from pgproxy.policy.catalog import SYSTEM_SCHEMAS, Catalog, Column, Function, Relation
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
       a.atttypid::int8 AS type_oid
  FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
 WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'v', 'm', 'p', 'f')
 ORDER BY a.attrelid, a.attnum
"""

_INHERITS = "SELECT inhrelid::int8 AS child, inhparent::int8 AS parent FROM pg_inherits"

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
    return build_catalog(rel_rows, col_rows, inh_rows, fn_rows, rules)


def build_catalog(
    rel_rows: list[Any],
    col_rows: list[Any],
    inh_rows: list[Any],
    fn_rows: list[Any],
    rules: Rules,
) -> Catalog:
    """Assemble a ``Catalog`` from rows shaped like the loader's queries (mappings by name)."""
    columns: dict[int, list[Column]] = {}
    for row in col_rows:
        columns.setdefault(int(row["relid"]), []).append(
            Column(int(row["attnum"]), str(row["name"]), int(row["type_oid"]))
        )
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
        )
        for row in rel_rows
    ]
    functions = [Function(int(r["oid"]), str(r["schema"]), str(r["name"])) for r in fn_rows]
    return Catalog.build(relations, functions, rules.tags)
