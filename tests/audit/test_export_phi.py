"""Parquet export layout and idempotence; no PHI in the audit file, its WAL or the export."""

from __future__ import annotations

from pathlib import Path

import duckdb

from pgproxy.audit.export import export_parquet
from pgproxy.audit.records import SessionStarted
from pgproxy.audit.sink import DuckDBSink
from pgproxy.policy.redact import fingerprint, redact

from .conftest import KEY, T0, sample_records, stmt

FAKE_PHI = [
    "000-12-3456",
    "Fakerson-Zed",
    "555-0100-777",
    "jane.fakerson@example.invalid",
    "99887766",
    "Zebulon-Fake",
    "1901-02-03",
]
ORIGINAL_SQL = [
    "SELECT * FROM patients WHERE ssn = '000-12-3456' AND last_name = 'Fakerson-Zed'",
    "UPDATE patients SET phone = '555-0100-777', email = 'jane.fakerson@example.invalid' "
    "WHERE mrn = 99887766",
    "INSERT INTO patients (first_name, dob) VALUES ('Zebulon-Fake', '1901-02-03')",
    "SELECT * FROM patients WHERE notes LIKE $$%Fakerson-Zed%$$ /* 000-12-3456 */",
]
# Stored on purpose: proves the byte scan can find a value that is in the file.
CANARY = "CANARY-audit-marker-7f3a"


async def _emit_phi_statements(sink: DuckDBSink) -> None:
    await sink.emit(SessionStarted("sess-phi", "triage-bot", "127.0.0.1:1", "clinic", CANARY, T0))
    for i, sql in enumerate(ORIGINAL_SQL):
        await sink.emit_durable(
            stmt(
                f"phi-{i}",
                session_id="sess-phi",
                sql_redacted=redact(sql),
                fingerprint=fingerprint(sql),
            )
        )


def _scan(paths: list[Path], needles: list[str]) -> set[str]:
    found = set()
    for p in paths:
        data = p.read_bytes()
        for n in needles:
            if n.encode() in data:
                found.add(n)
    return found


async def test_no_phi_in_duckdb_file_or_wal(tmp_path: Path) -> None:
    path = tmp_path / "a.duckdb"
    sink = DuckDBSink(path, signing_key=KEY)
    await sink.start()
    await _emit_phi_statements(sink)
    live_files = [p for p in tmp_path.iterdir() if p.is_file()]
    assert any(p.name.endswith(".wal") for p in live_files)  # committed rows sit in the WAL
    assert _scan(live_files, [CANARY]) == {CANARY}
    assert _scan(live_files, FAKE_PHI) == set()
    await sink.close()  # CHECKPOINT moves everything into the main file
    files = [p for p in tmp_path.iterdir() if p.is_file()]
    assert _scan(files, [CANARY]) == {CANARY}
    assert _scan(files, FAKE_PHI) == set()
    # and the redacted text kept the statement's shape
    with duckdb.connect(str(path), read_only=True) as conn:
        texts = [r[0] for r in conn.execute("SELECT sql_redacted FROM statements").fetchall()]
    assert any("FROM patients WHERE ssn =" in t for t in texts)


async def test_parquet_export_layout_idempotent_and_phi_free(tmp_path: Path) -> None:
    path = tmp_path / "a.duckdb"
    out = tmp_path / "export"
    sink = DuckDBSink(path, signing_key=KEY, export_dir=out)
    await sink.start()
    for rec in sample_records():
        await sink.emit(rec)
    await _emit_phi_statements(sink)
    first = await sink.export_parquet(out)
    second = await sink.export_parquet(out)  # same audit -> same files, no duplicates
    await sink.close()

    rel = sorted(str(Path(f).relative_to(out)) for f in first)
    assert rel == sorted(str(Path(f).relative_to(out)) for f in second)
    assert "statements/day=2026-03-01/data_0.parquet" in rel
    assert {r.split("/")[0] for r in rel} == {
        "sessions", "statements", "approvals", "approval_events", "policy_events"
    }  # fmt: skip
    with duckdb.connect() as conn:
        n = conn.execute(
            f"SELECT count(*) FROM read_parquet('{out}/statements/*/*.parquet', "
            "hive_partitioning = true)"
        ).fetchone()
        assert n == (len(ORIGINAL_SQL) + 4,)
        every_value = [conn.execute(f"SELECT * FROM read_parquet('{f}')").fetchall() for f in first]
    text = " ".join(str(v) for rows in every_value for row in rows for v in row)
    assert CANARY in text
    assert not [p for p in FAKE_PHI if p in text]
    files = list(out.rglob("*.parquet"))
    assert not _scan(files, FAKE_PHI)


def test_export_from_a_closed_file(tmp_path: Path) -> None:
    import asyncio

    path = tmp_path / "a.duckdb"

    async def fill() -> None:
        async with DuckDBSink(path, signing_key=KEY) as sink:
            for rec in sample_records():
                await sink.emit(rec)

    asyncio.run(fill())
    with duckdb.connect(str(path), read_only=True) as conn:
        files = export_parquet(conn, tmp_path / "out")
    assert any("/approvals/day=2026-03-01/" in f for f in files)
    assert not list((tmp_path / "out").glob(".*"))  # no temp dirs left behind
