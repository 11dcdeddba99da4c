"""The gateway bundle without intent entries and whole-flow digests: a baseline for what those two cost.

    .venv/bin/python bench/bench_gateway.py --scenario pii --baseline-script bench/gateway_without_intents_and_digests.py

Issue 14's target is that intent entries and whole-flow digests cost at most 5 % of the whole gateway's p50.
This is the same bundle (addons/gateway.py, every addon, every other audit entry, the flow entries with their
bodies' SHA-256) with exactly those two left out: no intent entry before a request goes upstream, and no record
entry (the claims of the record gathered, hashed and digested) when the flow recorder takes a flow's record.
The bench's "gateway/before" lines are then their cost. Its records do not verify (their flows lack the record
digest): a baseline, never a gateway.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from auditgate.core.addon_files import load_addon_module  # noqa: E402

_gateway = load_addon_module(ROOT / "addons", "gateway")
_audit_log = sys.modules["auditgate_addons.audit_log"].AuditLog
_audit_log._intent = lambda self, flow: None  # nothing before forwarding
_audit_log.record_taken = lambda self, flow: None  # no record entry when the recorder takes the record

addons = _gateway.addons
