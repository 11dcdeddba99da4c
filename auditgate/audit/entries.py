"""What an audit entry says about a flow, and the digests of the rules in force (no mitmproxy import)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from auditgate.audit.chain import json_safe, sha256_hex
from auditgate.audit.errors import describe
from auditgate.audit.record_digest import claims_of_flow, record_digest
from auditgate.core.flow_contract import (
    APPROVAL,
    BODY_LIMITS,
    FLOW_FILE,
    GUARD,
    IDENTITY,
    INTENT_SEQ,
    MASKING,
    POLICY,
    REFUSAL,
    STREAM_CUT,
    TUNNEL,
    UPSTREAM,
)
from auditgate.core.request_facts import facts_of


def flow_fields(flow, now: float) -> dict:
    """The fields of a flow's audit entry: who, where, what was decided, the digests of both bodies, and
    (`record`) the digest of everything the flow's record will hold, field by field (audit/record_digest.py).

    Taken at the hook that writes the entry, from the flow as the flow recorder takes its state for the
    record on the loop's next turn: no addon changes a flow after the audit log's hook."""
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
        "guard": json_safe(GUARD.get(flow)),  # a hook of the bundle that failed on this flow, and what it caused
        "tunnel": json_safe(TUNNEL.get(flow)),  # a CONNECT: who tunnelled where (or why it was refused)
        "body_limits": json_safe(BODY_LIMITS.get(flow)),
        "request_sha256": sha256_hex(request.raw_content),
        "response_sha256": sha256_hex(response.raw_content) if response else None,
        "flow_file": FLOW_FILE.get(flow),
        "intent": INTENT_SEQ.get(flow),  # the seq of its intent entry: it went upstream (None: it never did)
        "stream_cut": json_safe(STREAM_CUT.get(flow)),  # a stream that ended in an error: what the client got
        "record": record_digest(claims_of_flow(flow)),
    }


def intent_fields(flow) -> dict:
    """The fields of an intent entry: a request about to go upstream (the last request hook), before any outcome."""
    request = flow.request
    return {
        "flow_id": flow.id,
        "identity": json_safe(IDENTITY.get(flow)),
        "method": request.method,
        "host": request.pretty_host,
        "port": request.port,
        "path": request.path.partition("?")[0],
        "request_sha256": sha256_hex(request.raw_content),
    }


def read_rules_digests(directory: Path) -> tuple[dict[str, str], dict[str, str]]:
    """SHA-256 of every file below the rules directory (hidden files, e.g. half-written temporaries, aside),
    and what could not be read, with why.

    Rules files change under the gateway (an editor's save, an operator's swap): a file removed between
    listing and reading is simply not in force any more; one that cannot be read is named, not skipped.
    """
    digests: dict[str, str] = {}
    unreadable: dict[str, str] = {}
    for path in _listing(directory):
        relative = path.relative_to(directory)
        if any(part.startswith(".") for part in relative.parts):
            continue
        try:
            if not path.is_file():
                continue
            digests[relative.as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
        except FileNotFoundError:
            continue
        except OSError as e:
            unreadable[relative.as_posix()] = describe(e)
    return digests, unreadable


def rules_digests(directory: Path) -> dict[str, str]:
    """SHA-256 of every readable file below the rules directory (see read_rules_digests)."""
    return read_rules_digests(directory)[0]


def rules_signature(directory: Path) -> tuple:
    """(path, mtime, size) of every file: cheap to take each tick; a change means the digests are due again."""
    signature = []
    for path in _listing(directory):
        try:
            stat = path.stat()
        except OSError:
            continue  # removed meanwhile
        if not path.is_dir():
            signature.append((str(path), stat.st_mtime_ns, stat.st_size, stat.st_mode))
    return tuple(signature)


def _listing(directory: Path) -> list[Path]:
    try:
        return sorted(directory.rglob("*")) if directory.is_dir() else []
    except OSError:  # a subdirectory removed while walking: the next tick sees the directory as it is then
        return []
