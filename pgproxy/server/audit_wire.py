"""The read-only ``audit`` database over the Postgres wire, for analyst identities.

An analyst connects with psql (or any driver) to the proxy, database ``audit``; after SCRAM the
session is served here, never relayed: every query runs on the DuckDB audit through
``query`` (read-only, one statement at a time) and results go back as text columns. The
upstream is unreachable from this path by construction — there is no upstream connection.

Simple Query and the unnamed/named extended protocol without parameters are supported, which is
what psql, psycopg, asyncpg and JDBC use for plain SELECTs.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import json
import re
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pgproxy.protocol import codes
from pgproxy.protocol import messages as m
from pgproxy.protocol.errors import PeerProtocolError
from pgproxy.protocol.framing import FrameBuffer


@dataclass(frozen=True, slots=True)
class Result:
    columns: tuple[str, ...]
    rows: Sequence[Sequence[Any]]


AuditQuery = Callable[[str], Awaitable[Result]]

#: statements drivers send on their own (transaction control, session settings): answered
#: without touching the audit, since every query here is read-only anyway
_HOUSEKEEPING = re.compile(
    r"^\s*(BEGIN|START\s+TRANSACTION|COMMIT|END|ROLLBACK|ABORT|SET|RESET|DISCARD|DEALLOCATE)\b",
    re.IGNORECASE,
)
_TAGS = {"START": "BEGIN", "END": "COMMIT", "ABORT": "ROLLBACK"}


class AuditQueryFailed(Exception):
    """A query was refused or failed; ``sqlstate`` and the message go to the analyst."""

    def __init__(self, message: str, sqlstate: str = "42000") -> None:
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate


SERVER_PARAMETERS = {
    "server_version": "15.0 (pgproxy audit)",
    "server_encoding": "UTF8",
    "client_encoding": "UTF8",
    "DateStyle": "ISO, MDY",
    "integer_datetimes": "on",
    "standard_conforming_strings": "on",
    "TimeZone": "UTC",
    "application_name": "",
}


def text_value(value: Any) -> bytes | None:
    """A DuckDB value in Postgres text format."""
    if value is None:
        return None
    if isinstance(value, bool):
        return b"t" if value else b"f"
    if isinstance(value, dt.datetime):
        return value.isoformat(sep=" ").encode()
    if isinstance(value, dt.date | dt.time | uuid.UUID | decimal.Decimal):
        return str(value).encode()
    if isinstance(value, list | tuple):
        inner = ",".join(_array_item(v) for v in value)
        return ("{" + inner + "}").encode()
    if isinstance(value, dict):
        return json.dumps(value, default=str).encode()
    if isinstance(value, bytes):
        return b"\\x" + value.hex().encode()
    return str(value).encode()


def _array_item(v: Any) -> str:
    if v is None:
        return "NULL"
    raw = text_value(v)
    s = raw.decode() if raw is not None else "NULL"
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _row_description(columns: Sequence[str]) -> bytes:
    return m.RowDescription(tuple(m.Field(c) for c in columns)).encode()


def _rows(result: Result) -> bytes:
    out = bytearray()
    for row in result.rows:
        out += m.encode_data_row([text_value(v) for v in row])
    out += m.CommandComplete(f"SELECT {len(result.rows)}").encode()
    return bytes(out)


class AuditWireSession:
    """Serves one analyst connection until Terminate or disconnect."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, query: AuditQuery
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.query = query
        self._statements: dict[str, str] = {}
        self._portals: dict[str, str] = {}
        self._results: dict[str, Result] = {}
        self._skip_to_sync = False
        self._in_transaction = False

    def _ready(self) -> bytes:
        return m.ReadyForQuery(b"T" if self._in_transaction else b"I").encode()

    def _housekeeping(self, sql: str) -> str | None:
        """The command tag for a statement handled here, or None for a real query."""
        found = _HOUSEKEEPING.match(sql)
        if found is None:
            return None
        word = found.group(1).split()[0].upper()
        tag = _TAGS.get(word, word)
        if tag == "BEGIN":
            self._in_transaction = True
        elif tag in ("COMMIT", "ROLLBACK"):
            self._in_transaction = False
        return tag

    def greeting(self, key: tuple[int, int]) -> bytes:
        out = bytearray(m.Authentication(m.AUTH_OK).encode())
        for name, value in SERVER_PARAMETERS.items():
            out += m.ParameterStatus(name, value).encode()
        out += m.BackendKeyData(*key).encode()
        out += m.ReadyForQuery(b"I").encode()
        return bytes(out)

    async def serve(self, key: tuple[int, int]) -> None:
        self.writer.write(self.greeting(key))
        await self.writer.drain()
        frames = FrameBuffer(1 << 20)
        while True:
            data = await self.reader.read(65536)
            if not data:
                return
            try:
                chunk, fr = frames.feed(data)
            except PeerProtocolError as exc:
                self.writer.write(m.error(exc.sqlstate, exc.message, severity="FATAL"))
                await self.writer.drain()
                return
            for tag, start, end in fr:
                msg = m.decode_frontend(bytes([tag]), memoryview(chunk)[start + 5 : end])
                if isinstance(msg, m.Terminate):
                    return
                await self._handle(msg)
            await self.writer.drain()

    async def _handle(self, msg: m.Message) -> None:
        w = self.writer
        if self._skip_to_sync and not isinstance(msg, m.Sync):
            return
        try:
            if isinstance(msg, m.Query):
                await self._simple(msg.sql)
                return
            if isinstance(msg, m.Sync):
                self._skip_to_sync = False
                w.write(self._ready())
            elif isinstance(msg, m.Parse):
                if msg.param_types:
                    raise AuditQueryFailed("parameters are not supported here", "0A000")
                self._statements[msg.name] = msg.sql
                w.write(m.ParseComplete().encode())
            elif isinstance(msg, m.Bind):
                if msg.params:
                    raise AuditQueryFailed("parameters are not supported here", "0A000")
                sql = self._statements.get(msg.statement)
                if sql is None:
                    raise AuditQueryFailed("prepared statement does not exist", "26000")
                self._portals[msg.portal] = sql
                self._results.pop(msg.portal, None)
                w.write(m.BindComplete().encode())
            elif isinstance(msg, m.Describe):
                await self._describe(msg)
            elif isinstance(msg, m.Execute):
                sql = self._portals.get(msg.portal, "")
                tag = self._housekeeping(sql)
                if tag is not None:
                    w.write(m.CommandComplete(tag).encode())
                    return
                result = await self._portal_result(msg.portal)
                w.write(_rows(result))
                self._results.pop(msg.portal, None)
            elif isinstance(msg, m.Close):
                (self._statements if msg.kind == b"S" else self._portals).pop(msg.name, None)
                w.write(m.CloseComplete().encode())
            elif isinstance(msg, m.Flush):
                pass
            else:
                raise AuditQueryFailed(
                    "the audit database is read-only", codes.INSUFFICIENT_PRIVILEGE
                )
        except AuditQueryFailed as exc:
            w.write(m.error(exc.sqlstate, exc.message))
            self._skip_to_sync = True

    async def _describe(self, msg: m.Describe) -> None:
        if msg.kind == b"S":
            sql = self._statements.get(msg.name)
            if sql is None:
                raise AuditQueryFailed("prepared statement does not exist", "26000")
            result = await self._run(sql)
            self.writer.write(m.ParameterDescription(()).encode())
        else:
            result = await self._portal_result(msg.name)
        self.writer.write(
            _row_description(result.columns) if result.columns else m.NoData().encode()
        )

    async def _portal_result(self, portal: str) -> Result:
        if portal in self._results:
            return self._results[portal]
        sql = self._portals.get(portal)
        if sql is None:
            raise AuditQueryFailed("portal does not exist", "34000")
        result = await self._run(sql)
        self._results[portal] = result
        return result

    async def _run(self, sql: str) -> Result:
        if not sql.strip().rstrip(";").strip() or _HOUSEKEEPING.match(sql):
            return Result((), ())
        return await self.query(sql)

    async def _simple(self, sql: str) -> None:
        w = self.writer
        if not sql.strip().rstrip(";").strip():
            w.write(m.EmptyQueryResponse().encode() + self._ready())
            return
        tag = self._housekeeping(sql)
        if tag is not None:
            w.write(m.CommandComplete(tag).encode() + self._ready())
            return
        try:
            result = await self._run(sql)
        except AuditQueryFailed as exc:
            w.write(m.error(exc.sqlstate, exc.message) + self._ready())
            return
        w.write(_row_description(result.columns) + _rows(result) + self._ready())
