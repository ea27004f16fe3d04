"""Sans-I/O PostgreSQL protocol 3.0: framing, messages, startup, and the relay state machine.

Nothing in this package imports asyncio, opens a socket, reads a clock or logs: bytes in,
events and bytes out. See https://www.postgresql.org/docs/current/protocol.html.
"""
