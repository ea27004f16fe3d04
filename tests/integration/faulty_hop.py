"""A fault-injecting TCP hop between the proxy and Postgres, for lost-connection tests.

``FaultyHop`` listens on 127.0.0.1, forwards every connection to the target unchanged, counts
the connections it accepted, and cuts them on demand (``cut_all``: both sockets reset at once),
so a test can put it in the proxy's upstream DSN and watch what the agent sees when the database
link dies, or assert that a refused agent never caused an upstream connection at all. It runs its
own event loop in a daemon thread, so sync and async tests can use it alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine
from typing import Any


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset rather than a polite FIN: the way a dead link looks."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultyHop:
    """A TCP forwarder to ``target`` that can count and cut its connections."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.connections_total = 0
        self.host = "127.0.0.1"
        self.port = 0
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._server: asyncio.Server | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> FaultyHop:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    def start(self) -> FaultyHop:
        self._thread.start()

        async def listen() -> None:
            self._server = await asyncio.start_server(self._accept, self.host, 0)
            self.port = int(self._server.sockets[0].getsockname()[1])

        self._run(listen())
        return self

    @property
    def active(self) -> int:
        """Connections currently open through the hop."""

        async def count() -> int:
            return len(self._pairs)

        return int(self._run(count()))

    def cut_all(self) -> int:
        """Reset every open connection (both directions); return how many were cut."""

        async def cut() -> int:
            pairs = list(self._pairs)
            for a, b in pairs:
                _abort(a)
                _abort(b)
            self._pairs.clear()
            return len(pairs)

        return int(self._run(cut()))

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for a, b in list(self._pairs):
                _abort(a)
                _abort(b)
            self._pairs.clear()

        with contextlib.suppress(Exception):
            self._run(close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections_total += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            _abort(writer)
            return
        pair = (writer, up_writer)
        self._pairs.add(pair)
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
            )
        finally:
            self._pairs.discard(pair)
            for w in pair:
                w.close()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            if not writer.is_closing():
                with contextlib.suppress(OSError, RuntimeError):
                    writer.write_eof()
