"""psql (libpq, simple protocol, \\copy, \\gset, ON_ERROR_STOP) as a subprocess through the proxy."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.integration._util import unique
from tests.integration.conftest import AGENT_PASSWORD, RunningProxy

PSQL = shutil.which("psql")
pytestmark = pytest.mark.skipif(PSQL is None, reason="psql is not installed")


def psql(
    p: RunningProxy, *args: str, stdin: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    assert PSQL is not None
    env = {**os.environ, "PGPASSWORD": AGENT_PASSWORD, "PGCONNECT_TIMEOUT": "10"}
    env.pop("PGSERVICE", None)
    cmd = [PSQL, "-X", "-A", "-t", "-h", p.host, "-p", str(p.port), "-U", "triage-bot",
           "-d", "postgres", *args]  # fmt: skip
    proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, env=env, timeout=60)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_dash_c(running_proxy: RunningProxy) -> None:
    out = psql(running_proxy, "-c", "select 6 * 7, 'Fake Name'")
    assert out.stdout.strip() == "42|Fake Name"


def test_multiple_statements_in_one_dash_c(running_proxy: RunningProxy) -> None:
    out = psql(running_proxy, "-c", "select 1; select 2; select 'three'")
    assert out.stdout.split() == ["1", "2", "three"]


def test_script_with_copy_gset_and_multiple_statements(
    running_proxy: RunningProxy, tmp_path: Path
) -> None:
    table = unique("t_psql")
    data = tmp_path / "in.tsv"
    data.write_text("".join(f"{i}\tFake Person {i}\n" for i in range(100)))
    out_file = tmp_path / "out.tsv"
    script = tmp_path / "script.sql"
    script.write_text(
        f"""
\\set ON_ERROR_STOP on
create table {table} (id int, name text);
\\copy {table} from '{data}'
select count(*) as n, max(id) as top from {table} \\gset
\\echo rows=:n top=:top
insert into {table} values (:top + 1, 'added');
\\copy (select * from {table} where id >= 99 order by id) to '{out_file}'
drop table {table};
"""
    )
    out = psql(running_proxy, "-f", str(script))
    assert "rows=100 top=99" in out.stdout
    assert out_file.read_text() == "99\tFake Person 99\n100\tadded\n"


def test_on_error_stop(running_proxy: RunningProxy) -> None:
    script = "\\set ON_ERROR_STOP on\nselect 'before';\nselect 1/0;\nselect 'after';\n"
    proc = psql(running_proxy, stdin=script, check=False)
    assert proc.returncode == 3
    assert "before" in proc.stdout and "after" not in proc.stdout
    assert "division by zero" in proc.stderr
    # without ON_ERROR_STOP psql carries on, and the session is still usable after the error
    proc = psql(running_proxy, stdin="select 1/0;\nselect 'after';\n", check=False)
    assert proc.returncode == 0 and "after" in proc.stdout


def test_wrong_password(running_proxy: RunningProxy) -> None:
    assert PSQL is not None
    env = {**os.environ, "PGPASSWORD": "not-the-password"}
    proc = subprocess.run(
        [PSQL, "-X", "-h", running_proxy.host, "-p", str(running_proxy.port), "-U", "triage-bot",
         "-d", "postgres", "-c", "select 1"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "password authentication failed" in proc.stderr
