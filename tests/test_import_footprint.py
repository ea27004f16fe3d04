"""What ``pgproxy serve`` loads: presidio-analyzer (and with it spaCy, thinc, numpy: about 70 MB
of RSS) only when a ``free_text`` cell is scanned, never for the other tags.

Each check runs in a fresh interpreter (``sys.modules`` of the test process is shared by every
test). The assertions are structural -- which modules are loaded -- never timings or byte
counts. The positive control proves the probe can see presidio-analyzer when it is needed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("presidio_analyzer", "spacy", "thinc", "numpy")

RULES = """\
agents:
  - name: triage-bot
    password: "fake-pw"
tags:
  public.patients.ssn: ssn
  public.patients.first_name: name
  public.patients.dob: dob
  public.patients.email: email
  public.patients.note: free_text
masking:
  email: {operator: mask, masking_char: "*", chars_to_mask: 4, from_end: false}
approvals:
  hold: []
"""

#: Builds the serve-time policy objects for RULES, decides a statement and masks one row of
#: its result; prints the masked cells and which heavy modules got loaded.
PROBE = """
import json, sys
import pgproxy.server.runtime
from pgproxy.policy.catalog import Catalog, Column, Relation
from pgproxy.policy.decide import PolicyEngine
from pgproxy.policy.seam import FieldInfo, StatementContext
from pgproxy.rules import load_rules
from pgproxy.server.policy_hub import PolicyHub

rules = load_rules(sys.argv[1])
hub = PolicyHub(rules, "postgresql://unused@127.0.0.1:1/unused")
cols = [("id", 23), ("ssn", 25), ("first_name", 25), ("dob", 1082), ("email", 25), ("note", 25)]
rel = Relation(
    9001, "public", "patients", "r", tuple(Column(i + 1, n, t) for i, (n, t) in enumerate(cols))
)
catalog = Catalog.build([rel], [], rules.tags)
engine = PolicyEngine(rules, catalog, hub.masks, "triage-bot")
wanted = sys.argv[2].split(",")
verdict = engine.statement(
    f"SELECT {', '.join(wanted)} FROM patients", StatementContext("triage-bot", "clinic", "query")
)
fields = [
    FieldInfo(n, 9001, i + 1, t, -1, -1, 0) for i, (n, t) in enumerate(cols) if n in wanted
]
plan = verdict.result.plan(fields)
row = {
    "ssn": b"000-12-3456",
    "first_name": b"Avery",
    "dob": b"1961-07-04",
    "email": b"avery@example.com",
    "note": b"Seen by Dr. Jane Testperson on 2024-03-05, SSN 000-12-3456.",
}
cells = {}
for i, rewrite in plan.rewriters.items():
    out = rewrite(row[fields[i].name], 0)
    cells[fields[i].name] = None if out is None else out.decode()
print(json.dumps({
    "action": verdict.action.value,
    "cells": cells,
    "loaded": sorted(m for m in sys.argv[3].split(",") if m in sys.modules),
    "anonymizer": "presidio_anonymizer" in sys.modules,
}))
"""


def _probe(tmp_path: Path, columns: str) -> dict[str, object]:
    rules = tmp_path / "rules"
    rules.mkdir(exist_ok=True)
    (rules / "rules.yaml").write_text(RULES)
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(rules), columns, ",".join(HEAVY)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.timeout(150)
def test_masking_without_free_text_never_loads_presidio_analyzer(tmp_path: Path) -> None:
    got = _probe(tmp_path, "id,ssn,first_name,dob,email")
    # The masking really ran, with presidio-anonymizer's operators...
    assert got["action"] == "MASK"
    assert got["anonymizer"] is True
    cells = got["cells"]
    assert isinstance(cells, dict)
    assert cells["ssn"] == "<SSN>"
    assert cells["first_name"] == "<NAME>"
    assert cells["dob"] == "1961-01-01"
    assert cells["email"] == "****y@example.com"
    # ...and pulled in none of presidio-analyzer's NLP stack.
    assert got["loaded"] == []


@pytest.mark.timeout(150)
def test_free_text_loads_presidio_analyzer_on_first_scan(tmp_path: Path) -> None:
    """Positive control: scanning a free_text cell does load presidio-analyzer, so the probe
    above would notice it being loaded."""
    got = _probe(tmp_path, "id,note")
    cells = got["cells"]
    assert isinstance(cells, dict)
    note = cells["note"]
    assert isinstance(note, str)
    assert "000-12-3456" not in note and "Testperson" not in note
    assert "presidio_analyzer" in got["loaded"]  # type: ignore[operator]


def test_operators_import_leaves_no_blocked_module_behind() -> None:
    """The guard that keeps presidio-analyzer out while presidio-anonymizer's operators load
    must not leave the blocked name behind: presidio-analyzer stays importable afterwards, in
    full, for free-text scanning."""
    code = (
        "import sys\n"
        "import pgproxy.policy.operators\n"
        "name = 'presidio_analyzer.llm_utils.azure_auth_helper'\n"
        "assert sys.modules.get(name, 'absent') is not None, 'blocked name left behind'\n"
        "import presidio_analyzer\n"
        "from presidio_analyzer.predefined_recognizers import IpRecognizer\n"
        "print(len(IpRecognizer().analyze('from 192.0.2.10', ['IP_ADDRESS'], None)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "1"


#: Runs the live audit the way ``serve`` does (emit, query, verify, Parquet export) and prints
#: whether DuckDB got imported into this (the proxy's) process.
AUDIT_PROBE = """
import asyncio, json, sys
from datetime import UTC, datetime
import pgproxy.server.runtime
from pgproxy.audit.records import PolicyEvent
from pgproxy.audit.sink import DuckDBSink

async def main(path, export):
    async with DuckDBSink(path, signing_key=b"k", export_dir=export) as sink:
        await sink.emit_durable(PolicyEvent(datetime.now(UTC), "loaded", "x"))
        rows = (await sink.query("SELECT event FROM policy_events")).rows
        ok = (await sink.verify()).ok
        files = await sink.export_parquet(export)
    return {"rows": [list(r) for r in rows], "ok": ok, "files": len(files),
            "duckdb": "duckdb" in sys.modules}

print(json.dumps(asyncio.run(main(sys.argv[1], sys.argv[2]))))
"""


@pytest.mark.timeout(150)
def test_the_proxy_process_never_imports_duckdb(tmp_path: Path) -> None:
    """The audit's DuckDB lives in the writer process: ``serve``'s process does not load it,
    even while it serves analyst queries, verify and exports through that process."""
    proc = subprocess.run(
        [sys.executable, "-c", AUDIT_PROBE, str(tmp_path / "a.duckdb"), str(tmp_path / "pq")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["rows"] == [["loaded"]] and got["ok"] is True and got["files"] >= 1
    assert got["duckdb"] is False
