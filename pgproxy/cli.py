"""The ``pgproxy`` command: serve, demo, rules check, explain, audit sql/verify, hash-password.

Each subcommand parses its options here and hands off to the module that owns the work; errors
a user can fix (bad config, bad rules, unreachable database) are printed as one clear line and
exit with status 1 or 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from pgproxy.config import ConfigError, load_settings
from pgproxy.rules import RulesError, load_rules


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(
            {
                "ts": self.formatTime(record),
                "level": record.levelname,
                "logger": record.name,
                "msg": record.getMessage(),
            }
        )


def setup_logging(fmt: str = "text", level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _serve_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file with serve settings (keys as the option names)")
    p.add_argument("--listen", help="HOST:PORT agents connect to (default 127.0.0.1:6432)")
    p.add_argument("--upstream", help="DSN of the real database (held by the proxy only)")
    p.add_argument("--rules", help="rules directory (default ./rules)")
    p.add_argument("--audit", help="DuckDB audit file (default ./pgproxy-audit.duckdb)")
    p.add_argument("--http", help="HOST:PORT for approvals, API, /healthz, /metrics")
    p.add_argument("--public-url", dest="public_url", help="base URL of links in emails")
    p.add_argument("--smtp", help="smtp://, smtp+starttls:// or smtps:// URL (default: log emails)")
    p.add_argument("--mail-from", dest="mail_from", help="sender of approval emails")
    p.add_argument("--tls-cert", dest="tls_cert", help="TLS certificate for agents")
    p.add_argument("--tls-key", dest="tls_key", help="TLS key for agents")
    p.add_argument("--approvals-db", dest="approvals_db", help="approval store (SQLite file)")
    p.add_argument("--audit-key", dest="audit_key", help="key that signs audit checkpoints")
    p.add_argument("--audit-export", dest="audit_export", help="directory for Parquet exports")
    p.add_argument(
        "--audit-flush-seconds",
        dest="audit_flush_seconds",
        type=float,
        help="ordinary audit records are on disk within this many seconds (default 1)",
    )
    p.add_argument(
        "--audit-on-full",
        dest="audit_on_full",
        choices=["wait", "spill"],
        help="audit queue full: statements wait (default), or records spill to <audit>.spill/",
    )
    p.add_argument("--webhook-url", dest="webhook_url", help="also POST approval requests here")
    p.add_argument(
        "--reviewer-tokens", dest="reviewer_tokens", help="YAML reviewer: token for the JSON API"
    )
    p.add_argument(
        "--cleartext-over-tls",
        dest="cleartext_over_tls",
        action="store_const",
        const=True,
        help="ask TLS agents for a cleartext password instead of SCRAM",
    )
    p.add_argument("--pseudonym-key", dest="pseudonym_key", help="key for pseudonymous tokens")
    p.add_argument("--log-format", dest="log_format", choices=["text", "json"])
    p.add_argument("--log-level", dest="log_level")
    p.add_argument("--max-message-size", dest="max_message_size", type=int)
    p.add_argument("--drain-seconds", dest="drain_seconds", type=float)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgproxy", description="PostgreSQL governance proxy for AI agents touching PHI"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the proxy until SIGTERM/SIGINT")
    _serve_options(serve)

    demo = sub.add_parser("demo", help="embedded Postgres + synthetic clinic + proxy + mail sink")
    demo.add_argument("--data-dir", dest="data_dir", help="where the demo keeps its cluster")
    demo.add_argument("--fresh", action="store_true", help="start from an empty data dir")
    demo.add_argument("--listen", default="127.0.0.1:6432")
    demo.add_argument("--http", default="127.0.0.1:8080")
    demo.add_argument("--rows", type=int, default=None, help="patients to seed")

    rules = sub.add_parser("rules", help="rules tooling")
    rules_sub = rules.add_subparsers(dest="rules_command", required=True)
    check = rules_sub.add_parser("check", help="validate a rules directory")
    check.add_argument("dir", nargs="?", default="./rules")

    explain = sub.add_parser(
        "explain", help="print the decision for a statement, without running it"
    )
    explain.add_argument("--agent", required=True)
    explain.add_argument("sql")
    explain.add_argument("--rules", default=None)
    explain.add_argument("--upstream", default=None, help="read the catalog from this database")
    explain.add_argument("--config", default=None)

    audit = sub.add_parser("audit", help="query or verify the audit")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    asql = audit_sub.add_parser("sql", help="run a read-only query on the audit")
    asql.add_argument("query")
    asql.add_argument("--audit", default=None)
    asql.add_argument("--http", default=None, help="HOST:PORT of a running pgproxy serve")
    asql.add_argument("--format", choices=["table", "csv", "json"], default="table")
    verify = audit_sub.add_parser("verify", help="check the audit's tamper evidence")
    verify.add_argument("--audit", default=None)
    verify.add_argument("--audit-key", dest="audit_key", default=None)
    verify.add_argument("--http", default=None, help="HOST:PORT of a running pgproxy serve")

    hp = sub.add_parser("hash-password", help="print a SCRAM-SHA-256 verifier for rules/")
    hp.add_argument("--password", default=None, help="(default: prompt)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except (ConfigError, RulesError) as exc:
        print(f"pgproxy: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    cmd = args.command
    if cmd == "serve":
        cli = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
        settings = load_settings(cli, config_file=args.config)
        setup_logging(settings.log_format, settings.log_level)
        from pgproxy.server.runtime import run

        return _run_async(run(settings))
    if cmd == "demo":
        setup_logging()
        from pgproxy.demo import run_demo

        return _run_async(run_demo(args))
    if cmd == "rules":
        rules = load_rules(args.dir)
        print(
            f"{args.dir}: ok ({len(rules.agents)} agents, {len(rules.analysts)} analysts, "
            f"{len(rules.tags)} tagged columns)"
        )
        return 0
    if cmd == "explain":
        return _explain(args)
    if cmd == "audit":
        return _audit(args)
    if cmd == "hash-password":
        from pgproxy.server.credentials import format_verifier, verifier_from_password

        password = args.password if args.password is not None else getpass.getpass("password: ")
        print(format_verifier(verifier_from_password(password)))
        return 0
    raise AssertionError(cmd)


def _run_async(coro: Any) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        return int(asyncio.run(coro) or 0)
    return int(uvloop.run(coro) or 0)


def _explain(args: argparse.Namespace) -> int:
    from pgproxy.policy.catalog import Catalog
    from pgproxy.policy.decide import explain
    from pgproxy.server.policy_hub import PolicyHub

    settings = load_settings(
        {"rules": args.rules, "upstream": args.upstream}, config_file=args.config
    )
    rules = load_rules(settings.rules)
    if rules.agent(args.agent) is None:
        print(f"pgproxy: no agent named {args.agent!r} in {settings.rules}", file=sys.stderr)
        return 1
    hub = PolicyHub(rules, settings.upstream or "")
    if settings.upstream and not _run_async(_refresh(hub)):
        print("pgproxy: cannot read the catalog from the upstream", file=sys.stderr)
        return 1
    catalog = hub.catalog or Catalog.build((), (), rules.tags)
    if not settings.upstream:
        print("(no --upstream: the catalog is empty, so every relation is unknown)")
    print(explain(rules, catalog, hub.masks, args.agent, args.sql))
    return 0


async def _refresh(hub: Any) -> int:
    return 1 if await hub.refresh() else 0


def _audit(args: argparse.Namespace) -> int:
    from pgproxy.audit.http import query_over_http, verify_over_http
    from pgproxy.audit.keys import AuditKeyError, resolve_key
    from pgproxy.audit.query import AuditQueryError, QueryRejected, format_result, run_query
    from pgproxy.audit.verify import verify

    env_settings = load_settings({})
    path = args.audit or env_settings.audit
    try:
        if args.audit_command == "sql":
            if args.http:
                result = _run_async_value(query_over_http(args.http, args.query))
            else:
                result = run_query(path, args.query)
            print(format_result(result, args.format))
            return 0
        if args.http:
            body = _run_async_value(verify_over_http(args.http))
            if body["ok"]:
                print(f"live audit: ok, {body['rows']} rows, {body['checkpoints']} checkpoints")
                return 0
            print(f"live audit: TAMPERED: {body['first_bad']}", file=sys.stderr)
            return 1
        key = resolve_key(args.audit_key or env_settings.audit_key, path, create=False)
        outcome = verify(path, key)
    except (QueryRejected, AuditQueryError, AuditKeyError) as exc:
        print(f"pgproxy: {exc}", file=sys.stderr)
        return 1
    if outcome.ok:
        signed = "signed" if key else "unsigned (no key found)"
        print(f"{path}: ok, {outcome.rows} rows, {outcome.checkpoints} checkpoints {signed}")
        return 0
    print(f"{path}: TAMPERED: {outcome.first_bad}", file=sys.stderr)
    return 1


def _run_async_value(coro: Any) -> Any:
    return asyncio.run(coro)
