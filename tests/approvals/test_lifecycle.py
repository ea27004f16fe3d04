"""Expiry, restart, SMTP outages, release in ``reply: error`` mode, and the JSON API."""

from __future__ import annotations

import asyncio
import stat
import time
from pathlib import Path

import pytest

from pgproxy.approvals.service import ApprovalStateError, DecisionCode, execution_hash
from pgproxy.approvals.store import ApprovalStatus, SqliteApprovalStore

from .conftest import (
    HarnessFactory,
    SmtpServer,
    free_port,
    hold_request,
    link_of,
    make_rules,
)

SQL = "drop table public.patients_archive"


class FakeClock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def test_expiry_on_the_real_clock(harness: HarnessFactory) -> None:
    h = await harness(rules=make_rules(timeout=0.3))
    pending = await h.service.submit(hold_request(sql=SQL))
    url, approval_id, _ = link_of(await h.mailbox.next())
    form = await h.get_form(url)
    outcome = await asyncio.wait_for(h.service.wait(approval_id), 5)
    assert outcome.status == "expired"
    assert outcome.approval_id == pending.approval_id
    status, page = await h.post(url, {**form, "decision": "approve"})
    assert status == 409 and "expired" in page
    rec = await h.service.get(approval_id)
    assert rec is not None and rec.status is ApprovalStatus.EXPIRED
    assert len(h.events("expired", approval_id)) == 1
    assert h.events("approved", approval_id) == []


async def test_decision_after_expiry_is_refused_on_an_injected_clock(
    harness: HarnessFactory,
) -> None:
    clock = FakeClock()
    h = await harness(rules=make_rules(timeout=900), clock=clock)
    pending = await h.service.submit(hold_request(sql=SQL))
    assert pending.expires_at.timestamp() == pytest.approx(clock.now + 900)
    url, approval_id, _ = link_of(await h.mailbox.next())
    form = await h.get_form(url)
    clock.now += 899
    assert await h.service.sweep() == 0
    clock.now += 2
    # the decision itself notices the deadline even before any sweep ran
    status, page = await h.post(url, {**form, "decision": "approve"})
    assert status == 409 and "expired" in page
    outcome = await asyncio.wait_for(h.service.wait(approval_id), 5)
    assert outcome.status == "expired"
    result = await h.service.decide(approval_id, "alice@example.org", "approve", "")
    assert result.code is DecisionCode.EXPIRED


async def test_sweep_expires_on_an_injected_clock(harness: HarnessFactory) -> None:
    clock = FakeClock()
    h = await harness(rules=make_rules(timeout=60), clock=clock)
    pending = await h.service.submit(hold_request(sql=SQL))
    waiter = asyncio.create_task(h.service.wait(pending.approval_id))
    await asyncio.sleep(0.1)
    assert not waiter.done()
    clock.now += 61
    outcome = await asyncio.wait_for(waiter, 5)  # the expiry task's sweep notices
    assert outcome.status == "expired"
    assert outcome.reason == "no decision within 60 seconds"


async def test_smtp_down_then_up_delivers_everything(harness: HarnessFactory) -> None:
    port = free_port()
    h = await harness(smtp=False, smtp_url=f"smtp://127.0.0.1:{port}?timeout=2")
    pending = await h.service.submit(hold_request(sql=SQL))
    store = h.service.store

    async def attempts() -> int:
        return min(item.attempts for item in await store.outbox(pending.approval_id))

    async with asyncio.timeout(10):
        while await attempts() < 2:
            await asyncio.sleep(0.02)
    items = await store.outbox(pending.approval_id)
    assert all(i.sent_at is None and i.last_error for i in items)
    assert h.events("notified") == []
    server = await SmtpServer(port).start()
    try:
        got = sorted([(await server.mailbox.next())["To"] for _ in range(2)])
        assert got == ["alice@example.org", "bob@example.org"]
        await h.until(lambda: len(h.events("notified")) == 2)
        assert all(i.sent_at is not None for i in await store.outbox(pending.approval_id))
        # the delayed link still works
        url, approval_id, _ = link_of(server.mailbox.received[0])
        status, _ = await h.post(url, {**(await h.get_form(url)), "decision": "approve"})
        assert status == 200
        assert (await h.service.wait(approval_id)).status == "approved"
    finally:
        await server.stop()


async def test_restart_withdraws_pending_and_still_delivers_the_outbox(
    harness: HarnessFactory,
) -> None:
    port = free_port()
    first = await harness(smtp=False, smtp_url=f"smtp://127.0.0.1:{port}?timeout=2")
    pending = await first.service.submit(hold_request(sql=SQL))
    # the process dies with the request pending and the mail undelivered
    await first.close(withdraw_pending=False)
    store = SqliteApprovalStore(first.store_path)
    await store.open()
    rec = await store.get(pending.approval_id)
    assert rec is not None and rec.status is ApprovalStatus.PENDING
    await store.close()

    server = SmtpServer(port)
    await server.start()
    second = await harness(smtp=server)
    rec = await second.service.get(pending.approval_id)
    assert rec is not None and rec.status is ApprovalStatus.WITHDRAWN
    assert "restarted" in rec.reason
    withdrawn = second.events("withdrawn", pending.approval_id)
    assert len(withdrawn) == 1
    got = sorted([(await server.mailbox.next())["To"] for _ in range(2)])
    assert got == ["alice@example.org", "bob@example.org"]
    # the late link shows the outcome and cannot decide
    url, _, _ = link_of(server.mailbox.received[0])
    async with second.http.get(url) as resp:
        page = await resp.text()
    assert resp.status == 200 and "withdrawn" in page and '<form method="post">' not in page


async def test_starttls_required_but_not_offered_sends_nothing(harness: HarnessFactory) -> None:
    server = await SmtpServer(free_port()).start()  # no tls_context: no STARTTLS offered
    h = await harness(smtp=server, smtp_url=f"smtp+starttls://127.0.0.1:{server.port}?timeout=2")
    pending = await h.service.submit(hold_request(sql=SQL))
    store = h.service.store
    async with asyncio.timeout(10):
        while not all(i.attempts >= 1 for i in await store.outbox(pending.approval_id)):
            await asyncio.sleep(0.02)
    items = await store.outbox(pending.approval_id)
    assert all(i.sent_at is None for i in items)
    assert all("STARTTLS" in i.last_error for i in items)
    assert server.mailbox.mail_commands == 0
    assert server.mailbox.received == []
    assert h.events("notified") == []


async def test_claim_released_is_single_use_and_bound_to_the_execution(
    harness: HarnessFactory,
) -> None:
    h = await harness()
    req = hold_request(sql="copy public.patients to stdout", params=(b"x", None))
    pending = await h.service.submit(req)
    assert await h.service.claim_released(req) is None  # not approved yet
    result = await h.service.decide(pending.approval_id, "alice@example.org", "approve", "ok")
    assert result.code is DecisionCode.APPROVED
    other = hold_request(sql="copy public.patients to stdout", params=(b"y", None))
    assert await h.service.claim_released(other) is None
    assert await h.service.claim_released(req) == pending.approval_id
    assert await h.service.claim_released(req) is None
    await h.service.executed(pending.approval_id, rows=3, sqlstate="00000")
    with pytest.raises(ApprovalStateError):
        await h.service.executed(pending.approval_id, rows=3, sqlstate="00000")


async def test_executed_refuses_a_denied_request(harness: HarnessFactory) -> None:
    h = await harness()
    pending = await h.service.submit(hold_request(sql=SQL))
    await h.service.decide(pending.approval_id, "bob@example.org", "deny", "not today")
    with pytest.raises(ApprovalStateError):
        await h.service.executed(pending.approval_id, rows=1, sqlstate="00000")


def test_execution_hash_covers_every_field() -> None:
    base = hold_request(sql="select $1, $2", params=(b"a", None))
    variants = [
        hold_request(sql="select $1, $2", params=(b"a", b"")),
        hold_request(sql="select $1, $2", params=(b"", b"a")),
        hold_request(sql="select $1, $2", params=(b"a",)),
        hold_request(sql="select $1, $2 ", params=(b"a", None)),
        hold_request(sql="select $1, $2", params=(b"a", None), agent="other-bot"),
    ]
    hashes = {execution_hash(v) for v in variants}
    assert len(hashes) == len(variants)
    assert execution_hash(base) not in hashes
    assert execution_hash(base) == execution_hash(
        hold_request(sql="select $1, $2", params=(b"a", None))
    )
    # fields cannot shift bytes into one another
    assert execution_hash(hold_request(sql="ab", params=(b"c",))) != execution_hash(
        hold_request(sql="a", params=(b"bc",))
    )


async def test_json_api_lists_and_decides(harness: HarnessFactory) -> None:
    tokens = {"alice-api-token-000": "alice@example.org"}
    h = await harness(rules=make_rules(quorum=2), api_tokens=tokens)
    pending = await h.service.submit(hold_request(sql=SQL))
    api = f"{h.base_url}/api/approvals"
    async with h.http.get(f"{api}?status=pending") as resp:
        assert resp.status == 401
    alice = {"Authorization": "Bearer alice-api-token-000"}
    async with h.http.get(f"{api}?status=pending", headers=alice) as resp:
        assert resp.status == 200
        assert resp.headers["Cache-Control"] == "no-store"
        listed = (await resp.json())["approvals"]
    assert [a["approval_id"] for a in listed] == [pending.approval_id]
    assert listed[0]["sql"] == SQL and listed[0]["can_decide"] is True
    async with h.http.get(f"{api}?status=bogus", headers=alice) as resp:
        assert resp.status == 400
    decide = f"{api}/{pending.approval_id}/decision"
    async with h.http.post(decide, json={"decision": "deny"}, headers=alice) as resp:
        assert resp.status == 400
        assert (await resp.json())["result"] == "reason_required"
    async with h.http.post(decide, json={"decision": "approve"}, headers=alice) as resp:
        assert resp.status == 200
        assert (await resp.json())["result"] == "recorded"
    async with h.http.post(decide, json={"decision": "approve"}, headers=alice) as resp:
        assert resp.status == 409
    # bob uses his review-link token as a bearer for this one request
    bob_msg = None
    for _ in range(2):
        msg = await h.mailbox.next()
        if msg["To"] == "bob@example.org":
            bob_msg = msg
    assert bob_msg is not None
    bob = {"Authorization": f"Bearer {link_of(bob_msg)[2]}"}
    async with h.http.get(f"{api}?status=pending", headers=bob) as resp:
        listed = (await resp.json())["approvals"]
    assert [(a["approval_id"], a["approvals"]) for a in listed] == [(pending.approval_id, 1)]
    async with h.http.post(
        f"{api}/apr_0000000000000000/decision", json={"decision": "approve"}, headers=bob
    ) as resp:
        assert resp.status == 403
    async with h.http.post(decide, data=b"not json", headers=bob) as resp:
        assert resp.status == 400
    async with h.http.post(
        decide, json={"decision": "approve", "reason": "fine"}, headers=bob
    ) as resp:
        body = await resp.json()
        assert resp.status == 200 and body["result"] == "approved" and body["status"] == "approved"
    async with h.http.post(decide, json={"decision": "approve"}, headers=bob) as resp:
        assert resp.status == 409
    outcome = await h.service.wait(pending.approval_id)
    assert outcome.status == "approved"
    async with h.http.get(f"{api}?status=pending", headers=alice) as resp:
        assert (await resp.json())["approvals"] == []
    async with h.http.get(f"{api}/{pending.approval_id}", headers=alice) as resp:
        assert resp.status == 200
        assert (await resp.json())["status"] == "approved"


async def test_store_file_is_owner_only_and_reopens(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"
    store = SqliteApprovalStore(path)
    await store.open()
    secret = await store.server_secret()
    await store.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = SqliteApprovalStore(path)
    await again.open()
    try:
        assert await again.server_secret() == secret  # CSRF tags survive a restart
        assert await again.list_requests() == []
    finally:
        await again.close()
