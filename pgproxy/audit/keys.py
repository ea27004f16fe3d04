"""Where the audit's checkpoint-signing key comes from.

``--audit-key`` (or ``PGPROXY_AUDIT_KEY``) is ``env:VAR``, ``file:PATH`` or the key itself. With
none given, a random key is created once in ``<audit>.key`` (mode 0600) beside the audit file
and reused; production deployments should keep the key elsewhere (a secret store, via ``env:``)
so that whoever can rewrite the audit file cannot also re-sign its checkpoints.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


class AuditKeyError(Exception):
    """The configured key cannot be read."""


def default_key_path(audit_path: str | os.PathLike[str]) -> Path:
    return Path(f"{os.fspath(audit_path)}.key")


def resolve_key(
    spec: str | None, audit_path: str | os.PathLike[str], *, create: bool
) -> bytes | None:
    """The signing key; None only when no key exists and ``create`` is False."""
    if spec:
        if spec.startswith("env:"):
            value = os.environ.get(spec[4:])
            if not value:
                raise AuditKeyError(f"--audit-key: environment variable {spec[4:]} is not set")
            return value.encode()
        if spec.startswith("file:"):
            try:
                return Path(spec[5:]).read_bytes().strip()
            except OSError as exc:
                raise AuditKeyError(
                    f"--audit-key: cannot read {spec[5:]}: {exc.strerror}"
                ) from None
        return spec.encode()
    path = default_key_path(audit_path)
    if path.exists():
        return path.read_bytes().strip()
    if not create:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(secrets.token_hex(32).encode())
    return path.read_bytes().strip()
