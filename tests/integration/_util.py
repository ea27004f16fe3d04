"""Helpers shared by the real-driver integration tests: superuser peeks at the test Postgres,
bounded polling, proxies with a different upstream, and authenticated raw-socket sessions."""

from __future__ import annotations

import dataclasses
import shutil
import socket
import struct
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import scramp

from pgproxy.server.upstream import UpstreamDSN, parse_dsn
from tests.integration.conftest import AGENT, AGENT_PASSWORD, ProxyThread, start_proxy


def unique(prefix: str) -> str:
    """A name no other test uses (application names, tables, channels)."""
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def superuser(pg_dsn: str) -> psycopg.Connection[tuple[Any, ...]]:
    """A direct (not proxied) autocommit superuser connection."""
    return psycopg.connect(pg_dsn, autocommit=True)


def backends(pg_dsn: str, application_name: str) -> list[int]:
    """PIDs of upstream backends with this application_name (the proxy forwards it)."""
    with superuser(pg_dsn) as conn:
        rows = conn.execute(
            "select pid from pg_stat_activity where application_name = %s", (application_name,)
        ).fetchall()
    return [int(r[0]) for r in rows]


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def upstream(pg_dsn: str, **changes: object) -> UpstreamDSN:
    """The test database's DSN with some fields replaced (host/port/user/password/sslmode...)."""
    return dataclasses.replace(parse_dsn(pg_dsn), **changes)  # type: ignore[arg-type]


@contextmanager
def proxy(pg_dsn: str, rules_dir: Path, **kw: object) -> Iterator[ProxyThread]:
    """A proxy with non-default settings for the duration of a ``with`` block."""
    thread, _audit = start_proxy(pg_dsn, rules_dir, **kw)
    try:
        yield thread
    finally:
        thread.stop()


def agent_dsn(host: str, port: int, user: str = AGENT, password: str = AGENT_PASSWORD) -> str:
    return f"postgresql://{user}:{password}@{host}:{port}/postgres"


# ------------------------------------------------------------------------- raw protocol


def startup_packet(params: dict[str, str], minor: int = 0, major: int = 3) -> bytes:
    body = struct.pack("!HH", major, minor)
    for k, v in params.items():
        body += k.encode() + b"\x00" + v.encode() + b"\x00"
    body += b"\x00"
    return struct.pack("!i", len(body) + 4) + body


def message(tag: bytes, body: bytes) -> bytes:
    return tag + struct.pack("!i", len(body) + 4) + body


class RawConn:
    """A blocking raw-socket client that reads whole backend messages."""

    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, n: int) -> None:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed by the proxy")
            self.buf += chunk

    def read_byte(self) -> bytes:
        self._fill(1)
        b, self.buf = self.buf[:1], self.buf[1:]
        return b

    def read_message(self) -> tuple[bytes, bytes]:
        self._fill(5)
        tag = self.buf[:1]
        (length,) = struct.unpack("!i", self.buf[1:5])
        self._fill(1 + length)
        body = self.buf[5 : 1 + length]
        self.buf = self.buf[1 + length :]
        return tag, body

    def read_until_ready(self) -> list[tuple[bytes, bytes]]:
        out = []
        while True:
            tag, body = self.read_message()
            out.append((tag, body))
            if tag == b"Z":
                return out

    def closed_by_peer(self) -> bool:
        """True once the proxy closed the connection (EOF or reset), after buffered data."""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buf += chunk
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    def login(self, user: str = AGENT, password: str = AGENT_PASSWORD) -> list[tuple[bytes, bytes]]:
        """SCRAM-SHA-256 exchange after the startup packet; returns messages up to ReadyForQuery."""
        tag, body = self.read_message()
        assert tag == b"R" and struct.unpack("!i", body[:4])[0] == 10, (tag, body)
        client = scramp.ScramClient(["SCRAM-SHA-256"], user, password)
        first = client.get_client_first().encode()
        self.send(message(b"p", b"SCRAM-SHA-256\x00" + struct.pack("!i", len(first)) + first))
        tag, body = self.read_message()
        assert tag == b"R" and struct.unpack("!i", body[:4])[0] == 11, (tag, body)
        client.set_server_first(body[4:].decode())
        self.send(message(b"p", client.get_client_final().encode()))
        tag, body = self.read_message()
        assert tag == b"R" and struct.unpack("!i", body[:4])[0] == 12, (tag, body)
        client.set_server_final(body[4:].decode())
        return self.read_until_ready()

    def query(self, sql: str) -> list[tuple[bytes, bytes]]:
        self.send(message(b"Q", sql.encode() + b"\x00"))
        return self.read_until_ready()


def error_fields(body: bytes) -> dict[str, str]:
    """The fields of an ErrorResponse/NoticeResponse body, keyed by their one-letter codes."""
    out: dict[str, str] = {}
    for part in body.split(b"\x00"):
        if part:
            out[part[:1].decode()] = part[1:].decode()
    return out


NODE_DIR = Path(__file__).parent / "node"


def node_with_pg() -> str:
    """The ``node`` executable, with node-postgres installed in ``NODE_DIR`` (npm install on
    first use); skips the test with the reason when either is unavailable."""
    import pytest

    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node/npm are not installed")
    if not (NODE_DIR / "node_modules" / "pg").is_dir():
        try:
            proc = subprocess.run(
                [npm, "install", "--no-audit", "--no-fund", "--loglevel=error"],
                cwd=NODE_DIR, capture_output=True, text=True, timeout=180,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            pytest.skip("npm install timed out (offline?)")
        if proc.returncode != 0:
            pytest.skip(f"npm install failed (offline?): {proc.stderr.strip()[-300:]}")
    return node
