"""The command line as users and CI drive it: rules check, explain, hash-password, settings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from pgproxy.config import ConfigError, load_settings
from pgproxy.rules import RulesError, load_rules
from pgproxy.server.credentials import parse_verifier

REPO = Path(__file__).resolve().parent.parent


def pgproxy(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgproxy", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_bundled_rules_check_ok() -> None:
    out = pgproxy("rules", "check", str(REPO / "rules"))
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


@pytest.mark.parametrize(
    ("files", "where", "why"),
    [
        (
            {"a.yaml": "agents:\n  - name: a\n    password: x\n    colour: red\n"},
            "a.yaml:4",
            "colour",
        ),
        ({"a.yaml": "tags:\n  public.t.c: nonsense\n"}, "a.yaml:2", "unknown tag"),
        ({"a.yaml": "agents: [\n"}, "a.yaml:", "invalid YAML"),
        ({"a.yaml": "approvals:\n  quorum: 0\n"}, "a.yaml:2", "quorum"),
        ({"a.yaml": "masking:\n  ssn: {operator: keep}\n"}, "a.yaml:2", "keep"),
        (
            {"a.yaml": "tags:\n  public.t.c: ssn\n", "b.yaml": "tags:\n  public.t.c: name\n"},
            "b.yaml:2",
            "more than once",
        ),
        ({"a.yaml": "agents:\n  - name: a\n"}, "a.yaml:2", "password"),
        ({"a.yaml": "bogus: 1\n"}, "a.yaml:1", "unknown key"),
    ],
)
def test_rules_check_names_file_line_and_reason(
    tmp_path: Path, files: dict[str, str], where: str, why: str
) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    out = pgproxy("rules", "check", str(tmp_path))
    assert out.returncode == 1
    assert where in out.stderr and why in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    with pytest.raises(RulesError):
        load_rules(tmp_path)


def test_rules_check_missing_dir(tmp_path: Path) -> None:
    out = pgproxy("rules", "check", str(tmp_path / "nope"))
    assert out.returncode == 1 and "does not exist" in out.stderr


def test_hash_password_gives_a_verifier_rules_accept(tmp_path: Path) -> None:
    out = pgproxy("hash-password", "--password", "not-in-base64!")  # '-' and '!' never are
    assert out.returncode == 0
    verifier = out.stdout.strip()
    assert parse_verifier(verifier) is not None and "not-in-base64!" not in verifier
    (tmp_path / "r.yaml").write_text(f'agents:\n  - name: a\n    password: "{verifier}"\n')
    assert load_rules(tmp_path).agents[0].password == verifier


def test_settings_precedence(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("listen: 127.0.0.1:7000\nhttp: 127.0.0.1:7001\nrules: /from-file\n")
    env = {"PGPROXY_LISTEN": "127.0.0.1:7100", "PGPROXY_UPSTREAM": "postgresql://u@h/db"}
    s = load_settings({"listen": "127.0.0.1:7200"}, environ=env, config_file=str(cfg))
    assert s.listen == "127.0.0.1:7200"  # command line beats environment and file
    assert s.http == "127.0.0.1:7001"  # file beats the default
    assert s.upstream == "postgresql://u@h/db"  # environment
    assert s.rules == "/from-file"
    assert s.base_url == "http://127.0.0.1:7001"
    cfg.write_text("lisen: 1\n")
    with pytest.raises(ConfigError, match="unknown key"):
        load_settings({}, environ={}, config_file=str(cfg))
    with pytest.raises(ConfigError, match="HOST:PORT"):
        load_settings({"listen": "nope"}, environ={})
    with pytest.raises(ConfigError, match="wait or spill"):
        load_settings({}, environ={"PGPROXY_AUDIT_ON_FULL": "drop"})
    assert load_settings({"audit_flush_seconds": "0.2"}, environ={}).audit_flush_seconds == 0.2


def test_serve_without_upstream_is_a_clear_error(tmp_path: Path) -> None:
    out = pgproxy("serve", "--rules", str(REPO / "rules"), "--audit", str(tmp_path / "a.duckdb"),
                  env={"PATH": "/usr/bin:/bin"})  # fmt: skip
    assert out.returncode == 1
    assert "--upstream is required" in out.stderr and "Traceback" not in out.stderr


def test_explain_reads_the_catalog(pg_dsn: str, tmp_path: Path) -> None:
    db = "pgproxy_explain_test"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {db}")
        conn.execute(f"CREATE DATABASE {db}")
    upstream = pg_dsn.rsplit("/", 1)[0] + f"/{db}"
    with psycopg.connect(upstream, autocommit=True) as conn:
        conn.execute("CREATE TABLE patients (id int, ssn text, dob date)")
    (tmp_path / "r.yaml").write_text(
        "agents:\n  - name: bot\n    password: x\n"
        "tags:\n  public.patients.ssn: ssn\n  public.patients.dob: dob\n"
    )
    args = ["explain", "--agent", "bot", "--rules", str(tmp_path), "--upstream", upstream]
    out = pgproxy(*args, "SELECT id, ssn, dob FROM patients")
    assert out.returncode == 0, out.stderr
    assert "MASK" in out.stdout and "ssn" in out.stdout
    out = pgproxy(*args, "SELECT id FROM patients WHERE ssn = '1'")
    assert "BLOCK" in out.stdout or "HOLD" in out.stdout
    out = pgproxy(*args, "SELECT 1")
    assert "ALLOW" in out.stdout
    out = pgproxy("explain", "--agent", "nobody", "--rules", str(tmp_path), "SELECT 1")
    assert out.returncode == 1 and "no agent" in out.stderr
