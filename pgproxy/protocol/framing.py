"""Message framing (protocol section 55.2.1): a type byte, an Int32 length counting itself.

``FrameBuffer`` turns a byte stream that arrives in arbitrary chunks into whole messages without
copying them one by one: each call hands back the bytes of every complete message received so
far as one ``bytes`` chunk plus the (tag, start, end) offsets of each message in it, so that the
relay can forward unmodified runs with a single write. A length below 4 or above the configured
maximum is the peer's protocol error, raised before anything is buffered for it.
"""

from __future__ import annotations

import struct

from pgproxy.protocol.errors import PeerProtocolError

_LEN = struct.Struct("!I")
DEFAULT_MAX_MESSAGE_SIZE = 1 << 30

Frames = list[tuple[int, int, int]]


class FrameBuffer:
    __slots__ = ("buffered", "max_size")

    def __init__(self, max_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        #: bytes received but not yet a whole message (read it, never write it)
        self.buffered = bytearray()
        self.max_size = max_size

    def __len__(self) -> int:
        return len(self.buffered)

    def feed(self, data: bytes) -> tuple[bytes, Frames]:
        """Add ``data``; return (chunk, frames) for every message now complete."""
        buf = self.buffered
        if buf:
            buf += data
            src: bytes | bytearray = buf
        else:
            src = data
        n = len(src)
        pos = 0
        frames: Frames = []
        unpack = _LEN.unpack_from
        max_size = self.max_size
        while n - pos >= 5:
            (length,) = unpack(src, pos + 1)
            if length < 4:
                raise PeerProtocolError(f"message length {length} is below the minimum of 4")
            if length > max_size:
                raise PeerProtocolError(
                    f"message of {length} bytes exceeds the maximum message size of {max_size}",
                    sqlstate="54000",
                )
            end = pos + 1 + length
            if end > n:
                break
            frames.append((src[pos], pos, end))
            pos = end
        if src is buf:
            if pos == 0:
                return b"", frames
            chunk = bytes(buf[:pos])
            del buf[:pos]
            return chunk, frames
        if pos < n:
            buf += data[pos:]
        return (data if pos == n else data[:pos]), frames

    def take_rest(self) -> bytes:
        """Everything buffered but not yet framed (used when the stream changes hands)."""
        rest = bytes(self.buffered)
        self.buffered.clear()
        return rest
