"""Record golden byte vectors: real clients talk to a real Postgres through a raw byte relay.

Run from the checkout (re-runnable; it overwrites ``tests/vectors/*.json``)::

    .venv/bin/python tests/protocol/record_vectors.py            # throwaway cluster
    .venv/bin/python tests/protocol/record_vectors.py --dsn postgresql://postgres:pw@127.0.0.1/postgres

The relay (an asyncio server on 127.0.0.1) copies bytes unchanged and writes down every chunk it
reads, with its direction, in arrival order. Each client runs one short, fixed conversation as
the role ``pgproxy_vectors`` (SCRAM, a throwaway password, TimeZone UTC, TLS and GSS encryption
off so the bytes are plain protocol). The transcript is split at the server's first
ReadyForQuery into ``startup`` (carries nonces: never stable) and ``session`` (the part the
tests assert message by message). The decoded session messages are stored as ``repr`` lines
next to the bytes so a reviewer can read them. The tests use the committed files only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit

ROLE = "pgproxy_vectors"
ROLE_PASSWORD = "not-a-secret"
DATABASE = "postgres"
VECTORS = Path(__file__).resolve().parent.parent / "vectors"

Transcript = list[tuple[str, bytes]]

# ------------------------------------------------------------------ the conversations

PSQL_STATEMENTS = [
    "SELECT 1 AS one, 'Jane Fake'::text AS name, NULL::text AS nothing",
    "SELECT 2 AS a \\; SELECT 3 AS b",
    "SELECT 1/0",
    "BEGIN",
    "SELECT 1/0",
    "ROLLBACK",
    "DO $$BEGIN RAISE NOTICE 'fake notice'; END$$",
    "LISTEN pgproxy_vectors",
    "NOTIFY pgproxy_vectors, 'fake payload'",
    "SET application_name = 'vector-psql'",
    "CREATE TEMP TABLE fake_patients (id int, name text)",
    "COPY fake_patients FROM STDIN",
    "COPY fake_patients TO STDOUT",
]
PSQL_COPY_DATA = "1\tJane Fake\n2\tJohn Fake\n\\.\n"

PSYCOPG_TEXT_STATEMENTS = [
    "SELECT %s::int AS n, %s::text AS name, %s::text AS nothing",
    "SELECT 1/%s::int",
    "SELECT %s::int AS k",
]
PSYCOPG_BINARY_STATEMENTS = [
    "SELECT %s::int AS n, %s::text AS name, %s::bytea AS raw, %s::numeric AS num, NULL::int AS z",
]
ASYNCPG_STATEMENTS = [
    "SELECT $1::int AS n, $2::text AS name",
    "SET search_path = public; SELECT 1",
    "SELECT generate_series(1, 5) AS g",
]
PG8000_STATEMENTS = [
    "SELECT CAST(:n AS int) AS n, CAST(:name AS text) AS name",
    "SELECT 1/0",
    "",
    "COPY (SELECT g, 'Fake ' || g FROM generate_series(1, 3) g) TO STDOUT",
]


def conninfo(host: str, port: int) -> str:
    return (
        f"host={host} port={port} dbname={DATABASE} user={ROLE} password={ROLE_PASSWORD} "
        "sslmode=disable gssencmode=disable"
    )


async def run_psql(host: str, port: int) -> str:
    exe = shutil.which("psql")
    if exe is None:
        raise RuntimeError("psql is not on PATH")
    script = ""
    for sql in PSQL_STATEMENTS:
        script += sql + ";\n"
        if sql.startswith("COPY fake_patients FROM"):
            script += PSQL_COPY_DATA
    env = dict(os.environ, PGCLIENTENCODING="UTF8", PGTZ="UTC", LC_ALL="C")
    proc = await asyncio.create_subprocess_exec(
        exe,
        "-X",
        "-q",
        "-d",
        conninfo(host, port),
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    await asyncio.wait_for(proc.communicate(script.encode()), 60)
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True)
    return out.stdout.strip()


async def run_psycopg(host: str, port: int, *, binary: bool) -> str:
    import psycopg

    async with await psycopg.AsyncConnection.connect(conninfo(host, port), autocommit=True) as conn:
        cur = conn.cursor(binary=binary)
        if binary:
            await cur.execute(
                PSYCOPG_BINARY_STATEMENTS[0], (41, "Jane Fake", b"\x00\x01fake", "12.50")
            )
            await cur.fetchall()
        else:
            await cur.execute(PSYCOPG_TEXT_STATEMENTS[0], (41, "Jane Fake", None))
            await cur.fetchall()
            with contextlib.suppress(psycopg.errors.DivisionByZero):
                await cur.execute(PSYCOPG_TEXT_STATEMENTS[1], (0,))
            # executemany runs as one pipeline: three Parse/Bind/Describe/Execute, one Sync
            await cur.executemany(PSYCOPG_TEXT_STATEMENTS[2], [(1,), (2,), (3,)])
    return f"psycopg {psycopg.__version__} ({'binary' if binary else 'text'})"


async def run_asyncpg(host: str, port: int) -> str:
    import asyncpg

    conn = await asyncpg.connect(
        host=host, port=port, user=ROLE, password=ROLE_PASSWORD, database=DATABASE, ssl=False
    )
    try:
        await conn.fetch(ASYNCPG_STATEMENTS[0], 7, "Jane Fake")
        await conn.execute(ASYNCPG_STATEMENTS[1])
        async with conn.transaction():
            # prefetch=2: Execute with a row limit, PortalSuspended, Execute again
            async for _ in conn.cursor(ASYNCPG_STATEMENTS[2], prefetch=2):
                pass
    finally:
        await conn.close()
    return f"asyncpg {asyncpg.__version__}"


def _pg8000_session(host: str, port: int) -> str:
    import pg8000.native  # type: ignore[import-untyped]

    conn = pg8000.native.Connection(
        ROLE, host=host, port=port, database=DATABASE, password=ROLE_PASSWORD, ssl_context=False
    )
    try:
        conn.run(PG8000_STATEMENTS[0], n=3, name="Jane Fake")
        with contextlib.suppress(pg8000.native.DatabaseError):
            conn.run(PG8000_STATEMENTS[1])
        conn.run(PG8000_STATEMENTS[2])
        conn.run(PG8000_STATEMENTS[3], stream=io.BytesIO())
    finally:
        conn.close()
    return f"pg8000 {pg8000.__version__}"


async def run_pg8000(host: str, port: int) -> str:
    return await asyncio.to_thread(_pg8000_session, host, port)


ClientRun = Callable[[str, int], Awaitable[str]]


async def _psycopg_text(host: str, port: int) -> str:
    return await run_psycopg(host, port, binary=False)


async def _psycopg_binary(host: str, port: int) -> str:
    return await run_psycopg(host, port, binary=True)


CLIENTS: dict[str, tuple[ClientRun, list[str]]] = {
    "psql": (run_psql, PSQL_STATEMENTS),
    "psycopg_text": (_psycopg_text, PSYCOPG_TEXT_STATEMENTS),
    "psycopg_binary": (_psycopg_binary, PSYCOPG_BINARY_STATEMENTS),
    "asyncpg": (run_asyncpg, ASYNCPG_STATEMENTS),
    "pg8000": (run_pg8000, PG8000_STATEMENTS),
}

# ------------------------------------------------------------------ the raw relay


class RecordingRelay:
    """Copies bytes between each client and the upstream unchanged, noting every chunk."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.done: list[asyncio.Future[Transcript]] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        fut: asyncio.Future[Transcript] = asyncio.get_running_loop().create_future()
        self.done.append(fut)
        log: Transcript = []
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, who: str) -> None:
            try:
                while data := await src.read(65536):
                    log.append((who, data))
                    dst.write(data)
                    await dst.drain()
            except ConnectionError:
                pass
            finally:
                with contextlib.suppress(Exception):
                    dst.close()

        await asyncio.gather(pump(reader, up_writer, "C"), pump(up_reader, writer, "S"))
        fut.set_result(log)


# ------------------------------------------------------------------ splitting and writing


def split_transcript(log: Transcript) -> tuple[Transcript, Transcript]:
    """(startup, session): everything up to and including the server's first ReadyForQuery."""
    server = b"".join(d for who, d in log if who == "S")
    pos = 0
    while True:
        if pos + 5 > len(server):
            raise RuntimeError("no ReadyForQuery in the server stream")
        tag = server[pos : pos + 1]
        length = int.from_bytes(server[pos + 1 : pos + 5], "big")
        pos += 1 + length
        if tag == b"Z":
            break
    startup: Transcript = []
    session: Transcript = []
    seen = 0
    for who, data in log:
        if who == "S" and seen < pos:
            cut = min(len(data), pos - seen)
            startup.append((who, data[:cut]))
            if cut < len(data):
                session.append((who, data[cut:]))
            seen += len(data)
        elif seen < pos:
            startup.append((who, data))
        else:
            session.append((who, data))
    return startup, session


def describe(session: Transcript) -> tuple[list[str], list[str]]:
    """The decoded messages of each direction, as repr lines (needs pgproxy importable)."""
    from pgproxy.protocol import messages as m
    from pgproxy.protocol.framing import FrameBuffer

    out: dict[str, list[str]] = {"C": [], "S": []}
    for who in ("C", "S"):
        stream = b"".join(d for w, d in session if w == who)
        chunk, frames = FrameBuffer().feed(stream)
        decode = m.decode_frontend if who == "C" else m.decode_backend
        for tag, start, end in frames:
            out[who].append(repr(decode(bytes([tag]), chunk[start + 5 : end])))
    return out["C"], out["S"]


def write_vector(
    name: str,
    client: str,
    server_version: str,
    statements: list[str],
    log: Transcript,
    out: Path = VECTORS,
) -> Path:
    startup, session = split_transcript(log)
    frontend, backend = describe(session)
    doc = {
        "name": name,
        "client": client,
        "server_version": server_version,
        "statements": statements,
        "startup": [[who, data.hex()] for who, data in startup],
        "session": [[who, data.hex()] for who, data in session],
        "frontend": frontend,
        "backend": backend,
    }
    path = out / f"{name}.json"
    path.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    return path


# ------------------------------------------------------------------ setup and main


def prepare_role(superuser_dsn: str) -> str:
    """Create the recording role; return the server version."""
    import psycopg

    with psycopg.connect(superuser_dsn, autocommit=True) as conn:
        conn.execute(
            f"DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{ROLE}') "
            f"THEN CREATE ROLE {ROLE} LOGIN; END IF; END$$"
        )
        conn.execute("SET password_encryption = 'scram-sha-256'")
        conn.execute(f"ALTER ROLE {ROLE} PASSWORD '{ROLE_PASSWORD}'")
        conn.execute(f"ALTER ROLE {ROLE} SET TimeZone = 'UTC'")
        conn.execute(f"ALTER ROLE {ROLE} SET DateStyle = 'ISO, MDY'")
        row = conn.execute("SHOW server_version").fetchone()
        assert row is not None
        return str(row[0])


async def record_all(superuser_dsn: str, only: list[str], out: Path = VECTORS) -> list[Path]:
    server_version = prepare_role(superuser_dsn)
    parts = urlsplit(superuser_dsn)
    relay = RecordingRelay(parts.hostname or "127.0.0.1", parts.port or 5432)
    host, port = await relay.start()
    written = []
    try:
        for name, (run, statements) in CLIENTS.items():
            if only and name not in only:
                continue
            before = len(relay.done)
            client = await run(host, port)
            if len(relay.done) != before + 1:
                raise RuntimeError(f"{name} opened {len(relay.done) - before} connections, not 1")
            log = await asyncio.wait_for(relay.done[-1], 30)
            written.append(write_vector(name, client, server_version, statements, log, out))
    finally:
        await relay.stop()
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument(
        "--dsn",
        default=os.environ.get("PGPROXY_TEST_DSN"),
        help="superuser DSN (default: PGPROXY_TEST_DSN, else a throwaway cluster)",
    )
    ap.add_argument(
        "only", nargs="*", help=f"clients to record (default all: {', '.join(CLIENTS)})"
    )
    args = ap.parse_args(argv)
    if unknown := set(args.only) - set(CLIENTS):
        ap.error(f"unknown client(s): {', '.join(sorted(unknown))}")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    VECTORS.mkdir(exist_ok=True)
    if args.dsn:
        paths = asyncio.run(record_all(args.dsn, args.only))
    else:
        from pgproxy.pgcluster import Cluster

        base = Path(tempfile.mkdtemp(prefix="pgproxy-vectors-"))
        cluster = Cluster.create(base)
        cluster.start()
        try:
            paths = asyncio.run(record_all(cluster.dsn(), args.only))
        finally:
            cluster.stop()
            shutil.rmtree(base, ignore_errors=True)
    for p in paths:
        print(f"wrote {p} ({p.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
