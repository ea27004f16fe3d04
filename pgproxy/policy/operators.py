"""The masking catalog: one cell rewriter per (PHI tag, profile, column type), valid on the wire.

Safe Harbor defaults (profile ``safe_harbor``):

* identifiers (name, ssn, mrn, phone, fax, email, account_number, license_number,
  health_plan_id, vehicle_id, device_id, url, unique_id, address) are replaced whole by
  ``<TAG>`` (presidio-anonymizer ``Replace``) in text-like and json columns; NULL elsewhere;
* dob/date keep only the year, in the column's own type (``year_only``); a text column holding a
  date becomes its 4-digit year;
* age: ages of 90 and over become 90 (``age_cap``);
* zip: the first three digits, ``000`` for the 17 low-population prefixes (``zip3``); NULL for
  non-text columns;
* ip_address, photo, biometric, geo: NULL (``nullify``);
* free_text: spans found by ``freetext`` become ``<TYPE>`` (``scan``; ``mode: deny`` nulls the
  whole cell on any finding).

Profile ``pseudonymous`` replaces the identifier tags by ``tok_<hex16>`` (HMAC-SHA256 under the
pseudonym key, so equal values join) and otherwise behaves as ``safe_harbor``. A ``masking:``
override in the rules replaces the default operator of its tag in every profile; it is
validated once here (unknown operator or bad parameters raise ``ValueError``). Operators that
pass or restore the original (keep, decrypt, deanonymize, encrypt, custom) cannot be named.

Fail closed: a rewriter never raises and never returns its input for a replacing tag; any
error, unknown type or unparseable value gives NULL.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import hmac
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from pgproxy.policy import pgbinary
from pgproxy.policy.freetext import FreeTextMode, default_scanner
from pgproxy.policy.pgbinary import JSON_LIKE, TEXT_LIKE, Oid
from pgproxy.policy.seam import NULL_CELL, CellRewriter, ConstantRewriter, DateYear, FieldInfo
from pgproxy.rules import BUILTIN_TAGS, Rules


@contextlib.contextmanager
def _import_blocked(name: str) -> Iterator[None]:
    """Make ``import name`` fail (ImportError) for the duration, unless it is already loaded.

    presidio-anonymizer's ``operators`` package imports its Azure (AHDS) surrogate operator, which
    tries ``presidio_analyzer.llm_utils.azure_auth_helper``: importing that loads all of
    presidio-analyzer with spaCy, thinc and numpy (about 70 MB and 0.6 s) although no operator we
    use needs it. The import sits in a ``try/except ImportError`` there, so a ``None`` entry in
    ``sys.modules`` (Python's documented way to make an import fail) skips it cleanly.
    Free-text scanning still imports presidio-analyzer itself, on first use.
    """
    if name in sys.modules:
        yield
        return
    sys.modules[name] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if sys.modules.get(name, _MISSING) is None:
            del sys.modules[name]


_MISSING = object()

with _import_blocked("presidio_analyzer.llm_utils.azure_auth_helper"):
    from presidio_anonymizer.operators import Hash, Mask, Operator, Redact, Replace

SAFE_HARBOR = "safe_harbor"
PSEUDONYMOUS = "pseudonymous"
PROFILES = frozenset({SAFE_HARBOR, PSEUDONYMOUS})
REDACTED = "<REDACTED>"

REPLACED_TAGS: frozenset[str] = frozenset(
    {
        "name",
        "ssn",
        "mrn",
        "phone",
        "fax",
        "email",
        "account_number",
        "license_number",
        "health_plan_id",
        "vehicle_id",
        "device_id",
        "url",
        "unique_id",
        "address",
    }
)
NULLED_TAGS: frozenset[str] = frozenset({"ip_address", "photo", "biometric", "geo"})

#: Three-digit ZIP prefixes covering 20,000 people or fewer (Safe Harbor, 2000 census).
RESTRICTED_ZIP3: frozenset[str] = frozenset(
    {"036", "059", "063", "102", "203", "556", "692", "790", "821"}
    | {"823", "830", "831", "878", "879", "884", "890", "893"}
)


class Op(enum.StrEnum):
    """Operator names, as written in ``masking:`` overrides and shown by ``explain``/audit."""

    REPLACE = "replace"
    REDACT = "redact"
    HASH = "hash"
    MASK = "mask"
    NULLIFY = "nullify"
    YEAR_ONLY = "year_only"
    AGE_CAP = "age_cap"
    ZIP3 = "zip3"
    SCAN = "scan"
    PSEUDONYM = "pseudonym"


_PRESIDIO: dict[Op, tuple[type[Operator], frozenset[str]]] = {
    Op.REPLACE: (Replace, frozenset({"new_value"})),
    Op.REDACT: (Redact, frozenset()),
    Op.HASH: (Hash, frozenset({"hash_type", "salt"})),
    Op.MASK: (Mask, frozenset({"masking_char", "chars_to_mask", "from_end"})),
}
_OWN_PARAMS: dict[Op, frozenset[str]] = {
    Op.NULLIFY: frozenset(),
    Op.YEAR_ONLY: frozenset(),
    Op.AGE_CAP: frozenset(),
    Op.ZIP3: frozenset(),
    Op.SCAN: frozenset({"mode"}),
    Op.PSEUDONYM: frozenset(),
}
#: presidio operators whose output ignores the text they are given (``needs_text`` below)
_VALUE_BLIND = frozenset({Op.REPLACE, Op.REDACT})
_FORBIDDEN = frozenset({"keep", "decrypt", "deanonymize", "deanonymize_keep", "encrypt", "custom"})

_SAFE_HARBOR_DEFAULTS: dict[str, Op] = {
    **{tag: Op.REPLACE for tag in REPLACED_TAGS},
    **{tag: Op.NULLIFY for tag in NULLED_TAGS},
    "dob": Op.YEAR_ONLY,
    "date": Op.YEAR_ONLY,
    "age": Op.AGE_CAP,
    "zip": Op.ZIP3,
    "free_text": Op.SCAN,
}

_Impl = Callable[[bytes, int], bytes | None]


@dataclass(frozen=True, slots=True)
class _Spec:
    """A validated operator choice for one tag."""

    op: Op
    params: Mapping[str, Any] = field(default_factory=dict)
    presidio: Operator | None = None


class MaskCatalog:
    """Builds cell rewriters for tags; validates every ``masking:`` override at construction."""

    def __init__(
        self,
        rules: Rules,
        pseudonym_key: bytes | None = None,
        *,
        reference_year: int | None = None,
    ) -> None:
        """``reference_year`` (the current year, given by the caller: policy code reads no clock)
        turns on Safe Harbor's rule for ages over 89 in ``dob`` columns: birth years before
        ``reference_year - 90`` are shown as that year."""
        self._key = pseudonym_key
        self._clamp_year = reference_year - 90 if reference_year is not None else None
        self._overrides: dict[str, _Spec] = {
            tag: _validated(tag, spec.operator, spec.params(), pseudonym_key)
            for tag, spec in rules.masking.items()
        }
        if pseudonym_key is None and any(a.profile == PSEUDONYMOUS for a in rules.agents):
            raise ValueError("an agent uses the pseudonymous profile but no pseudonym key is set")

    def operator_name(self, tag: str, profile: str = SAFE_HARBOR) -> str:
        return self._spec(tag, profile).op.value

    def rewriter(self, tag: str, field: FieldInfo, profile: str = SAFE_HARBOR) -> CellRewriter:
        spec = self._spec(tag, profile)
        impl = self._impl(tag, spec, field)
        if impl is not None and spec.presidio is not None and spec.op in _VALUE_BLIND:
            return _guarded_constant(impl)
        replacing = spec.op not in (Op.YEAR_ONLY, Op.AGE_CAP, Op.ZIP3, Op.SCAN)
        rewrite = _guarded(impl, replacing)
        if spec.op is Op.YEAR_ONLY and field.type_oid == Oid.DATE and impl is not None:
            return DateYear(rewrite, self._clamp_year if tag == "dob" else None)
        return rewrite

    def redact_cell(self, field: FieldInfo) -> CellRewriter:
        """For derived columns: text-like and json cells become ``<REDACTED>``, others NULL."""
        oid, mod = field.type_oid, field.type_mod
        if oid not in TEXT_LIKE and oid not in JSON_LIKE:
            return NULL_CELL

        def impl(_value: bytes, fmt: int) -> bytes | None:
            return pgbinary.encode_string(oid, mod, REDACTED, fmt)

        return _guarded_constant(impl)

    # --- internals ------------------------------------------------------------------------------

    def _spec(self, tag: str, profile: str) -> _Spec:
        if profile not in PROFILES:
            raise ValueError(f"unknown masking profile {profile!r}")
        if tag in self._overrides:
            return self._overrides[tag]
        if tag not in BUILTIN_TAGS:
            return _Spec(Op.NULLIFY)
        if profile == PSEUDONYMOUS and tag in REPLACED_TAGS:
            return _Spec(Op.PSEUDONYM)
        op = _SAFE_HARBOR_DEFAULTS[tag]
        if op is Op.REPLACE:
            return _Spec(op, {"entity_type": tag.upper()}, Replace())
        return _Spec(op)

    def _impl(self, tag: str, spec: _Spec, f: FieldInfo) -> _Impl | None:
        oid, mod = f.type_oid, f.type_mod
        stringy = oid in TEXT_LIKE or oid in JSON_LIKE
        if spec.op is Op.NULLIFY:
            return None
        if spec.presidio is not None:
            if not stringy:
                return None
            return _presidio_impl(spec, tag, oid, mod)
        if spec.op is Op.PSEUDONYM:
            return self._pseudonym_impl(tag, oid, mod) if stringy else None
        if spec.op is Op.YEAR_ONLY:
            return self._year_impl(tag, oid, mod)
        if spec.op is Op.AGE_CAP:
            return _age_impl(oid, mod)
        if spec.op is Op.ZIP3:
            return _zip_impl(oid, mod) if oid in TEXT_LIKE else None
        if spec.op is Op.SCAN:
            return _scan_impl(oid, mod, FreeTextMode(spec.params.get("mode", "replace")))
        return None

    def _pseudonym_impl(self, tag: str, oid: int, mod: int) -> _Impl | None:
        key = self._key
        if key is None:
            return None

        def impl(value: bytes, fmt: int) -> bytes | None:
            if oid == Oid.BPCHAR:
                value = value.rstrip(b" ")
            elif oid == Oid.JSONB and fmt == 1:
                value = value[1:]
            mac = hmac.new(key, tag.encode() + b"\x00" + value, hashlib.sha256).hexdigest()
            return pgbinary.encode_string(oid, mod, f"tok_{mac[:16]}", fmt)

        return impl

    def _year_impl(self, tag: str, oid: int, mod: int) -> _Impl | None:
        clamp = self._clamp_year if tag == "dob" else None
        if oid in pgbinary.DATETIMES:

            def impl(value: bytes, fmt: int) -> bytes | None:
                return pgbinary.year_start(oid, value, fmt, clamp)

            return impl
        if oid in TEXT_LIKE:
            placeholder = f"<{tag.upper()}>"

            def text_impl(value: bytes, fmt: int) -> bytes | None:
                try:
                    year = pgbinary.year_in_text(pgbinary.decode_string(oid, value, fmt))
                    shown = str(max(year, clamp) if clamp is not None else year)
                except ValueError:
                    shown = placeholder
                return pgbinary.encode_string(oid, mod, shown, fmt)

            return text_impl
        return None


def _validated(tag: str, operator: str, params: dict[str, Any], key: bytes | None) -> _Spec:
    """Check an override once, at load time; the message names the tag, never a value."""
    if operator in _FORBIDDEN:
        raise ValueError(f"masking.{tag}: operator {operator!r} cannot be used for a tag")
    try:
        op = Op(operator)
    except ValueError:
        known = ", ".join(o.value for o in Op)
        raise ValueError(f"masking.{tag}: unknown operator {operator!r} (known: {known})") from None
    allowed = _PRESIDIO[op][1] if op in _PRESIDIO else _OWN_PARAMS[op]
    unknown = set(params) - allowed
    if unknown:
        raise ValueError(f"masking.{tag}: unknown parameter(s) {sorted(unknown)} for {op.value}")
    if op in _PRESIDIO:
        operator_obj = _PRESIDIO[op][0]()
        full = {**params, "entity_type": tag.upper()}
        try:
            operator_obj.validate(full)
            if not isinstance(operator_obj.operate("x", dict(full)), str):
                raise TypeError
        except Exception as exc:
            raise ValueError(f"masking.{tag}: invalid parameters for {op.value}: {exc}") from None
        return _Spec(op, full, operator_obj)
    if op is Op.SCAN:
        try:
            FreeTextMode(params.get("mode", "replace"))
        except ValueError:
            raise ValueError(f"masking.{tag}: mode must be 'replace' or 'deny'") from None
    if op is Op.PSEUDONYM and key is None:
        raise ValueError(f"masking.{tag}: pseudonym needs a pseudonym key")
    return _Spec(op, dict(params))


def _guarded(impl: _Impl | None, replacing: bool) -> CellRewriter:
    """The fail-closed wrapper every rewriter goes through."""
    if impl is None:
        return NULL_CELL

    def rewrite(value: bytes | None, fmt: int) -> bytes | None:
        if value is None:
            return None
        try:
            out = impl(bytes(value), fmt)
        except Exception:
            return None
        if replacing and out == value:
            return None
        return out

    return rewrite


def _guarded_constant(impl: _Impl) -> CellRewriter:
    """``_guarded`` for an ``impl`` whose output does not depend on the value (replace, redact):
    the output is computed once per format instead of once per cell. Same contract: NULL stays
    NULL, an error or an output equal to the original gives NULL."""
    return ConstantRewriter(lambda fmt: impl(b"", fmt))


def _presidio_impl(spec: _Spec, tag: str, oid: int, mod: int) -> _Impl:
    operator_obj = spec.presidio
    assert operator_obj is not None
    params = dict(spec.params)
    needs_text = spec.op not in _VALUE_BLIND

    def impl(value: bytes, fmt: int) -> bytes | None:
        text = _string_of(oid, value, fmt) if needs_text else ""
        result = operator_obj.operate(text, dict(params))
        if not isinstance(result, str):
            return None
        return pgbinary.encode_string(oid, mod, result, fmt)

    return impl


def _string_of(oid: int, value: bytes, fmt: int) -> str:
    if oid in TEXT_LIKE:
        return pgbinary.decode_string(oid, value, fmt)
    if oid == Oid.JSONB and fmt == 1:
        value = value[1:]
    return value.decode("utf-8")


def _age_impl(oid: int, mod: int) -> _Impl | None:
    if oid in TEXT_LIKE:

        def text_impl(value: bytes, fmt: int) -> bytes | None:
            text = pgbinary.decode_string(oid, value, fmt)
            try:
                age = pgbinary.decode_number(Oid.NUMERIC, text.encode("ascii"), 0)
            except Exception:
                return pgbinary.encode_string(oid, mod, "<AGE>", fmt)
            return pgbinary.encode_string(oid, mod, "90", fmt) if age >= 90 else value

        return text_impl
    if oid in pgbinary.INTEGERS or oid in pgbinary.FLOATS or oid == Oid.NUMERIC:

        def impl(value: bytes, fmt: int) -> bytes | None:
            age = pgbinary.decode_number(oid, value, fmt)
            if age.is_nan():
                return None
            if age < 90:  # "over 89" means 90 and older; 89.99 is still 89
                return value
            dscale = 0
            if oid == Oid.NUMERIC:
                dscale = pgbinary.numeric_binary_dscale(value) if fmt == 1 else _text_scale(value)
            return pgbinary.encode_number(oid, 90, fmt, dscale)

        return impl
    return None


def _text_scale(value: bytes) -> int:
    _, dot, frac = value.decode("ascii").strip().partition(".")
    return len(frac) if dot and frac.isdigit() else 0


def _zip_impl(oid: int, mod: int) -> _Impl:
    def impl(value: bytes, fmt: int) -> bytes | None:
        text = pgbinary.decode_string(oid, value, fmt).strip()
        digits = text.replace("-", "")
        if not (digits.isascii() and digits.isdigit() and len(digits) in (3, 5, 9)):
            return pgbinary.encode_string(oid, mod, "<ZIP>", fmt)
        prefix = digits[:3]
        return pgbinary.encode_string(oid, mod, "000" if prefix in RESTRICTED_ZIP3 else prefix, fmt)

    return impl


def _scan_impl(oid: int, mod: int, mode: FreeTextMode) -> _Impl | None:
    if oid not in TEXT_LIKE:
        return None

    def impl(value: bytes, fmt: int) -> bytes | None:
        scrubbed = default_scanner().scrub(pgbinary.decode_string(oid, value, fmt), mode)
        return None if scrubbed is None else pgbinary.encode_string(oid, mod, scrubbed, fmt)

    return impl
