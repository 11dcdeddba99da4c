"""Four-eyes: who may see and decide a held request, and which requests count as the same one (no mitmproxy).

Who someone is, for four-eyes, is their *principal*: a stable subject that no display name can imitate,
the issuer and `sub` of an OIDC identity or the token id of a service token (`principal_of`). Names are
compared too, but only once normalized (`normalized_name`) and only to refuse more: two identities whose
names read the same are treated as one person when approving, never as one person when granting access.
"""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass


@dataclass(frozen=True)
class DecisionRefused(Exception):
    """Why someone may not decide an approval: an explicit error for the API, and a line in the record."""

    status: int
    code: str  # self_approval_refused | not_an_approver | already_decided | not_found
    message: str

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


def principal_of(identity: dict | None) -> str | None:
    """The stable subject of an identity record (`Identity.as_metadata()`), or None when it has none.

    OIDC: `oidc:<issuer>#<sub>` (an issuer URL has no fragment, so the first '#' splits it); a service token:
    `service_token:<token id>` (the start of its SHA-256, see identity.service_tokens.token_id). Never the name,
    which an IdP lets its users choose and which may hold invisible or look-alike characters.
    """
    if not identity:
        return None
    issuer, subject = identity.get("issuer"), identity.get("subject")
    if isinstance(issuer, str) and issuer and isinstance(subject, str) and subject:
        return f"oidc:{issuer}#{subject}"
    token_id = identity.get("token_id")
    if isinstance(token_id, str) and token_id:
        return f"service_token:{token_id}"
    return None


# Default-ignorable characters outside the format category (Cf, removed whole): the combining grapheme joiner,
# Hangul fillers, Khmer inherent vowels, Mongolian and other variation selectors. They render as nothing.
_IGNORABLE = frozenset([0x034F, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x3164, 0xFFA0, *range(0x180B, 0x1810),
                        *range(0xFE00, 0xFE10), *range(0xE0100, 0xE01F0)])


def _without_invisibles(text: str) -> str:
    return "".join(c for c in text if unicodedata.category(c) not in ("Cf", "Cc") and ord(c) not in _IGNORABLE)


def visible_name(value: object) -> str | None:
    """A name as it shows: NFKC, invisible characters (zero-width, bidi controls, soft hyphens, variation
    selectors, controls) removed, white space collapsed. For display, next to the principal."""
    if not isinstance(value, str):
        return None
    text = " ".join(_without_invisibles(unicodedata.normalize("NFKC", value)).split())
    return text or None


def normalized_name(value: object) -> str | None:
    """A name as a person reads it: `visible_name`, case folded. The second four-eyes check compares it; it is
    never an identity on its own."""
    text = visible_name(value)
    if text is None:
        return None
    # Case folding can undo NFKC: the Unicode NFKC_Casefold way (and NFKC can bring an ignorable back).
    return _without_invisibles(unicodedata.normalize("NFKC", text.casefold())) or None


def _names(identity: dict) -> set[str]:
    return {n for n in (normalized_name(identity.get("name")), normalized_name(identity.get("email"))) if n}


def is_requester(requester: dict, caller: dict) -> bool:
    """Whether caller is the very identity that made the request: the same principal. What grants a
    requester their own requests (to see, to withdraw); a name that reads the same grants nothing."""
    principal = principal_of(requester)
    return principal is not None and principal == principal_of(caller)


def same_person(requester: dict, decider: dict) -> bool:
    """Whether two identities could be one person: the same principal, or names (or emails) that read the same
    once normalized. Deliberately wide, and used only to refuse an approval: a service token and an OIDC login
    of one person share a name or an email, and `alice` with a zero-width space is still alice to the eye."""
    return is_requester(requester, decider) or bool(_names(requester) & _names(decider))


def may_see(requester: dict, approver_groups: list[str] | tuple[str, ...], viewer: dict) -> bool:
    """Whether the admin API shows an approval to viewer: their own request, or one they may decide."""
    return is_requester(requester, viewer) or bool(set(viewer.get("groups") or ()) & set(approver_groups))


def decisions_open_to(requester: dict, approver_groups: list[str] | tuple[str, ...], status: str,
                      viewer: dict) -> list[str]:
    """The decisions check_decider would let viewer make ("approve", "deny"), for the page's buttons."""
    allowed = []
    for decision in ("approve", "deny"):
        try:
            check_decider(requester=requester, approver_groups=approver_groups, status=status, decider=viewer,
                          decision=decision)
        except DecisionRefused:
            continue
        allowed.append(decision)
    return allowed


def check_decider(*, requester: dict, approver_groups: list[str] | tuple[str, ...], status: str, decider: dict,
                  decision: str) -> None:
    """Raise DecisionRefused unless `decider` may approve (or deny) this request.

    Approving needs someone in one of the rule's approver groups who is not the requester: another principal,
    and a name (or email) that does not read the same. Denying needs an approver too, except that requesters
    (the same principal) may withdraw their own request.
    """
    groups = set(decider.get("groups") or ())
    approver = bool(groups.intersection(approver_groups))
    if decision == "approve" and is_requester(requester, decider):
        raise DecisionRefused(403, "self_approval_refused",
                              "nobody may approve their own request (four-eyes), whatever their groups or display name")
    if not approver and not (decision == "deny" and is_requester(requester, decider)):
        # Before the name check: someone who may not decide learns nothing of whose request it is.
        raise DecisionRefused(403, "not_an_approver",
                              f"{decider.get('name')} is in none of this rule's approver groups "
                              f"({', '.join(approver_groups)})")
    if decision == "approve" and same_person(requester, decider):
        raise DecisionRefused(403, "self_approval_refused",
                              f"your name reads the same as the requester's ({normalized_name(decider.get('name'))!r} "
                              "or the same email): another approver must decide (four-eyes)")
    if status != "pending":
        raise DecisionRefused(409, "already_decided", f"this request is no longer pending (it is {status})")


def request_key(caller: str, method: str, host: str, port: int, path: str, body: bytes | None) -> tuple[str, str]:
    """(key, body_sha256): a retry of the same request by the same caller has the same key.

    caller: the caller's principal (its name only when it has none): two people sharing a name never share
    an approval."""
    body_hash = hashlib.sha256(body or b"").hexdigest()
    identity = "\n".join((caller, method.upper(), host.lower(), str(port), path, body_hash))
    return hashlib.sha256(identity.encode()).hexdigest(), body_hash


def who(identity: dict) -> dict:
    """What is kept of a decider: who they are, never how they proved it."""
    return {k: identity[k] for k in ("name", "groups", "method", "issuer", "subject", "token_id", "email")
            if k in identity}


def name_of(identity: dict | None) -> str | None:
    return identity.get("name") if identity else None
