"""A plain TCP byte relay: the floor pgproxy's overhead is measured against.

It forwards bytes between each client and a new upstream connection without looking at them:
no framing, no policy, no TLS termination. Whatever pgproxy costs beyond this relay is the price
of understanding the protocol; whatever this relay costs beyond a direct connection is the price
of an extra hop through a Python process, which no Python proxy can avoid.

Two I/O models, so the cost of the model itself can be told apart from the cost of the work:

- ``protocol`` (default, the floor): ``asyncio.Protocol`` callbacks write each chunk straight
  to the other transport; the transports' flow control (``pause_writing`` → the peer's
  ``pause_reading``) carries backpressure.
- ``streams``: two ``StreamReader.read`` / ``StreamWriter.write`` + ``drain`` pumps per
  connection, the same shape as pgproxy's session loop.

``--write-buffer BYTES`` raises the transports' write-buffer high-water mark (default: the
loop's 64 KiB). Runs on uvloop when it is installed. Prints ``listening on HOST:PORT`` once it
accepts connections and runs until SIGTERM or SIGINT::

    python benchmarks/relay.py --listen 127.0.0.1:0 --upstream 127.0.0.1:5432 [--mode streams]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
from collections.abc import Awaitable, Callable
from typing import cast

READ_SIZE = 256 * 1024
#: transports' write-buffer high-water mark in bytes (0: the loop's default, 64 KiB)
WRITE_BUFFER = 0


def _nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Side(asyncio.Protocol):
    """One end of a relayed connection; ``peer`` is the other end."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)
        _nodelay(transport)
        if WRITE_BUFFER:
            self.transport.set_write_buffer_limits(high=WRITE_BUFFER)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def eof_received(self) -> bool | None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


class _ClientSide(_Side):
    """The agent's end: bytes that arrive before the upstream connection exists are kept.

    (Pausing reading in ``connection_made`` and resuming later loses the wakeup on uvloop.)
    """

    def __init__(self, upstream: tuple[str, int], tasks: set[asyncio.Task[None]]) -> None:
        super().__init__()
        self._upstream = upstream
        self._tasks = tasks
        self._early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        task = asyncio.get_running_loop().create_task(self._connect())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def data_received(self, data: bytes) -> None:
        if self.peer is None:
            self._early.append(data)
        else:
            super().data_received(data)

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.transport is not None
        try:
            _transport, server = await loop.create_connection(_Side, *self._upstream)
        except OSError:
            self.transport.close()
            return
        assert server.transport is not None
        if self.transport.is_closing():
            server.transport.close()
            return
        server.peer, self.peer = self, server
        for data in self._early:
            server.transport.write(data)
        self._early.clear()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(READ_SIZE):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


def _streams_handler(
    upstream: tuple[str, int],
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _nodelay(writer.transport)
        try:
            up_reader, up_writer = await asyncio.open_connection(*upstream, limit=READ_SIZE)
        except OSError:
            writer.close()
            return
        _nodelay(up_writer.transport)
        await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))

    return handle


def _hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host or "127.0.0.1", int(port)


async def serve(listen: tuple[str, int], upstream: tuple[str, int], mode: str) -> None:
    """Relay until SIGTERM/SIGINT."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()
    server: asyncio.Server
    if mode == "streams":
        server = await asyncio.start_server(_streams_handler(upstream), *listen, limit=READ_SIZE)
    else:
        server = await loop.create_server(lambda: _ClientSide(upstream, tasks), *listen)
    host, port = server.sockets[0].getsockname()[:2]
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"relay ({mode}, {type(loop).__module__}) listening on {host}:{port}", flush=True)
    await stop.wait()
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0: any free)")
    parser.add_argument("--upstream", required=True, help="HOST:PORT of Postgres")
    parser.add_argument("--mode", choices=["protocol", "streams"], default="protocol")
    parser.add_argument("--write-buffer", type=int, default=0, help="high-water mark, bytes")
    args = parser.parse_args()
    global WRITE_BUFFER
    WRITE_BUFFER = args.write_buffer
    coro = serve(_hostport(args.listen), _hostport(args.upstream), args.mode)
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


if __name__ == "__main__":
    main()
