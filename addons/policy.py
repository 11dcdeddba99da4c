"""Applies rules/policy.yaml to every authenticated request: allow, block (403 gateway_blocked), log, or hold for approval."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from mitmproxy import command, ctx, http

from addons.file_watch import ChangedFile
from addons.gateway_options import add_gateway_options, load_rules, rules_dir
from addons.openai_errors import is_answered, refuse
from addons.payload_masking import endpoint_kind, mask_request_payload
from addons.policy_rules import POLICY_FILE, Decision, Policy, RequestFacts, load_policy, tool_names
from addons.rules_yaml import ConfigError

logger = logging.getLogger(__name__)

METADATA_KEY = "auditgate.policy"
MARKS = {"block": ":no_entry:", "log": ":eyes:", "require_approval": ":hourglass_flowing_sand:"}


def json_payload(request: http.Request) -> Any:
    """The request body as JSON, or None (not JSON, or not decodable)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if request.raw_content is None or not request.raw_content:
        return None
    if content_type and "json" not in content_type:
        return None
    try:
        return json.loads(request.get_content(strict=False))
    except (ValueError, UnicodeDecodeError):
        return None


def prompt_texts(payload: Any, kind: str) -> list[str]:
    """Exactly the prompt text masking would look at: instructions, input, messages, tool outputs."""
    texts: list[str] = []

    def collect(value: str, path: str) -> str:
        if value:
            texts.append(value)
        return value

    if payload is not None:
        mask_request_payload(payload, kind, collect)
    return texts


def request_facts(flow: http.HTTPFlow, pii_finder=None) -> RequestFacts:
    """The facts the policy looks at, the costly ones computed only if a rule asks for them."""
    identity = flow.metadata.get("auditgate.identity") or {}
    upstream = flow.metadata.get("auditgate.upstream") or {}
    request = flow.request
    path = request.path.split("?", 1)[0]
    kind = endpoint_kind(path)
    parsed: dict[str, Any] = {}

    def payload() -> Any:
        if "payload" not in parsed:
            parsed["payload"] = json_payload(request)
        return parsed["payload"]

    def model() -> str | None:
        value = payload().get("model") if isinstance(payload(), dict) else None
        return value if isinstance(value, str) else None

    facts = RequestFacts(
        caller=identity.get("name"),
        groups=tuple(identity.get("groups") or ()),
        host=str(upstream.get("host", request.host)),
        port=int(upstream.get("port", request.port)),
        method=request.method,
        path=path,
        endpoint=kind,
        body_size=len(request.raw_content or b""),
        model_fn=model,
        texts_fn=lambda: prompt_texts(payload(), kind),
        tools_fn=lambda: tool_names(payload()),
    )
    if pii_finder is not None:
        facts.pii_fn = lambda: pii_finder(facts.texts)
    return facts


class PiiTypes:
    """The entity types the masking engine finds in prompt texts (the engine is built on first use)."""

    def __init__(self, directory: Path) -> None:
        from addons.masking_config import load_masking_settings
        from addons.pii_masking import PiiMasker

        settings = load_masking_settings(directory)
        if settings is None:
            raise ConfigError(directory / POLICY_FILE, "a rule uses 'pii', which needs the masking engine (masking.yaml)")
        self.masker = PiiMasker(settings)
        # Every recognizer the engine has, whatever is configured for masking: a rule names what it wants.
        self.entities = tuple(sorted(self.masker.supported))

    def check(self, policy: Policy) -> None:
        for rule in policy.rules:
            unknown = sorted(set(rule.match.pii or ()) - set(self.entities))
            if unknown:
                raise ConfigError(policy.path, f"rule {rule.id!r}: match.pii: no recognizer for {', '.join(unknown)} "
                                               f"(known: {', '.join(self.entities)})", rule.line)

    def __call__(self, texts: list[str]) -> set[str]:
        found: set[str] = set()
        for text in texts:
            if self.masker.may_contain(text, self.entities):
                found.update(span.entity_type for span in self.masker.find(text, self.entities))
        return found


def load_policy_dir(directory: Path) -> tuple[Policy | None, PiiTypes | None]:
    """The policy of a rules directory (None without policy.yaml) and, if its rules need it, the PII finder."""
    path = directory / POLICY_FILE
    if not path.exists():
        return None, None
    policy = load_policy(path)
    pii = None
    if policy.uses_pii:
        pii = PiiTypes(directory)
        pii.check(policy)
    return policy, pii


class PolicyRules:
    """Decides each request by rules/policy.yaml and records the decision in flow.metadata["auditgate.policy"]."""

    def __init__(self) -> None:
        self.policy: Policy | None = None
        self.pii: PiiTypes | None = None
        self._path: Path | None = None
        self._watch: ChangedFile | None = None

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
        if self._watch:
            self._watch.check_now()
        self._reload_if_changed()

    def _reload_if_changed(self) -> None:
        if self._watch is None or not self._watch.changed():
            return
        try:
            self.policy, self.pii = load_policy_dir(self._path.parent)
            self._log_loaded("policy reloaded")
        except ConfigError as e:
            logger.error("keeping the previous policy: %s", e)

    def request(self, flow: http.HTTPFlow) -> None:
        if not flow.live or is_answered(flow):
            return
        self._reload_if_changed()
        if self.policy is None:
            return
        if flow.request.stream:
            # A body streamed past the hooks (stream_large_bodies) was never seen: fail closed.
            decision = Decision("block", "unreadable-body", message="the request body was streamed past the gateway "
                                "(stream_large_bodies), so the policy could not inspect it", policy=self.policy.digest)
            flow.metadata[METADATA_KEY] = decision.as_metadata()
            self._apply(flow, decision)
            return
        started = time.perf_counter()
        decision = self.policy.decide(request_facts(flow, self.pii))
        metadata = decision.as_metadata()
        metadata["eval_us"] = round((time.perf_counter() - started) * 1e6)
        flow.metadata[METADATA_KEY] = metadata
        self._apply(flow, decision)

    @staticmethod
    def _apply(flow: http.HTTPFlow, decision: Decision) -> None:
        rule = decision.rule or "default"
        who = (flow.metadata.get("auditgate.identity") or {}).get("name")
        if decision.action == "block":
            message = f"blocked by policy rule '{rule}'" + (f": {decision.message}" if decision.message else "")
            logger.info("policy %s blocked a request from %s (%s)", rule, who, decision.matched)
            refuse(flow, 403, "gateway_blocked", message)
        elif decision.action == "log":
            logger.warning("policy %s flagged a request from %s (%s)", rule, who, decision.matched)
        elif decision.action == "require_approval":
            # The approval gate, next in the bundle, holds the flow; without it, nothing could approve.
            if ctx.master.addons.get("approvalgate") is None:
                refuse(flow, 403, "gateway_approval_unavailable",
                       f"policy rule '{rule}' requires an approval, and this gateway has no approval gate")
        flow.comment = f"policy {decision.action}: {rule}" + (f" ({flow.comment})" if flow.comment else "")
        if decision.action in MARKS:
            flow.marked = MARKS[decision.action]


addons = [PolicyRules()]
