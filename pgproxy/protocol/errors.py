"""Protocol errors, split by who broke the protocol (as h11 does).

``PeerProtocolError`` is raised when the bytes we received are invalid; the session answers with
an ErrorResponse carrying ``sqlstate`` (08P01 by default) and closes. ``LocalProtocolError`` means
pgproxy itself was about to send something illegal — a bug, never the peer's fault.
"""

from __future__ import annotations


class ProtocolError(Exception):
    def __init__(self, message: str, sqlstate: str = "08P01") -> None:
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate


class PeerProtocolError(ProtocolError):
    """The peer sent bytes that are not valid protocol 3.0 at this point."""


class LocalProtocolError(ProtocolError):
    """pgproxy was about to violate the protocol."""
