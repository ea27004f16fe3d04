"""The one seam between the wire and the policy.

The relay (``pgproxy.protocol.relay``) asks a ``SessionPolicy`` about every statement it sees —
simple Query text, Parse, SQL-level PREPARE/EXECUTE/DECLARE/FETCH arrive as Query text — and
gets back exactly one ``Verdict``: ALLOW, MASK, HOLD or BLOCK. A verdict that lets a statement
run also carries how its results are to be treated (``ResultPolicy``): which cells of the rows
are rewritten, whether diagnostics are scrubbed, how many rows may pass.

Everything here is pure data plus ``Protocol`` classes. Implementations must fail closed: if
they cannot decide, they return BLOCK; if a cell cannot be rewritten, it becomes NULL.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol


class Action(enum.Enum):
    ALLOW = "ALLOW"
    MASK = "MASK"
    HOLD = "HOLD"
    BLOCK = "BLOCK"


@dataclass(frozen=True, slots=True)
class FieldInfo:
    """One column of a RowDescription, as the policy needs it."""

    name: str
    table_oid: int
    attnum: int
    type_oid: int
    type_size: int
    type_mod: int
    format: int


#: Rewrites one cell: (value or None for NULL, format 0 text / 1 binary) -> new value or None.
CellRewriter = Callable[[bytes | None, int], bytes | None]


class ConstantRewriter:
    """A cell rewriter whose output ignores the value (replace, redact, nullify).

    ``output(fmt)`` is computed once per format, so the relay can write it into every row
    without a call per cell. The contract is that of any rewriter: NULL stays NULL, and an error
    computing the output or an output equal to the original value gives NULL. ``make`` None (or
    returning None) means the cell always becomes NULL.
    """

    __slots__ = ("_make", "_outputs")

    def __init__(self, make: Callable[[int], bytes | None] | None) -> None:
        self._make = make
        self._outputs: dict[int, bytes | None] = {}

    def output(self, fmt: int) -> bytes | None:
        try:
            return self._outputs[fmt]
        except KeyError:
            pass
        out: bytes | None = None
        if self._make is not None:
            try:
                out = self._make(fmt)
            except Exception:
                out = None
            if not isinstance(out, bytes):
                out = None
        if fmt in (0, 1):  # the only formats Postgres has; others are not worth keeping
            self._outputs[fmt] = out
        return out

    def __call__(self, value: bytes | None, fmt: int) -> bytes | None:
        if value is None:
            return None
        out = self.output(fmt)
        if out is None or out == value:
            return None
        return out


#: the rewriter that makes every cell NULL
NULL_CELL = ConstantRewriter(None)


@dataclass(frozen=True, slots=True)
class DateYear:
    """The year-only rewriter of a ``date`` column: January 1st of the value's year, years
    before ``clamp_year`` shown as that year.

    ``rewrite`` handles every value in either format and defines the result; the relay may
    compute the common cases itself (ISO text ``YYYY-MM-DD``, binary day numbers) and must give
    the same bytes.
    """

    rewrite: CellRewriter
    clamp_year: int | None = None

    def __call__(self, value: bytes | None, fmt: int) -> bytes | None:
        return self.rewrite(value, fmt)


@dataclass(frozen=True, slots=True)
class ColumnMask:
    """How one output column is masked, for the audit and for ``explain``."""

    ordinal: int
    column: str
    tag: str
    operator: str


@dataclass(frozen=True, slots=True)
class RowPlan:
    """What to do with the rows that follow one RowDescription.

    ``rewriters`` maps column ordinal to a cell rewriter; columns absent from it are forwarded
    as their original bytes. ``block`` set means the result must not reach the client at all:
    the relay ends the statement with that error instead.
    """

    rewriters: dict[int, CellRewriter] = field(default_factory=dict)
    masks: tuple[ColumnMask, ...] = ()
    block: str | None = None
    #: ``rewriters`` in column order, for one pass over a row
    ordered: tuple[tuple[int, CellRewriter], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ordered", tuple(sorted(self.rewriters.items())))


PASS_ROWS = RowPlan()


@dataclass(frozen=True, slots=True)
class CopyPlan:
    """What to do with the rows of a COPY … TO STDOUT (one CopyData message per row).

    ``rows`` rewrites cells by column ordinal as for DataRows (text-format values);
    ``format`` is "text", "csv" or "binary"; with ``header`` the first row is column names;
    ``columns`` is how many columns the plan was made for (None: not known), which the
    CopyOutResponse must announce before any cell is rewritten by ordinal.
    """

    rows: RowPlan = PASS_ROWS
    format: str = "text"
    header: bool = False
    columns: int | None = None


PASS_COPY = CopyPlan()


class ResultPolicy(Protocol):
    """Decides how the results of one admitted statement are treated."""

    def plan(self, fields: Sequence[FieldInfo], index: int = 0) -> RowPlan:
        """Called for each result's RowDescription. ``index`` is the position of the statement
        inside a multi-statement simple Query (0 for the first, and always 0 for Parse)."""
        ...

    def copy_plan(self, index: int = 0) -> CopyPlan:
        """Called at CopyOutResponse: how the COPY rows of statement ``index`` are treated."""
        ...

    @property
    def scrub_diagnostics(self) -> bool:
        """True when ErrorResponse/NoticeResponse of this statement may echo protected data."""
        ...

    @property
    def max_rows(self) -> int | None:
        """Rows of protected data that may pass before the stream is stopped (None: no limit)."""
        ...


@dataclass(frozen=True, slots=True)
class Verdict:
    """The single decision about one statement (or one multi-statement Query message)."""

    action: Action
    reasons: tuple[str, ...] = ()
    statement_class: str = "unknown"
    #: for BLOCK: the message the agent sees (SQLSTATE 42501); never contains data values.
    message: str = ""
    #: for HOLD: the class of statement being held ("ddl", "privilege", "bulk_export", "write").
    hold_class: str | None = None
    #: for ALLOW/MASK: result treatment; None means results pass untouched.
    result: ResultPolicy | None = None
    fingerprint: str = ""
    sql_redacted: str = ""
    relations: tuple[str, ...] = ()
    columns: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    masks: tuple[ColumnMask, ...] = ()
    #: the catalog the decision was made against ("" when it did not depend on one)
    catalog_version: str = ""

    @property
    def admits(self) -> bool:
        return self.action in (Action.ALLOW, Action.MASK)


@dataclass(frozen=True, slots=True)
class StatementContext:
    """Where a statement came from, for decisions that depend on it."""

    agent: str
    database: str
    #: "query" (simple Query), "parse" (extended Parse), "function" (FunctionCall)
    origin: str
    statement_name: str = ""
    #: parameter type OIDs given at Parse, when any
    param_types: tuple[int, ...] = ()


class SessionPolicy(Protocol):
    """The per-session policy the relay consults. Implementations are pure (no I/O)."""

    def statement(self, sql: str, ctx: StatementContext) -> Verdict:
        """Decide one Query text or Parse text."""
        ...

    def revalidate(self, sql: str, verdict: Verdict, ctx: StatementContext) -> Verdict:
        """A prepared statement is about to run: its Parse-time verdict, or a new one if what
        it was decided against (the catalog) has changed since."""
        ...

    def function_call(self, function_oid: int, ctx: StatementContext) -> Verdict:
        """Decide a FunctionCall ('F') message."""
        ...

    def notification(self, channel: str, payload: str) -> str | None:
        """The payload to deliver for an asynchronous NotificationResponse, or None to drop it."""
        ...

    def scrub_error(self, fields: dict[str, str], verdict: Verdict | None) -> dict[str, str]:
        """The fields of an ErrorResponse/NoticeResponse to send, given the statement's verdict."""
        ...


class AllowAll:
    """The pass-through policy: every statement ALLOW, results untouched."""

    def statement(self, sql: str, ctx: StatementContext) -> Verdict:
        return Verdict(Action.ALLOW, ("allow-all policy",), statement_class="unknown")

    def revalidate(self, sql: str, verdict: Verdict, ctx: StatementContext) -> Verdict:
        return verdict

    def function_call(self, function_oid: int, ctx: StatementContext) -> Verdict:
        return Verdict(Action.ALLOW, ("allow-all policy",), statement_class="function_call")

    def notification(self, channel: str, payload: str) -> str | None:
        return payload

    def scrub_error(self, fields: dict[str, str], verdict: Verdict | None) -> dict[str, str]:
        return fields
