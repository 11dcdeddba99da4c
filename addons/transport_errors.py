"""Makes mitmproxy's own transport errors (upstream down, bad request) OpenAI-shaped JSON instead of HTML."""

from __future__ import annotations

import logging
from collections.abc import Callable

from mitmproxy import http
from mitmproxy.proxy.layers.http import _http1, _http2

from auditgate.core.errors import error_body

logger = logging.getLogger("auditgate.addons.transport_errors")

# mitmproxy answers transport failures (connect refused, TLS failure, timeouts) from inside its HTTP
# layers with an HTML page and offers no hook to change it; the openai SDK would then raise an error
# with no code. These two module-level functions are the only places that page is built, so we swap
# them while this addon is loaded and restore them when it is unloaded.
_CODES = {400: "gateway_bad_request", 502: "gateway_upstream_unavailable", 504: "gateway_upstream_unavailable"}


def _json_error(status_code: int, message: str = "") -> bytes:
    code = _CODES.get(status_code, "gateway_error")
    if code == "gateway_upstream_unavailable":
        message = f"the upstream API could not be reached through the gateway: {message}"
    return error_body(status_code, code, message)


def _make_error_response(status_code: int, message: str = "") -> bytes:
    from mitmproxy.net.http import http1

    response = http.Response.make(
        status_code,
        _json_error(status_code, message),
        {"content-type": "application/json", "connection": "close", "x-request-id": "req_gw_transport"},
    )
    return http1.assemble_response(response)


class OpenAIShapedTransportErrors:
    """Answers mitmproxy's transport errors as OpenAI-shaped JSON."""

    def __init__(self) -> None:
        self._saved: list[tuple[object, str, Callable]] = []

    def load(self, loader) -> None:
        for module, name, replacement in (
            (_http1, "make_error_response", _make_error_response),
            (_http2, "format_error", _json_error),
        ):
            self._saved.append((module, name, getattr(module, name)))
            setattr(module, name, replacement)

    def running(self) -> None:
        # With mitmproxy's default "eager" strategy a reverse proxy dials the upstream as soon as a
        # client connects, and a failure drops the client connection with no HTTP answer at all (the
        # SDK then retries blindly). Lazy dialling happens per request, after the gateway has
        # authenticated the caller, so a failure reaches the client as the JSON error above.
        from mitmproxy import ctx

        ctx.options.update(connection_strategy="lazy")

    def done(self) -> None:
        for module, name, original in self._saved:
            setattr(module, name, original)
        self._saved.clear()


addons = [OpenAIShapedTransportErrors()]
