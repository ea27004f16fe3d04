"""Hypothesis strategies: one per protocol message class, and byte streams built from them."""

from __future__ import annotations

from typing import TypeVar

from hypothesis import strategies as st

from pgproxy.protocol import messages as m
from pgproxy.protocol import startup as s

T = TypeVar("T")

# protocol strings: UTF-8 encodable, no NUL
text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=20)
raw = st.binary(max_size=40)
value = st.none() | raw
i16 = st.integers(-(2**15), 2**15 - 1)
u16 = st.integers(0, 2**16 - 1)
i32 = st.integers(-(2**31), 2**31 - 1)
u32 = st.integers(0, 2**32 - 1)
fmt = i16  # format codes are Int16 on the wire; only 0 and 1 mean anything


def tup(elements: st.SearchStrategy[T]) -> st.SearchStrategy[tuple[T, ...]]:
    return st.lists(elements, max_size=6).map(tuple)


FIELD = st.builds(m.Field, text, u32, i16, u32, i16, i32, i16)

FRONTEND: dict[type[m.Message], st.SearchStrategy[m.Message]] = {
    m.Query: st.builds(m.Query, text),
    m.Parse: st.builds(m.Parse, text, text, tup(u32)),
    m.Bind: st.builds(
        m.Bind,
        text,
        text,
        tup(fmt),
        tup(value),
        tup(fmt),
    ),
    m.Describe: st.builds(m.Describe, st.sampled_from([b"S", b"P"]), text),
    m.Execute: st.builds(m.Execute, text, i32),
    m.Close: st.builds(m.Close, st.sampled_from([b"S", b"P"]), text),
    m.Sync: st.just(m.Sync()),
    m.Flush: st.just(m.Flush()),
    m.Terminate: st.just(m.Terminate()),
    m.CopyData: st.builds(m.CopyData, raw),
    m.CopyDone: st.just(m.CopyDone()),
    m.CopyFail: st.builds(m.CopyFail, text),
    m.FunctionCall: st.builds(
        m.FunctionCall,
        u32,
        tup(fmt),
        tup(value),
        fmt,
    ),
    m.PasswordMessage: st.builds(m.PasswordMessage, raw),
}

_fields = st.lists(st.tuples(st.sampled_from("SVCMDHPpqWsdtcnFLR"), text), max_size=8).map(tuple)
_copy = (st.integers(0, 255), tup(fmt))

BACKEND: dict[type[m.Message], st.SearchStrategy[m.Message]] = {
    m.Authentication: st.builds(m.Authentication, i32, raw),
    m.BackendKeyData: st.builds(m.BackendKeyData, i32, i32),
    m.ParseComplete: st.just(m.ParseComplete()),
    m.BindComplete: st.just(m.BindComplete()),
    m.CloseComplete: st.just(m.CloseComplete()),
    m.NoData: st.just(m.NoData()),
    m.EmptyQueryResponse: st.just(m.EmptyQueryResponse()),
    m.PortalSuspended: st.just(m.PortalSuspended()),
    m.CommandComplete: st.builds(m.CommandComplete, text),
    m.ReadyForQuery: st.builds(m.ReadyForQuery, st.sampled_from([b"I", b"T", b"E"])),
    m.ParameterStatus: st.builds(m.ParameterStatus, text, text),
    m.ParameterDescription: st.builds(m.ParameterDescription, tup(u32)),
    m.RowDescription: st.builds(m.RowDescription, st.lists(FIELD, max_size=4).map(tuple)),
    m.DataRow: st.builds(m.DataRow, tup(value)),
    m.CopyInResponse: st.builds(m.CopyInResponse, *_copy),
    m.CopyOutResponse: st.builds(m.CopyOutResponse, *_copy),
    m.CopyBothResponse: st.builds(m.CopyBothResponse, *_copy),
    m.CopyData: st.builds(m.CopyData, raw),
    m.CopyDone: st.just(m.CopyDone()),
    m.ErrorResponse: st.builds(m.ErrorResponse, _fields),
    m.NoticeResponse: st.builds(m.NoticeResponse, _fields),
    m.NotificationResponse: st.builds(m.NotificationResponse, i32, text, text),
    m.FunctionCallResponse: st.builds(m.FunctionCallResponse, value),
    m.NegotiateProtocolVersion: st.builds(m.NegotiateProtocolVersion, i32, tup(text)),
}

_params = st.dictionaries(text.filter(bool), text, max_size=5)
STARTUP = st.one_of(
    st.just(s.SSLRequest()),
    st.just(s.GSSENCRequest()),
    st.builds(s.CancelRequest, i32, i32),
    st.builds(s.StartupMessage, st.just(3), u16, _params),
)

any_frontend = st.one_of(*FRONTEND.values())
any_backend = st.one_of(*BACKEND.values())


def framed_garbage(tags: bytes) -> st.SearchStrategy[bytes]:
    """A well-framed message of a plausible type with an arbitrary body."""
    return st.builds(lambda t, b: m.frame(bytes([t]), b), st.sampled_from(tags), raw)


def stream_of(messages: st.SearchStrategy[m.Message], tags: bytes) -> st.SearchStrategy[bytes]:
    """Byte streams mixing valid messages, well-framed garbage and raw garbage."""
    part = st.one_of(
        messages.map(lambda x: x.encode()), framed_garbage(tags), st.binary(max_size=12)
    )
    return st.lists(part, max_size=12).map(b"".join)


FRONTEND_TAGS = b"".join(c.TAG for c in FRONTEND)
BACKEND_TAGS = b"".join(c.TAG for c in BACKEND)
