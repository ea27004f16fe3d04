"""The startup phase (protocol sections 55.2.1, 55.2.10-11, 55.7 "StartupMessage" et al.).

Startup packets have no type byte: an Int32 length, an Int32 request code, a body. This module
decodes them into ``SSLRequest``, ``GSSENCRequest``, ``CancelRequest`` and ``StartupMessage`` and
encodes the ones pgproxy sends upstream. Decisions about them (answer ``N`` to GSSENC, refuse
replication, negotiate the minor version) are taken by ``pgproxy.server.frontend``; this module
only says what arrived.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from pgproxy.protocol.errors import PeerProtocolError

MAX_STARTUP_PACKET = 10_000
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102
PROTOCOL_3 = 3

_II = struct.Struct("!ii")
_IIII = struct.Struct("!iiii")


@dataclass(frozen=True, slots=True)
class SSLRequest:
    def encode(self) -> bytes:
        return _II.pack(8, SSL_REQUEST_CODE)


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    def encode(self) -> bytes:
        return _II.pack(8, GSSENC_REQUEST_CODE)


@dataclass(frozen=True, slots=True)
class CancelRequest:
    pid: int
    secret: int

    def encode(self) -> bytes:
        return _IIII.pack(16, CANCEL_REQUEST_CODE, self.pid, self.secret)


@dataclass(frozen=True, slots=True)
class StartupMessage:
    major: int
    minor: int
    params: dict[str, str] = field(default_factory=dict)

    def encode(self) -> bytes:
        body = b"".join(k.encode() + b"\x00" + v.encode() + b"\x00" for k, v in self.params.items())
        body += b"\x00"
        return _II.pack(len(body) + 8, (self.major << 16) | self.minor) + body

    @property
    def user(self) -> str:
        return self.params.get("user", "")

    @property
    def database(self) -> str:
        return self.params.get("database") or self.user


StartupPacket = SSLRequest | GSSENCRequest | CancelRequest | StartupMessage


def read_startup(buf: bytes | bytearray) -> tuple[StartupPacket | None, int]:
    """Decode one startup packet from the front of ``buf``: (packet, bytes used) or (None, 0)."""
    if len(buf) < 8:
        return None, 0
    length, code = _II.unpack_from(buf, 0)
    if length < 8 or length > MAX_STARTUP_PACKET:
        raise PeerProtocolError(f"invalid startup packet length {length}")
    if len(buf) < length:
        return None, 0
    body = bytes(buf[8:length])
    if code == SSL_REQUEST_CODE:
        if length != 8:
            raise PeerProtocolError("SSLRequest has the wrong length")
        return SSLRequest(), length
    if code == GSSENC_REQUEST_CODE:
        if length != 8:
            raise PeerProtocolError("GSSENCRequest has the wrong length")
        return GSSENCRequest(), length
    if code == CANCEL_REQUEST_CODE:
        if length != 16:
            raise PeerProtocolError("CancelRequest has the wrong length")
        pid, secret = _II.unpack_from(body, 0)
        return CancelRequest(pid, secret), length
    major, minor = code >> 16, code & 0xFFFF
    if major != PROTOCOL_3:
        raise PeerProtocolError(
            f"unsupported frontend protocol {major}.{minor}: server supports 3.0", sqlstate="0A000"
        )
    return StartupMessage(major, minor, _params(body)), length


def _params(body: bytes) -> dict[str, str]:
    if not body.endswith(b"\x00"):
        raise PeerProtocolError("startup packet is not NUL-terminated")
    parts = body[:-1].split(b"\x00")
    if parts[-1] != b"":
        raise PeerProtocolError("startup packet is not NUL-terminated")
    parts.pop()
    if len(parts) % 2:
        raise PeerProtocolError("startup packet has a name without a value")
    try:
        items = [p.decode() for p in parts]
    except UnicodeDecodeError:
        raise PeerProtocolError("startup packet is not valid UTF-8") from None
    params: dict[str, str] = {}
    for name, value in zip(items[::2], items[1::2], strict=True):
        if not name:
            raise PeerProtocolError("startup packet has an empty parameter name")
        params[name] = value
    return params
