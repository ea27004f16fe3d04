"""Relay playbooks: whole conversations as tables, no sockets (see ``helpers.play``).

Each step feeds one side's bytes and states exactly what each side receives. ``SAME`` (the
default for what the other side receives) asserts byte identity: messages nobody rewrites are
forwarded as their original bytes. The server's answers in these tables are the ones a real
Postgres gives (the golden vectors show the same shapes); in particular a substitute statement
(``BLOCKED_SQL``) draws a syntax error (42601), also where it replaces a withheld Execute.
"""

from __future__ import annotations

from pgproxy.protocol import messages as m
from pgproxy.protocol.relay import BLOCKED_SQL, Relay, StatementFinished
from tests.protocol.helpers import (
    BLOCK,
    HOLD,
    SAME,
    Err,
    FakePolicy,
    MaskColumn,
    RowLimit,
    Step,
    client,
    describe,
    mask,
    play,
    relay_with,
    release,
    server,
    summarize,
    wire,
)

# ------------------------------------------------------------------ vocabulary

N = m.Field("n", type_oid=23, type_size=4)
NAME = m.Field("name", table_oid=16384, attnum=2)
RD = m.RowDescription((N, NAME))
RD_BINARY = m.RowDescription(
    (m.Field("n", type_oid=23, type_size=4, format=1), m.Field("name", 16384, 2, format=1))
)
RD_N = m.RowDescription((N,))
IDLE, IN_TXN, FAILED = m.ReadyForQuery(b"I"), m.ReadyForQuery(b"T"), m.ReadyForQuery(b"E")
PC, BC, CLOSE_C = m.ParseComplete(), m.BindComplete(), m.CloseComplete()

SELECT = "SELECT n, name FROM fake_patients"
DELETE = "DELETE FROM fake_patients"
DROP = "DROP TABLE fake_patients"


def row(n: int, name: str | None = "Jane Fake") -> m.DataRow:
    return m.DataRow((str(n).encode(), None if name is None else name.encode()))


def brow(n: int, name: str | None = "Jane Fake") -> m.DataRow:
    return m.DataRow((n.to_bytes(4, "big"), None if name is None else name.encode()))


def done(tag: str) -> m.CommandComplete:
    return m.CommandComplete(tag)


def pg_error(sqlstate: str, message: str) -> m.ErrorResponse:
    return m.ErrorResponse(m.error_fields(sqlstate, message))


SYNTAX_ERROR = pg_error("42601", 'syntax error at or near "pgproxy"')


def extended(
    sql: str,
    *,
    name: str = "",
    portal: str = "",
    formats: tuple[int, ...] = (),
    describe: bool = True,
    max_rows: int = 0,
    sync: bool = True,
) -> list[m.Message]:
    out: list[m.Message] = [m.Parse(name, sql), m.Bind(portal, name, result_formats=formats)]
    if describe:
        out.append(m.Describe(b"P", portal))
    out.append(m.Execute(portal, max_rows))
    if sync:
        out.append(m.Sync())
    return out


def simple_select_works(first_id: int) -> list[Step]:
    """The relay is still in step: an ordinary query round-trips untouched."""
    return [
        client(m.Query("SELECT 1"), events=[("admitted", first_id, "ALLOW")]),
        server(
            RD_N,
            m.DataRow((b"1",)),
            done("SELECT 1"),
            IDLE,
            events=[("finished", first_id, 1, "", 0)],
        ),
    ]


def extended_select_works(first_id: int) -> list[Step]:
    return [
        client(*extended("SELECT 1"), events=[("admitted", first_id, "ALLOW")]),
        server(
            PC,
            BC,
            RD_N,
            m.DataRow((b"1",)),
            done("SELECT 1"),
            IDLE,
            events=[("finished", first_id, 1, "", 0)],
        ),
    ]


# ------------------------------------------------------------------ plain flows


def test_simple_query() -> None:
    policy = FakePolicy()
    relay = play(
        relay_with(policy),
        [
            client(m.Query(SELECT), events=[("admitted", 1, "ALLOW")]),
            server(
                RD, row(1), row(2, None), done("SELECT 2"), IDLE, events=[("finished", 1, 2, "", 0)]
            ),
        ],
    )
    assert [(sql, ctx.origin, ctx.agent) for sql, ctx in policy.asked] == [
        (SELECT, "query", "fake-agent")
    ]
    assert relay.transaction_status == b"I"
    assert not relay.closed


def test_multi_statement_query_split_across_reads() -> None:
    play(
        relay_with(),
        [
            client(m.Query("SELECT 1; SELECT 2"), events=[("admitted", 1, "ALLOW")]),
            server(RD_N, events=[]),
            server(m.DataRow((b"1",)), done("SELECT 1"), RD_N, events=[]),
            server(m.DataRow((b"2",)), done("SELECT 1"), events=[]),
            server(IDLE, events=[("finished", 1, 2, "", 0)]),
            *simple_select_works(2),
        ],
    )


def test_extended_query() -> None:
    policy = FakePolicy()
    play(
        relay_with(policy),
        [
            client(
                m.Parse("", "SELECT $1::int AS n", (23,)),
                m.Bind("", "", (0,), (b"5",)),
                m.Describe(b"P", ""),
                m.Execute("", 0),
                m.Sync(),
                events=[("admitted", 1, "ALLOW")],
            ),
            server(
                PC,
                BC,
                RD_N,
                m.DataRow((b"5",)),
                done("SELECT 1"),
                IDLE,
                events=[("finished", 1, 1, "", 0)],
            ),
        ],
    )
    assert [(c.origin, c.param_types) for _, c in policy.asked] == [("parse", (23,))]


def test_pipeline_of_three_statements_before_one_sync() -> None:
    msgs = [
        *extended("SELECT 1", name="s1", sync=False),
        *extended("SELECT 2", name="s2", sync=False),
        *extended("SELECT 3", name="s3", sync=False),
        m.Sync(),
    ]
    play(
        relay_with(),
        [
            client(*msgs, events=[("admitted", i, "ALLOW") for i in (1, 2, 3)]),
            server(
                PC,
                BC,
                RD_N,
                m.DataRow((b"1",)),
                done("SELECT 1"),
                PC,
                BC,
                RD_N,
                events=[("finished", 1, 1, "", 0)],
            ),
            server(
                m.DataRow((b"2",)),
                done("SELECT 1"),
                PC,
                BC,
                RD_N,
                m.DataRow((b"3",)),
                events=[("finished", 2, 1, "", 0)],
            ),
            server(done("SELECT 1"), IDLE, events=[("finished", 3, 1, "", 0)]),
            *extended_select_works(4),
        ],
    )


def test_execute_with_row_limit_then_execute_again() -> None:
    play(
        relay_with(),
        [
            client(
                *extended("SELECT generate_series(1, 3)", max_rows=2, sync=False),
                m.Flush(),
                events=[("admitted", 1, "ALLOW")],
            ),
            server(
                PC,
                BC,
                RD_N,
                m.DataRow((b"1",)),
                m.DataRow((b"2",)),
                m.PortalSuspended(),
                events=[("finished", 1, 2, "", 0)],
            ),
            client(m.Execute("", 2), m.Sync(), events=[("admitted", 2, "ALLOW")]),
            server(m.DataRow((b"3",)), done("SELECT 1"), IDLE, events=[("finished", 2, 1, "", 0)]),
        ],
    )


def test_error_in_the_middle_of_a_pipeline_skips_to_sync() -> None:
    msgs = [
        *extended("SELECT 1", name="s1", sync=False),
        *extended("SELECT 1/0", name="s2", sync=False),
        *extended("SELECT 3", name="s3", sync=False),
        m.Sync(),
    ]
    play(
        relay_with(),
        [
            client(*msgs, events=[("admitted", i, "ALLOW") for i in (1, 2, 3)]),
            server(
                PC,
                BC,
                RD_N,
                m.DataRow((b"1",)),
                done("SELECT 1"),
                PC,
                BC,
                RD_N,
                events=[("finished", 1, 1, "", 0)],
            ),
            # the server skips s3 up to Sync; it is finished with the error that skipped it
            server(
                pg_error("22012", "division by zero"),
                events=[("finished", 2, 0, "22012", 0), ("finished", 3, 0, "22012", 0)],
            ),
            server(IDLE, events=[]),
            *extended_select_works(4),
            *simple_select_works(5),
        ],
    )


def test_empty_query() -> None:
    play(
        relay_with(),
        [
            client(m.Query(""), events=[("admitted", 1, "ALLOW")]),
            server(m.EmptyQueryResponse(), IDLE, events=[("finished", 1, 0, "", 0)]),
            client(*extended(""), events=[("admitted", 2, "ALLOW")]),
            server(
                PC, BC, m.NoData(), m.EmptyQueryResponse(), IDLE, events=[("finished", 2, 0, "", 0)]
            ),
            *simple_select_works(3),
        ],
    )


def test_terminate() -> None:
    relay = play(relay_with(), [client(m.Terminate(), events=[("terminated",)])])
    assert relay.closed


def test_unrewritten_messages_keep_their_exact_bytes() -> None:
    """Bytes a decode→encode would change (invalid UTF-8 in an error) still pass unchanged."""
    odd_error = m.frame(b"E", b"SERROR\x00C22P02\x00Mbad value \xff\xfe\x00\x00")
    odd_notice = m.frame(b"N", b"SNOTICE\x00C00000\x00Mnote \xc3\x00\x00")
    assert m.ErrorResponse.decode(odd_error[5:]).encode() != odd_error
    relay = relay_with()
    play(relay, [client(m.Query("SELECT 'x'::int"))])
    relay.server_data(odd_notice + odd_error + IDLE.encode())
    assert bytes(relay.to_client) == odd_notice + odd_error + IDLE.encode()


# ------------------------------------------------------------------ asynchronous messages


def test_notice_notification_and_parameter_status_at_any_point() -> None:
    notice = m.NoticeResponse(m.error_fields("00000", "fake notice", severity="NOTICE"))
    notify = m.NotificationResponse(4242, "fake_channel", "fake payload")
    param = m.ParameterStatus("application_name", "fake-app")
    policy = FakePolicy({SELECT: mask(MaskColumn())})
    play(
        relay_with(policy),
        [
            server(notify, param, notice, events=[]),  # while idle: nothing pending
            client(m.Query("SELECT 1")),
            server(
                notice,
                RD_N,
                notify,
                m.DataRow((b"1",)),
                param,
                notice,
                done("SELECT 1"),
                notify,
                IDLE,
                events=[("finished", 1, 1, "", 0)],
            ),
            client(*extended(SELECT)),
            server(
                PC,
                notify,
                BC,
                param,
                RD,
                notice,
                brow(1),
                notify,
                downstream=[
                    PC,
                    notify,
                    BC,
                    param,
                    RD,
                    notice,
                    m.DataRow((b"\x00\x00\x00\x01", b"masked-fmt0")),
                    notify,
                ],
            ),
            server(param, done("SELECT 1"), notice, IDLE, events=[("finished", 2, 1, "", 1)]),
            server(notify),
            *simple_select_works(3),
        ],
    )


# ------------------------------------------------------------------ COPY and FunctionCall


def test_copy_from_stdin() -> None:
    play(
        relay_with(),
        [
            client(m.Query("COPY fake_patients FROM STDIN")),
            server(m.CopyInResponse(0, (0, 0))),
            client(m.CopyData(b"1\tJane Fake\n"), m.CopyData(b"2\tJohn Fake\n")),
            client(m.CopyDone()),
            server(done("COPY 2"), IDLE),
            client(m.Query("COPY fake_patients FROM STDIN")),
            server(m.CopyInResponse(0, (0, 0))),
            client(m.CopyData(b"3\tJune Fake\n"), m.CopyFail("fake client gave up")),
            server(pg_error("57014", "COPY from stdin failed: fake client gave up"), IDLE),
            *simple_select_works(3),
        ],
    )


def test_copy_to_stdout() -> None:
    play(
        relay_with(),
        [
            client(m.Query("COPY fake_patients TO STDOUT")),
            server(m.CopyOutResponse(0, (0, 0)), m.CopyData(b"1\tJane Fake\n")),
            server(
                m.CopyData(b"2\tJohn Fake\n"),
                m.CopyDone(),
                done("COPY 2"),
                IDLE,
                events=[("finished", 1, 2, "", 0)],
            ),
            *simple_select_works(2),
        ],
    )


def test_function_call_allowed_and_blocked() -> None:
    policy = FakePolicy(functions={1111: BLOCK, 2222: HOLD})
    play(
        relay_with(policy),
        [
            client(
                m.FunctionCall(1598, (1,), (b"\x00\x00\x00\x07",), 1),
                events=[("admitted", 1, "ALLOW")],
            ),
            server(
                m.FunctionCallResponse(b"\x00\x00\x00\x2a"),
                IDLE,
                events=[("finished", 1, 0, "", 0)],
            ),
            client(
                m.FunctionCall(1111),
                upstream=[m.Query(BLOCKED_SQL)],
                events=[("admitted", 2, "BLOCK")],
            ),
            server(
                SYNTAX_ERROR,
                IDLE,
                downstream=[Err("42501", "fake rule says no"), IDLE],
                events=[("finished", 2, 0, "42501", 0)],
            ),
            # no review flow for raw function calls: a HOLD is a BLOCK
            client(
                m.FunctionCall(2222),
                upstream=[m.Query(BLOCKED_SQL)],
                events=[("admitted", 3, "BLOCK")],
            ),
            server(SYNTAX_ERROR, IDLE, downstream=[Err("42501"), IDLE]),
            *simple_select_works(4),
        ],
    )


# ------------------------------------------------------------------ BLOCK


def test_block_simple_query() -> None:
    relay = play(
        relay_with(FakePolicy({DELETE: BLOCK})),
        [
            client(
                m.Query(DELETE), upstream=[m.Query(BLOCKED_SQL)], events=[("admitted", 1, "BLOCK")]
            ),
            server(
                SYNTAX_ERROR,
                IDLE,
                downstream=[Err("42501", "blocked: fake rule says no"), IDLE],
                events=[("finished", 1, 0, "42501", 0)],
            ),
            *simple_select_works(2),
        ],
    )
    assert relay.transaction_status == b"I"


def test_block_inside_a_transaction_aborts_it() -> None:
    relay = play(
        relay_with(FakePolicy({DELETE: BLOCK})),
        [
            client(m.Query("BEGIN")),
            server(done("BEGIN"), IN_TXN),
            client(m.Query(DELETE), upstream=[m.Query(BLOCKED_SQL)]),
            server(SYNTAX_ERROR, FAILED, downstream=[Err("42501", "fake rule"), FAILED]),
        ],
    )
    assert relay.transaction_status == b"E"
    aborted = pg_error("25P02", "current transaction is aborted")
    play(
        relay,
        [
            client(m.Query("SELECT 1")),
            server(aborted, FAILED),
            client(m.Query("ROLLBACK")),
            server(done("ROLLBACK"), IDLE),
            *simple_select_works(5),
        ],
    )
    assert relay.transaction_status == b"I"


def test_block_extended_query_then_pipeline_works() -> None:
    relay = relay_with(FakePolicy({DELETE: BLOCK}))
    play(
        relay,
        [
            client(
                *extended(DELETE, name="s1", portal="p1"),
                upstream=[
                    m.Parse("s1", BLOCKED_SQL),
                    m.Bind("p1", "s1"),
                    m.Describe(b"P", "p1"),
                    # whatever the server has under that name, it does not run it
                    m.Parse("", BLOCKED_SQL),
                    m.Sync(),
                ],
            ),
            server(
                SYNTAX_ERROR, IDLE, downstream=[Err("42501", "blocked: fake rule says no"), IDLE]
            ),
        ],
    )
    play(relay, extended_select_works(2))  # one statement, one audit entry


def test_block_extended_inside_a_transaction() -> None:
    relay = play(
        relay_with(FakePolicy({DELETE: BLOCK})),
        [
            client(m.Query("BEGIN")),
            server(done("BEGIN"), IN_TXN),
            client(
                *extended(DELETE),
                upstream=[
                    m.Parse("", BLOCKED_SQL),
                    m.Bind("", ""),
                    m.Describe(b"P", ""),
                    m.Parse("", BLOCKED_SQL),
                    m.Sync(),
                ],
            ),
            server(SYNTAX_ERROR, FAILED, downstream=[Err("42501"), FAILED]),
        ],
    )
    assert relay.transaction_status == b"E"


def test_blocked_statement_events_all_finish_with_42501() -> None:
    relay = relay_with(FakePolicy({DELETE: BLOCK}))
    relay.client_data(wire(extended(DELETE)))
    relay.server_data(wire([SYNTAX_ERROR, IDLE]))
    finished = [e for e in relay.events if isinstance(e, StatementFinished)]
    assert finished
    assert {e.sqlstate for e in finished} == {"42501"}
    assert {e.verdict.action.value for e in finished} == {"BLOCK"}


# ------------------------------------------------------------------ MASK (one cell rewritten)


def test_mask_simple_query_text() -> None:
    result = MaskColumn()
    play(
        relay_with(FakePolicy({SELECT: mask(result)})),
        [
            client(m.Query(SELECT), events=[("admitted", 1, "MASK")]),
            server(
                RD,
                row(1),
                row(2, None),
                done("SELECT 2"),
                IDLE,
                downstream=[RD, row(1, "masked-fmt0"), row(2, None), done("SELECT 2"), IDLE],
                events=[("finished", 1, 2, "", 2)],
            ),
            *simple_select_works(2),
        ],
    )
    assert [(f.name, f.table_oid, f.attnum, f.format) for f in result.seen[0]] == [
        ("n", 0, 0, 0),
        ("name", 16384, 2, 0),
    ]


def test_mask_extended_text() -> None:
    play(
        relay_with(FakePolicy({SELECT: mask(MaskColumn())})),
        [
            client(*extended(SELECT, formats=(0,))),
            server(
                PC,
                BC,
                RD,
                row(1),
                done("SELECT 1"),
                IDLE,
                downstream=[PC, BC, RD, row(1, "masked-fmt0"), done("SELECT 1"), IDLE],
                events=[("finished", 1, 1, "", 1)],
            ),
        ],
    )


def test_mask_extended_binary() -> None:
    result = MaskColumn()
    play(
        relay_with(FakePolicy({SELECT: mask(result)})),
        [
            client(*extended(SELECT, formats=(1,))),
            server(
                PC,
                BC,
                RD_BINARY,
                brow(1),
                brow(2, None),
                done("SELECT 2"),
                IDLE,
                downstream=[
                    PC,
                    BC,
                    RD_BINARY,
                    brow(1, "masked-fmt1"),
                    brow(2, None),
                    done("SELECT 2"),
                    IDLE,
                ],
                events=[("finished", 1, 2, "", 2)],
            ),
        ],
    )
    assert [f.format for f in result.seen[0]] == [1, 1]


def test_mask_extended_mixed_formats() -> None:
    """Format codes per column: the rewriter is told the format of its own column."""
    result = MaskColumn()
    rd = m.RowDescription((N, m.Field("name", 16384, 2, format=1)))
    play(
        relay_with(FakePolicy({SELECT: mask(result)})),
        [
            client(*extended(SELECT, formats=(0, 1))),
            server(
                PC,
                BC,
                rd,
                row(1),
                done("SELECT 1"),
                IDLE,
                downstream=[PC, BC, rd, row(1, "masked-fmt1"), done("SELECT 1"), IDLE],
            ),
        ],
    )
    assert [f.format for f in result.seen[0]] == [0, 1]


def test_mask_rewriter_crash_makes_the_cell_null() -> None:
    def broken(value: bytes | None, fmt: int) -> bytes | None:
        raise ValueError("fake rewriter bug")

    play(
        relay_with(FakePolicy({SELECT: mask(MaskColumn(rewriter=broken))})),
        [
            client(m.Query(SELECT)),
            server(
                RD,
                row(1),
                done("SELECT 1"),
                IDLE,
                downstream=[RD, row(1, None), done("SELECT 1"), IDLE],
            ),
        ],
    )


def test_mask_injects_a_describe_the_client_never_sees() -> None:
    """A masking verdict needs the row shape; the client did not Describe its portal."""
    play(
        relay_with(FakePolicy({SELECT: mask(MaskColumn())})),
        [
            client(
                *extended(SELECT, formats=(1,), describe=False),
                upstream=[
                    m.Parse("", SELECT),
                    m.Bind("", "", result_formats=(1,)),
                    m.Describe(b"P", ""),
                    m.Execute(""),
                    m.Sync(),
                ],
            ),
            server(
                PC,
                BC,
                RD_BINARY,
                brow(1),
                done("SELECT 1"),
                IDLE,
                downstream=[PC, BC, brow(1, "masked-fmt1"), done("SELECT 1"), IDLE],
                events=[("finished", 1, 1, "", 1)],
            ),
            *extended_select_works(2),
        ],
    )


def test_injected_describe_answered_with_no_data_is_hidden() -> None:
    insert = "INSERT INTO fake_patients VALUES (1, 'Jane Fake')"
    play(
        relay_with(FakePolicy({insert: mask(MaskColumn())})),
        [
            client(
                *extended(insert, describe=False),
                upstream=[
                    m.Parse("", insert),
                    m.Bind("", ""),
                    m.Describe(b"P", ""),
                    m.Execute(""),
                    m.Sync(),
                ],
            ),
            server(
                PC,
                BC,
                m.NoData(),
                done("INSERT 0 1"),
                IDLE,
                downstream=[PC, BC, done("INSERT 0 1"), IDLE],
            ),
        ],
    )


def test_statement_described_but_portal_not() -> None:
    """asyncpg's shape: Parse + Describe(S) + Flush, then Bind/Execute/Sync."""
    play(
        relay_with(FakePolicy({SELECT: mask(MaskColumn())})),
        [
            client(m.Parse("st", SELECT), m.Describe(b"S", "st"), m.Flush()),
            server(PC, m.ParameterDescription(()), RD),
            client(
                m.Bind("", "st", result_formats=(1,)),
                m.Execute(""),
                m.Sync(),
                upstream=[
                    m.Bind("", "st", result_formats=(1,)),
                    m.Describe(b"P", ""),
                    m.Execute(""),
                    m.Sync(),
                ],
            ),
            server(
                BC,
                RD_BINARY,
                brow(7),
                done("SELECT 1"),
                IDLE,
                downstream=[BC, brow(7, "masked-fmt1"), done("SELECT 1"), IDLE],
            ),
        ],
    )


# ------------------------------------------------------------------ row limits


def test_max_rows_stops_a_simple_query_with_42501() -> None:
    relay = play(
        relay_with(FakePolicy({SELECT: mask(RowLimit(2))})),
        [
            client(m.Query(SELECT)),
            server(RD, row(1), row(2)),
            server(
                row(3),
                row(4),
                done("SELECT 4"),
                IDLE,
                downstream=[Err("42501", "more than 2 rows"), IDLE],
            ),
            *simple_select_works(2),
        ],
    )
    assert relay.transaction_status == b"I"


def test_max_rows_with_rewriting_stops_an_extended_query() -> None:
    relay = relay_with(FakePolicy({SELECT: mask(MaskColumn(max_rows=1))}))
    ext = extended(SELECT)
    play(
        relay,
        [
            # a row-limited Execute runs alone: Flush instead of the client's Sync, for now
            client(*ext, upstream=[*ext[:-1], m.Flush()]),
            server(
                PC,
                BC,
                RD,
                row(1),
                row(2),
                row(3),
                done("SELECT 3"),
                downstream=[PC, BC, RD, row(1, "masked-fmt0"), Err("42501", "more than 1 rows")],
                # the server is made to fail too, then gets the client's Sync
                upstream=[m.Parse("", BLOCKED_SQL), m.Sync()],
            ),
            server(SYNTAX_ERROR, IDLE, downstream=[IDLE]),
        ],
    )
    play(relay, extended_select_works(2))


def test_row_limit_inside_a_masked_run() -> None:
    """Five masked rows in one read: rewritten up to the limit, then the result is stopped."""
    relay = relay_with(FakePolicy({SELECT: mask(MaskColumn(max_rows=3))}))
    play(
        relay,
        [
            client(m.Query(SELECT)),
            server(
                RD,
                row(1),
                row(2, None),
                row(3),
                row(4),
                row(5),
                done("SELECT 5"),
                IDLE,
                downstream=[
                    RD,
                    row(1, "masked-fmt0"),
                    row(2, None),
                    row(3, "masked-fmt0"),
                    Err("42501", "more than 3 rows"),
                    IDLE,
                ],
                events=[("finished", 1, 4, "42501", 3)],
            ),
        ],
    )


def test_mask_rewriter_crash_inside_a_run_nulls_only_its_cells() -> None:
    def flaky(value: bytes | None, fmt: int) -> bytes | None:
        if value == b"Crash Fake":
            raise ValueError("fake rewriter bug")
        return None if value is None else b"ok"

    play(
        relay_with(FakePolicy({SELECT: mask(MaskColumn(rewriter=flaky))})),
        [
            client(m.Query(SELECT)),
            server(
                RD,
                row(1),
                row(2, "Crash Fake"),
                row(3, None),
                row(4),
                done("SELECT 4"),
                IDLE,
                downstream=[
                    RD,
                    row(1, "ok"),
                    row(2, None),
                    row(3, None),
                    row(4, "ok"),
                    done("SELECT 4"),
                    IDLE,
                ],
                events=[("finished", 1, 4, "", 4)],
            ),
        ],
    )


# ------------------------------------------------------------------ HOLD


def test_hold_simple_approved_runs_once_with_deferred_bytes_after() -> None:
    relay = relay_with(FakePolicy({DROP: HOLD}))
    later = m.Query("SELECT 1").encode()
    play(
        relay,
        [
            # the held Query plus half of the next message in one read
            Step(
                "client",
                m.Query(DROP).encode() + later[:4],
                upstream=[],
                events=[("admitted", 1, "HOLD"), ("hold", 1, DROP)],
            ),
            Step("client", later[4:], upstream=[], events=[]),
        ],
    )
    assert relay.holding
    play(
        relay,
        [
            release(
                True,
                upstream=[m.Query(DROP), m.Query("SELECT 1")],
                events=[("admitted", 2, "ALLOW")],
            ),
            server(
                done("DROP TABLE"),
                IDLE,
                RD_N,
                m.DataRow((b"1",)),
                done("SELECT 1"),
                IDLE,
                events=[("finished", 1, 0, "", 0), ("finished", 2, 1, "", 0)],
            ),
            release(True, upstream=[]),  # nothing held: a second release does nothing
        ],
    )
    assert not relay.holding


def test_hold_simple_denied_returns_42501_with_the_reason() -> None:
    relay = relay_with(FakePolicy({DROP: HOLD}))
    play(
        relay,
        [
            client(m.Query(DROP), upstream=[], events=[("admitted", 1, "HOLD"), ("hold", 1, DROP)]),
            client(m.Query("SELECT 1"), upstream=[]),
            release(
                False,
                "denied by fake reviewer: not today",
                upstream=[m.Query(BLOCKED_SQL), m.Query("SELECT 1")],
            ),
            server(
                SYNTAX_ERROR,
                IDLE,
                RD_N,
                m.DataRow((b"1",)),
                done("SELECT 1"),
                IDLE,
                downstream=[
                    Err("42501", "denied by fake reviewer: not today"),
                    IDLE,
                    RD_N,
                    m.DataRow((b"1",)),
                    done("SELECT 1"),
                    IDLE,
                ],
                events=[("finished", 1, 0, "42501", 0), ("finished", 2, 1, "", 0)],
            ),
        ],
    )


def test_hold_extended_approved() -> None:
    relay = relay_with(FakePolicy({DROP: HOLD}))
    play(
        relay,
        [
            client(
                *extended(DROP),
                upstream=[m.Parse("", DROP), m.Bind("", ""), m.Describe(b"P", "")],
                events=[("admitted", 1, "HOLD"), ("hold", 1, DROP)],
            ),
            client(m.Query("SELECT 1"), upstream=[]),
            release(True, upstream=[m.Execute(""), m.Sync(), m.Query("SELECT 1")]),
            server(
                PC, BC, m.NoData(), done("DROP TABLE"), IDLE, events=[("finished", 1, 0, "", 0)]
            ),
            server(
                RD_N, m.DataRow((b"1",)), done("SELECT 1"), IDLE, events=[("finished", 2, 1, "", 0)]
            ),
        ],
    )


def test_hold_extended_denied() -> None:
    relay = relay_with(FakePolicy({DROP: HOLD}))
    play(
        relay,
        [
            client(
                *extended(DROP), upstream=[m.Parse("", DROP), m.Bind("", ""), m.Describe(b"P", "")]
            ),
            release(
                False,
                "denied by fake reviewer",
                upstream=[m.Parse("", BLOCKED_SQL), m.Sync()],
            ),
            server(
                PC,
                BC,
                m.NoData(),
                SYNTAX_ERROR,
                IDLE,
                downstream=[PC, BC, m.NoData(), Err("42501", "denied by fake reviewer"), IDLE],
                events=[("finished", 1, 0, "42501", 0)],
            ),
            *extended_select_works(2),
        ],
    )


def test_hold_inside_a_pipeline_defers_the_rest() -> None:
    msgs = [*extended(DROP, name="s1", sync=False), *extended("SELECT 1", name="s2")]
    relay = relay_with(FakePolicy({DROP: HOLD}))
    play(
        relay,
        [
            client(*msgs, upstream=[m.Parse("s1", DROP), m.Bind("", "s1"), m.Describe(b"P", "")]),
            release(
                True,
                upstream=[m.Execute(""), *extended("SELECT 1", name="s2")],
                events=[("admitted", 2, "ALLOW")],
            ),
            server(
                PC,
                BC,
                m.NoData(),
                done("DROP TABLE"),
                PC,
                BC,
                RD_N,
                m.DataRow((b"1",)),
                done("SELECT 1"),
                IDLE,
                events=[("finished", 1, 0, "", 0), ("finished", 2, 1, "", 0)],
            ),
        ],
    )


def test_policy_crash_blocks() -> None:
    class Crashing(FakePolicy):
        def statement(self, sql: str, ctx: object) -> object:  # type: ignore[override]
            raise RuntimeError("fake policy bug")

    play(
        relay_with(Crashing()),
        [
            client(
                m.Query(SELECT), upstream=[m.Query(BLOCKED_SQL)], events=[("admitted", 1, "BLOCK")]
            ),
            server(SYNTAX_ERROR, IDLE, downstream=[Err("42501", "internal policy error"), IDLE]),
        ],
    )


def test_same_is_the_default_for_pass_through() -> None:
    """The DSL itself: a rewritten row fails a SAME expectation."""
    relay = relay_with(FakePolicy({SELECT: mask(MaskColumn())}))
    play(relay, [client(m.Query(SELECT))])
    try:
        play(relay, [server(RD, row(1), done("SELECT 1"), IDLE, downstream=SAME)])
    except AssertionError:
        return
    raise AssertionError("a rewritten DataRow passed as the original bytes")


def test_mask_multi_statement_query_plans_each_result() -> None:
    result = MaskColumn()
    both = f"{SELECT}; {SELECT}"
    play(
        relay_with(FakePolicy({both: mask(result)})),
        [
            client(m.Query(both)),
            server(
                RD,
                row(1),
                done("SELECT 1"),
                RD,
                row(2),
                done("SELECT 1"),
                IDLE,
                downstream=[
                    RD,
                    row(1, "masked-fmt0"),
                    done("SELECT 1"),
                    RD,
                    row(2, "masked-fmt0"),
                    done("SELECT 1"),
                    IDLE,
                ],
                events=[("finished", 1, 2, "", 2)],
            ),
        ],
    )
    assert result.indexes == [0, 1]


def test_row_limit_stop_before_sync_drops_client_messages_until_sync() -> None:
    """The client was sent an error mid-Execute, so it expects its next messages to be skipped
    up to Sync; the relay must not run them upstream, and fails the server before that Sync."""
    relay = relay_with(FakePolicy({SELECT: mask(RowLimit(1))}))
    ext = extended(SELECT, sync=False)
    play(
        relay,
        [
            client(*ext, m.Flush(), upstream=[*ext, m.Flush()]),
            server(
                PC,
                BC,
                RD,
                row(1),
                row(2),
                done("SELECT 2"),
                downstream=[PC, BC, RD, row(1), Err("42501", "more than 1 rows")],
                upstream=[],
            ),
            client(
                *extended("INSERT INTO fake_patients VALUES (9)", sync=False),
                m.Sync(),
                upstream=[m.Parse("", BLOCKED_SQL), m.Sync()],
                events=[],
            ),
            server(SYNTAX_ERROR, IDLE, downstream=[IDLE], events=[]),
            *extended_select_works(2),
        ],
    )


def test_statements_pipelined_behind_a_row_limit_stop_do_not_run_silently() -> None:
    """A row-limited Execute runs alone: what the client pipelined behind it waits for its
    outcome, and after a stop it is skipped to the Sync — on the server too, which is made to
    fail before the Sync so that it aborts the transaction just as the client believes."""
    insert = "INSERT INTO fake_patients VALUES (9)"
    relay = relay_with(FakePolicy({SELECT: mask(RowLimit(1))}))
    relay.client_data(
        wire([*extended(SELECT, sync=False), *extended(insert, sync=False), m.Sync()])
    )
    sent = describe(bytes(relay.to_server), backend=False)
    relay.to_server.clear()
    assert sent[-1] == "Flush()" and not any(insert in x for x in sent)
    relay.server_data(wire([PC, BC, RD, row(1), row(2), done("SELECT 2")]))
    # the stop: the client is told, the INSERT is never sent, the server gets a failing Parse
    sent = describe(bytes(relay.to_server), backend=False)
    assert not any(insert in x for x in sent)
    assert sent == [repr(m.Parse("", BLOCKED_SQL)), "Sync()"]
    relay.server_data(wire([SYNTAX_ERROR, IN_TXN.__class__(b"E")]))
    got = describe(bytes(relay.to_client), backend=True)
    assert sum("42501" in x for x in got) == 1 and got[-1] == repr(FAILED)
    assert not any(
        isinstance(e, StatementFinished) and not e.sqlstate and e.statement_id > 1
        for e in relay.events
    )


def test_a_row_limited_execute_that_stays_under_the_limit_releases_the_pipeline() -> None:
    relay = relay_with(FakePolicy({SELECT: mask(RowLimit(5))}))
    relay.client_data(wire([*extended(SELECT, sync=False), *extended("SELECT 1")]))
    assert describe(bytes(relay.to_server), backend=False)[-1] == "Flush()"
    relay.to_server.clear()
    relay.server_data(wire([PC, BC, RD, row(1), done("SELECT 1")]))
    sent = describe(bytes(relay.to_server), backend=False)
    assert any("SELECT 1" in x for x in sent) and sent[-1] == "Sync()"


def test_rows_nobody_asked_for_are_a_protocol_violation() -> None:
    """A DataRow/CopyData with no request pending has no verdict: it must not reach the client."""
    for unsolicited in (m.DataRow((b"000-12-3456",)), m.CopyData(b"000-12-3456\n")):
        relay = relay_with()
        relay.server_data(unsolicited.encode())
        assert b"000-12-3456" not in relay.to_client
        assert [summarize(e) for e in relay.events] == [("violation", False)]
        assert relay.closed


# ------------------------------------------------- row limits in simple Queries that change data

DELETE_RETURNING = "DELETE FROM fake_patients RETURNING n, name"
SELECT_THEN_DELETE = f"{SELECT}; {DELETE}"
BEGIN_OK, COMMIT_OK, ROLLBACK_OK = done("BEGIN"), done("COMMIT"), done("ROLLBACK")


def limited_delete(limit: int, statement: str = DELETE_RETURNING, klass: str = "delete") -> Relay:
    return relay_with(FakePolicy({statement: mask(RowLimit(limit), klass)}))


def test_a_row_limited_query_that_changes_data_is_rolled_back_after_a_stop() -> None:
    """Postgres would have aborted the statement and the client is told it failed, so its
    changes must not be committed: pgproxy ran it in its own transaction and rolls that back."""
    play(
        limited_delete(1),
        [
            client(
                m.Query(DELETE_RETURNING),
                upstream=[m.Query("BEGIN"), m.Query(DELETE_RETURNING)],
                events=[("admitted", 1, "MASK")],
            ),
            server(BEGIN_OK, IN_TXN, RD, row(1), downstream=[RD, row(1)]),
            # meanwhile the client sends its next statement: it waits for the outcome
            client(m.Query("SELECT 1"), upstream=[]),
            server(
                row(2),
                done("DELETE 2"),
                IN_TXN,
                downstream=[Err("42501", "more than 1 rows")],
                upstream=[m.Query("ROLLBACK")],
                events=[("finished", 1, 2, "42501", 0)],
            ),
            server(
                ROLLBACK_OK,
                IDLE,
                downstream=[IDLE],
                upstream=[m.Query("SELECT 1")],
                events=[("admitted", 2, "ALLOW")],
            ),
            server(RD_N, m.DataRow((b"1",)), done("SELECT 1"), IDLE),
        ],
    )


def test_a_row_limited_query_that_changes_data_commits_under_the_limit() -> None:
    relay = play(
        limited_delete(5),
        [
            client(
                m.Query(DELETE_RETURNING), upstream=[m.Query("BEGIN"), m.Query(DELETE_RETURNING)]
            ),
            server(BEGIN_OK, IN_TXN, downstream=[]),
            server(
                RD,
                row(1),
                done("DELETE 1"),
                IN_TXN,
                downstream=[RD, row(1), done("DELETE 1")],
                upstream=[m.Query("COMMIT")],
                events=[("finished", 1, 1, "", 0)],
            ),
            server(COMMIT_OK, IDLE, downstream=[IDLE]),
            *simple_select_works(2),
        ],
    )
    assert relay.transaction_status == b"I"


def test_a_failed_commit_of_a_wrapped_query_is_the_clients_error() -> None:
    play(
        limited_delete(5),
        [
            client(
                m.Query(DELETE_RETURNING), upstream=[m.Query("BEGIN"), m.Query(DELETE_RETURNING)]
            ),
            server(
                BEGIN_OK,
                IN_TXN,
                RD,
                row(1),
                done("DELETE 1"),
                IN_TXN,
                downstream=[RD, row(1), done("DELETE 1")],
                upstream=[m.Query("COMMIT")],
            ),
            server(
                pg_error("23505", "duplicate key value violates unique constraint"),
                IDLE,
                downstream=[Err("23505"), IDLE],
            ),
            *simple_select_works(2),
        ],
    )


def test_later_statements_of_a_stopped_multi_statement_query_are_rolled_back() -> None:
    """``SELECT …; DELETE …`` stopped in the SELECT: Postgres would not have run the DELETE.
    The server did (a simple Query cannot be stopped midway), inside pgproxy's transaction,
    which is rolled back; its output never reaches the client."""
    play(
        limited_delete(1, SELECT_THEN_DELETE, "select;delete"),
        [
            client(
                m.Query(SELECT_THEN_DELETE),
                upstream=[m.Query("BEGIN"), m.Query(SELECT_THEN_DELETE)],
            ),
            server(
                BEGIN_OK,
                IN_TXN,
                RD,
                row(1),
                row(2),
                done("SELECT 2"),
                done("DELETE 2"),
                IN_TXN,
                downstream=[RD, row(1), Err("42501", "more than 1 rows")],
                upstream=[m.Query("ROLLBACK")],
            ),
            server(ROLLBACK_OK, IDLE, downstream=[IDLE]),
            *simple_select_works(2),
        ],
    )


def test_a_stop_inside_the_clients_transaction_fails_that_transaction() -> None:
    """In a transaction block the client now believes its transaction failed (as it would
    have): pgproxy makes it so, so that nothing before the stop can be committed."""
    relay = limited_delete(1, SELECT, "select")
    play(
        relay,
        [
            client(m.Query("BEGIN")),
            server(BEGIN_OK, IN_TXN),
            client(m.Query(SELECT)),
            server(
                RD,
                row(1),
                row(2),
                done("SELECT 2"),
                IN_TXN,
                downstream=[RD, row(1), Err("42501", "more than 1 rows")],
                upstream=[m.Query(BLOCKED_SQL)],
            ),
            server(SYNTAX_ERROR, FAILED, downstream=[FAILED]),
        ],
    )
    assert relay.transaction_status == b"E"


def test_a_row_limited_select_outside_a_transaction_runs_as_is() -> None:
    """A plain SELECT changes nothing: stopping its rows needs no transaction of pgproxy's."""
    play(
        limited_delete(1, SELECT, "select"),
        [
            client(m.Query(SELECT)),
            server(
                RD,
                row(1),
                row(2),
                done("SELECT 2"),
                IDLE,
                downstream=[RD, row(1), Err("42501"), IDLE],
                upstream=[],
            ),
        ],
    )


def test_a_row_limited_query_waits_for_what_is_in_flight() -> None:
    """Its transaction state is known only once earlier requests have completed."""
    play(
        limited_delete(5),
        [
            client(
                m.Query("SELECT 1"),
                m.Query(DELETE_RETURNING),
                upstream=[m.Query("SELECT 1"), m.Flush()],
            ),
            server(
                RD_N,
                m.DataRow((b"1",)),
                done("SELECT 1"),
                IDLE,
                downstream=[RD_N, m.DataRow((b"1",)), done("SELECT 1"), IDLE],
                upstream=[m.Query("BEGIN"), m.Query(DELETE_RETURNING)],
            ),
        ],
    )


def test_a_row_limited_query_mixed_with_transaction_control_is_refused() -> None:
    mixed = f"{SELECT}; COMMIT"
    play(
        limited_delete(5, mixed, "select;transaction"),
        [
            client(
                m.Query(mixed), upstream=[m.Query(BLOCKED_SQL)], events=[("admitted", 1, "BLOCK")]
            ),
            server(SYNTAX_ERROR, IDLE, downstream=[Err("42501", "send it on its own"), IDLE]),
            *simple_select_works(2),
        ],
    )


# ------------------------------------------------------------------ names the server refused

OTHER = "SELECT 'x', 'y'"


def test_a_refused_second_parse_leaves_the_first_statement_bound() -> None:
    """Postgres refuses a Parse of a name that exists: the name keeps the first statement,
    and so does its masking."""
    relay = relay_with(FakePolicy({SELECT: mask(MaskColumn())}))
    play(
        relay,
        [
            client(m.Parse("s1", SELECT), m.Sync()),
            server(PC, IDLE),
            client(m.Parse("s1", OTHER), m.Sync()),
            server(pg_error("42P05", 'prepared statement "s1" already exists'), IDLE),
            client(m.Bind("", "s1"), m.Describe(b"P", ""), m.Execute(""), m.Sync()),
            server(
                BC,
                RD,
                row(1),
                done("SELECT 1"),
                IDLE,
                downstream=[BC, RD, m.DataRow((b"1", b"masked-fmt0")), done("SELECT 1"), IDLE],
            ),
        ],
    )


def test_a_bind_after_a_sync_waits_for_the_parse_answer() -> None:
    """Which statement a Bind in a later Sync segment binds is known only from the Parse's
    answer: the Bind (and what follows) waits for it."""
    relay = relay_with(FakePolicy({SELECT: mask(MaskColumn())}))
    play(
        relay,
        [
            client(m.Parse("s1", SELECT), m.Sync()),
            server(PC, IDLE),
            client(
                m.Parse("s1", OTHER),
                m.Sync(),
                m.Bind("", "s1"),
                m.Describe(b"P", ""),
                m.Execute(""),
                m.Sync(),
                upstream=[m.Parse("s1", OTHER), m.Sync(), m.Flush()],
            ),
            server(
                pg_error("42P05", 'prepared statement "s1" already exists'),
                IDLE,
                upstream=[m.Bind("", "s1"), m.Describe(b"P", ""), m.Execute(""), m.Sync()],
            ),
            server(
                BC,
                RD,
                row(1),
                done("SELECT 1"),
                IDLE,
                downstream=[BC, RD, m.DataRow((b"1", b"masked-fmt0")), done("SELECT 1"), IDLE],
            ),
        ],
    )


def test_execute_of_a_portal_the_relay_never_bound_is_withheld() -> None:
    """An SQL cursor shares the portal namespace: executing it through the protocol would skip
    the policy, so a substitute that fails at once goes instead."""
    play(
        relay_with(),
        [
            client(
                m.Execute("sqlcursor"),
                m.Sync(),
                upstream=[m.Parse("", BLOCKED_SQL), m.Sync()],
            ),
            server(SYNTAX_ERROR, IN_TXN, downstream=[Err("42501"), IN_TXN]),
        ],
    )
