"""``serve`` settings from three places, in order of precedence: command-line options,
``PGPROXY_<NAME>`` environment variables, a ``--config`` YAML file; then the defaults.

Every option in the contract's table is a field here; the option ``--public-url`` is the
environment variable ``PGPROXY_PUBLIC_URL`` and the config key ``public_url``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml


class ConfigError(Exception):
    """A setting is missing or malformed; the message says which and why."""


@dataclass(frozen=True)
class Settings:
    listen: str = "127.0.0.1:6432"
    upstream: str | None = None
    rules: str = "./rules"
    audit: str = "./pgproxy-audit.duckdb"
    http: str = "127.0.0.1:8080"
    public_url: str | None = None
    smtp: str | None = None
    mail_from: str = "pgproxy@localhost"
    tls_cert: str | None = None
    tls_key: str | None = None
    approvals_db: str | None = None
    audit_key: str | None = None
    audit_export: str | None = None
    audit_flush_seconds: float = 1.0
    audit_on_full: str = "wait"
    max_message_size: int = 1 << 30
    drain_seconds: float = 10.0
    log_format: str = "text"
    log_level: str = "INFO"
    cleartext_over_tls: bool = False
    pseudonym_key: str | None = None
    webhook_url: str | None = None
    reviewer_tokens: str | None = None

    @property
    def listen_addr(self) -> tuple[str, int]:
        return split_hostport(self.listen, "listen")

    @property
    def http_addr(self) -> tuple[str, int]:
        return split_hostport(self.http, "http")

    @property
    def base_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        host, port = self.http_addr
        return f"http://{host}:{port}"

    @property
    def approvals_path(self) -> str:
        return self.approvals_db or str(Path(self.audit).with_suffix(".approvals.sqlite"))


def split_hostport(value: str, name: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"--{name.replace('_', '-')}: expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


_FIELDS = {f.name: f for f in fields(Settings)}


def _coerce(name: str, value: Any) -> Any:
    kind = _FIELDS[name].type
    if value is None:
        return None
    if "bool" in str(kind):
        if isinstance(value, bool):
            return value
        return str(value).lower() in ("1", "true", "yes", "on")
    if "int" in str(kind) and "str" not in str(kind):
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected a whole number, got {value!r}") from None
    if "float" in str(kind):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    return str(value)


def load_settings(
    cli: Mapping[str, Any], environ: Mapping[str, str] | None = None, config_file: str | None = None
) -> Settings:
    """Merge the three sources; unknown config-file keys are an error."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    path = config_file or env.get("PGPROXY_CONFIG")
    if path:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"--config {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"--config {path}: invalid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"--config {path}: the top level must be a mapping")
        for key, value in data.items():
            name = str(key).replace("-", "_")
            if name not in _FIELDS:
                raise ConfigError(f"--config {path}: unknown key {key!r}")
            values[name] = _coerce(name, value)
    for name in _FIELDS:
        var = f"PGPROXY_{name.upper()}"
        if var in env:
            values[name] = _coerce(name, env[var])
    for name, value in cli.items():
        if name in _FIELDS and value is not None:
            values[name] = _coerce(name, value)
    settings = Settings(**values)
    if settings.reviewer_tokens:
        reviewer_tokens(settings)  # validates the file early
    settings.listen_addr  # noqa: B018  (validates)
    settings.http_addr  # noqa: B018
    if settings.audit_on_full not in ("wait", "spill"):
        raise ConfigError("--audit-on-full: expected wait or spill")
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together")
    return settings


def reviewer_tokens(settings: Settings) -> dict[str, str]:
    """token → reviewer, from the ``--reviewer-tokens`` YAML file (reviewer: token)."""
    if not settings.reviewer_tokens:
        return {}
    path = settings.reviewer_tokens
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"--reviewer-tokens {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--reviewer-tokens {path}: invalid YAML: {exc}") from None
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and len(v) >= 24 for k, v in data.items()
    ):
        raise ConfigError(
            f"--reviewer-tokens {path}: expected a mapping reviewer: token (tokens of 24+ chars)"
        )
    return {token: reviewer for reviewer, token in data.items()}
