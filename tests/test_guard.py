"""The hook guard on its own: what each kind of hook failure turns into (mitmproxy's test flows, no proxy)."""

from __future__ import annotations

import asyncio
import inspect

from mitmproxy.test import tflow

from auditgate.core.flow_contract import GUARD, REFUSAL, services
from auditgate.core.guard import guard_addon


class Broken(RuntimeError):
    pass


class Addon:
    """Stands in for a bundle addon: each hook does what the test sets."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.fail: set[str] = set()

    def _run(self, hook: str) -> None:
        self.calls.append(hook)
        if hook in self.fail:
            raise Broken(f"{hook} broke with secret text sk-do-not-log")

    def requestheaders(self, flow) -> None:
        self._run("requestheaders")

    async def request(self, flow) -> None:
        self._run("request")

    def responseheaders(self, flow) -> None:
        self._run("responseheaders")

    async def response(self, flow) -> None:
        self._run("response")

    def tcp_message(self, flow) -> None:
        self._run("tcp_message")

    def configure(self, updated) -> None:  # not a flow hook: left alone, so an OptionsError still stops a start
        self._run("configure")


def _run(result) -> None:
    if inspect.isawaitable(result):
        asyncio.run(result)


def test_hooks_keep_their_kind_and_lifecycle_hooks_are_not_wrapped():
    addon = guard_addon(Addon())
    assert not inspect.iscoroutinefunction(addon.requestheaders) and inspect.iscoroutinefunction(addon.request)
    assert "configure" not in vars(addon)
    addon.fail = {"configure"}
    try:
        addon.configure(set())
    except Broken:
        pass
    else:
        raise AssertionError("configure must raise through the guard")


def test_a_request_hook_that_raises_refuses_the_flow_without_its_message():
    addon = guard_addon(Addon())
    addon.fail = {"request"}
    flow = tflow.tflow()
    _run(addon.request(flow))
    assert flow.response.status_code == 500
    assert REFUSAL.get(flow)["code"] == "gateway_internal_error"
    assert GUARD.get(flow) == {"addon": "test_guard", "hook": "request", "error": "Broken", "action": "refused"}
    assert b"sk-do-not-log" not in flow.response.content and "sk-do-not-log" not in str(flow.metadata)


def test_a_request_hook_keeps_an_earlier_refusal():
    addon = guard_addon(Addon())
    addon.fail = {"requestheaders"}
    flow = tflow.tflow()
    from auditgate.core.refusal import refuse

    refuse(flow, 403, "gateway_blocked", "blocked by policy")
    _run(addon.requestheaders(flow))
    assert flow.response.status_code == 403 and REFUSAL.get(flow)["code"] == "gateway_blocked"


def test_a_failed_responseheaders_stops_streaming_and_the_first_response_hook_withholds_the_reply():
    failing, later = guard_addon(Addon()), guard_addon(Addon())
    failing.fail = {"responseheaders"}
    flow = tflow.tflow(resp=True)
    flow.response.stream = lambda data: data  # e.g. masking's stream, set by an earlier addon
    _run(failing.responseheaders(flow))
    assert flow.response.stream is False and GUARD.get(flow)["action"] == "pending"
    _run(later.response(flow))
    assert flow.response.status_code == 500 and GUARD.get(flow)["action"] == "refused"
    assert later.calls == ["response"]  # the hook still runs, on the refusal


def test_a_response_hook_that_raises_withholds_a_buffered_reply_but_cannot_recall_a_stream():
    addon = guard_addon(Addon())
    addon.fail = {"response"}
    buffered = tflow.tflow(resp=True)
    _run(addon.response(buffered))
    assert buffered.response.status_code == 500 and GUARD.get(buffered)["action"] == "refused"

    streamed = tflow.tflow(resp=True)
    streamed.response.stream = True
    _run(addon.response(streamed))
    assert streamed.response.status_code == 200 and GUARD.get(streamed)["action"] == "stream_ended"


def test_a_tcp_hook_that_raises_kills_the_connection():
    addon = guard_addon(Addon())
    addon.fail = {"tcp_message"}
    flow = tflow.ttcpflow()
    flow.live = True
    _run(addon.tcp_message(flow))
    assert flow.error is not None and GUARD.get(flow)["action"] == "killed"


def test_each_failure_is_also_an_audit_event_and_later_failures_are_kept():
    events = []

    class Audit:
        def append_event(self, kind, fields):
            events.append((kind, fields))
            return {}

    services.audit_events = Audit()
    first, second = guard_addon(Addon()), guard_addon(Addon())
    first.fail, second.fail = {"response"}, {"response"}
    flow = tflow.tflow(resp=True)
    _run(first.response(flow))
    _run(second.response(flow))
    assert [kind for kind, _ in events] == ["hook_failed", "hook_failed"]
    assert events[0][1]["flow_id"] == flow.id and events[0][1]["hook"] == "response"
    assert GUARD.get(flow)["also"][0]["hook"] == "response"


def test_the_hook_is_looked_up_on_the_class_at_each_call():
    addon = guard_addon(Addon())
    flow = tflow.tflow()

    def replaced(self, flow):
        raise Broken("replaced after the guard went on")

    original = Addon.requestheaders
    Addon.requestheaders = replaced
    try:
        _run(addon.requestheaders(flow))
    finally:
        Addon.requestheaders = original
    assert flow.response.status_code == 500
