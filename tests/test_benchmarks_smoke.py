"""``benchmarks/run.py --quick`` with tiny sizes completes and prints its whole table.

Only that the benchmark runs end to end against a real Postgres (direct, the relay, PgBouncer
when installed, and a real ``pgproxy serve``) and reports every row: no timing is asserted here;
numbers belong to the benchmark's own output.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pgproxy.pgcluster import ClusterUnavailable, find_bindir

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "benchmarks" / "run.py"

#: the measurements the benchmark must report, as the table labels them
ROWS = (
    "TPS pgbench -S -c 8 -j 2",
    "latency -c 1 -M simple",
    "added latency -c 1 -M simple",
    "latency -c 1 -M prepared",
    "added latency -c 1 -M prepared",
    "proxy CPU per transaction -c 8",
    "proxy CPU per transaction -c 1 -M simple",
    "proxy CPU per transaction -c 1 -M prepared",
    "rows/s, 2,000 rows x 10 columns",
    "RSS before streaming",
    "peak RSS streaming 0.005 GB",
    "audit writer process peak RSS (whole run)",
)
COLUMNS = ("direct", "relay", "pgbouncer", "pgproxy", "pgproxy÷direct", "pgproxy÷relay", "target")
#: rows with a target from the product issue
JUDGED = (ROWS[0], ROWS[2], ROWS[4], ROWS[10])


def _have_pgbench() -> bool:
    if shutil.which("pgbench"):
        return True
    try:
        return (find_bindir() / "pgbench").exists()
    except ClusterUnavailable:
        return False


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


@pytest.mark.slow
@pytest.mark.timeout(280)
@pytest.mark.skipif(not _have_pgbench(), reason="pgbench is not installed")
def test_quick_run_prints_every_row(pg_dsn: str, tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--duration", "1", "--scale", "1",
         "--rows", "2000", "--rss-mb", "5", "--dsn", pg_dsn, "--json", str(out)],
        capture_output=True, text=True, timeout=260, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    table = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    header = _cells(table[0])
    for column in COLUMNS:
        assert column in header
    body = {_cells(line)[0]: dict(zip(header, _cells(line), strict=True)) for line in table[2:]}
    assert set(body) == set(ROWS)

    for label in ROWS:
        row = body[label]
        for target in ("relay", "pgproxy") if "audit writer" not in label else ("pgproxy",):
            assert row[target] not in ("", "—", "ERR"), (label, target, row)
        if "RSS" not in label and "added" not in label and "CPU" not in label:
            assert row["direct"] not in ("", "—", "ERR"), (label, row)
    for label in JUDGED:
        assert body[label]["result"] in ("PASS", "FAIL", "n/a"), body[label]

    results = json.loads(out.read_text())
    assert results["errors"] == {}
    assert results["values"]["tps"]["pgproxy"] > 0
    assert results["values"]["cpu_tps"]["pgproxy"] > 0  # the proxy's process and its writer
    assert len(results["samples"]["lat_simple"]["pgproxy"]) == 1  # --quick: one slice per round
    assert results["values"]["rss"]["pgproxy"] > 0
    assert results["values"]["rss_audit"]["pgproxy"] > 0  # pgproxy's audit writer process


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_masking_benchmark_runs_and_checks_the_masking(pg_dsn: str, tmp_path: Path) -> None:
    """``benchmarks/masking.py`` streams both tables through a real ``pgproxy serve`` (it fails
    by itself if the masked stream's first row is not masked) and reports the ratio."""
    out = tmp_path / "masking.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "masking.py"), "--quick", "--rows", "3000",
         "--binary", "--dsn", pg_dsn, "--json", str(out)],
        capture_output=True, text=True, timeout=180, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["errors"] == {}
    rates = results["rows_per_s"]
    for stream in ("unmasked (pgproxy)", "masked (pgproxy)", "direct (no proxy)",
                   "unmasked, binary (pgproxy)", "masked, binary (pgproxy)"):  # fmt: skip
        assert rates[stream] > 0, stream
    assert set(results["targets"]) == {"masked (pgproxy)", "masked, binary (pgproxy)"}
    assert all(v in ("PASS", "FAIL") for v in results["targets"].values())
    assert "target masked >= 0.5x unmasked" in proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_decisions_benchmark_reports_every_statement(pg_dsn: str, tmp_path: Path) -> None:
    """``benchmarks/decisions.py`` reads the demo schema's catalog from a real Postgres and
    reports p50/p99 of the three latencies, with the decision of each statement of its mix."""
    out = tmp_path / "decisions.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "decisions.py"), "--samples", "3",
         "--dsn", pg_dsn, "--json", str(out)],
        capture_output=True, text=True, timeout=180, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results["summary"]) == {"first sight", "new literals", "cached repeat"}
    assert set(results["targets"]) == {"first sight", "cached repeat"}
    decisions = {name: s["decision"] for name, s in results["statements"].items()}
    # the mix exercises every kind of decision, so a catalog that failed to load would show
    assert set(decisions.values()) == {"ALLOW", "MASK", "HOLD", "BLOCK"}
    assert decisions["lookup masked"] == "MASK"
    assert decisions["catalog view (blocked)"] == "BLOCK"


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.skipif(not _have_pgbench(), reason="pgbench is not installed")
def test_breakdown_benchmark_runs_every_variant(pg_dsn: str, tmp_path: Path) -> None:
    """``benchmarks/breakdown.py`` runs pgbench through the relay and each patched
    ``pgproxy serve`` variant (each must answer pgbench, else pgbench fails the run)."""
    out = tmp_path / "breakdown.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "breakdown.py"), "--quick",
         "--dsn", pg_dsn, "--json", str(out)],
        capture_output=True, text=True, timeout=200, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert list(results) == ["relay", "forward", "decide", "record", "full"]
    for name, row in results.items():
        assert row["tps"] and all(t > 0 for t in row["tps"]), name
        assert all(c > 0 for c in row["cpu_us"]), name
    for name in results:
        assert f"| {name} |" in proc.stdout
