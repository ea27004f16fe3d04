"""A recording TCP hop: everything the proxy sends to the client, kept for byte-level checks.

Security tests put this between a real driver and the proxy, then assert that no seeded PHI
value appears anywhere in ``received`` — DataRow, CopyData, ErrorResponse, NoticeResponse,
NotificationResponse alike, since it is simply every byte on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading


class CaptureHop:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.received = bytearray()
        self.host = "127.0.0.1"
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> CaptureHop:
        self._thread.start()

        async def listen() -> None:
            self._server = await asyncio.start_server(self._accept, self.host, 0)
            self.port = int(self._server.sockets[0].getsockname()[1])

        asyncio.run_coroutine_threadsafe(listen(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def snapshot(self) -> bytes:
        with self._lock:
            return bytes(self.received)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, record: bool) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await src.read(65536):
                    if record:
                        with self._lock:
                            self.received += data
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(Exception):
                dst.close()

        await asyncio.gather(pipe(reader, up_writer, False), pipe(up_reader, writer, True))
