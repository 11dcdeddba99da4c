"""Applies rules/policy.yaml to every authenticated request: allow, block (403 gateway_blocked), log, or hold for approval."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from mitmproxy import command, http

from auditgate.core.config import ConfigError
from auditgate.core.file_watch import ChangedFile
from auditgate.core.flow_contract import (
    IDENTITY,
    POLICY,
    UPSTREAM,
    services,
)
from auditgate.core.options import add_gateway_options, load_rules, rules_dir
from auditgate.core.refusal import is_answered, refuse
from auditgate.core.request_facts import facts_of
from auditgate.policy.loading import PiiTypes, load_policy_dir, match_input
from auditgate.policy.rules import POLICY_FILE, Decision, Policy
from auditgate.websocket import session, session_control
from auditgate.websocket.events import PROMPT_EVENTS, NotAnEvent, endpoint_of, parse
from auditgate.websocket.facts import EventFacts

logger = logging.getLogger("auditgate.addons.policy")

MARKS = {"block": ":no_entry:", "log": ":eyes:", "require_approval": ":hourglass_flowing_sand:"}


class PolicyRules:
    """Decides each request by rules/policy.yaml and records the decision in the flow's POLICY metadata."""

    def __init__(self) -> None:
        self.policy: Policy | None = None
        self.pii: PiiTypes | None = None
        self._path: Path | None = None
        self._watch: ChangedFile | None = None
        self._rebuilding = asyncio.Lock()

    def load(self, loader) -> None:
        add_gateway_options(loader)

    def configure(self, updated: set[str]) -> None:
        if "gateway_rules" not in updated:
            return
        self.policy, self.pii = load_rules(load_policy_dir)
        self._path = rules_dir() / POLICY_FILE
        self._watch = ChangedFile(self._path)
        self._log_loaded("policy")

    def _log_loaded(self, what: str) -> None:
        if self.policy is None:
            logger.warning("%s: %s does not exist, so every authenticated request is allowed", what, self._path)
        else:
            logger.info("%s: %d rule(s) from %s, default %s (%s)", what, len(self.policy.rules), self._path,
                        self.policy.default, self.policy.digest)

    @command.command("auditgate.policy.reload")
    def reload(self) -> None:
        """Re-read policy.yaml now; an invalid file keeps the rules already loaded."""
        if self._watch is None:
            return
        self._watch.changed(now=True)  # the file as read now is the one in force: no second reload
        try:
            self._adopt(load_policy_dir(self._path.parent))
        except ConfigError as e:
            logger.error("keeping the previous policy: %s", e)

    async def _reload_if_changed(self) -> None:
        # An edited policy.yaml is read and compiled in a thread: the event loop, which carries every
        # flow, does not wait on it. The request that noticed waits for the new rules; one rebuild at a time.
        if self._watch is None or not self._watch.changed():
            return
        async with self._rebuilding:
            try:
                self._adopt(await asyncio.to_thread(load_policy_dir, self._path.parent))
            except ConfigError as e:
                logger.error("keeping the previous policy: %s", e)

    def _adopt(self, loaded) -> None:
        self.policy, self.pii = loaded
        self._log_loaded("policy reloaded")

    async def request(self, flow: http.HTTPFlow) -> None:
        if not flow.live or is_answered(flow):
            return
        await self._reload_if_changed()
        unreadable = facts_of(flow).decode_error if not flow.request.stream else None
        if unreadable is not None:
            # Text the gateway cannot read is text no rule (and no masking) has seen: refused, never passed.
            POLICY.set(flow, {"rule": "undecodable-body", "action": "block"})
            logger.info("policy refused an undecodable request body: %s", unreadable.message)
            refuse(flow, unreadable.status, unreadable.code, unreadable.message)
            return
        if self.policy is None:
            # Recorded all the same: the last request check (request_gate) refuses a request that
            # carries no policy decision at all, as one whose policy check never ran.
            POLICY.set(flow, {"rule": "no-policy-file", "action": "allow"})
            return
        if flow.request.stream:
            # A body streamed past the hooks (stream_large_bodies) was never seen: fail closed.
            decision = Decision("block", "unreadable-body", message="the request body was streamed past the gateway "
                                "(stream_large_bodies), so the policy could not inspect it", policy=self.policy.digest)
            POLICY.set(flow, decision.as_metadata())
            self._apply(flow, decision)
            return
        started = time.perf_counter()
        facts = match_input(facts_of(flow), IDENTITY.get(flow) or {}, UPSTREAM.get(flow) or {}, flow.request.host,
                            flow.request.port, self.pii)
        decision = self.policy.decide(facts)
        metadata = decision.as_metadata()
        metadata["eval_us"] = round((time.perf_counter() - started) * 1e6)
        POLICY.set(flow, metadata)
        self._apply(flow, decision)

    @staticmethod
    def _apply(flow: http.HTTPFlow, decision: Decision) -> None:
        rule = decision.rule or "default"
        who = (IDENTITY.get(flow) or {}).get("name")
        if decision.action == "block":
            message = f"blocked by policy rule '{rule}'" + (f": {decision.message}" if decision.message else "")
            logger.info("policy %s blocked a request from %s (%s)", rule, who, decision.matched)
            status, code = decision.refusal or (403, "gateway_blocked")
            refuse(flow, status, code, message)
        elif decision.action == "log":
            logger.warning("policy %s flagged a request from %s (%s)", rule, who, decision.matched)
        elif decision.action == "require_approval":
            # The approval gate, next in the bundle, holds the flow; without it, nothing could approve.
            if services.approval_gate is None:
                refuse(flow, 403, "gateway_approval_unavailable",
                       f"policy rule '{rule}' requires an approval, and this gateway has no approval gate")
        flow.comment = f"policy {decision.action}: {rule}" + (f" ({flow.comment})" if flow.comment else "")
        if decision.action in MARKS:
            flow.marked = MARKS[decision.action]


    # ---- WebSocket sessions: every client event that carries text, decided like a request ---------------
    async def websocket_message(self, flow: http.HTTPFlow) -> None:
        message = flow.websocket.messages[-1]
        if not message.from_client:
            return
        rec = session.record(flow)
        if rec.get("failed"):
            return  # the session is closing: the gate drops what still comes
        try:
            if session.own_kind(flow) == "release":  # decided before it was held, approved since
                session.mark(flow, "policy")
                return
            await self._reload_if_changed()
            await self._decide_message(flow, message)
        except Exception as error:  # anything unexpected: the message is not passed, the session is closed
            session_control.fail(flow, "policy", error)

    async def _decide_message(self, flow: http.HTTPFlow, message) -> None:
        try:
            event = parse(message.content, message.is_text, strict=True)
        except NotAnEvent as e:
            # Text the gateway cannot read is text no rule has seen: refused, never passed.
            session.mark(flow, "policy")
            self._audit_event(flow, "unreadable", {"rule": "unreadable-event", "action": "block"}, None, True)
            rec = session.record(flow)
            rec["blocked"] += 1
            session_control.refuse_event(flow, "gateway_bad_request",
                                         f"the gateway reads only JSON text events on this session ({e})")
            return
        facts = EventFacts(event, endpoint=endpoint_of(flow.request.path) or "other", path=flow.request.path,
                           method=flow.request.method, size=len(message.content))
        if event["type"] not in PROMPT_EVENTS and not facts.prompt_texts and not facts.tool_names:
            session.mark(flow, "policy")  # no prompt, no text (audio, commit, cancel): nothing to decide
            return
        if self.policy is None:
            session.mark(flow, "policy")
            self._audit_event(flow, event["type"], {"rule": "no-policy-file", "action": "allow"}, None, False)
            return
        started = time.perf_counter()
        decision = self.policy.decide(match_input(facts, IDENTITY.get(flow) or {}, UPSTREAM.get(flow) or {},
                                                  flow.request.host, flow.request.port, self.pii))
        metadata = decision.as_metadata()
        metadata["eval_us"] = round((time.perf_counter() - started) * 1e6)
        rule = decision.rule or "default"
        decided = {"rule": rule, "action": decision.action}
        rec = session.record(flow)
        who = (IDENTITY.get(flow) or {}).get("name")
        if decision.action == "block":
            message.drop()
            session.mark(flow, "policy")
            self._audit_event(flow, event["type"], decided, None, True)
            rec["blocked"] += 1
            logger.info("policy %s blocked a %s event from %s (%s)", rule, event["type"], who, decision.matched)
            text = f"blocked by policy rule '{rule}'" + (f": {decision.message}" if decision.message else "")
            session_control.refuse_event(flow, decision.refusal[1] if decision.refusal else "gateway_policy_blocked", text)
        elif decision.action == "require_approval":
            message.drop()  # held apart from the session, which goes on meanwhile
            session.mark(flow, "policy")
            gate = services.approval_gate
            if gate is None or not callable(getattr(gate, "hold_message", None)):
                self._audit_event(flow, event["type"], decided, None, True)
                rec["blocked"] += 1
                session_control.refuse_event(flow, "gateway_approval_unavailable",
                                             f"policy rule '{rule}' requires an approval, and this gateway has no "
                                             "approval gate")
                return
            rec["held"] += 1
            asyncio.get_running_loop().create_task(
                self._hold(flow, gate, metadata, facts.prompt_texts, message.content, event["type"], decided))
        else:
            if decision.action == "log":
                logger.warning("policy %s flagged a %s event from %s (%s)", rule, event["type"], who,
                               decision.matched)
            self._audit_event(flow, event["type"], decided, None, False)
            session.mark(flow, "policy")

    async def _hold(self, flow: http.HTTPFlow, gate, policy: dict, texts: list[str], content: bytes,
                    event_type: str, decided: dict) -> None:
        """One held client event: sent on as it came when a second person grants it, else answered with an error."""
        try:
            outcome = await gate.hold_message(flow, policy, texts)
            status = outcome.get("status")
            rec = session.record(flow)
            if flow.websocket is None or flow.websocket.timestamp_end is not None or rec.get("failed"):
                return  # the session ended while the event was held: nothing to send it on
            granted = status == "granted"
            self._audit_event(flow, event_type, decided, outcome.get("id"), not granted)
            if granted:
                rec["released"] += 1
                session.note_own(flow, content, "release")
                session_control.send(flow, False, content)
                return
            rec["blocked"] += 1
            code, text = {
                "denied": ("gateway_approval_denied", f"approval {outcome.get('id')} was denied"),
                "expired": ("gateway_approval_expired", f"approval {outcome.get('id')} was not granted in time"),
            }.get(status, ("gateway_approval_unavailable", "the approval could not be held: "
                                                          f"{outcome.get('reason') or 'unavailable'}"))
            session_control.answer_error(flow, code, text)
        except Exception as error:  # never the event: the session is closed instead
            logger.error("holding a WebSocket event of flow %s failed: %s", flow.id, type(error).__name__)
            try:
                session_control.fail(flow, "policy", error)
            except Exception as again:
                logger.error("closing WebSocket flow %s failed: %s", flow.id, type(again).__name__)

    @staticmethod
    def _audit_event(flow: http.HTTPFlow, event_type: str, decided: dict, approval: str | None,
                     blocked: bool) -> None:
        events = services.audit_events
        if events is None:
            return
        fields = {"flow_id": flow.id, "event_type": event_type, "policy": decided, "blocked": blocked}
        if approval:
            fields["approval"] = approval
        # AuditUnavailable goes up: the message is then dropped and the session closed (fail closed).
        events.append_event("websocket_event", fields)


addons = [PolicyRules()]
