"""Every protocol 3.0 message, as frozen dataclasses that decode from and encode to bytes.

Section 55.7 ("Message Formats") of the PostgreSQL documentation. Regular messages are a tag
byte, an Int32 length that counts itself, and a body; ``decode_frontend``/``decode_backend`` take
the tag and the body, ``encode()`` gives the whole message. Tags collide between directions
('D' is Describe from the client and DataRow from the server), hence two tables. Startup-phase
packets (no tag) live in ``pgproxy.protocol.startup``.

The relay forwards most messages as their original bytes and decodes only what it inspects;
these classes are for that inspection and for messages pgproxy writes itself.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Self

from pgproxy.protocol.errors import PeerProtocolError

_I16 = struct.Struct("!h")
_U16 = struct.Struct("!H")
_I32 = struct.Struct("!i")
_HDR = struct.Struct("!cI")
_FIELD = struct.Struct("!IhIhih")


def frame(tag: bytes, body: bytes = b"") -> bytes:
    """A whole regular message: tag, length, body."""
    return _HDR.pack(tag, len(body) + 4) + body


def cstr(s: str) -> bytes:
    b = s.encode()
    if b"\x00" in b:
        raise ValueError("NUL byte in a protocol string")
    return b + b"\x00"


class Reader:
    """Reads the fields of one message body; any overrun is the peer's protocol error."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes | memoryview) -> None:
        self.buf = bytes(buf)
        self.pos = 0

    def _need(self, n: int) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise PeerProtocolError("message is shorter than its fields")

    def int8(self) -> int:
        self._need(1)
        v = self.buf[self.pos]
        self.pos += 1
        return v

    def int16(self) -> int:
        self._need(2)
        (v,) = _I16.unpack_from(self.buf, self.pos)
        self.pos += 2
        return int(v)

    def uint16(self) -> int:
        self._need(2)
        (v,) = _U16.unpack_from(self.buf, self.pos)
        self.pos += 2
        return int(v)

    def int32(self) -> int:
        self._need(4)
        (v,) = _I32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return int(v)

    def uint32(self) -> int:
        return self.int32() & 0xFFFFFFFF

    def bytes_(self, n: int) -> bytes:
        self._need(n)
        v = self.buf[self.pos : self.pos + n]
        self.pos += n
        return v

    def cstring(self) -> str:
        end = self.buf.find(b"\x00", self.pos)
        if end < 0:
            raise PeerProtocolError("string is not NUL-terminated")
        raw = self.buf[self.pos : end]
        self.pos = end + 1
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise PeerProtocolError("string is not valid UTF-8") from None

    def rest(self) -> bytes:
        v = self.buf[self.pos :]
        self.pos = len(self.buf)
        return v

    def value(self) -> bytes | None:
        n = self.int32()
        if n == -1:
            return None
        if n < -1:
            raise PeerProtocolError("negative value length")
        return self.bytes_(n)

    def done(self) -> None:
        if self.pos != len(self.buf):
            raise PeerProtocolError("message has trailing bytes")


def _value(v: bytes | None) -> bytes:
    return b"\xff\xff\xff\xff" if v is None else _I32.pack(len(v)) + v


class Message:
    TAG: ClassVar[bytes]

    def body(self) -> bytes:
        return b""

    def encode(self) -> bytes:
        return frame(self.TAG, self.body())

    @classmethod
    def decode(cls, body: bytes | memoryview) -> Self:
        r = Reader(body)
        msg = cls._read(r)
        r.done()
        return msg

    @classmethod
    def _read(cls, r: Reader) -> Self:
        return cls()


class _Empty(Message):
    pass


# ---------------------------------------------------------------- frontend and backend: copy


@dataclass(frozen=True, slots=True)
class CopyData(Message):
    TAG = b"d"
    data: bytes

    def body(self) -> bytes:
        return self.data

    @classmethod
    def _read(cls, r: Reader) -> CopyData:
        return cls(r.rest())


@dataclass(frozen=True, slots=True)
class CopyDone(_Empty):
    TAG = b"c"


# ---------------------------------------------------------------- frontend


@dataclass(frozen=True, slots=True)
class Query(Message):
    TAG = b"Q"
    sql: str

    def body(self) -> bytes:
        return cstr(self.sql)

    @classmethod
    def _read(cls, r: Reader) -> Query:
        return cls(r.cstring())


@dataclass(frozen=True, slots=True)
class Parse(Message):
    TAG = b"P"
    name: str
    sql: str
    param_types: tuple[int, ...] = ()

    def body(self) -> bytes:
        out = cstr(self.name) + cstr(self.sql) + _I16.pack(len(self.param_types))
        return out + b"".join(_I32.pack(t if t < 2**31 else t - 2**32) for t in self.param_types)

    @classmethod
    def _read(cls, r: Reader) -> Parse:
        name, sql = r.cstring(), r.cstring()
        n = r.int16()
        if n < 0:
            raise PeerProtocolError("negative parameter count")
        return cls(name, sql, tuple(r.uint32() for _ in range(n)))


@dataclass(frozen=True, slots=True)
class Bind(Message):
    TAG = b"B"
    portal: str
    statement: str
    param_formats: tuple[int, ...] = ()
    params: tuple[bytes | None, ...] = ()
    result_formats: tuple[int, ...] = ()

    def body(self) -> bytes:
        out = [cstr(self.portal), cstr(self.statement), _I16.pack(len(self.param_formats))]
        out += [_I16.pack(f) for f in self.param_formats]
        out.append(_I16.pack(len(self.params)))
        out += [_value(p) for p in self.params]
        out.append(_I16.pack(len(self.result_formats)))
        out += [_I16.pack(f) for f in self.result_formats]
        return b"".join(out)

    @classmethod
    def _read(cls, r: Reader) -> Bind:
        portal, stmt = r.cstring(), r.cstring()
        pf = tuple(r.int16() for _ in range(_count(r)))
        params = tuple(r.value() for _ in range(_count(r)))
        rf = tuple(r.int16() for _ in range(_count(r)))
        return cls(portal, stmt, pf, params, rf)

    def result_format(self, column: int) -> int:
        """The format code the client asked for result column ``column``."""
        if not self.result_formats:
            return 0
        if len(self.result_formats) == 1:
            return self.result_formats[0]
        return self.result_formats[column] if column < len(self.result_formats) else 0


def _count(r: Reader) -> int:
    n = r.int16()
    if n < 0:
        raise PeerProtocolError("negative count")
    return n


@dataclass(frozen=True, slots=True)
class Describe(Message):
    TAG = b"D"
    kind: bytes  # b"S" statement or b"P" portal
    name: str

    def body(self) -> bytes:
        return self.kind + cstr(self.name)

    @classmethod
    def _read(cls, r: Reader) -> Describe:
        kind = r.bytes_(1)
        if kind not in (b"S", b"P"):
            raise PeerProtocolError("Describe must name a statement (S) or portal (P)")
        return cls(kind, r.cstring())


@dataclass(frozen=True, slots=True)
class Execute(Message):
    TAG = b"E"
    portal: str
    max_rows: int = 0

    def body(self) -> bytes:
        return cstr(self.portal) + _I32.pack(self.max_rows)

    @classmethod
    def _read(cls, r: Reader) -> Execute:
        return cls(r.cstring(), r.int32())


@dataclass(frozen=True, slots=True)
class Close(Message):
    TAG = b"C"
    kind: bytes
    name: str

    def body(self) -> bytes:
        return self.kind + cstr(self.name)

    @classmethod
    def _read(cls, r: Reader) -> Close:
        kind = r.bytes_(1)
        if kind not in (b"S", b"P"):
            raise PeerProtocolError("Close must name a statement (S) or portal (P)")
        return cls(kind, r.cstring())


@dataclass(frozen=True, slots=True)
class Sync(_Empty):
    TAG = b"S"


@dataclass(frozen=True, slots=True)
class Flush(_Empty):
    TAG = b"H"


@dataclass(frozen=True, slots=True)
class Terminate(_Empty):
    TAG = b"X"


@dataclass(frozen=True, slots=True)
class CopyFail(Message):
    TAG = b"f"
    message: str

    def body(self) -> bytes:
        return cstr(self.message)

    @classmethod
    def _read(cls, r: Reader) -> CopyFail:
        return cls(r.cstring())


@dataclass(frozen=True, slots=True)
class FunctionCall(Message):
    TAG = b"F"
    function_oid: int
    arg_formats: tuple[int, ...] = ()
    args: tuple[bytes | None, ...] = ()
    result_format: int = 0

    def body(self) -> bytes:
        oid = self.function_oid
        out = [_I32.pack(oid - 2**32 if oid >= 2**31 else oid), _I16.pack(len(self.arg_formats))]
        out += [_I16.pack(f) for f in self.arg_formats]
        out.append(_I16.pack(len(self.args)))
        out += [_value(a) for a in self.args]
        out.append(_I16.pack(self.result_format))
        return b"".join(out)

    @classmethod
    def _read(cls, r: Reader) -> FunctionCall:
        oid = r.uint32()
        af = tuple(r.int16() for _ in range(_count(r)))
        args = tuple(r.value() for _ in range(_count(r)))
        return cls(oid, af, args, r.int16())


@dataclass(frozen=True, slots=True)
class PasswordMessage(Message):
    """'p': PasswordMessage, SASLInitialResponse, SASLResponse and GSSResponse share this tag;
    which one it is depends on what the server asked for, so the body stays raw here."""

    TAG = b"p"
    data: bytes

    def body(self) -> bytes:
        return self.data

    @classmethod
    def _read(cls, r: Reader) -> PasswordMessage:
        return cls(r.rest())

    def password(self) -> str:
        r = Reader(self.data)
        pw = r.cstring()
        r.done()
        return pw

    def sasl_initial(self) -> tuple[str, bytes | None]:
        r = Reader(self.data)
        mech = r.cstring()
        data = r.value()
        r.done()
        return mech, data


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return frame(b"p", cstr(mechanism) + _value(data))


# ---------------------------------------------------------------- backend


AUTH_OK = 0
AUTH_KERBEROS_V5 = 2
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_GSS = 7
AUTH_GSS_CONTINUE = 8
AUTH_SSPI = 9
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12


@dataclass(frozen=True, slots=True)
class Authentication(Message):
    """Every AuthenticationXxx message: ``code`` says which; ``data`` is the rest (the MD5 salt,
    the SASL mechanism list, SASL challenge data…)."""

    TAG = b"R"
    code: int
    data: bytes = b""

    def body(self) -> bytes:
        return _I32.pack(self.code) + self.data

    @classmethod
    def _read(cls, r: Reader) -> Authentication:
        return cls(r.int32(), r.rest())

    def mechanisms(self) -> list[str]:
        r = Reader(self.data)
        out: list[str] = []
        while True:
            m = r.cstring()
            if not m:
                return out
            out.append(m)


def auth_sasl(mechanisms: Sequence[str]) -> bytes:
    return Authentication(AUTH_SASL, b"".join(cstr(m) for m in mechanisms) + b"\x00").encode()


@dataclass(frozen=True, slots=True)
class BackendKeyData(Message):
    TAG = b"K"
    pid: int
    secret: int

    def body(self) -> bytes:
        return _I32.pack(self.pid) + _I32.pack(self.secret)

    @classmethod
    def _read(cls, r: Reader) -> BackendKeyData:
        return cls(r.int32(), r.int32())


@dataclass(frozen=True, slots=True)
class ParseComplete(_Empty):
    TAG = b"1"


@dataclass(frozen=True, slots=True)
class BindComplete(_Empty):
    TAG = b"2"


@dataclass(frozen=True, slots=True)
class CloseComplete(_Empty):
    TAG = b"3"


@dataclass(frozen=True, slots=True)
class NoData(_Empty):
    TAG = b"n"


@dataclass(frozen=True, slots=True)
class EmptyQueryResponse(_Empty):
    TAG = b"I"


@dataclass(frozen=True, slots=True)
class PortalSuspended(_Empty):
    TAG = b"s"


@dataclass(frozen=True, slots=True)
class CommandComplete(Message):
    TAG = b"C"
    tag: str

    def body(self) -> bytes:
        return cstr(self.tag)

    @classmethod
    def _read(cls, r: Reader) -> CommandComplete:
        return cls(r.cstring())

    @property
    def rows(self) -> int:
        last = self.tag.rsplit(" ", 1)[-1]
        return int(last) if last.isdigit() else 0


@dataclass(frozen=True, slots=True)
class ReadyForQuery(Message):
    TAG = b"Z"
    status: bytes  # b"I" idle, b"T" in a transaction, b"E" in a failed transaction

    def body(self) -> bytes:
        return self.status

    @classmethod
    def _read(cls, r: Reader) -> ReadyForQuery:
        status = r.bytes_(1)
        if status not in (b"I", b"T", b"E"):
            raise PeerProtocolError("ReadyForQuery with an unknown transaction status")
        return cls(status)


@dataclass(frozen=True, slots=True)
class ParameterStatus(Message):
    TAG = b"S"
    name: str
    value: str

    def body(self) -> bytes:
        return cstr(self.name) + cstr(self.value)

    @classmethod
    def _read(cls, r: Reader) -> ParameterStatus:
        return cls(r.cstring(), r.cstring())


@dataclass(frozen=True, slots=True)
class ParameterDescription(Message):
    TAG = b"t"
    types: tuple[int, ...]

    def body(self) -> bytes:
        return _I16.pack(len(self.types)) + b"".join(
            _I32.pack(t - 2**32 if t >= 2**31 else t) for t in self.types
        )

    @classmethod
    def _read(cls, r: Reader) -> ParameterDescription:
        n = r.uint16()
        return cls(tuple(r.uint32() for _ in range(n)))


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    table_oid: int = 0
    attnum: int = 0
    type_oid: int = 25
    type_size: int = -1
    type_mod: int = -1
    format: int = 0


@dataclass(frozen=True, slots=True)
class RowDescription(Message):
    TAG = b"T"
    fields: tuple[Field, ...]

    def body(self) -> bytes:
        out = [_I16.pack(len(self.fields))]
        for f in self.fields:
            out.append(cstr(f.name))
            out.append(
                _FIELD.pack(f.table_oid, f.attnum, f.type_oid, f.type_size, f.type_mod, f.format)
            )
        return b"".join(out)

    @classmethod
    def _read(cls, r: Reader) -> RowDescription:
        n = r.uint16()
        fields: list[Field] = []
        for _ in range(n):
            name = r.cstring()
            r._need(_FIELD.size)
            t, a, ty, sz, md, fm = _FIELD.unpack_from(r.buf, r.pos)
            r.pos += _FIELD.size
            fields.append(Field(name, t, a, ty, sz, md, fm))
        return cls(tuple(fields))


@dataclass(frozen=True, slots=True)
class DataRow(Message):
    TAG = b"D"
    values: tuple[bytes | None, ...]

    def body(self) -> bytes:
        return _U16.pack(len(self.values)) + b"".join(_value(v) for v in self.values)

    @classmethod
    def _read(cls, r: Reader) -> DataRow:
        n = r.uint16()
        return cls(tuple(r.value() for _ in range(n)))


def encode_data_row(values: Sequence[bytes | None]) -> bytes:
    return DataRow(tuple(values)).encode()


@dataclass(frozen=True, slots=True)
class _CopyResponse(Message):
    overall_format: int
    column_formats: tuple[int, ...]

    def body(self) -> bytes:
        return (
            bytes([self.overall_format])
            + _I16.pack(len(self.column_formats))
            + b"".join(_I16.pack(f) for f in self.column_formats)
        )

    @classmethod
    def _read(cls, r: Reader) -> Self:
        overall = r.int8()
        n = _count(r)
        return cls(overall, tuple(r.int16() for _ in range(n)))


@dataclass(frozen=True, slots=True)
class CopyInResponse(_CopyResponse):
    TAG = b"G"


@dataclass(frozen=True, slots=True)
class CopyOutResponse(_CopyResponse):
    TAG = b"H"


@dataclass(frozen=True, slots=True)
class CopyBothResponse(_CopyResponse):
    TAG = b"W"


@dataclass(frozen=True, slots=True)
class _Fields(Message):
    """ErrorResponse and NoticeResponse: (field code, value) pairs, in order."""

    fields: tuple[tuple[str, str], ...]

    def body(self) -> bytes:
        return b"".join(code.encode() + cstr(v) for code, v in self.fields) + b"\x00"

    @classmethod
    def _read(cls, r: Reader) -> Self:
        out: list[tuple[str, str]] = []
        while True:
            code = r.int8()
            if code == 0:
                return cls(tuple(out))
            # field values are in the server encoding; we require UTF-8 upstream but must not
            # crash on anything else
            end = r.buf.find(b"\x00", r.pos)
            if end < 0:
                raise PeerProtocolError("field is not NUL-terminated")
            out.append((chr(code), r.buf[r.pos : end].decode("utf-8", "replace")))
            r.pos = end + 1

    def get(self, code: str, default: str = "") -> str:
        return next((v for c, v in self.fields if c == code), default)

    @property
    def sqlstate(self) -> str:
        return self.get("C")

    @property
    def message(self) -> str:
        return self.get("M")


@dataclass(frozen=True, slots=True)
class ErrorResponse(_Fields):
    TAG = b"E"


@dataclass(frozen=True, slots=True)
class NoticeResponse(_Fields):
    TAG = b"N"


def error_fields(
    sqlstate: str, message: str, *, severity: str = "ERROR", detail: str = "", hint: str = ""
) -> tuple[tuple[str, str], ...]:
    out = [("S", severity), ("V", severity), ("C", sqlstate), ("M", message)]
    if detail:
        out.append(("D", detail))
    if hint:
        out.append(("H", hint))
    return tuple(out)


def error(
    sqlstate: str, message: str, *, severity: str = "ERROR", detail: str = "", hint: str = ""
) -> bytes:
    return ErrorResponse(
        error_fields(sqlstate, message, severity=severity, detail=detail, hint=hint)
    ).encode()


def notice(message: str, *, code: str = "00000", detail: str = "", hint: str = "") -> bytes:
    return NoticeResponse(
        error_fields(code, message, severity="NOTICE", detail=detail, hint=hint)
    ).encode()


@dataclass(frozen=True, slots=True)
class NotificationResponse(Message):
    TAG = b"A"
    pid: int
    channel: str
    payload: str

    def body(self) -> bytes:
        return _I32.pack(self.pid) + cstr(self.channel) + cstr(self.payload)

    @classmethod
    def _read(cls, r: Reader) -> NotificationResponse:
        return cls(r.int32(), r.cstring(), r.cstring())


@dataclass(frozen=True, slots=True)
class FunctionCallResponse(Message):
    TAG = b"V"
    result: bytes | None

    def body(self) -> bytes:
        return _value(self.result)

    @classmethod
    def _read(cls, r: Reader) -> FunctionCallResponse:
        return cls(r.value())


@dataclass(frozen=True, slots=True)
class NegotiateProtocolVersion(Message):
    TAG = b"v"
    newest_minor: int
    unrecognized: tuple[str, ...] = field(default=())

    def body(self) -> bytes:
        return (
            _I32.pack(self.newest_minor)
            + _I32.pack(len(self.unrecognized))
            + b"".join(cstr(o) for o in self.unrecognized)
        )

    @classmethod
    def _read(cls, r: Reader) -> NegotiateProtocolVersion:
        minor = r.int32()
        n = r.int32()
        if n < 0:
            raise PeerProtocolError("negative option count")
        return cls(minor, tuple(r.cstring() for _ in range(n)))


FRONTEND: dict[bytes, type[Message]] = {
    m.TAG: m
    for m in (Query, Parse, Bind, Describe, Execute, Close, Sync, Flush, Terminate, CopyData,
              CopyDone, CopyFail, FunctionCall, PasswordMessage)
}  # fmt: skip

BACKEND: dict[bytes, type[Message]] = {
    m.TAG: m
    for m in (Authentication, BackendKeyData, ParseComplete, BindComplete, CloseComplete, NoData,
              EmptyQueryResponse, PortalSuspended, CommandComplete, ReadyForQuery,
              ParameterStatus, ParameterDescription, RowDescription, DataRow, CopyInResponse,
              CopyOutResponse, CopyBothResponse, CopyData, CopyDone, ErrorResponse,
              NoticeResponse, NotificationResponse, FunctionCallResponse,
              NegotiateProtocolVersion)
}  # fmt: skip


def decode_frontend(tag: bytes, body: bytes | memoryview) -> Message:
    cls = FRONTEND.get(tag)
    if cls is None:
        raise PeerProtocolError(f"unknown frontend message type {tag!r}")
    return cls.decode(body)


def decode_backend(tag: bytes, body: bytes | memoryview) -> Message:
    cls = BACKEND.get(tag)
    if cls is None:
        raise PeerProtocolError(f"unknown backend message type {tag!r}")
    return cls.decode(body)
