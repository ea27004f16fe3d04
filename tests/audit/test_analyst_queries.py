"""Every SQL block in docs/analyst-queries.md runs against a populated audit and returns rows."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from pgproxy.audit.query import run_query
from pgproxy.audit.sink import DuckDBSink

from .conftest import KEY, sample_records

DOC = Path(__file__).resolve().parents[2] / "docs" / "analyst-queries.md"
QUERIES = re.findall(r"```sql\n(.*?)```", DOC.read_text(), flags=re.DOTALL)


def test_doc_has_at_least_eight_queries() -> None:
    assert len(QUERIES) >= 8


@pytest.fixture(scope="module")
def populated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("analyst") / "audit.duckdb"

    async def fill() -> None:
        async with DuckDBSink(path, signing_key=KEY) as sink:
            for rec in sample_records():
                await sink.emit(rec)

    asyncio.run(fill())
    return path


@pytest.mark.parametrize("sql", QUERIES, ids=[f"query{i + 1}" for i in range(len(QUERIES))])
def test_query_runs_and_finds_rows(populated: Path, sql: str) -> None:
    result = run_query(populated, sql)
    assert result.columns
    assert result.rows, "the sample audit should give every example query something to show"


README = Path(__file__).resolve().parents[2] / "README.md"
README_QUERIES = [
    q.strip()
    for block in re.findall(r"```sql\n(.*?)```", README.read_text(), flags=re.DOTALL)
    for q in re.split(r";\s*(?:\n|$)", re.sub(r"--[^\n]*\n", "", block))
    if q.strip()
]


def test_readme_shows_at_least_eight_queries() -> None:
    assert len(README_QUERIES) >= 8


@pytest.mark.parametrize(
    "sql", README_QUERIES, ids=[f"readme{i + 1}" for i in range(len(README_QUERIES))]
)
def test_readme_query_runs(populated: Path, sql: str) -> None:
    result = run_query(populated, sql)
    assert result.columns
