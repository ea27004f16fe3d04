"""Free-text scanning on synthetic clinical notes: what is found, what passes, deny mode."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgproxy.policy.freetext import (
    FreeTextMode,
    FreeTextScanner,
    RegexDetector,
    default_scanner,
)

SCANNER = default_scanner()

# (note, PHI fragments that must not survive) — all synthetic.
NOTES: list[tuple[str, list[str]]] = [
    (
        "Pt seen by Dr. Jane Roe on 03/14/2021 for follow-up.",
        ["Jane", "Roe", "03/14/2021"],
    ),
    (
        "Mr. John Q. Public, 93 year old male, presents with chest pain.",
        ["John", "Public", "93 year"],
    ),
    ("MRN: 00123456. Chart # A77-1234 reviewed.", ["00123456", "A77-1234"]),
    ("SSN 000-12-3456 on file; alt 000 12 3456.", ["000-12-3456", "000 12 3456"]),
    ("Call (555) 010-4477 or 555.010.9999 after 5pm.", ["010-4477", "010.9999"]),
    ("Email jane.roe@example.org with results.", ["jane.roe@example.org"]),
    (
        "Lives at 42 Fake Street, Apt 3B, Springfield, IL 62704.",
        ["42 Fake Street", "Springfield", "62704"],
    ),
    ("Mailing address PO Box 1234.", ["Box 1234"]),
    ("DOB June 5, 1987; admitted 5 Jan 2021; discharged 2021-01-09.", ["June 5", "5 Jan", "01-09"]),
    ("Patient: Testy McTestface. Emergency contact: Zed Testerson.", ["McTestface", "Testerson"]),
    ("daughter Mary visits daily; Nurse Ratched on duty.", ["Mary", "Ratched"]),
    ("Member ID: XQ1234567, policy # PL-99887766.", ["XQ1234567", "99887766"]),
    (
        "Portal https://portal.example.org/p/123 from 10.0.0.12.",
        ["portal.example.org", "10.0.0.12"],
    ),
    ("Dr. A Smith and Dr. J. R. Doe co-signed.", ["Smith", "Doe"]),
    ("Aged 94, lives alone.", ["94"]),
]


@pytest.mark.parametrize(("note", "phi"), NOTES)
def test_phi_in_notes_is_replaced(note: str, phi: list[str]) -> None:
    out = SCANNER.scrub(note)
    assert out is not None
    for fragment in phi:
        assert fragment not in out, (fragment, out)
    assert "<" in out and ">" in out


@pytest.mark.parametrize(
    "note",
    [
        "BP 120 over 80, HR 72, afebrile. No acute distress.",
        "Continue metformin 500 mg twice daily; recheck A1c in three months.",
        "Patient is stable and was discharged home with family.",
        "",
    ],
)
def test_notes_without_phi_pass_unchanged(note: str) -> None:
    assert SCANNER.findings(note) == []
    assert SCANNER.scrub(note) == note
    assert SCANNER.scrub(note, FreeTextMode.DENY) == note


def test_replacement_tokens_name_the_entity() -> None:
    out = SCANNER.scrub("Dr. Jane Roe, SSN 000-12-3456, jane.roe@example.org")
    assert out == "Dr. <PERSON>, SSN <US_SSN>, <EMAIL_ADDRESS>"


def test_deny_mode_nulls_any_finding() -> None:
    assert SCANNER.scrub("Seen by Dr. Jane Roe.", FreeTextMode.DENY) is None


def test_overlapping_findings_merge_into_one_token() -> None:
    # an SSN-shaped value is found by several detectors (SSN, phone): one token, no leftovers
    out = SCANNER.scrub("id 000-12-3456 end")
    assert out is not None
    assert out.count("<") == 1 and "3456" not in out


def test_regex_detector_alone_needs_no_presidio() -> None:
    scanner = FreeTextScanner((RegexDetector.default(),))
    assert scanner.scrub("Mrs. Jane Roe, MRN 00123456") == "Mrs. <PERSON>, MRN <MRN>"


_first = st.sampled_from(["Jane", "John", "Zed", "Testy", "Ada", "Quinn"])
_last = st.sampled_from(["Roe", "Public", "Testerson", "McTestface", "O'Fake", "Smith-Jones"])
_title = st.sampled_from(["Dr.", "Dr", "Mr.", "Mrs.", "Ms.", "Prof.", "Nurse", "Patient:"])
_filler = st.sampled_from(["Seen by", "Discussed with", "Note:", "Per", ""])


@settings(max_examples=200, deadline=None)
@given(_filler, _title, _first, _last, st.integers(min_value=0, max_value=9999))
def test_titled_names_and_ssns_never_survive(
    filler: str, title: str, first: str, last: str, n: int
) -> None:
    ssn = f"000-{n % 100:02d}-{n:04d}"
    note = f"{filler} {title} {first} {last} regarding SSN {ssn}."
    out = SCANNER.scrub(note)
    assert out is not None
    assert first not in out and last not in out and ssn not in out


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_scrub_is_total(text: str) -> None:
    out = SCANNER.scrub(text)
    assert isinstance(out, str)
    assert (out == text) == (SCANNER.findings(text) == [])


@pytest.mark.parametrize(
    "text",
    [
        "Called patient at (300) 555-0100 today",
        "call 300-555-0100 to confirm",
        "phone 555-0100",
        "reach her on 221.555.0142",
        "tel: +1 280 555 0177",
        "Fax #311-555-0123",
    ],
)
def test_phone_numbers_with_unassigned_area_codes_are_found(text: str) -> None:
    out = default_scanner().scrub(text, FreeTextMode.REPLACE)
    digits = "".join(ch for ch in text if ch.isdigit())
    assert out is not None and digits[-4:] not in out, out
