"""Golden byte vectors from real clients (tests/vectors, see its README): decode and re-encode.

Each vector is the byte stream a real driver and a real Postgres exchanged through a raw relay.
The session part must decode to the recorded message list and re-encode to the identical bytes;
the startup part (nonces, never stable) must decode and re-encode to identical bytes. Replayed
through a pass-through ``Relay`` in recorded order, both directions must come out unchanged.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest

from pgproxy.protocol import messages as m
from pgproxy.protocol.framing import FrameBuffer
from pgproxy.protocol.relay import ProtocolViolation, StatementAdmitted, StatementFinished
from pgproxy.protocol.startup import StartupMessage, read_startup
from tests.protocol.helpers import FakePolicy, Vector, load_vectors, relay_with

VECTORS = load_vectors()
EXPECTED_CLIENTS = {"psql", "psycopg_text", "psycopg_binary", "asyncpg", "pg8000"}


def by_name(vector: Vector) -> str:
    return vector.name


def frames_as_received(chunks: list[bytes]) -> list[tuple[bytes, bytes]]:
    """(tag, body) of every message, framed from the chunks exactly as they arrived."""
    buf = FrameBuffer()
    out = []
    for data in chunks:
        chunk, frames = buf.feed(data)
        out += [(bytes([t]), chunk[s + 5 : e]) for t, s, e in frames]
    assert len(buf) == 0, "a partial message was left over"
    return out


def test_every_client_has_a_vector() -> None:
    assert {v.name for v in VECTORS} == EXPECTED_CLIENTS


@pytest.mark.parametrize("vector", VECTORS, ids=by_name)
@pytest.mark.parametrize(("who", "backend"), [("C", False), ("S", True)], ids=["client", "server"])
def test_session_decodes_and_reencodes(vector: Vector, who: str, backend: bool) -> None:
    chunks = [d for w, d in vector.session if w == who]
    decode = m.decode_backend if backend else m.decode_frontend
    msgs = [decode(tag, body) for tag, body in frames_as_received(chunks)]
    assert [repr(x) for x in msgs] == (vector.backend if backend else vector.frontend)
    assert b"".join(x.encode() for x in msgs) == b"".join(chunks)


@pytest.mark.parametrize("vector", VECTORS, ids=by_name)
def test_session_is_a_consistent_conversation(vector: Vector) -> None:
    """What the server said fits what the client asked: one ReadyForQuery per Query/Sync."""
    front = Counter(type(x).__name__ for x in _decoded(vector, "C"))
    back = Counter(type(x).__name__ for x in _decoded(vector, "S"))
    assert back["ReadyForQuery"] == front["Query"] + front["Sync"]
    assert front["Terminate"] == 1
    parsed = front["Parse"]
    assert back["ParseComplete"] == parsed  # every Parse in these conversations was valid


def _decoded(vector: Vector, who: str) -> list[m.Message]:
    decode = m.decode_backend if who == "S" else m.decode_frontend
    chunks = [d for w, d in vector.session if w == who]
    return [decode(t, b) for t, b in frames_as_received(chunks)]


@pytest.mark.parametrize("vector", VECTORS, ids=by_name)
def test_startup_decodes_and_reencodes(vector: Vector) -> None:
    client = vector.stream("C", "startup")
    packet, used = read_startup(client)
    assert isinstance(packet, StartupMessage)
    assert (packet.major, packet.minor) == (3, 0)
    assert packet.user == "pgproxy_vectors"
    assert packet.encode() == client[:used]
    rest = [m.decode_frontend(t, b) for t, b in frames_as_received([client[used:]])]
    assert rest and all(isinstance(x, m.PasswordMessage) for x in rest)
    assert isinstance(rest[0], m.PasswordMessage)
    assert rest[0].sasl_initial()[0] == "SCRAM-SHA-256"
    assert b"".join(x.encode() for x in rest) == client[used:]

    server = vector.stream("S", "startup")
    back = [m.decode_backend(t, b) for t, b in frames_as_received([server])]
    assert b"".join(x.encode() for x in back) == server
    auth = back[0]
    assert isinstance(auth, m.Authentication)
    assert auth.code == m.AUTH_SASL
    assert "SCRAM-SHA-256" in auth.mechanisms()
    assert any(isinstance(x, m.BackendKeyData) for x in back)
    assert back[-1] == m.ReadyForQuery(b"I")


@pytest.mark.parametrize("vector", VECTORS, ids=by_name)
@pytest.mark.parametrize("bytewise", [False, True], ids=["chunks", "bytes"])
def test_pass_through_relay_is_byte_identical(vector: Vector, bytewise: bool) -> None:
    relay = relay_with(FakePolicy())
    for who, data in vector.session:
        pieces = [data[i : i + 1] for i in range(len(data))] if bytewise else [data]
        for piece in pieces:
            (relay.client_data if who == "C" else relay.server_data)(piece)
    assert bytes(relay.to_server) == vector.stream("C")
    assert bytes(relay.to_client) == vector.stream("S")
    assert not any(isinstance(e, ProtocolViolation) for e in relay.events)
    admitted = [e.statement_id for e in relay.events if isinstance(e, StatementAdmitted)]
    finished = [e.statement_id for e in relay.events if isinstance(e, StatementFinished)]
    assert admitted, "no statement seen"
    assert sorted(finished) == sorted(admitted), "every statement must finish exactly once"
    assert relay.closed  # the client ended with Terminate


def _normalized(lines: list[str]) -> list[str]:
    """Drop what Postgres makes up per run or per build: backend PIDs, source positions."""
    out = []
    for line in lines:
        line = re.sub(r"NotificationResponse\(pid=\d+", "NotificationResponse(pid=?", line)
        line = re.sub(r", \('[FLR]', '[^']*'\)", "", line)
        # asyncpg numbers its statements process-wide: the count depends on earlier tests
        line = re.sub(r"__asyncpg_(stmt|portal)_[0-9a-f]+__", r"__asyncpg_\1_N__", line)
        out.append(line)
    return out


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("psql") is None, reason="psql is not on PATH")
async def test_recorder_reproduces_the_committed_vectors(pg_dsn: str, tmp_path: Path) -> None:
    """The recorder still runs, and today's clients and server say what the vectors say."""
    from tests.protocol import record_vectors

    written = await record_vectors.record_all(pg_dsn, [], tmp_path)
    assert {p.stem for p in written} == EXPECTED_CLIENTS
    committed = {v.name: v for v in VECTORS}
    for path in written:
        fresh = json.loads(path.read_text())
        old = committed[path.stem]
        assert _normalized(fresh["frontend"]) == _normalized(old.frontend), path.stem
        assert _normalized(fresh["backend"]) == _normalized(old.backend), path.stem
