"""Review pages and the JSON API for approvals (aiohttp), mountable in the proxy's HTTP server.

``GET``/``HEAD /approvals/{id}?t=TOKEN`` only shows the request (audited as ``viewed``) and never
changes its state, however often fetched — mail scanners prefetch links. The page's
``<form method="post">`` carries the token and a CSRF tag (HMAC of id and token under the server
secret); ``POST`` checks the tag and, when present, the Origin/Referer host, then decides.
A second post of the same link answers 409 "already decided".

JSON API, ``Authorization: Bearer <token>`` where the token is either a review-link token (it
acts for its reviewer on its one request, single use) or a reviewer API token from the
configuration (``api_tokens``: token -> reviewer; acts for that reviewer on any request the
current rules let them decide): ``GET /api/approvals?status=pending``,
``GET /api/approvals/{id}``, ``POST /api/approvals/{id}/decision`` with
``{"decision": "approve"|"deny", "reason": "..."}``. Same guarantees as the page.

Every response: ``Cache-Control: no-store``, ``Referrer-Policy: no-referrer``,
``X-Frame-Options: DENY``, ``X-Content-Type-Options: nosniff`` and a strict CSP; every value
shown is HTML-escaped. Pages are rendered with ``string.Template`` (no template engine).
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from string import Template
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from pgproxy.approvals.mail import pretty_sql
from pgproxy.approvals.service import ApprovalService, DecisionCode, DecisionResult, Review
from pgproxy.approvals.store import ApprovalStatus
from pgproxy.approvals.tokens import hash_token

__all__ = ["approval_routes", "make_app"]

MAX_REASON = 2000

_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}"
    "th{text-align:left;padding-right:1rem;vertical-align:top}"
    "pre{background:#f4f4f4;padding:1rem;overflow:auto;white-space:pre-wrap}"
    ".status{font-weight:bold}.error{color:#a00}"
    "textarea{width:100%}button{margin:.5rem .5rem 0 0;padding:.4rem 1.2rem}"
)
_CSS_HASH = base64.b64encode(hashlib.sha256(_CSS.encode()).digest()).decode()
CSP = (
    f"default-src 'none'; style-src 'sha256-{_CSS_HASH}'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Pragma": "no-cache",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": CSP,
}

_PAGE = Template(
    """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="robots" content="noindex,nofollow">
<title>$title</title><style>$css</style></head>
<body>
<h1>$title</h1>
$body
</body></html>
"""
)

_REVIEW = Template(
    """<p class="status" id="status">Status: $status</p>
$message
<table>$facts</table>
<h2>Statement</h2>
<p>Bound parameter values are never shown.</p>
<pre id="sql">$sql</pre>
<p id="votes">$votes</p>
$form"""
)

_FORM = Template(
    """<form method="post">
<input type="hidden" name="t" value="$token">
<input type="hidden" name="csrf" value="$csrf">
<p>Deciding as <b>$reviewer</b>.</p>
<p><label for="reason">Reason (required to deny)</label><br>
<textarea id="reason" name="reason" rows="3" maxlength="$max_reason"></textarea></p>
<button type="submit" id="approve" name="decision" value="approve">Approve</button>
<button type="submit" id="deny" name="decision" value="deny">Deny</button>
</form>"""
)


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _when(ts: float | None) -> str:
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="seconds")


def _page(title: str, body: str, status: int = 200) -> web.Response:
    text = _PAGE.substitute(title=_e(title), css=_CSS, body=body)
    return web.Response(
        text=text, status=status, content_type="text/html", headers=SECURITY_HEADERS
    )


def _json(data: Mapping[str, Any], status: int = 200, **headers: str) -> web.Response:
    return web.json_response(dict(data), status=status, headers={**SECURITY_HEADERS, **headers})


def _why_not(review: Review) -> str:
    rec = review.record
    if rec.status is not ApprovalStatus.PENDING:
        return f"This request is already {rec.status.value}; nothing more to decide."
    if review.expired:
        return "This request has expired; the statement will not run."
    if review.token_used or any(
        v.reviewer.casefold() == review.reviewer.casefold() for v in review.votes
    ):
        return "You already decided this request."
    if not review.eligible:
        return "You may not decide this request (separation of duties or not an approver)."
    return ""


def _render_review(
    service: ApprovalService, review: Review, token: str, message: str = "", status: int = 200
) -> web.Response:
    rec = review.record
    facts = [
        ("Request", rec.approval_id),
        ("Agent", rec.agent),
        ("Owner", rec.owner or "(none)"),
        ("Database", rec.database),
        ("Held as", rec.hold_class),
        ("Statement class", rec.statement_class),
        ("Reasons", "; ".join(rec.reasons) or "(none)"),
        ("Objects touched", ", ".join(rec.relations) or "(none)"),
        ("Estimated rows", "unknown" if rec.estimated_rows is None else rec.estimated_rows),
        ("Masking in effect", "; ".join(rec.masking) or "(none)"),
        ("Requested", _when(rec.requested_at)),
        ("Expires", _when(rec.expires_at)),
    ]
    if rec.decided_at is not None:
        facts += [
            ("Decided", _when(rec.decided_at)),
            ("Decided by", rec.decided_by or "(system)"),
            ("Reason", rec.reason or "(none)"),
        ]
    approvals = [v.reviewer for v in review.votes if v.decision == "approve"]
    quorum = service.quorum_for(rec)
    votes = f"Approvals: {len(approvals)} of {quorum} needed"
    if approvals:
        votes += f" ({', '.join(approvals)})"
    if review.can_decide:
        form = _FORM.substitute(
            token=_e(token),
            csrf=_e(service.csrf_tag(rec.approval_id, token)),
            reviewer=_e(review.reviewer),
            max_reason=MAX_REASON,
        )
    else:
        form = f'<p id="closed">{_e(_why_not(review))}</p>'
    body = _REVIEW.substitute(
        status=_e(rec.status.value),
        message=f'<p class="error" id="message">{_e(message)}</p>' if message else "",
        facts="".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in facts),
        sql=_e(pretty_sql(rec.sql)),
        votes=_e(votes),
        form=form,
    )
    return _page(f"pgproxy approval request {rec.approval_id}", body, status)


def _result_status(result: DecisionResult) -> int:
    if result.accepted:
        return 200
    return {
        DecisionCode.ALREADY_DECIDED: 409,
        DecisionCode.EXPIRED: 409,
        DecisionCode.NOT_ELIGIBLE: 403,
        DecisionCode.REASON_REQUIRED: 400,
        DecisionCode.NOT_FOUND: 404,
        DecisionCode.INVALID: 403,
    }[result.code]


def _same_origin(request: web.Request, public_url: str) -> bool:
    """Origin/Referer, when the browser sent one, must name this server."""
    allowed = {request.host.lower(), urlsplit(public_url).netloc.lower()}
    for header in ("Origin", "Referer"):
        value = request.headers.get(header)
        if value is None or value == "null":  # "null": sent under Referrer-Policy no-referrer
            continue
        if urlsplit(value).netloc.lower() not in allowed:
            return False
    return True


@dataclass(frozen=True, slots=True)
class _Bearer:
    reviewer: str
    #: set when the bearer is a review-link token: it acts on this request only
    approval_id: str | None
    link_token: str | None


def approval_routes(
    service: ApprovalService, api_tokens: Mapping[str, str] | None = None
) -> web.RouteTableDef:
    """The review pages and the JSON API; ``api_tokens`` maps reviewer API tokens to reviewers."""
    routes = web.RouteTableDef()
    api_reviewers = {hash_token(tok): who for tok, who in (api_tokens or {}).items()}

    @routes.get("/approvals/{approval_id}")
    async def show(request: web.Request) -> web.Response:
        approval_id = request.match_info["approval_id"]
        token = request.query.get("t", "")
        review = await service.review(approval_id, token)
        if review is None:
            return _page("Link not valid", "<p>This approval link is not valid.</p>", 403)
        return _render_review(service, review, token)

    @routes.post("/approvals/{approval_id}")
    async def decide(request: web.Request) -> web.Response:
        approval_id = request.match_info["approval_id"]
        if not _same_origin(request, service.public_url):
            return _page("Refused", "<p>Cross-site form post refused.</p>", 403)
        form = await request.post()
        token = str(form.get("t") or request.query.get("t", ""))
        csrf = str(form.get("csrf") or "")
        if not token or not csrf or not service.csrf_ok(approval_id, token, csrf):
            return _page("Refused", "<p>The form is not valid (CSRF check failed).</p>", 403)
        decision = str(form.get("decision") or "")
        reason = str(form.get("reason") or "")[:MAX_REASON]
        if decision not in ("approve", "deny"):
            return _page("Refused", "<p>Choose Approve or Deny.</p>", 400)
        result = await service.decide_by_token(approval_id, token, decision, reason)
        code = _result_status(result)
        if result.code is DecisionCode.REASON_REQUIRED:
            review = await service.review(approval_id, token, audit_view=False)
            if review is not None:
                return _render_review(service, review, token, result.message, code)
        if result.code is DecisionCode.ALREADY_DECIDED:
            title = "Already decided"
        elif result.accepted:
            title = "Thank you"
        else:
            title = "Not recorded"
        status_line = f"Status: {result.status.value}" if result.status is not None else ""
        body = (
            f'<p id="result">{_e(result.message)}</p>'
            f'<p class="status" id="status">{_e(status_line)}</p>'
        )
        return _page(f"{title}: {approval_id}", body, code)

    async def bearer(request: web.Request) -> _Bearer | None:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None
        who = api_reviewers.get(hash_token(token))
        if who is not None:
            return _Bearer(who, None, None)
        tok = await service.link_token(token)
        if tok is None:
            return None
        return _Bearer(tok.reviewer, tok.approval_id, token)

    def unauthorized() -> web.Response:
        return _json(
            {"error": "a valid bearer token is required"}, 401, **{"WWW-Authenticate": "Bearer"}
        )

    def as_json(review: Review) -> dict[str, Any]:
        rec = review.record
        return {
            "approval_id": rec.approval_id,
            "status": rec.status.value,
            "agent": rec.agent,
            "owner": rec.owner,
            "database": rec.database,
            "sql": rec.sql,
            "statement_class": rec.statement_class,
            "hold_class": rec.hold_class,
            "reasons": list(rec.reasons),
            "relations": list(rec.relations),
            "estimated_rows": rec.estimated_rows,
            "masking": list(rec.masking),
            "requested_at": _when(rec.requested_at),
            "expires_at": _when(rec.expires_at),
            "decided_at": _when(rec.decided_at) or None,
            "decided_by": rec.decided_by,
            "reason": rec.reason,
            "approvals": sum(1 for v in review.votes if v.decision == "approve"),
            "quorum": service.quorum_for(rec),
            "can_decide": review.can_decide,
        }

    async def visible(who: _Bearer, status: ApprovalStatus | None) -> list[Review]:
        if who.approval_id is None:
            return await service.requests_for(who.reviewer, status)
        assert who.link_token is not None
        review = await service.review(who.approval_id, who.link_token, audit_view=False)
        if review is None or (status is not None and review.record.status is not status):
            return []
        return [review]

    @routes.get("/api/approvals")
    async def api_list(request: web.Request) -> web.Response:
        who = await bearer(request)
        if who is None:
            return unauthorized()
        raw = request.query.get("status")
        try:
            status = None if raw in (None, "", "all") else ApprovalStatus(raw)
        except ValueError:
            return _json({"error": f"unknown status {raw!r}"}, 400)
        return _json({"approvals": [as_json(r) for r in await visible(who, status)]})

    @routes.get("/api/approvals/{approval_id}")
    async def api_get(request: web.Request) -> web.Response:
        who = await bearer(request)
        if who is None:
            return unauthorized()
        approval_id = request.match_info["approval_id"]
        for review in await visible(who, None):
            if review.record.approval_id == approval_id:
                return _json(as_json(review))
        return _json({"error": "no such request for this reviewer"}, 404)

    @routes.post("/api/approvals/{approval_id}/decision")
    async def api_decide(request: web.Request) -> web.Response:
        who = await bearer(request)
        if who is None:
            return unauthorized()
        approval_id = request.match_info["approval_id"]
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _json({"error": "the body must be JSON"}, 400)
        if not isinstance(body, dict):
            return _json({"error": "the body must be a JSON object"}, 400)
        decision = body.get("decision")
        reason = body.get("reason", "")
        if decision not in ("approve", "deny") or not isinstance(reason, str):
            return _json({"error": "decision must be 'approve' or 'deny', reason a string"}, 400)
        reason = reason[:MAX_REASON]
        if who.link_token is not None:
            if who.approval_id != approval_id:
                return _json({"error": "this token is for another request"}, 403)
            result = await service.decide_by_token(approval_id, who.link_token, decision, reason)
        else:
            result = await service.decide(approval_id, who.reviewer, decision, reason)
        return _json(
            {
                "approval_id": approval_id,
                "result": result.code.value,
                "message": result.message,
                "status": None if result.status is None else result.status.value,
                "approvals": result.approvals,
                "quorum": result.quorum,
            },
            _result_status(result),
        )

    return routes


def make_app(
    service: ApprovalService, api_tokens: Mapping[str, str] | None = None
) -> web.Application:
    """A stand-alone application serving only the approval routes."""
    app = web.Application(client_max_size=64 * 1024)
    app.add_routes(approval_routes(service, api_tokens))
    return app
