"""Cell values as they travel in DataRow: the few type codecs the masking operators need.

Postgres sends each cell in text format (0) or binary format (1) (protocol docs, "Formats and
Format Codes"; the binary layouts are the types' ``*send``/``*recv`` functions). The operators
only have to read a value far enough to generalise it (a year, an age) and to write a valid
value of the *same* type back, so this module covers exactly that: integers, floats, numeric,
date, timestamp[tz], text-like types (with ``char(n)``/``varchar(n)`` type modifiers)
and json/jsonb. Dates and timestamps in text format are read in ``DateStyle=ISO`` only;
anything else raises ``ValueError`` and the caller turns the cell into NULL.

Every function here raises on input it does not understand; none of them guesses.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
import re
import struct
from decimal import Decimal


class Oid(enum.IntEnum):
    """Built-in type OIDs (``pg_type.oid``) the operators know."""

    BOOL = 16
    BYTEA = 17
    CHAR = 18
    NAME = 19
    INT8 = 20
    INT2 = 21
    INT4 = 23
    TEXT = 25
    JSON = 114
    FLOAT4 = 700
    FLOAT8 = 701
    UNKNOWN = 705
    BPCHAR = 1042
    VARCHAR = 1043
    DATE = 1082
    TIMESTAMP = 1114
    TIMESTAMPTZ = 1184
    NUMERIC = 1700
    UUID = 2950
    JSONB = 3802


TEXT_LIKE: frozenset[int] = frozenset({Oid.TEXT, Oid.VARCHAR, Oid.BPCHAR, Oid.NAME, Oid.UNKNOWN})
JSON_LIKE: frozenset[int] = frozenset({Oid.JSON, Oid.JSONB})
INTEGERS: dict[int, struct.Struct] = {
    Oid.INT2: struct.Struct("!h"),
    Oid.INT4: struct.Struct("!i"),
    Oid.INT8: struct.Struct("!q"),
}
FLOATS: dict[int, struct.Struct] = {
    Oid.FLOAT4: struct.Struct("!f"),
    Oid.FLOAT8: struct.Struct("!d"),
}
DATETIMES: frozenset[int] = frozenset({Oid.DATE, Oid.TIMESTAMP, Oid.TIMESTAMPTZ})

VARHDRSZ = 4
NAMEDATALEN = 64
JSONB_VERSION = b"\x01"

_I32 = struct.Struct("!i")
_I64 = struct.Struct("!q")
_NUMERIC_HEAD = struct.Struct("!hhHh")
_NUMERIC_POS = 0x0000
_NUMERIC_NEG = 0x4000
_NUMERIC_SPECIAL = {
    0xC000: Decimal("NaN"),
    0xD000: Decimal("Infinity"),
    0xF000: Decimal("-Infinity"),
}
_NBASE = 10000

_PG_EPOCH = dt.date(2000, 1, 1)
_PG_EPOCH_ORDINAL = _PG_EPOCH.toordinal()
_USECS_PER_DAY = 86_400_000_000
_DATE_INFINITIES = frozenset({2**31 - 1, -(2**31)})
_TIMESTAMP_INFINITIES = frozenset({2**63 - 1, -(2**63)})


# --- text-like -------------------------------------------------------------------------------


def fit_text(type_oid: int, type_mod: int, text: str) -> str:
    """``text`` made valid for the column's type modifier: ``char(n)`` padded/cut, ``varchar(n)``
    cut, ``name`` cut to 63 bytes."""
    if type_oid == Oid.BPCHAR and type_mod >= VARHDRSZ:
        n = type_mod - VARHDRSZ
        return text[:n].ljust(n)
    if type_oid == Oid.VARCHAR and type_mod >= VARHDRSZ:
        return text[: type_mod - VARHDRSZ]
    if type_oid == Oid.NAME:
        raw = text.encode("utf-8")[: NAMEDATALEN - 1]
        return raw.decode("utf-8", errors="ignore")
    return text


def encode_string(type_oid: int, type_mod: int, text: str, fmt: int) -> bytes:
    """A string as a value of a text-like or json type, in either format."""
    if type_oid in TEXT_LIKE:
        return fit_text(type_oid, type_mod, text).encode("utf-8")
    if type_oid in JSON_LIKE:
        doc = json.dumps(text, ensure_ascii=False).encode("utf-8")
        return JSONB_VERSION + doc if type_oid == Oid.JSONB and fmt == 1 else doc
    raise ValueError("not a string type")


def decode_string(type_oid: int, data: bytes, fmt: int) -> str:
    """The text of a text-like value (binary and text format are both the UTF-8 bytes)."""
    if type_oid not in TEXT_LIKE:
        raise ValueError("not a text-like type")
    return data.decode("utf-8")


# --- numbers ---------------------------------------------------------------------------------


def decode_number(type_oid: int, data: bytes, fmt: int) -> Decimal:
    """An integer, float or numeric value as a Decimal."""
    if fmt == 0:
        if type_oid not in INTEGERS and type_oid not in FLOATS and type_oid != Oid.NUMERIC:
            raise ValueError("not a numeric type")
        return Decimal(data.decode("ascii").strip())
    if type_oid in INTEGERS:
        return Decimal(INTEGERS[type_oid].unpack(data)[0])
    if type_oid in FLOATS:
        return Decimal(FLOATS[type_oid].unpack(data)[0])
    if type_oid == Oid.NUMERIC:
        return decode_numeric_binary(data)
    raise ValueError("not a numeric type")


def encode_number(type_oid: int, value: int, fmt: int, dscale: int = 0) -> bytes:
    """A whole number as a value of an integer, float or numeric type."""
    if fmt == 0:
        if type_oid in INTEGERS or type_oid in FLOATS:
            return str(value).encode("ascii")
        if type_oid == Oid.NUMERIC:
            return f"{Decimal(value):.{dscale}f}".encode("ascii")
        raise ValueError("not a numeric type")
    if type_oid in INTEGERS:
        return INTEGERS[type_oid].pack(value)
    if type_oid in FLOATS:
        return FLOATS[type_oid].pack(float(value))
    if type_oid == Oid.NUMERIC:
        return encode_numeric_binary(value, dscale)
    raise ValueError("not a numeric type")


def decode_numeric_binary(data: bytes) -> Decimal:
    ndigits, weight, sign, _dscale = _NUMERIC_HEAD.unpack_from(data)
    if sign in _NUMERIC_SPECIAL:
        return _NUMERIC_SPECIAL[sign]
    if sign not in (_NUMERIC_POS, _NUMERIC_NEG) or len(data) != 8 + 2 * ndigits or ndigits < 0:
        raise ValueError("malformed numeric")
    digits = struct.unpack_from(f"!{ndigits}H", data, 8)
    if any(d >= _NBASE for d in digits):
        raise ValueError("malformed numeric")
    value = Decimal(0)
    for i, d in enumerate(digits):
        value += Decimal(d).scaleb(4 * (weight - i))
    return -value if sign == _NUMERIC_NEG else value


def numeric_binary_dscale(data: bytes) -> int:
    return int(_NUMERIC_HEAD.unpack_from(data)[3])


def encode_numeric_binary(value: int, dscale: int = 0) -> bytes:
    """A non-negative whole number in numeric's binary layout, shown with ``dscale`` decimals."""
    if value < 0:
        raise ValueError("negative numbers are not needed here")
    digits: list[int] = []
    while value:
        value, d = divmod(value, _NBASE)
        digits.insert(0, d)
    weight = len(digits) - 1 if digits else 0
    while digits and digits[-1] == 0:  # Postgres strips trailing zero base-10000 digits
        digits.pop()
    head = _NUMERIC_HEAD.pack(len(digits), weight, _NUMERIC_POS, max(dscale, 0))
    return head + struct.pack(f"!{len(digits)}H", *digits)


# --- dates and timestamps ----------------------------------------------------------------------

_ISO = re.compile(
    r"(?P<year>\d{4,})-(?P<month>\d{2})-(?P<day>\d{2})"
    r"(?: (?P<time>\d{2}:\d{2}:\d{2}(?:\.\d{1,6})?)(?P<offset>[+-]\d{2}(?::\d{2}){0,2})?)?"
    r"(?P<bc> BC)?"
)
_TEXT_INFINITIES = frozenset({b"infinity", b"-infinity"})
#: b"MM-DD" of every day of a leap year: the month/day check of a text date without parsing it
_MONTH_DAYS: frozenset[bytes] = frozenset(
    (_PG_EPOCH + dt.timedelta(days=i)).strftime("%m-%d").encode("ascii") for i in range(366)
)


def is_infinite(type_oid: int, data: bytes, fmt: int) -> bool:
    if fmt == 0:
        return data in _TEXT_INFINITIES
    if type_oid == Oid.DATE:
        return _I32.unpack(data)[0] in _DATE_INFINITIES
    return _I64.unpack(data)[0] in _TIMESTAMP_INFINITIES


def year_start(type_oid: int, data: bytes, fmt: int, clamp_year: int | None = None) -> bytes:
    """A date/timestamp/timestamptz cut to January 1st 00:00 of its year, same type and format.

    ``clamp_year``: years before it become it (Safe Harbor's "ages over 89" rule for birth dates).
    Text format: ISO DateStyle only. timestamptz is cut in UTC in both formats (written with
    offset +00 in text), so the original's offset cannot show through. Infinite values pass
    unchanged.
    """
    if type_oid not in DATETIMES:
        raise ValueError("not a date/time type")
    if is_infinite(type_oid, data, fmt):
        return data
    if fmt == 0:
        if type_oid == Oid.DATE and len(data) == 10 and data[4:5] == b"-":
            # the common 'YYYY-MM-DD' without the regex below; same result, same checks
            year, month_day = data[:4], data[5:]
            if year.isdigit() and month_day in _MONTH_DAYS:
                if clamp_year is not None and int(year) < clamp_year:
                    return b"%04d-01-01" % clamp_year
                return year + b"-01-01"
        return _year_start_text(type_oid, data.decode("ascii"), clamp_year)
    if type_oid == Oid.DATE:
        day = _date_from_days(_I32.unpack(data)[0])
        first = dt.date(_clamp(day.year, clamp_year), 1, 1)
        return _I32.pack(first.toordinal() - _PG_EPOCH_ORDINAL)
    usecs = _I64.unpack(data)[0]
    day = _date_from_days(usecs // _USECS_PER_DAY)
    first = dt.date(_clamp(day.year, clamp_year), 1, 1)
    return _I64.pack((first.toordinal() - _PG_EPOCH_ORDINAL) * _USECS_PER_DAY)


def _clamp(year: int, clamp_year: int | None) -> int:
    return max(year, clamp_year) if clamp_year is not None else year


def _date_from_days(days: int) -> dt.date:
    """Days since 2000-01-01 as a date; years outside 1..9999 raise (the cell becomes NULL)."""
    return dt.date.fromordinal(_PG_EPOCH_ORDINAL + days)


def _year_start_text(type_oid: int, text: str, clamp_year: int | None) -> bytes:
    m = _ISO.fullmatch(text)
    if m is None:
        raise ValueError("not an ISO date/time")
    has_time, has_offset = m["time"] is not None, m["offset"] is not None
    expected = (type_oid != Oid.DATE, type_oid == Oid.TIMESTAMPTZ)
    if (has_time, has_offset) != expected:
        raise ValueError("date/time text does not match its type")
    dt.date(2000, int(m["month"]), int(m["day"]))  # a real month/day (2000 is a leap year)
    bc = bool(m["bc"])
    year = int(m["year"])
    if has_offset and not bc and year <= 9999:
        # cut in UTC, as the binary form is: the printed offset (daylight saving or not) is
        # itself a date element and must not survive
        year = _utc_year(m, year)
    if clamp_year is not None and (bc or year < clamp_year):
        year, bc = clamp_year, False
    out = f"{year:04d}-01-01"
    if has_time:
        out += " 00:00:00" + ("+00" if has_offset else "")
    if bc:
        out += " BC"
    return out.encode("ascii")


def _utc_year(m: re.Match[str], year: int) -> int:
    hh, mm, ss = (int(x) for x in m["time"][:8].split(":"))
    sign = -1 if m["offset"][0] == "-" else 1
    parts = [int(x) for x in m["offset"][1:].split(":")] + [0, 0]
    offset = dt.timedelta(hours=parts[0], minutes=parts[1], seconds=parts[2])
    local = dt.datetime(year, int(m["month"]), int(m["day"]), hh, mm, ss)
    return (local - sign * offset).year


_YEAR_IN_TEXT = re.compile(r"(?<!\d)(\d{4})(?!\d)")


def year_in_text(text: str) -> int:
    """The one four-digit year written in free-form date text; raises if none or ambiguous."""
    years = {int(y) for y in _YEAR_IN_TEXT.findall(text)}
    if len(years) != 1:
        raise ValueError("no single year")
    return years.pop()
