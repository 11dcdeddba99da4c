"""The people and the approval candidates the approvals-store tests hold, decide and race on."""

from __future__ import annotations

from auditgate.approval.store import Approval, new_approval_id

ALICE = {"name": "alice", "groups": ["agents"], "method": "service_token", "token_id": "a11ce00000000001"}
BOB = {"name": "bob", "groups": ["agents", "approvers"], "method": "service_token", "token_id": "b0b0000000000002"}
CAROL = {"name": "carol", "groups": ["approvers"], "method": "service_token", "token_id": "ca40100000000004"}


def candidate(key: str = "k1", now: float = 1000.0, timeout: float = 60, reuse: float = 0, instance: str = "i1",
              rule: str = "r", holder: str = "") -> Approval:
    """A request by alice, for the approvers, as the approval addon would ask the store to hold it."""
    return Approval(id=new_approval_id(), key=key, rule=rule, requester=ALICE, approver_groups=["approvers"],
                    created_at=now, expires_at=now + timeout, reuse_seconds=reuse, instance=instance, holder=holder,
                    body_sha256="b" * 64, preview="hello <EMAIL_ADDRESS>")
