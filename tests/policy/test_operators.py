"""The masking catalog: every tag in text and binary format, decoded back with real decoders.

Values produced by the rewriters are read back with psycopg's loaders (an independent
implementation of the wire formats) and, in ``test_values_are_valid_for_postgres``, sent to a
real Postgres as binary/text parameters of their type, which rejects malformed input.
"""

from __future__ import annotations

import datetime as dt
import struct
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from psycopg.adapt import Dumper, Transformer
from psycopg.pq import Format

from pgproxy.policy.operators import (
    NULLED_TAGS,
    REPLACED_TAGS,
    RESTRICTED_ZIP3,
    MaskCatalog,
)
from pgproxy.policy.pgbinary import Oid
from pgproxy.policy.seam import FieldInfo
from pgproxy.rules import BUILTIN_TAGS, Agent, MaskSpec, Rules

KEY = b"k" * 32
TX = Transformer()
TEXT, BINARY = 0, 1


def field(oid: int, mod: int = -1) -> FieldInfo:
    return FieldInfo("c", 0, 0, oid, -1, mod, 0)


def load(oid: int, data: bytes | None, fmt: int) -> Any:
    assert data is not None
    return TX.get_loader(oid, Format.BINARY if fmt else Format.TEXT).load(data)


def dump(oid: int, value: Any, fmt: int) -> bytes:
    """Encode a Python value the way Postgres would send it (psycopg's dumpers)."""
    if oid in (Oid.TEXT, Oid.VARCHAR, Oid.BPCHAR, Oid.NAME):
        return str(value).encode()
    if fmt == TEXT:
        return str(value).encode()
    fmts: dict[int, str] = {
        Oid.INT2: "!h",
        Oid.INT4: "!i",
        Oid.INT8: "!q",
        Oid.FLOAT4: "!f",
        Oid.FLOAT8: "!d",
    }
    if oid in fmts:
        return struct.pack(fmts[oid], value)
    dumped = TX.get_dumper(value, psycopg.adapt.PyFormat.BINARY).dump(value)
    assert dumped is not None
    return bytes(dumped)


CATALOG = MaskCatalog(Rules(), KEY, reference_year=2025)
STRING_TYPES = [(Oid.TEXT, -1), (Oid.VARCHAR, -1), (Oid.VARCHAR, 4 + 40), (Oid.NAME, -1)]


# --- replacing tags ----------------------------------------------------------------------------


@pytest.mark.parametrize("tag", sorted(REPLACED_TAGS))
@pytest.mark.parametrize(("oid", "mod"), STRING_TYPES)
@pytest.mark.parametrize("fmt", [TEXT, BINARY])
def test_replacing_tags_replace_whole_text(tag: str, oid: int, mod: int, fmt: int) -> None:
    original = "Synthetic Value 000-12-3456"
    out = CATALOG.rewriter(tag, field(oid, mod))(original.encode(), fmt)
    assert load(oid, out, fmt) == f"<{tag.upper()}>"


@pytest.mark.parametrize("tag", ["ssn", "name", "email"])
@pytest.mark.parametrize("fmt", [TEXT, BINARY])
def test_bpchar_is_padded_or_cut_to_its_length(tag: str, fmt: int) -> None:
    long_out = CATALOG.rewriter(tag, field(Oid.BPCHAR, 4 + 12))(b"000-12-3456 ", fmt)
    short_out = CATALOG.rewriter(tag, field(Oid.BPCHAR, 4 + 3))(b"000", fmt)
    assert long_out == f"<{tag.upper()}>".ljust(12).encode()
    assert short_out == f"<{tag.upper()}>"[:3].encode()


@pytest.mark.parametrize("tag", sorted(REPLACED_TAGS))
@pytest.mark.parametrize("oid", [Oid.JSON, Oid.JSONB])
@pytest.mark.parametrize("fmt", [TEXT, BINARY])
def test_replacing_tags_in_json_give_a_json_string(tag: str, oid: int, fmt: int) -> None:
    original = b'{"ssn": "000-12-3456"}'
    if oid == Oid.JSONB and fmt == BINARY:
        original = b"\x01" + original
    out = CATALOG.rewriter(tag, field(oid))(original, fmt)
    assert load(oid, out, fmt) == f"<{tag.upper()}>"


NON_STRING_SAMPLES: list[tuple[int, Any]] = [
    (Oid.INT2, 12),
    (Oid.INT4, 123456),
    (Oid.INT8, 1234567890123),
    (Oid.FLOAT8, 1.5),
    (Oid.NUMERIC, Decimal("12.5")),
    (Oid.DATE, dt.date(1987, 6, 5)),
    (Oid.UUID, __import__("uuid").UUID("12345678-1234-5678-1234-567812345678")),
]


@pytest.mark.parametrize("tag", sorted(REPLACED_TAGS | NULLED_TAGS))
@pytest.mark.parametrize(("oid", "value"), NON_STRING_SAMPLES)
@pytest.mark.parametrize("fmt", [TEXT, BINARY])
def test_replacing_tags_null_other_types(tag: str, oid: int, value: Any, fmt: int) -> None:
    data = dump(oid, value, fmt)
    assert CATALOG.rewriter(tag, field(oid))(data, fmt) is None


@pytest.mark.parametrize("tag", sorted(NULLED_TAGS))
@pytest.mark.parametrize(("oid", "mod"), STRING_TYPES)
def test_nulled_tags_null_text_too(tag: str, oid: int, mod: int) -> None:
    assert CATALOG.rewriter(tag, field(oid, mod))(b"10.0.0.1", TEXT) is None
    assert CATALOG.operator_name(tag) == "nullify"


@pytest.mark.parametrize("tag", sorted(BUILTIN_TAGS))
def test_null_stays_null(tag: str) -> None:
    for oid, mod in [*STRING_TYPES, (Oid.INT4, -1), (Oid.DATE, -1)]:
        assert CATALOG.rewriter(tag, field(oid, mod))(None, TEXT) is None


# --- dates -------------------------------------------------------------------------------------

DATE_CASES: list[tuple[int, Any, Any]] = [
    (Oid.DATE, dt.date(1987, 6, 5), dt.date(1987, 1, 1)),
    (Oid.DATE, dt.date(2024, 2, 29), dt.date(2024, 1, 1)),
    (Oid.DATE, dt.date(1999, 12, 31), dt.date(1999, 1, 1)),
    (Oid.TIMESTAMP, dt.datetime(1987, 6, 5, 14, 30, 1, 123456), dt.datetime(1987, 1, 1)),
    (Oid.TIMESTAMP, dt.datetime(1969, 7, 20, 20, 17), dt.datetime(1969, 1, 1)),
]


@pytest.mark.parametrize("tag", ["dob", "date"])
@pytest.mark.parametrize(("oid", "value", "expected"), DATE_CASES)
@pytest.mark.parametrize("fmt", [TEXT, BINARY])
def test_dates_keep_only_the_year(tag: str, oid: int, value: Any, expected: Any, fmt: int) -> None:
    data = dump(oid, value, fmt) if fmt == BINARY else str(value).encode()
    out = CATALOG.rewriter(tag, field(oid))(data, fmt)
    assert load(oid, out, fmt) == expected


@pytest.mark.parametrize("tag", ["dob", "date"])
def test_timestamptz_binary_is_cut_in_utc(tag: str) -> None:
    value = dt.datetime(1987, 6, 5, 23, 30, tzinfo=dt.UTC)
    out = CATALOG.rewriter(tag, field(Oid.TIMESTAMPTZ))(dump(Oid.TIMESTAMPTZ, value, BINARY), 1)
    assert load(Oid.TIMESTAMPTZ, out, BINARY) == dt.datetime(1987, 1, 1, tzinfo=dt.UTC)


@pytest.mark.parametrize("offset", ["+00", "+02", "-05", "+05:30", "-03:30:15"])
def test_timestamptz_text_is_cut_in_utc_whatever_the_offset(offset: str) -> None:
    data = f"1987-06-05 14:30:00.5{offset}".encode()
    out = CATALOG.rewriter("date", field(Oid.TIMESTAMPTZ))(data, TEXT)
    assert out == b"1987-01-01 00:00:00+00"  # the offset (DST or not) does not show through
    assert load(Oid.TIMESTAMPTZ, out, TEXT) == dt.datetime(1987, 1, 1, tzinfo=dt.UTC)


def test_timestamptz_text_takes_the_year_of_the_utc_instant() -> None:
    data = b"2021-12-31 22:00:00-05"  # 2022-01-01 03:00 UTC
    out = CATALOG.rewriter("date", field(Oid.TIMESTAMPTZ))(data, TEXT)
    assert out == b"2022-01-01 00:00:00+00"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1987-06-05", "1987"),
        ("06/05/1987", "1987"),
        ("June 5, 1987", "1987"),
        ("5 June 1987 14:00", "1987"),
        ("87-06-05", "<DOB>"),
        ("1987 to 1999", "<DOB>"),
        ("unknown", "<DOB>"),
    ],
)
def test_text_dob_keeps_the_year(text: str, expected: str) -> None:
    assert CATALOG.rewriter("dob", field(Oid.TEXT))(text.encode(), TEXT) == expected.encode()


def test_dob_over_89_years_is_aggregated_only_with_a_reference_year() -> None:
    old = dump(Oid.DATE, dt.date(1920, 6, 5), BINARY)
    with_ref = CATALOG.rewriter("dob", field(Oid.DATE))(old, BINARY)
    assert load(Oid.DATE, with_ref, BINARY) == dt.date(1935, 1, 1)
    assert CATALOG.rewriter("dob", field(Oid.TEXT))(b"1920-06-05", TEXT) == b"1935"
    assert CATALOG.rewriter("dob", field(Oid.DATE))(b"0044-03-15 BC", TEXT) == b"1935-01-01"
    # encounter dates are not birth dates: no aggregation
    assert CATALOG.rewriter("date", field(Oid.DATE))(b"1920-06-05", TEXT) == b"1920-01-01"
    no_ref = MaskCatalog(Rules()).rewriter("dob", field(Oid.DATE))(old, BINARY)
    assert load(Oid.DATE, no_ref, BINARY) == dt.date(1920, 1, 1)


@pytest.mark.parametrize("oid", [Oid.DATE, Oid.TIMESTAMP, Oid.TIMESTAMPTZ])
@pytest.mark.parametrize(
    "data",
    [b"05/06/1987", b"Fri Jun 05 1987", b"1987-13-45", b"1987-06-05 14:30", b"", b"\xff\xfe"],
)
def test_dates_not_in_iso_style_become_null(oid: int, data: bytes) -> None:
    assert CATALOG.rewriter("dob", field(oid))(data, TEXT) is None


@pytest.mark.parametrize("data", [b"", b"\x00\x00", b"\x00" * 9])
@pytest.mark.parametrize("oid", [Oid.DATE, Oid.TIMESTAMP, Oid.TIMESTAMPTZ])
def test_malformed_binary_dates_become_null(oid: int, data: bytes) -> None:
    assert CATALOG.rewriter("date", field(oid))(data, BINARY) is None


def test_infinite_dates_pass() -> None:
    rw = CATALOG.rewriter("date", field(Oid.DATE))
    assert rw(b"infinity", TEXT) == b"infinity"
    assert rw(struct.pack("!i", 2**31 - 1), BINARY) == struct.pack("!i", 2**31 - 1)


# --- age and zip -------------------------------------------------------------------------------


@pytest.mark.parametrize("oid", [Oid.INT2, Oid.INT4, Oid.INT8, Oid.FLOAT4, Oid.FLOAT8])
@pytest.mark.parametrize("fmt", [TEXT, BINARY])
@pytest.mark.parametrize(("age", "expected"), [(93, 90), (90, 90), (89, 89), (42, 42), (0, 0)])
def test_age_over_89_becomes_90(oid: int, fmt: int, age: int, expected: int) -> None:
    value: Any = float(age) if oid in (Oid.FLOAT4, Oid.FLOAT8) else age
    out = CATALOG.rewriter("age", field(oid))(dump(oid, value, fmt), fmt)
    assert load(oid, out, fmt) == expected


@pytest.mark.parametrize("fmt", [TEXT, BINARY])
@pytest.mark.parametrize(
    ("age", "expected"),
    [("93.5", "90.0"), ("104", "90"), ("89.99", "89.99"), ("90.000", "90.000"), ("12", "12")],
)
def test_numeric_age_keeps_its_scale(fmt: int, age: str, expected: str) -> None:
    data = dump(Oid.NUMERIC, Decimal(age), fmt)
    out = CATALOG.rewriter("age", field(Oid.NUMERIC))(data, fmt)
    got = load(Oid.NUMERIC, out, fmt)
    assert got == Decimal(expected)
    assert str(got) == expected


@pytest.mark.parametrize(
    ("text", "expected"), [("93", "90"), ("89", "89"), (" 100 ", "90"), ("ninety", "<AGE>")]
)
def test_text_age(text: str, expected: str) -> None:
    assert CATALOG.rewriter("age", field(Oid.TEXT))(text.encode(), TEXT) == expected.encode()


@pytest.mark.parametrize(
    ("zip_code", "expected"),
    [
        ("02139", "021"),
        ("02139-4307", "021"),
        ("021394307", "021"),
        ("90210", "902"),
        ("021", "021"),
        ("1234", "<ZIP>"),
        ("SW1A 1AA", "<ZIP>"),
        ("", "<ZIP>"),
    ]
    + [(f"{p}42", "000") for p in sorted(RESTRICTED_ZIP3)],
)
@pytest.mark.parametrize("fmt", [TEXT, BINARY])
def test_zip_keeps_three_digits(zip_code: str, expected: str, fmt: int) -> None:
    assert CATALOG.rewriter("zip", field(Oid.TEXT))(zip_code.encode(), fmt) == expected.encode()


def test_zip_fits_char_5_and_nulls_integers() -> None:
    assert CATALOG.rewriter("zip", field(Oid.BPCHAR, 4 + 5))(b"02139", TEXT) == b"021  "
    assert CATALOG.rewriter("zip", field(Oid.INT4))(struct.pack("!i", 2139), BINARY) is None
    assert len(RESTRICTED_ZIP3) == 17


# --- free text ---------------------------------------------------------------------------------


def test_free_text_column_is_scanned() -> None:
    note = "Dr. Jane Roe called 555-010-4477 about SSN 000-12-3456."
    out = CATALOG.rewriter("free_text", field(Oid.TEXT))(note.encode(), TEXT)
    assert out is not None
    for phi in (b"Jane", b"Roe", b"555-010-4477", b"000-12-3456"):
        assert phi not in out
    assert CATALOG.rewriter("free_text", field(Oid.INT4))(b"1", TEXT) is None


def test_free_text_deny_mode_nulls_cells_with_findings() -> None:
    spec = MaskSpec.model_validate({"operator": "scan", "mode": "deny"})
    cat = MaskCatalog(Rules(masking={"free_text": spec}))
    rw = cat.rewriter("free_text", field(Oid.TEXT))
    assert rw(b"Call Dr. Jane Roe at 555-010-4477", TEXT) is None
    assert rw(b"No acute distress.", TEXT) == b"No acute distress."


# --- pseudonymous profile ----------------------------------------------------------------------


def test_pseudonyms_are_keyed_deterministic_and_join_across_formats() -> None:
    rw = CATALOG.rewriter("ssn", field(Oid.TEXT), "pseudonymous")
    a, b, c = rw(b"000-12-3456", TEXT), rw(b"000-12-3456", BINARY), rw(b"000-12-3457", TEXT)
    assert a == b != c
    assert a is not None and a.startswith(b"tok_") and len(a) == 20
    assert bytes.fromhex(a[4:].decode())  # hex
    other_key = MaskCatalog(Rules(), b"q" * 32).rewriter("ssn", field(Oid.TEXT), "pseudonymous")
    assert other_key(b"000-12-3456", TEXT) != a
    bp = CATALOG.rewriter("ssn", field(Oid.BPCHAR, 4 + 24), "pseudonymous")(b"000-12-3456   ", TEXT)
    assert bp == a.decode().ljust(24).encode()


def test_pseudonymous_profile_nulls_non_text_and_generalises_dates() -> None:
    assert CATALOG.rewriter("mrn", field(Oid.INT8), "pseudonymous")(b"12345", TEXT) is None
    assert CATALOG.rewriter("dob", field(Oid.DATE), "pseudonymous")(b"1987-06-05", TEXT) == (
        b"1987-01-01"
    )
    assert CATALOG.operator_name("name", "pseudonymous") == "pseudonym"


def test_pseudonymous_agent_without_key_is_a_load_error() -> None:
    rules = Rules(agents=(Agent(name="bot", password="x", profile="pseudonymous"),))
    with pytest.raises(ValueError, match="pseudonym key"):
        MaskCatalog(rules)
    assert MaskCatalog(rules, KEY).operator_name("ssn", "pseudonymous") == "pseudonym"


def test_unknown_profile_is_rejected() -> None:
    with pytest.raises(ValueError):
        CATALOG.rewriter("ssn", field(Oid.TEXT), "plaintext")


# --- overrides ---------------------------------------------------------------------------------


def catalog_with(tag: str, **spec: Any) -> MaskCatalog:
    return MaskCatalog(Rules(masking={tag: MaskSpec(**spec)}))


def test_replace_override_sets_the_value() -> None:
    cat = catalog_with("ssn", operator="replace", new_value="***-**-****")
    assert cat.rewriter("ssn", field(Oid.TEXT))(b"000-12-3456", TEXT) == b"***-**-****"
    assert cat.operator_name("ssn") == "replace"


def test_hash_override_is_presidio_hash() -> None:
    cat = catalog_with("mrn", operator="hash", hash_type="sha256", salt="0123456789abcdef")
    out = cat.rewriter("mrn", field(Oid.TEXT))(b"MRN00998877", TEXT)
    assert out is not None and len(out) == 64 and b"998877" not in out


def test_mask_override() -> None:
    cat = catalog_with("phone", operator="mask", masking_char="*", chars_to_mask=8, from_end=False)
    assert cat.rewriter("phone", field(Oid.TEXT))(b"555-010-4477", TEXT) == b"********4477"


def test_redact_override_gives_empty_text() -> None:
    cat = catalog_with("name", operator="redact")
    assert cat.rewriter("name", field(Oid.TEXT))(b"Testpatient", TEXT) == b""


def test_override_applies_to_dates_too() -> None:
    cat = catalog_with("dob", operator="nullify")
    assert cat.rewriter("dob", field(Oid.DATE))(b"1987-06-05", TEXT) is None


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"operator": "frobnicate"}, "unknown operator"),
        ({"operator": "encrypt", "key": "0123456789abcdef"}, "cannot be used"),
        ({"operator": "custom"}, "cannot be used"),
        ({"operator": "deanonymize_keep"}, "cannot be used"),
        ({"operator": "replace", "new_value": 5}, "invalid parameters"),
        ({"operator": "replace", "colour": "red"}, "unknown parameter"),
        ({"operator": "hash", "hash_type": "md5"}, "invalid parameters"),
        ({"operator": "hash", "salt": "short"}, "invalid parameters"),
        (
            {"operator": "mask", "masking_char": "**", "chars_to_mask": 1, "from_end": True},
            "invalid",
        ),
        ({"operator": "mask", "masking_char": "*"}, "invalid parameters"),
        ({"operator": "scan", "mode": "maybe"}, "mode"),
        ({"operator": "nullify", "x": 1}, "unknown parameter"),
    ],
)
def test_bad_overrides_fail_at_load_time(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        catalog_with("ssn", **spec)


def test_pass_through_operators_cannot_even_be_written() -> None:
    for op in ("keep", "decrypt", "deanonymize"):
        with pytest.raises(ValueError):
            MaskSpec(operator=op)


def test_pseudonym_override_needs_a_key() -> None:
    with pytest.raises(ValueError, match="key"):
        catalog_with("ssn", operator="pseudonym")


# --- derived columns, unknown tags -------------------------------------------------------------


def test_redact_cell() -> None:
    assert CATALOG.redact_cell(field(Oid.TEXT))(b"000-12-3456", TEXT) == b"<REDACTED>"
    assert CATALOG.redact_cell(field(Oid.BPCHAR, 4 + 4))(b"abcd", TEXT) == b"<RED"
    assert load(Oid.JSONB, CATALOG.redact_cell(field(Oid.JSONB))(b"\x01{}", 1), 1) == "<REDACTED>"
    assert CATALOG.redact_cell(field(Oid.INT4))(b"\x00\x00\x00\x01", BINARY) is None
    assert CATALOG.redact_cell(field(Oid.TEXT))(None, TEXT) is None


def test_unknown_tag_nulls() -> None:
    assert CATALOG.rewriter("shoe_size", field(Oid.TEXT))(b"44", TEXT) is None
    assert CATALOG.operator_name("shoe_size") == "nullify"


# --- properties --------------------------------------------------------------------------------

ALL_TYPES = [
    (Oid.TEXT, -1),
    (Oid.VARCHAR, 8),
    (Oid.BPCHAR, 9),
    (Oid.NAME, -1),
    (Oid.JSON, -1),
    (Oid.JSONB, -1),
    (Oid.INT2, -1),
    (Oid.INT4, -1),
    (Oid.INT8, -1),
    (Oid.FLOAT4, -1),
    (Oid.FLOAT8, -1),
    (Oid.NUMERIC, -1),
    (Oid.DATE, -1),
    (Oid.TIMESTAMP, -1),
    (Oid.TIMESTAMPTZ, -1),
    (Oid.UUID, -1),
    (Oid.BYTEA, -1),
    (Oid.BOOL, -1),
    (99999, -1),
]


@settings(max_examples=600, deadline=None)
@given(
    st.sampled_from(sorted(REPLACED_TAGS | NULLED_TAGS)),
    st.sampled_from(ALL_TYPES),
    st.sampled_from(["safe_harbor", "pseudonymous"]),
    st.integers(min_value=0, max_value=1),
    st.binary(max_size=64) | st.text(max_size=40).map(str.encode),
)
def test_replacing_rewriters_never_return_their_input(
    tag: str, oid_mod: tuple[int, int], profile: str, fmt: int, data: bytes
) -> None:
    out = CATALOG.rewriter(tag, field(*oid_mod), profile)(data, fmt)
    assert out is None or out != data


@settings(max_examples=600, deadline=None)
@given(
    st.sampled_from(sorted(BUILTIN_TAGS - {"free_text"})),
    st.sampled_from(ALL_TYPES),
    st.integers(min_value=0, max_value=1),
    st.binary(max_size=64),
)
def test_no_rewriter_raises(tag: str, oid_mod: tuple[int, int], fmt: int, data: bytes) -> None:
    out = CATALOG.rewriter(tag, field(*oid_mod))(data, fmt)
    assert out is None or isinstance(out, bytes)


# --- a real Postgres accepts what we produce -------------------------------------------------


class _Raw:
    def __init__(self, data: bytes, oid: int) -> None:
        self.data, self.oid = data, oid


def _raw_dumper(fmt: int) -> type[Dumper]:
    class RawDumper(Dumper):
        format = Format.BINARY if fmt else Format.TEXT

        def dump(self, obj: Any) -> bytes:
            return bytes(obj.data)

        def get_key(self, obj: Any, format: Any) -> Any:
            return (type(obj), obj.oid)

        def upgrade(self, obj: Any, format: Any) -> Dumper:
            d = type(self)(type(obj))
            d.oid = obj.oid
            return d

    return RawDumper


ROUND_TRIP: list[tuple[str, int, int, bytes]] = [
    ("ssn", Oid.TEXT, -1, b"000-12-3456"),
    ("ssn", Oid.BPCHAR, 4 + 7, b"0001234"),
    ("name", Oid.NAME, -1, b"Testpatient"),
    ("email", Oid.JSON, -1, b'"x@example.org"'),
    ("email", Oid.JSONB, -1, b'"x@example.org"'),
    ("dob", Oid.DATE, -1, b"1987-06-05"),
    ("dob", Oid.TIMESTAMP, -1, b"1987-06-05 12:34:56.789"),
    ("date", Oid.TIMESTAMPTZ, -1, b"1987-06-05 12:34:56+02"),
    ("age", Oid.INT2, -1, b"93"),
    ("age", Oid.INT4, -1, b"93"),
    ("age", Oid.INT8, -1, b"93"),
    ("age", Oid.FLOAT4, -1, b"93.5"),
    ("age", Oid.FLOAT8, -1, b"93.5"),
    ("age", Oid.NUMERIC, -1, b"93.25"),
    ("zip", Oid.VARCHAR, -1, b"02139"),
    ("free_text", Oid.TEXT, -1, b"Dr. Jane Roe, 555-010-4477"),
]


@pytest.mark.parametrize(("tag", "oid", "mod", "text_value"), ROUND_TRIP)
@pytest.mark.parametrize("fmt", [TEXT, BINARY])
def test_values_are_valid_for_postgres(
    pg_dsn: str, tag: str, oid: int, mod: int, text_value: bytes, fmt: int
) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("SET DateStyle = 'ISO, MDY'; SET TimeZone = 'UTC'")
        type_name = conn.execute("SELECT %s::regtype::text", [int(oid)]).fetchone()
        assert type_name is not None
        # what the server itself sends for the original value, in the wanted format
        cur = conn.cursor(binary=bool(fmt))
        row = cur.execute(f"SELECT %s::{type_name[0]}", [text_value.decode()]).fetchone()
        original = cur.pgresult.get_value(0, 0) if cur.pgresult else None
        assert row is not None and original is not None
        out = CATALOG.rewriter(tag, field(oid, mod), "safe_harbor")(bytes(original), fmt)
        assert out is not None
        # the server parses it back with the type's own input / receive function
        conn.adapters.register_dumper(_Raw, _raw_dumper(fmt))
        placeholder = "%b" if fmt else "%t"
        echoed = conn.execute(f"SELECT ({placeholder})::text", [_Raw(out, oid)]).fetchone()
        assert echoed is not None and echoed[0] is not None
        assert text_value.decode() not in echoed[0] or tag in ("age", "free_text")
