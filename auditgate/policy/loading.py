"""A rules directory's policy, the PII finder its rules may need, and what a request is matched on."""

from __future__ import annotations

from pathlib import Path

from auditgate.core.config import ConfigError
from auditgate.core.request_facts import RequestFacts
from auditgate.masking.payload import is_encoded_blob
from auditgate.policy.rules import POLICY_FILE, MatchInput, Policy, load_policy


class PiiTypes:
    """The entity types the masking engine finds in prompt texts (the engine is built on first use)."""

    def __init__(self, directory: Path) -> None:
        from auditgate.masking.config import load_masking_settings
        from auditgate.masking.engine import shared_masker

        settings = load_masking_settings(directory)
        if settings is None:
            raise ConfigError(directory / POLICY_FILE, "a rule uses 'pii', which needs the masking engine (masking.yaml)")
        self.masker = shared_masker(settings)
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
            if is_encoded_blob(text):
                continue  # base64 payloads: read by text rules, but no entity lives in one (see masking.payload)
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


def match_input(facts: RequestFacts, identity: dict, upstream: dict, host: str, port: int,
                pii_finder: PiiTypes | None = None) -> MatchInput:
    """What the rules look at for one request; the costly parts come from the request's facts when asked."""
    return MatchInput(
        caller=identity.get("name"),
        groups=tuple(identity.get("groups") or ()),
        host=str(upstream.get("host", host)),
        port=int(upstream.get("port", port)),
        method=facts.method,
        path=facts.path,
        endpoint=facts.endpoint,
        body_size=facts.body_size,
        model_fn=lambda: facts.model,
        texts_fn=lambda: facts.prompt_texts,
        tools_fn=lambda: facts.tool_names,
        pii_fn=(lambda: pii_finder(facts.prompt_texts)) if pii_finder else set,
    )
