"""Holds requests that policy.yaml sends for approval until a second person decides, or the rule's timeout passes."""

import asyncio
import hashlib
import logging
import os
import secrets
import socket
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from mitmproxy import connection, ctx, exceptions, hooks, http

from auditgate.approval.admin import parse_listen
from auditgate.approval.rules import (
    DecisionRefused,
    check_decider,
    name_of,
    request_key,
    who,
)
from auditgate.approval.store import (
    APPROVED,
    DENIED,
    EXPIRED,
    PENDING,
    STORE_FILE,
    Approval,
    ApprovalStore,
    SqliteApprovalStore,
    new_approval_id,
    public_view,
)
from auditgate.approval.webhook import post_webhook, webhook_message
from auditgate.core.config import ConfigError
from auditgate.core.flow_contract import (
    APPROVAL,
    IDENTITY,
    POLICY,
    UPSTREAM,
    AuditUnavailable,
    services,
)
from auditgate.core.options import add_gateway_options, records_dir, rules_dir
from auditgate.core.refusal import fails_closed, is_answered, refuse
from auditgate.core.request_facts import facts_of
from auditgate.identity.authenticator import AuthFailure
from auditgate.identity.identities_file import IdentitiesFile, identities_file

logger = logging.getLogger("auditgate.addons.approval")

DEFAULT_ADMIN_LISTEN = "127.0.0.1:8181"
POLL_SECONDS = 1.0  # a held flow also re-reads the store this often: decisions made by another instance
PREVIEW_CHARS = 1200
_MASK_WINDOW = 4000


@dataclass
class _Held:
    """A flow waiting inside its request hook."""

    flow: http.HTTPFlow
    approval_id: str
    woken: asyncio.Event = field(default_factory=asyncio.Event)
    abandoned: bool = False


class ApprovalGate:
    """Holds require_approval flows in an async hook (never mitmproxy's intercept), serving the admin API and page."""

    def __init__(self) -> None:
        self.store: ApprovalStore | None = None
        self.instance = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.masker = None
        self.admin_url = ""
        self._server = None
        self._held: dict[str, list[_Held]] = {}  # approval id → flows waiting on it
        self._by_client: weakref.WeakKeyDictionary[connection.Client, list[_Held]] = weakref.WeakKeyDictionary()
        self.identities: IdentitiesFile | None = None
        self._tasks: set[asyncio.Task] = set()

    # ---- options and lifecycle ----------------------------------------------------------------------
    def load(self, loader) -> None:
        services.approval_gate = self  # policy sends require_approval flows here; without a gate it refuses them
        add_gateway_options(loader)
        loader.add_option(
            "approval_admin_listen", str, DEFAULT_ADMIN_LISTEN,
            "HOST:PORT of the approvals admin listener (API and approver page); port 0 picks a free one.",
        )
        loader.add_option(
            "approval_page_url", str, "",
            "The approver page's URL as approvers reach it (for webhook links); default: the admin listener's.",
        )
        loader.add_option(
            "approval_webhook_url", str, "",
            "Slack-compatible incoming webhook told about each new held request; 'env:NAME' reads it from the "
            "environment. Empty: no notification.",
        )

    def configure(self, updated: set[str]) -> None:
        if "approval_admin_listen" in updated:
            try:
                parse_listen(ctx.options.approval_admin_listen)
            except ValueError as e:
                raise exceptions.OptionsError(f"auditgate: {e}") from None
        if "approval_webhook_url" in updated and ctx.options.approval_webhook_url:
            url = self._webhook_url()
            if not url or not url.startswith(("http://", "https://")):
                raise exceptions.OptionsError("auditgate: approval_webhook_url must be an http(s) URL (or env:NAME "
                                              "naming one)")
        if "gateway_records" in updated:
            try:
                store = SqliteApprovalStore(records_dir() / STORE_FILE)
            except Exception as e:
                raise exceptions.OptionsError(f"auditgate: gateway_records: approvals store "
                                              f"{records_dir() / STORE_FILE}: {e}") from None
            if self.store is not None:
                self.store.close()
            self.store = store
        if "gateway_rules" in updated:
            try:
                self.identities = identities_file(rules_dir())
                self.masker = self._build_masker(rules_dir())
            except ConfigError as e:
                raise exceptions.OptionsError(f"auditgate: {e}") from None

    @staticmethod
    def _build_masker(directory: Path):
        from auditgate.masking.config import load_masking_settings

        settings = load_masking_settings(directory)
        if settings is None:
            return None
        from auditgate.masking.engine import shared_masker

        return shared_masker(settings)

    @staticmethod
    def _webhook_url() -> str:
        value = ctx.options.approval_webhook_url
        return os.environ.get(value[4:], "") if value.startswith("env:") else value

    async def running(self) -> None:
        if self.store is not None:
            closed = self.store.expire_orphans(self.instance, time.time())
            if closed:
                logger.warning("approvals: %d request(s) held before the last stop were closed as expired", closed)
        if self._server is None:
            await self._start_admin()

    async def _start_admin(self) -> None:
        from tornado.httpserver import HTTPServer
        from tornado.netutil import bind_sockets

        from auditgate.approval.admin import admin_application

        host, port = parse_listen(ctx.options.approval_admin_listen)
        try:
            sockets = bind_sockets(port, host)
        except OSError as e:
            # Not fatal (another gateway on this machine may hold the port): held requests can then only
            # time out, which fails closed.
            logger.warning("approvals: the admin listener could not listen on %s:%d (%s); held requests can only "
                           "time out. Set approval_admin_listen.", host, port, e.strerror)
            return
        self._server = HTTPServer(admin_application(self), xheaders=False)
        self._server.add_sockets(sockets)
        bound = sockets[0].getsockname()
        shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        self.admin_url = f"http://{shown}:{bound[1]}"
        logger.info("approvals: admin API and approver page at %s/approvals", self.admin_url)

    def done(self) -> None:
        if services.approval_gate is self:
            services.approval_gate = None
        if self._server is not None:
            self._server.stop()
            self._server = None
        for task in self._tasks:
            task.cancel()
        if self.store is not None:
            self.store.close()
            self.store = None

    @property
    def page_url(self) -> str:
        if ctx.options.approval_page_url:
            return ctx.options.approval_page_url
        return f"{self.admin_url}/approvals" if self.admin_url else "(no admin listener)"

    # ---- approvers -----------------------------------------------------------------------------------
    async def authenticate(self, credential: str | None) -> dict | AuthFailure:
        """An approver's identity: the same service tokens and OIDC issuers as callers (identities.yaml)."""
        if self.identities is None:
            return AuthFailure("the gateway has no identities loaded", "none")
        result = await self.identities.current().authenticator.authenticate(credential)
        return result if isinstance(result, AuthFailure) else result.as_metadata()

    def decide(self, approval_id: str, decision: str, decider: dict, reason: str | None) -> Approval:
        """Approve or deny for `decider`; DecisionRefused (recorded) when four-eyes or the state forbids it."""
        assert self.store is not None
        approval = self.store.get(approval_id)
        if approval is None:
            raise DecisionRefused(404, "not_found", f"no approval {approval_id!r}")
        try:
            check_decider(requester=approval.requester, approver_groups=approval.approver_groups,
                          status=approval.status, decider=decider, decision=decision)
            decided = self.store.decide(approval_id, APPROVED if decision == "approve" else DENIED,
                                        who(decider), reason, time.time())
        except DecisionRefused as refused:
            if refused.code in ("self_approval_refused", "not_an_approver"):
                entry = {"by": who(decider), "decision": decision, "code": refused.code, "at": time.time()}
                self.store.add_refusal(approval_id, entry)
                # Named like the decision it tried to make, as the audit log's evidence report counts them.
                attempted = "refused_approved" if decision == "approve" else "refused_denied"
                self._audit(approval, decider.get("name"), attempted, refused.message, code=refused.code)
                logger.warning("approvals: %s may not %s %s: %s", decider.get("name"), decision, approval_id,
                               refused.code)
            raise
        logger.info("approvals: %s %s %s (rule %s, requested by %s)", decider.get("name"),
                    "approved" if decision == "approve" else "denied", approval_id, approval.rule,
                    approval.requester.get("name"))
        self._audit(decided, decider.get("name"), decided.status, reason)
        self._wake(approval_id)
        return decided

    def public(self, approval: Approval) -> dict:
        return public_view(approval, time.time())

    # ---- the hold --------------------------------------------------------------------------------------
    @fails_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        if not flow.live or is_answered(flow):
            return
        policy = POLICY.get(flow) or {}
        if policy.get("action") != "require_approval":
            return
        if self.store is None:
            refuse(flow, 403, "gateway_approval_unavailable", "the approvals store is not available")
            return
        started = time.time()
        # One approval sends one request upstream: an identical request that finds it already used
        # (and no reuse window open) asks again (bounded).
        for _ in range(3):
            approval, record = await self._hold(flow, policy, started)
            if approval is None:
                return  # answered: denied, timed out, or abandoned
            # The request goes upstream exactly as approved: a body edited while held (mitmweb) is refused.
            if hashlib.sha256(flow.request.raw_content or b"").hexdigest() != approval.body_sha256:
                record["status"] = "changed_while_held"
                refuse(flow, 403, "gateway_approval_denied", f"request {approval.id} changed while it was held")
                return
            if self.store.claim(approval.id, flow.id, time.time()):
                verb = "reused approval" if record.get("status") == "reused" else "approved"
                self._show(flow, f"{verb} {approval.id} by {name_of(approval.decided_by)}", ":white_check_mark:")
                return
        refuse(flow, 403, "gateway_approval_denied", "an identical request was approved once and already sent")

    async def _hold(self, flow: http.HTTPFlow, policy: dict, started: float) -> tuple[Approval | None, dict]:
        """Wait for the approval this request needs; None once the flow has been answered instead."""
        now = time.time()
        approval, how = self.store.hold(self._candidate(flow, policy, now), flow.id, now)
        record = {"id": approval.id, "rule": approval.rule, "requester": approval.requester.get("name"),
                  "how": how, "requested_at": approval.created_at}
        APPROVAL.set(flow, record)
        if how == "created":
            logger.info("approvals: holding %s from %s for rule %s (%s)", approval.id, approval.requester.get("name"),
                        approval.rule, self.page_url)
            self._audit(approval, None, "requested", None)
            self._notify(approval)
        held = _Held(flow, approval.id)
        if how != "reused":
            self._held.setdefault(approval.id, []).append(held)
            self._by_client.setdefault(flow.client_conn, []).append(held)
            self._show(flow, f"held for approval {approval.id} (rule {approval.rule})", ":hourglass_flowing_sand:")
            try:
                approval = await self._wait(held, approval)
            finally:
                self._forget(held)
        record["waited_s"] = round(time.time() - started, 3)
        if held.abandoned and approval.status in (PENDING, APPROVED):
            record["status"] = "abandoned"
            refuse(flow, 408, "gateway_approval_abandoned", "the caller went away while the request was held")
            return None, record
        record.update(status="reused" if how == "reused" else approval.status, decided_by=name_of(approval.decided_by),
                      decided_at=approval.decided_at, reason=approval.reason, refusals=approval.refusals)
        if approval.status == APPROVED:
            return approval, record
        if approval.status == DENIED:
            message = f"request {approval.id} was denied by {name_of(approval.decided_by)}"
            message += f": {approval.reason}" if approval.reason else ""
            refuse(flow, 403, "gateway_approval_denied", message)
            self._show(flow, f"approval {approval.id} denied by {name_of(approval.decided_by)}", ":no_entry:")
        else:
            refuse(flow, 403, "gateway_approval_timeout",
                   f"request {approval.id} was not approved within {approval.expires_at - approval.created_at:g}s "
                   f"(policy rule '{approval.rule}')")
            self._show(flow, f"approval {approval.id} timed out", ":alarm_clock:")
        return None, record

    def _candidate(self, flow: http.HTTPFlow, policy: dict, now: float) -> Approval:
        identity = IDENTITY.get(flow) or {}
        upstream = UPSTREAM.get(flow) or {}
        request, facts = flow.request, facts_of(flow)
        host, port = str(upstream.get("host", request.host)), int(upstream.get("port", request.port))
        key, body_hash = request_key(str(identity.get("name")), request.method, host, port, facts.path,
                                     request.raw_content)
        return Approval(
            id=new_approval_id(), key=key, rule=str(policy.get("rule")), requester=identity,
            approver_groups=list(policy.get("approvers") or ()), created_at=now,
            expires_at=now + float(policy.get("timeout_s", 300)), reuse_seconds=float(policy.get("reuse_s", 0)),
            model=facts.model, method=request.method, host=host, path=facts.path,
            body_sha256=body_hash, preview=self._preview(facts.prompt_texts), tools=facts.tool_names,
            instance=self.instance,
        )

    def _preview(self, prompt_texts: list[str]) -> str:
        """The end of the prompt text, masked (never shown unmasked: no engine, no preview)."""
        if self.masker is None:
            return "(no preview: the masking engine is not configured)"
        text = "\n---\n".join(prompt_texts)
        if not text:
            return ""
        # Mask a wide window before cutting, so the cut can never split a value and show half of it.
        window = text[-_MASK_WINDOW:]
        try:
            spans = self.masker.find(window, self.masker.supported)
            masked = self.masker.apply(window, spans)
        except Exception as e:  # no preview rather than an unmasked one
            logger.warning("approvals: the preview could not be masked: %s", e)
            return "(no preview: masking failed)"
        return ("…" if len(text) > PREVIEW_CHARS else "") + masked[-PREVIEW_CHARS:]

    async def _wait(self, held: _Held, approval: Approval) -> Approval:
        while True:
            if approval.status != PENDING or held.abandoned:
                return approval
            now = time.time()
            if now >= approval.expires_at:
                try:
                    approval = self.store.decide(approval.id, EXPIRED, None, "not decided in time", now)
                    self._audit(approval, None, EXPIRED, "not decided in time")
                    self._wake(approval.id)
                    logger.info("approvals: %s expired (rule %s)", approval.id, approval.rule)
                except DecisionRefused:
                    approval = self.store.get(approval.id) or approval
                continue
            try:
                await asyncio.wait_for(held.woken.wait(), min(POLL_SECONDS, approval.expires_at - now))
            except TimeoutError:
                pass
            held.woken.clear()
            approval = self.store.get(approval.id) or approval

    def _show(self, flow: http.HTTPFlow, comment: str, mark: str) -> None:
        flow.comment, flow.marked = comment, mark
        # mitmweb's view refreshes the flow on an update event: the hold is visible while it lasts.
        ctx.master.addons.trigger(hooks.UpdateHook([flow]))

    def _wake(self, approval_id: str) -> None:
        for held in self._held.get(approval_id, ()):
            held.woken.set()

    def _forget(self, held: _Held) -> None:
        waiting = self._held.get(held.approval_id, [])
        if held in waiting:
            waiting.remove(held)
        if not waiting:
            self._held.pop(held.approval_id, None)
        by_client = self._by_client.get(held.flow.client_conn, [])
        if held in by_client:
            by_client.remove(held)

    def client_disconnected(self, client: connection.Client) -> None:
        # mitmproxy lets a hook run on after its client left; a held flow then must not go upstream
        # when approved (the SDK's retry, attached to the same approval, goes instead).
        for held in self._by_client.pop(client, []):
            held.abandoned = True
            held.woken.set()

    # ---- telling people ---------------------------------------------------------------------------------
    def _notify(self, approval: Approval) -> None:
        url = self._webhook_url()
        if not url:
            return
        payload = webhook_message(approval, self.page_url)

        async def send() -> None:
            try:
                await asyncio.to_thread(post_webhook, url, payload)
            except Exception as e:  # the URL is a secret: never logged
                logger.warning("approvals: the webhook notification for %s failed: %s", approval.id,
                               type(e).__name__)

        task = asyncio.get_running_loop().create_task(send())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    def _audit(approval: Approval, approver: str | None, decision: str, reason: str | None, **details) -> None:
        events = services.audit_events
        if events is None:
            return
        fields = {"flow_id": approval.flows[0] if approval.flows else None,
                  "requester": approval.requester.get("name"), "approver": approver, "decision": decision,
                  "reason": reason, "details": {"approval_id": approval.id, "rule": approval.rule, **details}}
        try:
            events.append_event("approval", fields)
        except AuditUnavailable as e:
            logger.debug("approvals: no audit entry for %s %s: %s", approval.id, decision, e)


addons = [ApprovalGate()]
