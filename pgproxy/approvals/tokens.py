"""Secrets of the approval flow: reviewer link tokens, their stored hashes, CSRF tags, ids.

A reviewer link token is ``secrets.token_urlsafe(32)``; only its SHA-256 is ever stored, so a
copy of the approval store does not let anyone decide. The CSRF tag of a review form is an HMAC
of (approval id, token) under a server secret kept in the store, checked in constant time.
Pure functions: no I/O, no clock.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

__all__ = [
    "csrf_ok",
    "csrf_tag",
    "hash_token",
    "new_approval_id",
    "new_server_secret",
    "new_token",
    "tokens_equal",
]


def new_token() -> str:
    """A fresh reviewer token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """The stored form of a token: hex SHA-256 of its UTF-8 bytes."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def tokens_equal(a: str, b: str) -> bool:
    """Constant-time comparison of two token strings."""
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


def new_approval_id() -> str:
    """A short, unguessable approval id, safe in URLs, subjects and error messages."""
    return "apr_" + secrets.token_hex(8)


def new_server_secret() -> bytes:
    return secrets.token_bytes(32)


def csrf_tag(secret: bytes, approval_id: str, token: str) -> str:
    """The CSRF field of the review form for this (request, reviewer token)."""
    msg = b"pgproxy-csrf-v1\0" + approval_id.encode("utf-8") + b"\0" + token.encode("utf-8")
    return hmac.new(secret, msg, hashlib.sha256).hexdigest()


def csrf_ok(secret: bytes, approval_id: str, token: str, tag: str) -> bool:
    return hmac.compare_digest(
        csrf_tag(secret, approval_id, token).encode("ascii"), tag.encode("utf-8")
    )
