"""One guard around every flow hook of every addon in the bundle: an exception refuses, it never passes.

mitmproxy logs an exception escaping a hook ("Addon error") and carries on with the flow as it is. For
a gateway that means a request whose policy check crashed goes upstream unchecked, and a reply whose
check crashed goes to the caller unchecked. ``guard_addon`` wraps each flow hook an addon defines, when
the bundle is loaded (``auditgate.core.addon_files.bundle``), so no addon has to remember a try/except:

- a request-side hook (``requestheaders``, ``request``, ``http_connect``) that raises refuses the flow:
  500 ``gateway_internal_error``, nothing goes upstream;
- ``responseheaders`` that raises: the reply is no longer streamed through, and the next response
  hook of the bundle replaces it with the same refusal before anything of it reaches the caller;
- ``response`` that raises: the reply is replaced by the refusal (a stream already sent is past
  recalling: it went through the masking stream, which fails closed on its own; the record says so);
- anything else (``error``, TCP and WebSocket hooks): logged, and a connection-level flow is killed.

Each case leaves a ``GUARD`` record on the flow (the addon, the hook, the exception's type: never its
message, which may quote request data), which the records and the audit entry carry. The wrapper
looks the hook up on the addon's class at each call, so whatever the class holds at that moment runs
under the guard.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any

from auditgate.core.flow_contract import GUARD, GuardRecord, services
from auditgate.core.refusal import refuse

logger = logging.getLogger(__name__)

REQUEST_HOOKS = frozenset({"requestheaders", "request", "http_connect", "http_connect_upstream"})
FLOW_HOOKS = REQUEST_HOOKS | frozenset({
    "responseheaders", "response", "error", "http_connected", "http_connect_error",
    "tcp_start", "tcp_message", "tcp_end", "tcp_error",
    "websocket_start", "websocket_message", "websocket_end",
    "udp_start", "udp_message", "udp_end", "udp_error",
})

INTERNAL_ERROR = "gateway_internal_error"
_REQUEST_MESSAGE = "the gateway could not complete its checks on this request, so it was not sent"
_REPLY_MESSAGE = "the gateway could not complete its checks on this reply, so it was withheld"


def addon_name(addon: Any) -> str:
    """The addon's module without the bundle's prefix (``auditgate_addons.policy`` → ``policy``)."""
    return type(addon).__module__.rpartition(".")[2]


def guard_addon(addon: Any) -> Any:
    """Put the guard around each flow hook the addon's class defines (on the instance); returns the addon."""
    cls = type(addon)
    for hook in FLOW_HOOKS:
        if callable(getattr(cls, hook, None)) and hook not in vars(addon):
            setattr(addon, hook, _guarded(addon, hook, inspect.iscoroutinefunction(getattr(cls, hook))))
    return addon


def _guarded(addon: Any, hook: str, is_async: bool):
    cls, name = type(addon), addon_name(addon)
    # Only the response hook may have a failed responseheaders to convert: decided once, not at each call
    # (every hook of every addon of the bundle runs through here, on every flow).
    convert = _convert_pending if hook == "response" else None

    if is_async:
        async def guarded_async(*args):
            if convert is not None:
                convert(hook, args)
            try:
                # Looked up at each call: the class's hook as it is now (a test's fault injection included).
                result = getattr(cls, hook)(addon, *args)
                if result is not None and inspect.isawaitable(result):
                    await result
            except Exception as error:
                failed(name, hook, args, error)
        return functools.update_wrapper(guarded_async, getattr(cls, hook))

    def guarded(*args):
        if convert is not None:
            convert(hook, args)
        try:
            result = getattr(cls, hook)(addon, *args)  # looked up at each call, as above
        except Exception as error:
            failed(name, hook, args, error)
            return None
        if result is not None and inspect.isawaitable(result):  # the class now holds an async hook where it had a sync one
            async def finish():
                try:
                    await result
                except Exception as error:
                    failed(name, hook, args, error)
            return finish()
        return None
    return functools.update_wrapper(guarded, getattr(cls, hook))


def failed(addon: str, hook: str, args: tuple, error: BaseException) -> None:
    """Turn an exception of one addon's hook into the safe outcome for that hook (see the module doc)."""
    flow = args[0] if args else None
    record: GuardRecord = {"addon": addon, "hook": hook, "error": type(error).__name__}
    if flow is None or not hasattr(flow, "metadata"):
        logger.error("%s.%s failed: %s", addon, hook, type(error).__name__, exc_info=error)
        return
    logger.error("%s.%s failed on flow %s; %s", addon, hook, getattr(flow, "id", "?"),
                 _outcome(hook), exc_info=error)
    if hook in REQUEST_HOOKS:
        if getattr(flow, "response", None) is None:  # an earlier refusal stands, with its reason
            refuse(flow, 500, INTERNAL_ERROR, _REQUEST_MESSAGE)
        record["action"] = "refused"
    elif hook == "responseheaders":
        if flow.response is not None:
            flow.response.stream = False  # buffered: the first response hook replaces it (below)
        record["action"] = "pending"
    elif hook == "response":
        if flow.response is not None and flow.response.stream:
            record["action"] = "stream_ended"  # already with the caller, through the masking stream
        else:
            refuse(flow, 500, INTERNAL_ERROR, _REPLY_MESSAGE)
            record["action"] = "refused"
    else:
        killable = getattr(flow, "killable", False)
        if hook.startswith(("tcp_", "udp_", "websocket_")) and killable:
            flow.kill()
            record["action"] = "killed"
        else:
            record["action"] = "logged"
    _note(flow, record)


def _outcome(hook: str) -> str:
    if hook in REQUEST_HOOKS:
        return "the request is refused"
    if hook in ("responseheaders", "response"):
        return "the reply is withheld"
    return "logged"


def _note(flow: Any, record: GuardRecord) -> None:
    # The first failure says why the flow was refused; later ones are kept too, in order.
    existing = GUARD.get(flow)
    if existing is None:
        GUARD.set(flow, record)
    else:
        existing.setdefault("also", []).append(dict(record))
    # An entry of its own in the audit log as well: the flow's entry may be the very thing that failed
    # (the audit log's or the recorder's hook), and the failure must be on record either way.
    events = services.audit_events
    if events is None:
        return
    try:
        events.append_event("hook_failed", {"flow_id": getattr(flow, "id", None), **record})
    except Exception as error:  # the audit log refuses the flow itself when it cannot write
        logger.error("the audit log could not take the hook failure of flow %s: %s", getattr(flow, "id", "?"),
                     type(error).__name__)


def _convert_pending(hook: str, args: tuple) -> None:
    """At the first response hook after a failed responseheaders: replace the (buffered) reply."""
    if hook != "response" or not args:
        return
    record = GUARD.get(args[0])
    if record is not None and record.get("action") == "pending":
        refuse(args[0], 500, INTERNAL_ERROR, _REPLY_MESSAGE)
        record["action"] = "refused"
