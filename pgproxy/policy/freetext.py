"""PHI inside free text (clinical notes): find spans, replace them by ``<TYPE>`` tokens.

Detection is patterns only — no NLP model, nothing downloaded at run time:

* presidio-analyzer's pattern recognizers, called directly (never ``AnalyzerEngine``, which
  would load a spaCy model): phone numbers (libphonenumber), US SSN, dates, URLs, IP addresses,
  credit cards, and e-mail addresses (presidio's e-mail patterns without its ``tldextract``
  validation, which may fetch the public suffix list over the network);
* our own patterns for what those miss: SSN-shaped numbers presidio rejects as invalid,
  MRN/member/account ids after a label, long digit runs, month-name dates, street addresses and
  "City, ST 12345", ages over 89, and personal names after a title or a label
  ("Dr. Jane Roe", "Mr. John Q. Public", "Patient: Jane Roe").

Residual risk, stated plainly: without a model, a name that follows no title or label ("Jane
said...") is not found, nor are lower-case names, nicknames, relatives' names, employers,
or rare date and address formats. Detection errs towards over-redaction (every presidio hit is
used whatever its score). Columns whose risk is not acceptable should use ``mode: deny``
(any finding nulls the cell) or a replacing operator.

``scrub`` returns the original text unchanged only when nothing was found; that is the one
place original text passes the masking layer.
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol


class FreeTextMode(enum.StrEnum):
    REPLACE = "replace"  # found spans become <TYPE>
    DENY = "deny"  # any finding nulls the whole cell


@dataclass(frozen=True, slots=True)
class Finding:
    entity: str
    start: int
    end: int


class Detector(Protocol):
    def find(self, text: str) -> Iterable[Finding]: ...


_TITLES = (
    r"(?:Dr|Drs|Mr|Mrs|Ms|Miss|Mx|Prof|Rev|Fr|Sr|Nurse|Sister|Brother|Pt|Patient|Mother|Father"
    r"|Husband|Wife|Son|Daughter|Dad|Mom)"
)
_CAP_WORD = r"[A-Z][a-zA-Z'\u00C0-\u017F-]+"
# An initial is "Q." or a lone capital followed by a space; never the first letter of a word.
_NAME = rf"(?:[A-Z]\.?\s+){{0,2}}{_CAP_WORD}(?:\s+[A-Z](?:\.|(?=\s)))?(?:\s+{_CAP_WORD}){{0,2}}"
_MONTH = (
    r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?"
    r"|Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)"
)
_STREET = (
    r"(?:Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|Way|Place|Pl"
    r"|Terrace|Ter|Circle|Cir|Parkway|Pkwy|Highway|Hwy|Square|Sq)"
)

#: (entity, pattern, flags); the span replaced is the named group ``v`` when present.
OWN_PATTERNS: tuple[tuple[str, str, int], ...] = (
    # Titles and labels match in any case; the name itself must be capitalised.
    ("PERSON", rf"\b(?i:{_TITLES})\b\.?\s+(?P<v>{_NAME})", 0),
    (
        "PERSON",
        r"\b(?i:patient(?: name)?|name|seen by|signed by|attending|referred by|provider|"
        r"contact|emergency contact|next of kin|nok)\s*[:\-]\s*" + rf"(?P<v>{_NAME})",
        0,
    ),
    ("US_SSN", r"(?<!\d)\d{3}[- ]\d{2}[- ]\d{4}(?!\d)", 0),
    # Phone numbers by shape, whether or not the area code is assigned (libphonenumber only
    # finds valid ones): (300) 555-0100, 300-555-0100, 300.555.0100, +1 300 555 0100, 555-0100.
    (
        "PHONE_NUMBER",
        r"(?<![\w-])(?:\+?1[-. ]?)?(?:\(\d{3}\)\s?|\d{3}[-. ])?\d{3}[-. ]\d{4}(?![\w-])",
        0,
    ),
    (
        "PHONE_NUMBER",
        r"\b(?:phone|tel|telephone|cell|mobile|fax|call|pager|ext)\.?\s*[:#]?\s*"
        r"(?P<v>\+?[\d(][\d ().-]{5,}\d)",
        re.IGNORECASE,
    ),
    (
        "MRN",
        r"\b(?:MRN|MR#|medical record(?: number| no\.?| #)?|chart(?: number| no\.?| #)?"
        r"|patient id|pt id)\s*[:#]?\s*(?P<v>[A-Z0-9][A-Z0-9-]{3,})",
        re.IGNORECASE,
    ),
    (
        "ID",
        r"\b(?:member id|member #|policy(?: number| no\.?| #)?|account(?: number| no\.?| #)?"
        r"|acct\.?(?: #)?|license(?: number| no\.?| #)?|plate|vin|serial(?: number| no\.?)?"
        r"|device id)\s*[:#]?\s*(?P<v>[A-Z0-9][A-Z0-9-]{3,})",
        re.IGNORECASE,
    ),
    ("ID", r"(?<![\d.])\d{7,}(?![\d.])", 0),
    ("DATE_TIME", rf"\b{_MONTH}\.?\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{2,4}}\b", re.IGNORECASE),
    ("DATE_TIME", rf"\b\d{{1,2}}(?:st|nd|rd|th)?\s+{_MONTH}\.?,?\s+\d{{2,4}}\b", re.IGNORECASE),
    ("DATE_TIME", r"(?<!\d)\d{4}-\d{1,2}-\d{1,2}(?!\d)", 0),
    ("DATE_TIME", r"(?<![\d/])\d{1,2}/\d{1,2}/\d{2,4}(?![\d/])", 0),
    (
        "ADDRESS",
        rf"\b\d{{1,6}}\s+(?:[A-Z][a-zA-Z]+\s+){{1,4}}{_STREET}\b\.?"
        r"(?:,?\s+(?:Apt|Apartment|Suite|Ste|Unit|#)\.?\s*[A-Za-z0-9-]+)?",
        0,
    ),
    ("ADDRESS", r"\b[A-Z][a-zA-Z]+(?:\s[A-Z][a-zA-Z]+){0,2},\s*[A-Z]{2}\s+\d{5}(?:-\d{4})?\b", 0),
    ("ADDRESS", r"\bP\.?\s?O\.?\s+Box\s+\d+\b", re.IGNORECASE),
    ("AGE", r"\b(?:9\d|1[0-4]\d)\s*[- ]?(?:years?|yrs?|y/?o)\b(?:[- ]old)?", re.IGNORECASE),
    ("AGE", r"\b(?:age[d]?|aged)\s*:?\s*(?P<v>9\d|1[0-4]\d)\b", re.IGNORECASE),
)


@dataclass(frozen=True, slots=True)
class RegexDetector:
    """Our own patterns (case-sensitive where capitalisation is the signal, e.g. names)."""

    patterns: tuple[tuple[str, re.Pattern[str]], ...]

    @classmethod
    def default(cls) -> RegexDetector:
        return cls(tuple((e, re.compile(p, f)) for e, p, f in OWN_PATTERNS))

    def find(self, text: str) -> Iterable[Finding]:
        for entity, pattern in self.patterns:
            for m in pattern.finditer(text):
                group = "v" if "v" in pattern.groupindex and m.group("v") else 0
                if m.end(group) > m.start(group):
                    yield Finding(entity, m.start(group), m.end(group))


@dataclass(frozen=True, slots=True)
class PresidioDetector:
    """presidio-analyzer pattern recognizers, called directly (no NLP engine)."""

    recognizers: tuple[object, ...]

    @classmethod
    def default(cls) -> PresidioDetector:
        from presidio_analyzer import PatternRecognizer
        from presidio_analyzer.predefined_recognizers import (
            CreditCardRecognizer,
            DateRecognizer,
            EmailRecognizer,
            IpRecognizer,
            PhoneRecognizer,
            UrlRecognizer,
            UsSsnRecognizer,
        )

        email = PatternRecognizer(
            supported_entity="EMAIL_ADDRESS", patterns=EmailRecognizer.PATTERNS, name="email"
        )
        return cls(
            (
                email,
                PhoneRecognizer(),
                UsSsnRecognizer(),
                DateRecognizer(),
                UrlRecognizer(),
                IpRecognizer(),
                CreditCardRecognizer(),
            )
        )

    def find(self, text: str) -> Iterable[Finding]:
        for recognizer in self.recognizers:
            results = recognizer.analyze(text, recognizer.supported_entities, None)  # type: ignore[attr-defined]
            for r in results or ():
                if r.end > r.start:
                    yield Finding(str(r.entity_type), int(r.start), int(r.end))


@dataclass(frozen=True, slots=True)
class FreeTextScanner:
    detectors: Sequence[Detector]

    def findings(self, text: str) -> list[Finding]:
        """All findings, overlapping spans merged (the longest span's entity names the union)."""
        found = sorted(
            (f for d in self.detectors for f in d.find(text)),
            key=lambda f: (f.start, -(f.end - f.start)),
        )
        merged: list[Finding] = []
        for f in found:
            if merged and f.start < merged[-1].end:
                last = merged[-1]
                if f.end > last.end:
                    merged[-1] = Finding(last.entity, last.start, f.end)
                continue
            merged.append(f)
        return merged

    def scrub(self, text: str, mode: FreeTextMode = FreeTextMode.REPLACE) -> str | None:
        """``text`` with every finding replaced by ``<ENTITY>``; None in deny mode if any."""
        found = self.findings(text)
        if not found:
            return text
        if mode is FreeTextMode.DENY:
            return None
        out: list[str] = []
        pos = 0
        for f in found:
            out.append(text[pos : f.start])
            out.append(f"<{f.entity}>")
            pos = f.end
        out.append(text[pos:])
        return "".join(out)


@functools.cache
def default_scanner() -> FreeTextScanner:
    """The shared scanner (built on first use: importing presidio-analyzer takes about a second)."""
    return FreeTextScanner((PresidioDetector.default(), RegexDetector.default()))
