"""End to end through real parts: service -> outbox -> aiosmtpd -> link -> aiohttp page -> decision."""

from __future__ import annotations

import asyncio
import re

from pgproxy.approvals.service import DecisionCode
from pgproxy.approvals.store import ApprovalStatus
from pgproxy.approvals.web import CSP

from .conftest import SECRET_PARAM, HarnessFactory, hold_request, link_of, make_rules, part

SQL = "drop table public.patients_archive"


async def test_email_carries_the_review_and_never_the_parameters(harness: HarnessFactory) -> None:
    h = await harness()
    req = hold_request(sql="delete from public.patients where ssn = $1", params=(SECRET_PARAM,))
    pending = await h.service.submit(req)
    first, second = await h.mailbox.next(), await h.mailbox.next()
    # owner carol and the agent itself are never recipients
    assert sorted([first["To"], second["To"]]) == ["alice@example.org", "bob@example.org"]
    for msg in (first, second):
        text, html = part(msg, "plain"), part(msg, "html")
        assert pending.approval_id in msg["Subject"]
        assert "ssn = $1" not in msg["Subject"]
        for body in (text, html):
            assert "triage-bot" in body
            assert "carol@example.org" in body
            assert "clinic" in body
            assert "public.patients_archive" in body
            assert "DDL is held for approval" in body
            assert "ssn: replaced" in body
            assert pending.expires_at.isoformat(timespec="seconds") in body
        # pretty-printed by pglast: keywords upper-cased
        assert "DELETE FROM public.patients" in text
        assert "WHERE ssn = $1" in text
        url, approval_id, _token = link_of(msg)
        assert approval_id == pending.approval_id
        assert url in html.replace("&amp;", "&")
        assert SECRET_PARAM.decode() not in msg.as_string()
    # one token per reviewer
    assert link_of(first)[2] != link_of(second)[2]
    await h.until(lambda: len(h.events("notified", pending.approval_id)) == 2)
    notified = h.events("notified", pending.approval_id)
    sent_ids = {first["Message-ID"].strip(), second["Message-ID"].strip()}
    assert {e.detail["message_id"] for e in notified} == sent_ids
    assert {e.detail["to"] for e in notified} == {"alice@example.org", "bob@example.org"}
    created = h.events("created", pending.approval_id)
    assert len(created) == 1
    assert created[0].detail["expires_at"] == pending.expires_at.isoformat()
    assert created[0].detail["hold_class"] == "ddl"
    # the parameter value is nowhere at rest: store file (and WAL) and audit records
    for path in h.store_path.parent.glob(h.store_path.name + "*"):
        data = path.read_bytes()
        assert SECRET_PARAM not in data
        assert link_of(first)[2].encode() not in data  # tokens are stored hashed
    assert SECRET_PARAM.decode() not in repr(h.audit.records)
    assert SECRET_PARAM.decode() not in repr(req)


async def test_get_twice_and_head_change_nothing_then_approve(harness: HarnessFactory) -> None:
    h = await harness()
    pending = await h.service.submit(hold_request(sql=SQL))
    url, approval_id, _ = link_of(await h.mailbox.next())
    waiter = asyncio.create_task(h.service.wait(approval_id))
    for _ in range(2):
        async with h.http.get(url) as resp:
            assert resp.status == 200
            page = await resp.text()
            assert resp.headers["Cache-Control"] == "no-store"
            assert resp.headers["Referrer-Policy"] == "no-referrer"
            assert resp.headers["X-Frame-Options"] == "DENY"
            assert resp.headers["Content-Security-Policy"] == CSP
        assert "Status: pending" in page
        assert '<form method="post">' in page
        assert "DROP TABLE public.patients_archive" in page
    async with h.http.head(url) as resp:
        assert resp.status == 200
    rec = await h.service.get(approval_id)
    assert rec is not None and rec.status is ApprovalStatus.PENDING
    assert not waiter.done()
    assert len(h.events("viewed", approval_id)) == 3
    form = await h.get_form(url)
    status, page = await h.post(url, {**form, "decision": "approve", "reason": ""})
    assert status == 200, page
    outcome = await asyncio.wait_for(waiter, 5)
    assert outcome.status == "approved"
    assert outcome.approval_id == pending.approval_id
    assert outcome.decided_by in ("alice@example.org", "bob@example.org")
    await h.service.executed(approval_id, rows=0, sqlstate="00000")
    executed = h.events("executed", approval_id)
    assert [e.detail for e in executed] == [{"rows": "0", "sqlstate": "00000"}]


async def test_deny_needs_a_reason_and_the_outcome_carries_it(harness: HarnessFactory) -> None:
    h = await harness()
    await h.service.submit(hold_request(sql=SQL))
    url, approval_id, _ = link_of(await h.mailbox.next())
    form = await h.get_form(url)
    status, page = await h.post(url, {**form, "decision": "deny", "reason": "   "})
    assert status == 400
    assert "a denial needs a reason" in page
    rec = await h.service.get(approval_id)
    assert rec is not None and rec.status is ApprovalStatus.PENDING
    # the refused attempt did not spend the link
    status, page = await h.post(
        url, {**form, "decision": "deny", "reason": "no <b>archive</b> drops this week"}
    )
    assert status == 200, page
    outcome = await asyncio.wait_for(h.service.wait(approval_id), 5)
    assert outcome.status == "denied"
    assert outcome.reason == "no <b>archive</b> drops this week"
    denied = h.events("denied", approval_id)
    assert len(denied) == 1 and denied[0].reason == outcome.reason
    # HTML-escaped on the page
    async with h.http.get(url) as resp:
        page = await resp.text()
    assert "no &lt;b&gt;archive&lt;/b&gt; drops this week" in page
    assert "<b>archive</b>" not in page


async def test_second_post_of_the_same_link_is_already_decided(harness: HarnessFactory) -> None:
    h = await harness()
    await h.service.submit(hold_request(sql=SQL))
    url, approval_id, _ = link_of(await h.mailbox.next())
    form = await h.get_form(url)
    status, _ = await h.post(url, {**form, "decision": "approve"})
    assert status == 200
    status, page = await h.post(url, {**form, "decision": "deny", "reason": "changed my mind"})
    assert status == 409
    assert "already" in page.lower()
    rec = await h.service.get(approval_id)
    assert rec is not None and rec.status is ApprovalStatus.APPROVED
    # the other reviewer's link is refused too: the request is decided
    other_url, _, _ = link_of(await h.mailbox.next())
    async with h.http.get(other_url) as resp:
        page = await resp.text()
    assert '<form method="post">' not in page and "already approved" in page


async def test_quorum_of_two_needs_two_distinct_reviewers(harness: HarnessFactory) -> None:
    h = await harness(rules=make_rules(quorum=2))
    await h.service.submit(hold_request(sql=SQL))
    links = {}
    for _ in range(2):
        msg = await h.mailbox.next()
        links[msg["To"]] = link_of(msg)[0]
    url_a, url_b = links["alice@example.org"], links["bob@example.org"]
    approval_id = url_a.split("/approvals/")[1].split("?")[0]
    waiter = asyncio.create_task(h.service.wait(approval_id))
    form_a = await h.get_form(url_a)
    status, page = await h.post(url_a, {**form_a, "decision": "approve"})
    assert status == 200 and "1 of 2" in page
    await asyncio.sleep(0.1)
    assert not waiter.done()
    rec = await h.service.get(approval_id)
    assert rec is not None and rec.status is ApprovalStatus.PENDING
    # alice again (same link) does not make two
    status, _ = await h.post(url_a, {**form_a, "decision": "approve"})
    assert status == 409
    assert not waiter.done()
    form_b = await h.get_form(url_b)
    status, _ = await h.post(url_b, {**form_b, "decision": "approve", "reason": "looks fine"})
    assert status == 200
    outcome = await asyncio.wait_for(waiter, 5)
    assert outcome.status == "approved"
    assert set(outcome.decided_by.split(",")) == {"alice@example.org", "bob@example.org"}
    assert [e.detail["approvals"] for e in h.events("voted", approval_id)] == ["1/2"]


async def test_owner_and_agent_can_never_approve(harness: HarnessFactory) -> None:
    tokens = {"carol-api-token": "carol@example.org", "bot-api-token": "triage-bot"}
    rules = make_rules(approvers=("alice@example.org", "carol@example.org", "triage-bot"))
    h = await harness(rules=rules, api_tokens=tokens)
    await h.service.submit(hold_request(sql=SQL))
    msg = await h.mailbox.next()
    assert msg["To"] == "alice@example.org"  # the only eligible recipient
    approval_id = link_of(msg)[1]
    for token in tokens:
        async with h.http.post(
            f"{h.base_url}/api/approvals/{approval_id}/decision",
            json={"decision": "approve", "reason": "self-service"},
            headers={"Authorization": f"Bearer {token}"},
        ) as resp:
            assert resp.status == 403
            body = await resp.json()
            assert body["result"] == "not_eligible"
    result = await h.service.decide(approval_id, "CAROL@example.org", "approve", "")
    assert result.code is DecisionCode.NOT_ELIGIBLE
    rec = await h.service.get(approval_id)
    assert rec is not None and rec.status is ApprovalStatus.PENDING
    assert h.events("approved", approval_id) == []


async def test_eligibility_is_rechecked_against_reloaded_rules(harness: HarnessFactory) -> None:
    h = await harness()
    await h.service.submit(hold_request(sql=SQL))
    links = {}
    for _ in range(2):
        msg = await h.mailbox.next()
        links[msg["To"]] = link_of(msg)[0]
    url, url_a = links["bob@example.org"], links["alice@example.org"]
    form, form_a = await h.get_form(url), await h.get_form(url_a)
    # bob becomes the agent's owner after the mail went out
    h.service.update_rules(make_rules(owner="bob@example.org"))
    status, page = await h.post(url, {**form, "decision": "approve"})
    assert status == 403
    assert "separation of duties" in page
    # removed from the approvers altogether: also refused
    h.service.update_rules(make_rules(approvers=("bob@example.org",)))
    status, _ = await h.post(url_a, {**form_a, "decision": "approve"})
    assert status == 403
    async with h.http.get(url_a) as resp:
        assert '<form method="post">' not in await resp.text()
    rec = await h.service.get(link_of(h.mailbox.received[0])[1])
    assert rec is not None and rec.status is ApprovalStatus.PENDING


async def test_csrf_missing_forged_or_cross_site_is_403(harness: HarnessFactory) -> None:
    h = await harness()
    await h.service.submit(hold_request(sql=SQL))
    url, approval_id, token = link_of(await h.mailbox.next())
    form = await h.get_form(url)
    status, _ = await h.post(url, {"t": token, "decision": "approve"})
    assert status == 403
    forged = "0" * 64
    status, _ = await h.post(url, {"t": token, "csrf": forged, "decision": "approve"})
    assert status == 403
    # a tag for another request does not fit this one
    other = h.service.csrf_tag("apr_0000000000000000", token)
    status, _ = await h.post(url, {"t": token, "csrf": other, "decision": "approve"})
    assert status == 403
    status, _ = await h.post(
        url, {**form, "decision": "approve"}, headers={"Origin": "https://evil.example"}
    )
    assert status == 403
    status, _ = await h.post(
        url, {**form, "decision": "approve"}, headers={"Referer": "https://evil.example/x"}
    )
    assert status == 403
    rec = await h.service.get(approval_id)
    assert rec is not None and rec.status is ApprovalStatus.PENDING
    # the genuine form still works afterwards, with the browser's own Origin
    status, _ = await h.post(url, {**form, "decision": "approve"}, headers={"Origin": h.base_url})
    assert status == 200


async def test_invalid_or_foreign_tokens_show_nothing(harness: HarnessFactory) -> None:
    h = await harness()
    await h.service.submit(hold_request(sql=SQL))
    _url, approval_id, token = link_of(await h.mailbox.next())
    await h.service.submit(hold_request(sql="drop table public.other_table"))
    other_id = None
    for _ in range(3):
        msg = await h.mailbox.next()
        if link_of(msg)[1] != approval_id:
            other_id = link_of(msg)[1]
            break
    assert other_id is not None
    for bad in (
        f"{h.base_url}/approvals/{approval_id}",
        f"{h.base_url}/approvals/{approval_id}?t=not-a-token",
        f"{h.base_url}/approvals/{other_id}?t={token}",  # a token is bound to one request
    ):
        async with h.http.get(bad) as resp:
            assert resp.status == 403
            page = await resp.text()
        assert "DROP TABLE" not in page and "drop table" not in page


async def test_withdraw_while_pending(harness: HarnessFactory) -> None:
    h = await harness()
    pending = await h.service.submit(hold_request(sql=SQL))
    url, approval_id, _ = link_of(await h.mailbox.next())
    form = await h.get_form(url)
    waiter = asyncio.create_task(h.service.wait(pending.approval_id))
    await asyncio.sleep(0.05)
    await h.service.withdraw(pending.approval_id, "client disconnected")
    outcome = await asyncio.wait_for(waiter, 5)
    assert outcome.status == "withdrawn"
    assert outcome.reason == "client disconnected"
    status, page = await h.post(url, {**form, "decision": "approve"})
    assert status == 409 and "withdrawn" in page
    assert [e.reason for e in h.events("withdrawn", approval_id)] == ["client disconnected"]
    # withdrawing again (or after a decision) is a no-op
    await h.service.withdraw(pending.approval_id, "again")
    assert len(h.events("withdrawn", approval_id)) == 1


async def test_page_escapes_the_statement(harness: HarnessFactory) -> None:
    h = await harness()
    sql = "select '<script>alert(1)</script>' as x from public.patients"
    await h.service.submit(hold_request(sql=sql))
    url, _, _ = link_of(await h.mailbox.next())
    async with h.http.get(url) as resp:
        page = await resp.text()
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert re.search(r"<style>", page)  # only the hashed inline style, allowed by the CSP
