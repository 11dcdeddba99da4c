"""The gateway bundle without intent entries and whole-flow digests: a baseline for what those two cost.

    .venv/bin/python bench/bench_gateway.py --scenario pii --baseline-script bench/gateway_without_intents_and_digests.py

Issue 14's target is that intent entries and whole-flow digests cost at most 5 % of the whole gateway's p50.
This is the same bundle (addons/gateway.py, every addon, every other audit entry field, the bodies' SHA-256 as
before the whole-flow digest) with exactly those two left out: no intent entry before a request goes upstream,
and no claims gathered, hashed and digested for the flow entry's "record". The bench's "gateway/before" line is
then their cost. Its records do not verify (their entries lack the record digest): a baseline, never a gateway.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from auditgate.audit import entries  # noqa: E402
from auditgate.audit.chain import sha256_hex  # noqa: E402
from auditgate.core.addon_files import load_addon_module  # noqa: E402

_gateway = load_addon_module(ROOT / "addons", "gateway")


def _body_digests_only(flow, claimed=None, request_content=None) -> tuple:
    """What flow_fields takes from record_of_flow besides the record digest: the two bodies' SHA-256."""
    response = flow.response
    return None, sha256_hex(flow.request.raw_content), sha256_hex(response.raw_content) if response else None


entries.record_of_flow = _body_digests_only  # flow_fields looks it up in its module when it runs
sys.modules["auditgate_addons.audit_log"].AuditLog._intent = lambda self, flow: None  # nothing before forwarding

addons = _gateway.addons
