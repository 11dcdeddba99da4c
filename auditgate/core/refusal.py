"""How an addon refuses a flow: an OpenAI-shaped error answered by the gateway, noted in the flow's metadata."""

from __future__ import annotations

import functools
import inspect
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


def fails_closed(hook):
    """A request hook that refuses its flow (500 gateway_internal_error, recorded) when it raises.

    mitmproxy logs an exception escaping a hook and carries on with the flow: a request whose
    routing, authorization, policy, approval or key custody check crashed would go upstream unchecked.
    """
    def refuse_after(flow: http.HTTPFlow, error: BaseException) -> None:
        logger.error("%s failed on %s %s; the request is refused: %s", hook.__qualname__, flow.request.method,
                     flow.request.pretty_host, error, exc_info=error)
        refuse(flow, 500, "gateway_internal_error",
               "the gateway could not complete its checks on this request, so it was not sent")

    if inspect.iscoroutinefunction(hook):
        @functools.wraps(hook)
        async def guarded_async(self, flow: http.HTTPFlow) -> None:
            try:
                await hook(self, flow)
            except Exception as e:
                refuse_after(flow, e)
        return guarded_async

    @functools.wraps(hook)
    def guarded(self, flow: http.HTTPFlow) -> None:
        try:
            hook(self, flow)
        except Exception as e:
            refuse_after(flow, e)
    return guarded
