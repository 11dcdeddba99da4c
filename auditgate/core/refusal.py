"""How an addon refuses a flow: an OpenAI-shaped error answered by the gateway, noted in the flow's metadata."""

from __future__ import annotations

import logging
import uuid

from mitmproxy import http

from auditgate.core.errors import error_body
from auditgate.core.flow_contract import REFUSAL

logger = logging.getLogger(__name__)


def error_response(status: int, code: str, message: str, request_id: str | None = None) -> http.Response:
    return http.Response.make(
        status,
        error_body(status, code, message),
        {
            "content-type": "application/json",
            "x-request-id": request_id or f"req_gw_{uuid.uuid4().hex}",
            # A refusal is final: tell clients not to retry it on the same connection.
            "x-should-retry": "false",
        },
    )


def refuse(flow: http.HTTPFlow, status: int, code: str, message: str) -> None:
    """Answer the flow ourselves (it never reaches the upstream) and note why in its metadata.

    Never flow.kill(): the openai SDK retries dropped connections.
    """
    flow.response = error_response(status, code, message, f"req_gw_{flow.id.replace('-', '')}")
    REFUSAL.set(flow, {"status": status, "code": code, "message": message})
    flow.comment = f"refused {status} {code}"
    logger.info("refused %s %s %s: %s %s", flow.request.method, flow.request.pretty_host, flow.request.path, status, code)


def is_answered(flow: http.HTTPFlow) -> bool:
    """True once an earlier addon answered the flow (a refusal): later request hooks leave it alone."""
    return flow.response is not None
