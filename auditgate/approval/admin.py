"""The approvals admin listener: a JSON API and a small approver page, for the same identities as callers.

    GET  /api/approvals[?status=pending|approved|denied|expired]   list (newest first)
    GET  /api/approvals/ID                                          one
    POST /api/approvals/ID/approve   {"reason": "..."}              approve (four-eyes enforced)
    POST /api/approvals/ID/deny      {"reason": "..."}              deny
    GET  /approvals                                                 the approver page (its data comes from the API)

Every API call needs `Authorization: Bearer <token>` (a service token or OIDC JWT from identities.yaml),
and shows that caller only what is theirs to see: their own requests (the same principal, see
auditgate.approval.rules) and those a rule lets them decide (its `approvers` groups meet theirs). Any other
approval does not exist for them: it is left out of lists, and fetching it by id is 404 as for an unknown id.
The page keeps the token in the tab's sessionStorage and sends it as that header, never as a cookie,
so another site cannot make a browser approve anything.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Protocol

from tornado import web

from auditgate.approval.rules import (
    DecisionRefused,
    may_see,
    principal_of,
    visible_name,
)
from auditgate.approval.store import (
    APPROVED,
    DENIED,
    EXPIRED,
    PENDING,
    StoreUnavailable,
    Viewer,
)
from auditgate.core.credentials import bearer_token
from auditgate.identity.authenticator import AuthFailure


class ApprovalGate(Protocol):
    """What the admin listener needs of the approval addon that serves it."""

    store: object  # awaitable calls (ThreadedApprovalStore): the listener shares the proxy's event loop

    async def authenticate(self, credential: str | None) -> dict | AuthFailure: ...

    async def decide(self, approval_id: str, decision: str, decider: dict, reason: str | None): ...

    def public(self, approval, viewer: dict) -> dict: ...


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"approval_admin_listen must be HOST:PORT, not {value!r}")
    return host.strip("[]"), int(port)


logger = logging.getLogger("auditgate.approval.admin")

MAX_REASON = 500
UNAVAILABLE = "approvals_unavailable"
UNAVAILABLE_MESSAGE = "the approvals store is unavailable right now (the gateway log says why); nothing was changed"
_STATUSES = {PENDING, APPROVED, DENIED, EXPIRED}


class _Base(web.RequestHandler):
    def initialize(self, gate: ApprovalGate) -> None:
        self.gate = gate

    def set_default_headers(self) -> None:
        self.set_header("cache-control", "no-store")
        self.set_header("x-content-type-options", "nosniff")
        self.set_header("x-frame-options", "DENY")  # approve buttons must not be clickjacked
        self.set_header("content-security-policy",
                        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                        "frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
        self.set_header("referrer-policy", "no-referrer")

    def error(self, status: int, code: str, message: str) -> None:
        self.set_status(status)
        self.set_header("content-type", "application/json")
        self.finish(json.dumps({"error": {"code": code, "message": message}}))

    def write_error(self, status_code: int, **kwargs) -> None:
        self.error(status_code, "error", self._reason)

    async def approver(self) -> dict | None:
        result = await self.gate.authenticate(bearer_token(self.request.headers.get("authorization", "")))
        if isinstance(result, AuthFailure):
            self.error(401, "unauthenticated", result.reason)
            return None
        return result


def _viewer_summary(viewer: dict) -> dict:
    """Who the listing is for, as the page shows it ("signed in as")."""
    return {"name": viewer.get("name"), "display": visible_name(viewer.get("name")),
            "principal": principal_of(viewer), "groups": list(viewer.get("groups") or ())}


class ListHandler(_Base):
    async def get(self) -> None:
        viewer = await self.approver()
        if viewer is None:
            return
        status = self.get_query_argument("status", None)
        if status is not None and status not in _STATUSES:
            return self.error(400, "bad_status", f"status must be one of {', '.join(sorted(_STATUSES))}")
        try:
            # Filtered in the store (before its LIMIT), by the same rule as may_see.
            approvals = await self.gate.store.list(status, viewer=Viewer.of(viewer))
        except StoreUnavailable as e:
            logger.error("approvals admin: %s %s: %s", self.request.method, self.request.path, e)
            return self.error(503, UNAVAILABLE, UNAVAILABLE_MESSAGE)
        approvals = [a for a in approvals if may_see(a.requester, a.approver_groups, viewer)]  # and again here
        self.set_header("content-type", "application/json")
        self.finish(json.dumps({"viewer": _viewer_summary(viewer),
                                "approvals": [self.gate.public(a, viewer) for a in approvals]}))


class ShowHandler(_Base):
    async def get(self, approval_id: str) -> None:
        viewer = await self.approver()
        if viewer is None:
            return
        try:
            approval = await self.gate.store.get(approval_id)
        except StoreUnavailable as e:
            logger.error("approvals admin: %s %s: %s", self.request.method, self.request.path, e)
            return self.error(503, UNAVAILABLE, UNAVAILABLE_MESSAGE)
        # Someone else's approval that this caller may not decide reads as an unknown one: not even whether
        # it exists is told.
        if approval is None or not may_see(approval.requester, approval.approver_groups, viewer):
            return self.error(404, "not_found", f"no approval {approval_id!r}")
        self.set_header("content-type", "application/json")
        self.finish(json.dumps(self.gate.public(approval, viewer)))


class DecideHandler(_Base):
    async def post(self, approval_id: str, decision: str) -> None:
        decider = await self.approver()
        if decider is None:
            return
        reason = None
        if self.request.body:
            try:
                body = json.loads(self.request.body)
                reason = body.get("reason") if isinstance(body, dict) else None
            except ValueError:
                return self.error(400, "bad_json", "the body must be JSON like {\"reason\": \"...\"}")
        if reason is not None and (not isinstance(reason, str) or len(reason) > MAX_REASON):
            return self.error(400, "bad_reason", f"reason must be text of at most {MAX_REASON} characters")
        try:
            decided = await self.gate.decide(approval_id, decision, decider, reason or None)
        except DecisionRefused as e:
            return self.error(e.status, e.code, e.message)
        except StoreUnavailable as e:
            logger.error("approvals: %s's decision on %s was not taken: %s", decider.get("name"), approval_id, e)
            return self.error(503, UNAVAILABLE, "the approvals store is unavailable right now (the gateway log says "
                              "why): the decision was not taken; try again")
        self.set_header("content-type", "application/json")
        self.finish(json.dumps(self.gate.public(decided, decider)))


class StaticText(_Base):
    def initialize(self, gate: ApprovalGate, body: str, content_type: str) -> None:
        self.gate, self.body, self.content_type = gate, body, content_type

    def get(self) -> None:
        self.set_header("content-type", self.content_type)
        self.finish(self.body)


PAGE_DIR = Path(__file__).resolve().parent / "page"  # package data: the approver page, as files


def _page_file(name: str) -> str:
    return (PAGE_DIR / name).read_text(encoding="utf-8")


def admin_application(gate: ApprovalGate) -> web.Application:
    args = {"gate": gate}
    page, script, css = _page_file("approvals.html"), _page_file("approvals.js"), _page_file("approvals.css")
    return web.Application([
        (r"/api/approvals/?", ListHandler, args),
        (r"/api/approvals/([A-Za-z0-9_]+)/?", ShowHandler, args),
        (r"/api/approvals/([A-Za-z0-9_]+)/(approve|deny)/?", DecideHandler, args),
        (r"/approvals/?", StaticText, {**args, "body": page, "content_type": "text/html; charset=utf-8"}),
        (r"/approvals\.js", StaticText, {**args, "body": script, "content_type": "text/javascript; charset=utf-8"}),
        (r"/approvals\.css", StaticText, {**args, "body": css, "content_type": "text/css; charset=utf-8"}),
        (r"/", web.RedirectHandler, {"url": "/approvals"}),
    ], xsrf_cookies=False, compress_response=False)
