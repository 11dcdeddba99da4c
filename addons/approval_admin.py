"""The approvals admin listener: a JSON API and a small approver page, for the same identities as callers.

    GET  /api/approvals[?status=pending|approved|denied|expired]   list (newest first)
    GET  /api/approvals/ID                                          one
    POST /api/approvals/ID/approve   {"reason": "..."}              approve (four-eyes enforced)
    POST /api/approvals/ID/deny      {"reason": "..."}              deny
    GET  /approvals                                                 the approver page (its data comes from the API)

Every API call needs `Authorization: Bearer <token>` (a service token or OIDC JWT from identities.yaml).
The page keeps the token in the tab's sessionStorage and sends it as that header, never as a cookie,
so another site cannot make a browser approve anything.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from tornado import web

from addons.approval_rules import DecisionRefused
from addons.approval_store import APPROVED, DENIED, EXPIRED, PENDING
from addons.credentials import bearer_token
from addons.oidc_authenticator import AuthFailure

if TYPE_CHECKING:
    from addons.approval import ApprovalGate

MAX_REASON = 500
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


class ListHandler(_Base):
    async def get(self) -> None:
        if await self.approver() is None:
            return
        status = self.get_query_argument("status", None)
        if status is not None and status not in _STATUSES:
            return self.error(400, "bad_status", f"status must be one of {', '.join(sorted(_STATUSES))}")
        approvals = self.gate.store.list(status)
        self.set_header("content-type", "application/json")
        self.finish(json.dumps({"approvals": [self.gate.public(a) for a in approvals]}))


class ShowHandler(_Base):
    async def get(self, approval_id: str) -> None:
        if await self.approver() is None:
            return
        approval = self.gate.store.get(approval_id)
        if approval is None:
            return self.error(404, "not_found", f"no approval {approval_id!r}")
        self.set_header("content-type", "application/json")
        self.finish(json.dumps(self.gate.public(approval)))


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
            decided = self.gate.decide(approval_id, decision, decider, reason or None)
        except DecisionRefused as e:
            return self.error(e.status, e.code, e.message)
        self.set_header("content-type", "application/json")
        self.finish(json.dumps(self.gate.public(decided)))


class StaticText(_Base):
    def initialize(self, gate: ApprovalGate, body: str, content_type: str) -> None:
        self.gate, self.body, self.content_type = gate, body, content_type

    def get(self) -> None:
        self.set_header("content-type", self.content_type)
        self.finish(self.body)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>auditgate approvals</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="/approvals.css"><script src="/approvals.js" defer></script></head>
<body>
<h1>Requests waiting for approval</h1>
<form id="signin">
  <label>Your gateway token <input id="token" type="password" autocomplete="off" size="50"></label>
  <button id="signin-button" type="submit">Sign in</button>
  <span id="whoami"></span>
</form>
<p id="status" role="status"></p>
<table id="pending"><thead><tr>
  <th>id</th><th>caller</th><th>model</th><th>rule</th><th>age</th><th>prompt (masked)</th><th>decision</th>
</tr></thead><tbody></tbody></table>
<p class="note">Nobody can approve their own request. Decisions are recorded with your identity.</p>
</body></html>
"""

CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;width:100%;margin-top:1em}th,td{border:1px solid #ccc;padding:.4em;vertical-align:top}
th{background:#f3f3f3;text-align:left}pre{white-space:pre-wrap;max-width:50em;max-height:12em;overflow:auto;margin:0}
.note{color:#666;font-size:.9em}#status{min-height:1.2em}.error{color:#b00}
button.approve{background:#2a7;color:#fff}button.deny{background:#c33;color:#fff}
"""

# Built with textContent only: nothing a caller sent is ever parsed as HTML.
SCRIPT = r"""
"use strict";
const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem("auditgate-token") || "";

async function api(path, options = {}) {
  const headers = Object.assign({"authorization": "Bearer " + token}, options.headers || {});
  const response = await fetch(path, Object.assign({}, options, {headers}));
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = (body && body.error) || {};
    throw new Error((error.code || response.status) + ": " + (error.message || response.statusText));
  }
  return body;
}

function cell(row, text, cls) {
  const td = document.createElement("td");
  if (cls) { const pre = document.createElement("pre"); pre.textContent = text; td.appendChild(pre); }
  else td.textContent = text;
  row.appendChild(td);
  return td;
}

function say(text, isError) { $("status").textContent = text; $("status").className = isError ? "error" : ""; }

async function decide(id, decision, reasonInput) {
  try {
    await api("/api/approvals/" + encodeURIComponent(id) + "/" + decision, {
      method: "POST", headers: {"content-type": "application/json"},
      body: JSON.stringify({reason: reasonInput.value || null}),
    });
    say((decision === "approve" ? "Approved " : "Denied ") + id, false);
  } catch (e) { say(e.message, true); }
  refresh();
}

async function refresh(auto) {
  if (!token) return;
  // Not while someone types a reason: the rows are rebuilt on every refresh.
  if (auto === true && document.activeElement && document.activeElement.className === "reason") return;
  let data;
  try { data = await api("/api/approvals?status=pending"); }
  catch (e) { say(e.message, true); return; }
  const body = $("pending").querySelector("tbody");
  body.replaceChildren();
  for (const a of data.approvals) {
    const row = document.createElement("tr");
    row.id = "approval-" + a.id;
    row.dataset.id = a.id;
    cell(row, a.id);
    cell(row, (a.requester && a.requester.name) || "?");
    cell(row, a.model || "");
    cell(row, a.rule + (a.tools && a.tools.length ? " (tools: " + a.tools.join(", ") + ")" : ""));
    cell(row, Math.round(a.age_s) + " s (" + Math.round(a.expires_in_s) + " s left)");
    cell(row, a.preview || "", "pre");
    const td = cell(row, "");
    const reason = document.createElement("input");
    reason.placeholder = "reason"; reason.className = "reason";
    const approve = document.createElement("button");
    approve.textContent = "Approve"; approve.className = "approve";
    approve.addEventListener("click", () => decide(a.id, "approve", reason));
    const deny = document.createElement("button");
    deny.textContent = "Deny"; deny.className = "deny";
    deny.addEventListener("click", () => decide(a.id, "deny", reason));
    td.append(reason, approve, deny);
    body.appendChild(row);
  }
  document.body.dataset.loaded = String(Date.now());
}

$("signin").addEventListener("submit", (event) => {
  event.preventDefault();
  token = $("token").value.trim();
  sessionStorage.setItem("auditgate-token", token);
  $("token").value = "";
  $("whoami").textContent = token ? "signed in" : "";
  refresh();
});
if (token) $("whoami").textContent = "signed in";
refresh();
setInterval(() => refresh(true), 2000);
"""


def admin_application(gate: ApprovalGate) -> web.Application:
    args = {"gate": gate}
    return web.Application([
        (r"/api/approvals/?", ListHandler, args),
        (r"/api/approvals/([A-Za-z0-9_]+)/?", ShowHandler, args),
        (r"/api/approvals/([A-Za-z0-9_]+)/(approve|deny)/?", DecideHandler, args),
        (r"/approvals/?", StaticText, {**args, "body": PAGE, "content_type": "text/html; charset=utf-8"}),
        (r"/approvals\.js", StaticText, {**args, "body": SCRIPT, "content_type": "text/javascript; charset=utf-8"}),
        (r"/approvals\.css", StaticText, {**args, "body": CSS, "content_type": "text/css; charset=utf-8"}),
        (r"/", web.RedirectHandler, {"url": "/approvals"}),
    ], xsrf_cookies=False, compress_response=False)
