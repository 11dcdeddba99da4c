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
    principal_of,
    request_key,
    who,
)
from auditgate.approval.store import (
    APPROVED,
    DENIED,
    EXPIRED,
    ORPHANED,
    PENDING,
    TOO_LATE,
    Approval,
    DecisionTooLate,
    StoreUnavailable,
    ThreadedApprovalStore,
    new_approval_id,
    public_view,
)
from auditgate.approval.stores import choose_store
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
from auditgate.core.options import (
    add_gateway_options,
    instance_id,
    records_dir,
    rules_dir,
)
from auditgate.core.refusal import is_answered, refuse
from auditgate.core.request_facts import facts_of
from auditgate.identity.authenticator import AuthFailure
from auditgate.identity.identities_file import IdentitiesFile, identities_file

logger = logging.getLogger("auditgate.addons.approval")

DEFAULT_ADMIN_LISTEN = "127.0.0.1:8181"
POLL_SECONDS = 1.0  # a held flow also re-reads the store this often: decisions made by another instance
PUSHED_POLL_SECONDS = 5.0  # the same, with a store that tells of decisions at once (PostgreSQL's NOTIFY)
DEFAULT_LEASE_MS = 15_000
MIN_LEASE_MS = 1_000
SWEEP_SECONDS = 1.0  # how often approvals past their expiry, or abandoned by their callers, are closed
SWEEP_SKIP_QUEUED = 4  # calls already waiting on the store thread past which a sweep waits for the next turn
DEFAULT_BUSY_TIMEOUT_MS = 2000
DEFAULT_ABANDONED_GRACE_MS = 5000
MAX_BUSY_TIMEOUT_MS = 60_000
ABANDONED = "the caller went away before a decision"
UNAVAILABLE_CODE = "gateway_approvals_unavailable"
PREVIEW_CHARS = 1200
WEBSOCKET_METHOD = "WEBSOCKET"  # an approval's method when it holds one WebSocket message
MESSAGE_MARK = "#m"  # a held message's subject: <flow id>#m<n>, the n-th message of that flow held
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
        self.store: ThreadedApprovalStore | None = None
        # Which gateway instance this is (gateway_instance; set at `running`, once the listen port is known),
        # and this run of it: the holder of its pending approvals, whose lease keeps them pending.
        self.instance = f"{socket.gethostname()}:{os.getpid()}"
        self.holder = f"{self.instance}/{secrets.token_hex(4)}"
        self._run_token = secrets.token_hex(4)
        self._next_heartbeat = 0.0
        self.masker = None
        self.admin_url = ""
        self._server = None
        self._held: dict[str, list[_Held]] = {}  # approval id → flows waiting on it
        self._by_client: weakref.WeakKeyDictionary[connection.Client, list[_Held]] = weakref.WeakKeyDictionary()
        self.identities: IdentitiesFile | None = None
        self._tasks: set[asyncio.Task] = set()
        # approval id → (time.monotonic() after which it is closed, its flow count when its last caller left)
        self._abandoned: dict[str, tuple[float, int]] = {}
        self._sweeper: asyncio.Task | None = None
        self._last_sweep_error = ""
        self._message_count: dict[str, int] = {}  # WebSocket flow id → its messages held so far

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
        loader.add_option(
            "approval_store_busy_timeout_ms", int, DEFAULT_BUSY_TIMEOUT_MS,
            "How long a call to the approvals store waits for a lock held by another process (ms) before it "
            "fails; a request needing approval is then refused (503 gateway_approvals_unavailable).",
        )
        loader.add_option(
            "gateway_approvals", str, "",
            "Where approvals live: empty for the SQLite file in gateway_records; postgresql://USER:PASSWORD@HOST/DB "
            "(or env:NAME, reading that DSN from the environment) for a PostgreSQL store shared by several "
            "gateway instances.",
        )
        loader.add_option(
            "approval_instance_lease_ms", int, DEFAULT_LEASE_MS,
            "How long (ms) this instance's lease in the approvals store lasts without a heartbeat (renewed every "
            "third of it). Another instance closes this one's pending approvals only once its lease has lapsed.",
        )
        loader.add_option(
            "approval_abandoned_grace_ms", int, DEFAULT_ABANDONED_GRACE_MS,
            "When every caller waiting on a pending approval has gone, how long (ms) an SDK retry has to attach "
            "to it before it is closed as expired.",
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
        if "approval_store_busy_timeout_ms" in updated:
            if not 0 <= ctx.options.approval_store_busy_timeout_ms <= MAX_BUSY_TIMEOUT_MS:
                raise exceptions.OptionsError(f"auditgate: approval_store_busy_timeout_ms must be between 0 and "
                                              f"{MAX_BUSY_TIMEOUT_MS}")
        if "approval_abandoned_grace_ms" in updated and ctx.options.approval_abandoned_grace_ms < 0:
            raise exceptions.OptionsError("auditgate: approval_abandoned_grace_ms must be 0 or more")
        if "approval_instance_lease_ms" in updated and ctx.options.approval_instance_lease_ms < MIN_LEASE_MS:
            raise exceptions.OptionsError(f"auditgate: approval_instance_lease_ms must be at least {MIN_LEASE_MS}")
        if updated & {"gateway_records", "approval_store_busy_timeout_ms", "gateway_approvals"}:
            try:
                choice = choose_store(ctx.options.gateway_approvals, records_dir())
            except ValueError as e:  # its message never quotes the DSN
                raise exceptions.OptionsError(f"auditgate: {e}") from None
            # Opened now, on the store's own thread (the start waits for it): a store that cannot be opened
            # stops the start. Every later call goes through that thread, never the event loop.
            store = choice.threaded(ctx.options.approval_store_busy_timeout_ms / 1000)
            try:
                store.open_now()
            except StoreUnavailable as e:
                store.close()
                option = "gateway_approvals" if choice.kind == "postgresql" else "gateway_records"
                raise exceptions.OptionsError(f"auditgate: {option}: {e}") from None
            if self.store is not None:
                self.store.close()  # its lease stays: this process still holds its requests (in the new store)
            self.store = store
            self._next_heartbeat = 0.0
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
        self.instance = instance_id()
        self.holder = f"{self.instance}/{self._run_token}"
        if self.store is not None:
            try:
                await self._heartbeat(time.time())
                closed = await self._expire_orphans()
            except StoreUnavailable as e:
                logger.error("approvals: could not close the requests held before the last stop: %s", e)
            else:
                if closed:
                    logger.warning("approvals: %d request(s) held before the last stop were closed as expired",
                                   closed)
            self.store.listen(self._changed_elsewhere)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())
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
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self.store is not None:
            self.store.close(release_holder=self.holder)  # its held requests go with it: others close them now
            self.store = None

    # ---- instances ------------------------------------------------------------------------------------
    async def _heartbeat(self, now: float) -> None:
        lease_s = ctx.options.approval_instance_lease_ms / 1000
        await self.store.heartbeat(self.holder, self.instance, now, lease_s)
        self._next_heartbeat = now + lease_s / 3

    async def _expire_orphans(self) -> int:
        """Close the pending approvals of processes whose lease lapsed (stopped, or killed): their flows are gone."""
        closed = await self.store.expire_orphans(self.holder, time.time())
        for approval in closed:
            logger.info("approvals: %s (held by %s) expired: %s", approval.id, approval.instance, ORPHANED)
            self._audit_or_log(approval, None, EXPIRED, ORPHANED, holder=approval.holder)
            self._wake(approval.id)
        return len(closed)

    def _changed_elsewhere(self, approval_id: str | None) -> None:
        """The store told of a change (a decision on another instance): the flows waiting on it re-read it now."""
        if approval_id is None:
            for waiting in list(self._held):
                self._wake(waiting)
        else:
            self._wake(approval_id)

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

    async def decide(self, approval_id: str, decision: str, decider: dict, reason: str | None) -> Approval:
        """Approve or deny for `decider`. DecisionRefused (recorded) when four-eyes, the state or the expiry
        forbids it, or when the audit log cannot record the decision (503 audit_unavailable: a decision that
        cannot be audited does not stand); StoreUnavailable when the store cannot answer."""
        if self.store is None:
            raise StoreUnavailable("the approvals store is not configured")
        approval = await self.store.get(approval_id)
        if approval is None:
            raise DecisionRefused(404, "not_found", f"no approval {approval_id!r}")
        status = APPROVED if decision == "approve" else DENIED
        audited: list[Approval] = []

        def audit(decided: Approval) -> None:
            # On the loop, inside the store's transaction: if the entry cannot be written, the store rolls back.
            self._audit(decided, decider.get("name"), decided.status, reason, approver_principal=principal_of(decider))
            audited.append(decided)

        try:
            check_decider(requester=approval.requester, approver_groups=approval.approver_groups,
                          status=approval.status, decider=decider, decision=decision)
            # now=None: the store reads the clock once it holds the write lock, and compares it with the
            # expiry in the same UPDATE (a decision that waited for the lock past the expiry does not stand).
            decided = await self.store.decide(approval_id, status, who(decider), reason, None, before_commit=audit)
        except DecisionTooLate as late:
            closed = late.approval or approval
            logger.warning("approvals: %s tried to %s %s after its expiry: refused, closed as expired",
                           decider.get("name"), decision, approval_id)
            self._audit_or_log(closed, None, EXPIRED, TOO_LATE)
            await self._record_refusal(closed, decider, decision, late)
            self._wake(approval_id)
            raise
        except DecisionRefused as refused:
            if refused.code in ("self_approval_refused", "not_an_approver"):
                logger.warning("approvals: %s may not %s %s: %s", decider.get("name"), decision, approval_id,
                               refused.code)
                await self._record_refusal(approval, decider, decision, refused)
            raise
        except AuditUnavailable as e:
            logger.error("approvals: %s's decision to %s %s was NOT taken: the audit log cannot record it (%s)",
                         decider.get("name"), decision, approval_id, e)
            raise DecisionRefused(503, "audit_unavailable", "the decision was not taken: the gateway cannot "
                                  "record it in its audit log right now; try again later") from None
        except StoreUnavailable:
            if audited:  # the audit entry is written and the store could not commit: the log must say so
                logger.error("approvals: %s's decision to %s %s is in the audit log but the approvals store could "
                             "not commit it: it does not stand", decider.get("name"), decision, approval_id)
                self._audit_or_log(audited[0], decider.get("name"), "decision_not_stored",
                                   "the approvals store could not commit the decision above; it does not stand",
                                   approver_principal=principal_of(decider))
            raise
        logger.info("approvals: %s %s %s (rule %s, requested by %s)", decider.get("name"),
                    "approved" if decision == "approve" else "denied", approval_id, approval.rule,
                    approval.requester.get("name"))
        self._wake(approval_id)
        return decided

    async def _record_refusal(self, approval: Approval, decider: dict, decision: str, refused: DecisionRefused) -> None:
        """A refused attempt to decide: kept with the approval and in the audit log (the refusal stands either
        way), named like the decision it tried to make, as the evidence report counts them."""
        entry = {"by": who(decider), "decision": decision, "code": refused.code, "at": time.time()}
        try:
            await self.store.add_refusal(approval.id, entry)
        except StoreUnavailable as e:
            logger.error("approvals: the refused attempt on %s could not be kept with it: %s", approval.id, e)
        attempted = "refused_approved" if decision == "approve" else "refused_denied"
        self._audit_or_log(approval, decider.get("name"), attempted, refused.message, code=refused.code,
                           approver_principal=principal_of(decider))

    def public(self, approval: Approval, viewer: dict | None = None) -> dict:
        return public_view(approval, time.time(), viewer)

    # ---- the hold --------------------------------------------------------------------------------------
    async def request(self, flow: http.HTTPFlow) -> None:
        if not flow.live or is_answered(flow):
            return
        policy = POLICY.get(flow) or {}
        if policy.get("action") != "require_approval":
            return
        if self.store is None:
            refuse(flow, 403, "gateway_approval_unavailable", "the approvals store is not available")
            return
        try:
            await self._request(flow, policy)
        except StoreUnavailable as e:
            logger.error("approvals: a request for rule %s was refused: %s", policy.get("rule"), e)
            self._refuse_for(flow, policy, "store_unavailable", UNAVAILABLE_CODE,
                             "the approvals store is unavailable, so this request, which needs an approval, was "
                             "not sent; try again later")
        except AuditUnavailable as e:
            logger.error("approvals: a request for rule %s was refused: the audit log cannot record it: %s",
                         policy.get("rule"), e)
            self._refuse_for(flow, policy, "audit_unavailable", "gateway_audit_unavailable",
                             "the gateway cannot record the request for approval in its audit log, so it was not "
                             "sent; try again later")

    def _refuse_for(self, flow: http.HTTPFlow, policy: dict, status: str, code: str, message: str) -> None:
        """Refuse (503) a request whose approval could not be handled; the approval record says why."""
        record = APPROVAL.get(flow) or {"rule": str(policy.get("rule")), "requester": name_of(IDENTITY.get(flow))}
        APPROVAL.set(flow, {**record, "status": status})
        if not is_answered(flow):
            refuse(flow, 503, code, message)
            self._show(flow, f"refused: {status.replace('_', ' ')}", ":no_entry:")

    async def _request(self, flow: http.HTTPFlow, policy: dict) -> None:
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
            if await self.store.claim(approval.id, flow.id, time.time()):
                verb = "reused approval" if record.get("status") == "reused" else "approved"
                self._show(flow, f"{verb} {approval.id} by {name_of(approval.decided_by)}", ":white_check_mark:")
                return
        refuse(flow, 403, "gateway_approval_denied", "an identical request was approved once and already sent")

    async def _hold(self, flow: http.HTTPFlow, policy: dict, started: float) -> tuple[Approval | None, dict]:
        """Wait for the approval this request needs; None once the flow has been answered instead."""
        now = time.time()
        # The "requested" audit entry is written before the new approval is committed: no approval exists
        # that the audit log does not know of (AuditUnavailable: nothing is held, the request is refused).
        approval, how = await self.store.hold(
            self._candidate(flow, policy, now), flow.id, now,
            on_create=lambda created: self._audit(created, None, "requested", None))
        record = {"id": approval.id, "rule": approval.rule, "requester": approval.requester.get("name"),
                  "how": how, "requested_at": approval.created_at}
        APPROVAL.set(flow, record)
        if how == "created":
            logger.info("approvals: holding %s from %s for rule %s (%s)", approval.id, approval.requester.get("name"),
                        approval.rule, self.page_url)
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
            if approval.status == PENDING:
                await self._abandon(approval.id)
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

    # ---- one WebSocket message ------------------------------------------------------------------------
    async def hold_message(self, flow: http.HTTPFlow, policy: dict, prompt_texts: list[str]) -> dict:
        """Hold ONE client message of a WebSocket flow for a second person's decision, through the same
        store, page, CLI and webhook as HTTP requests; the connection goes on meanwhile (the caller drops
        the message and re-sends it when granted). Returns an ApprovalRecord whose "status" is granted,
        denied, expired (timed out, or the client left) or unavailable (store or audit log down: the
        message must be dropped). Four-eyes, timeouts, reuse windows and the audit entries are those of
        HTTP approvals; each message is its own subject ("<flow id>#m<n>"), so one approval sends one
        message unless its rule's reuse window is open."""
        self._message_count[flow.id] = number = self._message_count.get(flow.id, 0) + 1
        subject = f"{flow.id}{MESSAGE_MARK}{number}"
        record: dict = {"rule": str(policy.get("rule")), "requester": name_of(IDENTITY.get(flow))}
        if self.store is None:
            return {**record, "status": "unavailable", "reason": "the approvals store is not available"}
        started = time.time()
        try:
            return await self._hold_message(flow, policy, prompt_texts, subject, record, started)
        except StoreUnavailable as e:
            logger.error("approvals: a WebSocket message for rule %s was refused: %s", policy.get("rule"), e)
            reason = "the approvals store is unavailable"
        except AuditUnavailable as e:
            logger.error("approvals: a WebSocket message for rule %s was refused: the audit log cannot record it: "
                         "%s", policy.get("rule"), e)
            reason = "the audit log cannot record the request for approval"
        return {**record, "status": "unavailable", "reason": reason, "waited_s": round(time.time() - started, 3)}

    async def _hold_message(self, flow: http.HTTPFlow, policy: dict, prompt_texts: list[str], subject: str,
                            record: dict, started: float) -> dict:
        body = "\n".join(prompt_texts).encode()
        for _ in range(3):  # as _request: an identical message finding its approval used asks again (bounded)
            now = time.time()
            approval, how = await self.store.hold(
                self._message_candidate(flow, policy, prompt_texts, body, now), subject, now,
                on_create=lambda created: self._audit(created, None, "requested", None))
            record.update(id=approval.id, rule=approval.rule, requester=approval.requester.get("name"), how=how,
                          requested_at=approval.created_at)
            if how == "created":
                logger.info("approvals: holding %s (a WebSocket message) from %s for rule %s (%s)", approval.id,
                            approval.requester.get("name"), approval.rule, self.page_url)
                self._notify(approval)
            held = _Held(flow, approval.id)
            if how != "reused":
                self._held.setdefault(approval.id, []).append(held)
                self._by_client.setdefault(flow.client_conn, []).append(held)
                try:
                    approval = await self._wait(held, approval)
                except asyncio.CancelledError:
                    held.abandoned = True  # the session ended: nobody waits for this message any more
                    raise
                finally:
                    self._forget(held)
                    if held.abandoned:
                        self._abandon_later(approval.id)
            record.update(waited_s=round(time.time() - started, 3), decided_by=name_of(approval.decided_by),
                          decided_at=approval.decided_at, reason=approval.reason, refusals=approval.refusals)
            if held.abandoned and approval.status in (PENDING, APPROVED):
                return {**record, "status": EXPIRED, "reason": ABANDONED}
            if approval.status == DENIED:
                return {**record, "status": DENIED}
            if approval.status != APPROVED:
                return {**record, "status": EXPIRED}
            if await self.store.claim(approval.id, subject, time.time()):
                return {**record, "status": "granted", "how": how}
        return {**record, "status": DENIED, "reason": "an identical message was approved once and already sent"}

    def _abandon_later(self, approval_id: str) -> None:
        """_abandon from a place that may be unwinding a cancellation: in a task of its own."""
        task = asyncio.get_running_loop().create_task(self._abandon(approval_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _message_candidate(self, flow: http.HTTPFlow, policy: dict, prompt_texts: list[str], body: bytes,
                           now: float) -> Approval:
        identity = IDENTITY.get(flow) or {}
        upstream = UPSTREAM.get(flow) or {}
        request = flow.request
        host, port = str(upstream.get("host", request.host)), int(upstream.get("port", request.port))
        caller = principal_of(identity) or f"name:{identity.get('name')}"
        # Keyed like a request, on the message's text: a resent identical message attaches to its approval.
        key, body_hash = request_key(caller, WEBSOCKET_METHOD, host, port, request.path.split("?", 1)[0], body)
        return Approval(
            id=new_approval_id(), key=key, rule=str(policy.get("rule")), requester=identity,
            approver_groups=list(policy.get("approvers") or ()), created_at=now,
            expires_at=now + float(policy.get("timeout_s", 300)), reuse_seconds=float(policy.get("reuse_s", 0)),
            model=request.query.get("model"), method=WEBSOCKET_METHOD, host=host,
            path=request.path.split("?", 1)[0], body_sha256=body_hash, preview=self._preview(prompt_texts),
            instance=self.instance, holder=self.holder,
        )

    def _candidate(self, flow: http.HTTPFlow, policy: dict, now: float) -> Approval:
        identity = IDENTITY.get(flow) or {}
        upstream = UPSTREAM.get(flow) or {}
        request, facts = flow.request, facts_of(flow)
        host, port = str(upstream.get("host", request.host)), int(upstream.get("port", request.port))
        # Keyed by the caller's principal: two callers whose names read alike never share an approval.
        caller = principal_of(identity) or f"name:{identity.get('name')}"
        key, body_hash = request_key(caller, request.method, host, port, facts.path, request.raw_content)
        return Approval(
            id=new_approval_id(), key=key, rule=str(policy.get("rule")), requester=identity,
            approver_groups=list(policy.get("approvers") or ()), created_at=now,
            expires_at=now + float(policy.get("timeout_s", 300)), reuse_seconds=float(policy.get("reuse_s", 0)),
            model=facts.model, method=request.method, host=host, path=facts.path,
            body_sha256=body_hash, preview=self._preview(facts.prompt_texts), tools=facts.tool_names,
            instance=self.instance, holder=self.holder,
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
                # StoreUnavailable here ends the hold with a refusal: the flow never outlives the expiry.
                try:
                    approval = await self.store.decide(approval.id, EXPIRED, None, "not decided in time", now)
                except DecisionRefused:
                    approval = await self.store.get(approval.id) or approval
                    continue
                self._audit_or_log(approval, None, EXPIRED, "not decided in time")
                self._wake(approval.id)
                logger.info("approvals: %s expired (rule %s)", approval.id, approval.rule)
                continue
            poll = PUSHED_POLL_SECONDS if self.store.pushes_changes else POLL_SECONDS
            try:
                await asyncio.wait_for(held.woken.wait(), min(poll, approval.expires_at - now))
            except TimeoutError:
                pass
            held.woken.clear()
            try:
                approval = await self.store.get(approval.id) or approval
            except StoreUnavailable as e:
                # Keep waiting on what was last read (a decision cannot be committed meanwhile either).
                logger.warning("approvals: %s could not be re-read: %s", approval.id, e)

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

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        self._message_count.pop(flow.id, None)

    def client_disconnected(self, client: connection.Client) -> None:
        # mitmproxy lets a hook run on after its client left; a held flow then must not go upstream
        # when approved (the SDK's retry, attached to the same approval, goes instead), and its approval
        # is closed once no retry has come for it (_abandon).
        for held in self._by_client.pop(client, []):
            held.abandoned = True
            held.woken.set()

    # ---- closing what nobody waits for any more ----------------------------------------------------------
    async def _abandon(self, approval_id: str) -> None:
        """Every caller of this pending approval here has gone: close it after the grace period unless a
        retry attaches meanwhile (here, or through another instance: its flow count then differs)."""
        if self._held.get(approval_id):
            return  # another flow still waits on it here
        try:
            current = await self.store.get(approval_id)
        except StoreUnavailable as e:
            logger.warning("approvals: %s was abandoned and could not be re-read: %s", approval_id, e)
            return  # it stays pending until its expiry, when the sweep closes it
        if current is not None and current.status == PENDING:
            grace = ctx.options.approval_abandoned_grace_ms / 1000
            self._abandoned[approval_id] = (time.monotonic() + grace, len(current.flows))

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            try:
                await self._sweep()
            except StoreUnavailable as e:
                if str(e) != self._last_sweep_error:  # once per distinct failure, not every second
                    logger.warning("approvals: could not close expired or abandoned approvals: %s", e)
                self._last_sweep_error = str(e)
            except Exception as e:  # the sweep must outlive any one failure
                logger.error("approvals: the sweep of expired approvals failed: %s", e, exc_info=e)
            else:
                self._last_sweep_error = ""

    async def _sweep(self) -> None:
        """Close abandoned approvals whose grace ran out, and any pending approval past its expiry (a held flow
        closes its own; this closes those nobody waits on, and those of instances that are gone)."""
        if self.store is None or self.store.queued >= SWEEP_SKIP_QUEUED:
            return  # the store is backed up (locked, slow): not one more call on the pile; next time
        monotonic = time.monotonic()
        for approval_id, (deadline, flows_seen) in list(self._abandoned.items()):
            if deadline > monotonic:
                continue
            if not self._held.get(approval_id):
                closed = await self.store.cancel_abandoned(approval_id, flows_seen, time.time(), ABANDONED)
                if closed is not None:
                    logger.info("approvals: %s closed as expired: %s", approval_id, ABANDONED)
                    self._audit_or_log(closed, None, EXPIRED, ABANDONED)
            self._abandoned.pop(approval_id, None)
        for approval in await self.store.expire_overdue(time.time()):
            logger.info("approvals: %s expired (rule %s)", approval.id, approval.rule)
            self._audit_or_log(approval, None, EXPIRED, "not decided in time")
            self._wake(approval.id)
        now = time.time()
        if now >= self._next_heartbeat:
            await self._heartbeat(now)
            await self._expire_orphans()

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
        """One approval entry in the audit log; AuditUnavailable when it cannot be written (whatever failed)."""
        events = services.audit_events
        if events is None:
            return  # no audit log in this bundle (the addon loaded alone)
        # The principals (stable subjects) beside the names: who approved whose request is compared on them.
        flow_id, _, message = (approval.flows[0] if approval.flows else "").partition(MESSAGE_MARK)
        if message:  # a held WebSocket message: its flow, and which of the flow's held messages it is
            details = {"message": int(message), **details}
        fields = {"flow_id": flow_id or None,
                  "requester": approval.requester.get("name"), "approver": approver, "decision": decision,
                  "reason": reason, "details": {"approval_id": approval.id, "rule": approval.rule,
                                                "requester_principal": approval.requester_principal, **details}}
        try:
            events.append_event("approval", fields)
        except AuditUnavailable:
            raise
        except Exception as e:
            raise AuditUnavailable(f"{type(e).__name__}: {e}") from e

    def _audit_or_log(self, approval: Approval, approver: str | None, decision: str, reason: str | None,
                      **details) -> None:
        """For what stands whether or not it is audited (an expiry, a refused attempt): a missing entry is an
        error in the log, never silent."""
        try:
            self._audit(approval, approver, decision, reason, **details)
        except AuditUnavailable as e:
            logger.error("approvals: the audit log could not record %s %s: %s", approval.id, decision, e)


addons = [ApprovalGate()]
