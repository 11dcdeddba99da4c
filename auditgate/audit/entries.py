"""What an audit entry says about a flow, and the digests of the rules in force (no mitmproxy import)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from auditgate.audit.chain import json_safe, sha256_hex
from auditgate.core.flow_contract import (
    APPROVAL,
    FLOW_FILE,
    IDENTITY,
    MASKING,
    POLICY,
    REFUSAL,
    UPSTREAM,
)
from auditgate.core.request_facts import facts_of


def flow_fields(flow, now: float) -> dict:
    """The fields of a flow's audit entry: who, where, what was decided, and the digests of both bodies."""
    request, response = flow.request, flow.response
    peer = flow.client_conn.peername if flow.client_conn else None
    return {
        "flow_id": flow.id,
        "identity": json_safe(IDENTITY.get(flow)),
        "client": peer[0] if peer else None,
        "upstream": json_safe(UPSTREAM.get(flow)),
        "method": request.method,
        "host": request.pretty_host,
        "port": request.port,
        "path": request.path.partition("?")[0],  # a query string may carry a key; the flow file has it all
        "model": facts_of(flow).model,
        "status": response.status_code if response else None,
        "error": flow.error.msg if flow.error else None,
        "streamed": bool(response and response.stream),
        "latency_us": max(0, int((now - request.timestamp_start) * 1_000_000)),
        "policy": json_safe(POLICY.get(flow)),
        "approval": json_safe(APPROVAL.get(flow)),
        "masking": json_safe(MASKING.get(flow)),
        "refusal": json_safe(REFUSAL.get(flow)),
        "request_sha256": sha256_hex(request.raw_content),
        "response_sha256": sha256_hex(response.raw_content) if response else None,
        "flow_file": FLOW_FILE.get(flow),
    }


def rules_digests(directory: Path) -> dict[str, str]:
    """SHA-256 of every file below the rules directory (hidden files, e.g. half-written temporaries, aside)."""
    digests = {}
    if directory.is_dir():
        for path in sorted(directory.rglob("*")):
            relative = path.relative_to(directory)
            if path.is_file() and not any(part.startswith(".") for part in relative.parts):
                digests[relative.as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def rules_signature(directory: Path) -> tuple:
    try:
        return tuple(sorted((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in directory.rglob("*") if p.is_file()))
    except OSError:
        return ()
