"""Refusals shaped like OpenAI API errors, so the openai SDK raises its usual exception classes."""

from __future__ import annotations

import json
import logging
import uuid

from mitmproxy import http

logger = logging.getLogger(__name__)

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error"}


def error_body(status: int, code: str, message: str) -> bytes:
    error_type = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return json.dumps({"error": {"message": message, "type": error_type, "param": None, "code": code}}).encode()


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
    flow.metadata["auditgate.refusal"] = {"status": status, "code": code, "message": message}
    flow.comment = f"refused {status} {code}"
    logger.info("refused %s %s %s: %s %s", flow.request.method, flow.request.pretty_host, flow.request.path, status, code)


def is_answered(flow: http.HTTPFlow) -> bool:
    """True once an earlier addon answered the flow (a refusal): later request hooks leave it alone."""
    return flow.response is not None
