"""Four-eyes: who may decide a held request, and which requests count as the same one (no mitmproxy)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True)
class DecisionRefused(Exception):
    """Why someone may not decide an approval: an explicit error for the API, and a line in the record."""

    status: int
    code: str  # self_approval_refused | not_an_approver | already_decided | not_found
    message: str

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


def same_person(requester: dict, decider: dict) -> bool:
    """Whether two identities could be one person: same name, same OIDC subject, or same email.

    Deliberately wide: a service token and an OIDC login of one person share a name or an email, and
    a second look at one's own request is no second pair of eyes.
    """
    def folded(identity: dict, key: str) -> str | None:
        value = identity.get(key)
        return value.strip().lower() if isinstance(value, str) and value.strip() else None

    if folded(requester, "name") and folded(requester, "name") == folded(decider, "name"):
        return True
    if folded(requester, "email") and folded(requester, "email") == folded(decider, "email"):
        return True
    subject, issuer = requester.get("subject"), requester.get("issuer")
    return bool(subject) and (subject, issuer) == (decider.get("subject"), decider.get("issuer"))


def check_decider(*, requester: dict, approver_groups: list[str] | tuple[str, ...], status: str, decider: dict,
                  decision: str) -> None:
    """Raise DecisionRefused unless `decider` may approve (or deny) this request.

    Approving needs someone other than the requester, whatever their groups, in one of the rule's
    approver groups. Denying needs an approver too, except that requesters may withdraw their own request.
    """
    own = same_person(requester, decider)
    if decision == "approve" and own:
        raise DecisionRefused(403, "self_approval_refused",
                              "nobody may approve their own request (four-eyes), whatever their groups")
    groups = set(decider.get("groups") or ())
    if not groups.intersection(approver_groups) and not (decision == "deny" and own):
        raise DecisionRefused(403, "not_an_approver",
                              f"{decider.get('name')} is in none of this rule's approver groups "
                              f"({', '.join(approver_groups)})")
    if status != "pending":
        raise DecisionRefused(409, "already_decided", f"this request is no longer pending (it is {status})")


def request_key(caller: str, method: str, host: str, port: int, path: str, body: bytes | None) -> tuple[str, str]:
    """(key, body_sha256): a retry of the same request by the same caller has the same key."""
    body_hash = hashlib.sha256(body or b"").hexdigest()
    identity = "\n".join((caller, method.upper(), host.lower(), str(port), path, body_hash))
    return hashlib.sha256(identity.encode()).hexdigest(), body_hash


def who(identity: dict) -> dict:
    """What is kept of a decider: who they are, never how they proved it."""
    return {k: identity[k] for k in ("name", "groups", "method", "issuer", "subject", "email") if k in identity}


def name_of(identity: dict | None) -> str | None:
    return identity.get("name") if identity else None
