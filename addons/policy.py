"""Applies rules/policy.yaml to every authenticated request: allow, block (403 gateway_blocked), log, or hold for approval."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from mitmproxy import command, http

from auditgate.core.config import ConfigError
from auditgate.core.file_watch import ChangedFile
from auditgate.core.flow_contract import IDENTITY, POLICY, UPSTREAM, services
from auditgate.core.options import add_gateway_options, load_rules, rules_dir
from auditgate.core.refusal import is_answered, refuse
from auditgate.core.request_facts import facts_of
from auditgate.policy.loading import PiiTypes, load_policy_dir, match_input
from auditgate.policy.rules import POLICY_FILE, Decision, Policy

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
            refuse(flow, 403, "gateway_blocked", message)
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


addons = [PolicyRules()]
