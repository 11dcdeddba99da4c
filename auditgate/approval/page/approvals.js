// Built with textContent only: nothing a caller sent is ever parsed as HTML.
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

// Who asked: the name as it shows (invisible characters removed) and, beneath, the stable subject four-eyes
// compares, so that two callers whose names look alike are told apart; a name that shows differently from how
// it is spelled says so.
function requesterText(a) {
  const raw = (a.requester && a.requester.name) || "?";
  const shown = a.requester_display || raw;
  const altered = shown !== raw ? " [name has hidden or look-alike characters]" : "";
  return shown + altered + (a.requester_principal ? "\n" + a.requester_principal : "");
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
  if (data.viewer) {
    $("whoami").textContent = "signed in as " + (data.viewer.display || data.viewer.name || "?") +
      (data.viewer.principal ? " (" + data.viewer.principal + ")" : "");
  }
  const body = $("pending").querySelector("tbody");
  body.replaceChildren();
  for (const a of data.approvals) {
    const row = document.createElement("tr");
    row.id = "approval-" + a.id;
    row.dataset.id = a.id;
    cell(row, a.id);
    cell(row, requesterText(a), "pre");
    cell(row, a.model || "");
    cell(row, a.rule + (a.tools && a.tools.length ? " (tools: " + a.tools.join(", ") + ")" : ""));
    cell(row, Math.round(a.age_s) + " s (" + Math.round(a.expires_in_s) + " s left)");
    cell(row, a.preview || "", "pre");
    const td = cell(row, "");
    // Only the decisions the gateway would take from this caller (it checks again on every click).
    const may = a.viewer_may || [];
    const reason = document.createElement("input");
    reason.placeholder = "reason"; reason.className = "reason";
    if (may.length) td.append(reason);
    if (may.includes("approve")) {
      const approve = document.createElement("button");
      approve.textContent = "Approve"; approve.className = "approve";
      approve.addEventListener("click", () => decide(a.id, "approve", reason));
      td.append(approve);
    }
    if (may.includes("deny")) {
      const deny = document.createElement("button");
      // A requester's own request: withdrawing it is the one decision open to them.
      deny.textContent = may.includes("approve") ? "Deny" : "Withdraw"; deny.className = "deny";
      deny.addEventListener("click", () => decide(a.id, "deny", reason));
      td.append(deny);
    }
    if (!may.length) td.textContent = "waiting for an approver";
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
