"""The dispatch index calls exactly what mitmproxy's own trigger_event calls, in the same order.

Each case builds the same addons twice under mitmproxy's AddonManager, one manager with the index
installed and one without, triggers the same events on both, and compares what the addons saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re

import pytest
from mitmproxy import exceptions, hooks
from mitmproxy import log as log_module
from mitmproxy.test import taddons, tflow

from auditgate.core import hook_dispatch

EVENTS = ("requestheaders", "request", "responseheaders", "response")


class Recorder:
    def __init__(self, name: str, log: list, fail_on: str = "", halt_on: str = "") -> None:
        self.name, self.log, self.fail_on, self.halt_on = name, log, fail_on, halt_on

    def _seen(self, hook: str) -> None:
        self.log.append(f"{self.name}.{hook}")
        if hook == self.fail_on:
            raise RuntimeError("a failing addon")  # mitmproxy logs it; the next top-level addon goes on
        if hook == self.halt_on:
            raise exceptions.AddonHalt()  # mitmproxy ends the event here

    def requestheaders(self, flow) -> None:
        self._seen("requestheaders")

    def response(self, flow) -> None:
        self._seen("response")


class AsyncRecorder(Recorder):
    async def request(self, flow) -> None:
        await asyncio.sleep(0.005)  # the next handler must wait for this one
        self._seen("request")


class AwaitableRecorder(Recorder):
    def responseheaders(self, flow):
        async def later():
            await asyncio.sleep(0.005)
            self._seen("responseheaders")
        return later()


class Container:
    """Addons nested the way mitmproxy nests a script's addons (an ``addons`` list)."""

    def __init__(self, name: str, parts: list) -> None:
        self.name, self.addons = name, parts


def _addons(log: list, fail: dict) -> list:
    def make(cls, name):
        return cls(name, log, **fail.get(name, {}))
    return [
        make(Recorder, "top1"),
        Container("box", [make(AsyncRecorder, "inner1"), Container("deeper", [make(AwaitableRecorder, "inner2")]),
                          make(Recorder, "inner3")]),
        make(AsyncRecorder, "top2"),
    ]


class UpdateRecorder(Recorder):
    def update(self, flows) -> None:
        self._seen("update")


def _trigger(manager, flow) -> None:
    async def run():
        for name in EVENTS:  # as mitmproxy's proxy server sends them: each with its update
            await manager.handle_lifecycle(hooks.all_hooks[name](flow))
    asyncio.run(run())


@contextlib.contextmanager
def _manager(indexed: bool, addons: list):
    """mitmproxy's addon manager holding `addons`, with the gateway's index installed or not."""
    with taddons.context(loadcore=False) as tctx:
        manager = tctx.master.addons
        if indexed:
            assert hook_dispatch.install(manager) is not None
        for addon in addons:
            manager.add(addon)
        yield manager


def _run(indexed: bool, fail: dict, extra=()) -> list[str]:
    log: list[str] = []
    with _manager(indexed, [*_addons(log, fail), *(cls(cls.__name__, log) for cls in extra)]) as manager:
        _trigger(manager, tflow.tflow(resp=True))
    return log


@pytest.mark.parametrize("fail", [
    {}, {"top1": {"fail_on": "requestheaders"}}, {"inner1": {"fail_on": "request"}},
    {"inner2": {"fail_on": "responseheaders"}}, {"inner3": {"halt_on": "response"}}, {"top1": {"halt_on": "response"}},
], ids=["none", "top-raises", "nested-async-raises", "nested-awaitable-raises", "nested-halts", "top-halts"])
def test_the_index_calls_what_mitmproxy_calls_in_the_same_order(fail, caplog):
    caplog.set_level(logging.ERROR)
    expected = _run(False, fail)
    logged = [r.getMessage() for r in caplog.records if r.name == "mitmproxy.addonmanager"]
    caplog.clear()
    assert _run(True, fail) == expected
    assert [r.getMessage() for r in caplog.records if r.name == "mitmproxy.addonmanager"] == logged  # mitmproxy's "Addon error: ..." lines
    if "fail_on" in str(fail):
        assert logged and all(line.startswith("Addon error: ") for line in logged)
    if not fail:
        assert expected == ["top1.requestheaders", "inner1.requestheaders", "inner2.requestheaders",
                            "inner3.requestheaders", "top2.requestheaders", "inner1.request", "top2.request",
                            "inner2.responseheaders", "top1.response", "inner1.response", "inner2.response",
                            "inner3.response", "top2.response"]


class LogRecorder(Recorder):
    def add_log(self, entry) -> None:
        self._seen("add_log")


class AsyncLogRecorder(Recorder):
    async def add_log(self, entry) -> None:  # mitmproxy: "cannot be called from sync context", logged
        self._seen("add_log")


def _run_sync(indexed: bool, fail: dict, extra=()) -> list[str]:
    """The synchronous dispatch (mitmproxy's trigger: each log record as an add_log event)."""
    log: list[str] = []
    addons = [LogRecorder("first", log, **fail.get("first", {})),
              Container("box", [LogRecorder("inner", log, **fail.get("inner", {})),
                                *(cls(cls.__name__, log) for cls in extra)]),
              LogRecorder("last", log)]
    with _manager(indexed, addons) as manager:
        for text in ("one", "two"):
            manager.trigger(log_module.AddLogHook(log_module.LogEntry(text, "info")))
    return log


@pytest.mark.parametrize("fail, extra", [({}, ()), ({"first": {"fail_on": "add_log"}}, ()),
                                         ({"inner": {"halt_on": "add_log"}}, ()), ({}, (AsyncLogRecorder,))],
                         ids=["none", "raises", "halts", "async-handler"])
def test_the_sync_dispatch_calls_what_mitmproxy_calls_in_the_same_order(fail, extra, caplog):
    def lines():
        return [re.sub(r" at 0x[0-9a-f]+", "", r.getMessage()) for r in caplog.records if r.name == "mitmproxy.addonmanager"]

    caplog.set_level(logging.ERROR)
    expected = _run_sync(False, fail, extra)
    logged = lines()
    caplog.clear()
    assert _run_sync(True, fail, extra) == expected
    assert lines() == logged
    if not fail:
        assert expected == ["first.add_log", "inner.add_log", "last.add_log"] * 2
    if "fail_on" in str(fail):
        assert logged and all(line.startswith("Addon error: ") for line in logged)
    if "halt_on" in str(fail):
        assert "last.add_log" not in expected
    if extra:  # an async add_log handler: refused (logged) both ways, the next top-level addon still called
        assert logged and all("cannot be called from sync context" in line for line in logged)


def test_update_follows_each_flow_event_where_an_addon_handles_it():
    expected = _run(False, {}, extra=[UpdateRecorder])
    assert _run(True, {}, extra=[UpdateRecorder]) == expected
    assert expected.count("UpdateRecorder.update") == len(EVENTS)


def test_the_index_follows_addons_added_removed_and_changed_at_run_time():
    log: list[str] = []
    with taddons.context(loadcore=False) as tctx:
        manager = tctx.master.addons
        index = hook_dispatch.install(manager)
        box = Container("box", [])
        manager.add(box)
        flow = tflow.tflow(resp=True)
        _trigger(manager, flow)
        assert log == []
        # A script loaded later: its module is registered, then set as the box's child (as mitmproxy's script
        # addon does), and must be called from the next event on.
        late = Recorder("late", log)
        manager.register(late)
        box.addons = [late]
        _trigger(manager, flow)
        assert log == ["late.requestheaders", "late.response"]
        manager.remove(late)
        box.addons = []
        _trigger(manager, flow)
        assert log == ["late.requestheaders", "late.response"]
        # An option change forgets the index too (the script loader reorders scripts on one).
        box.addons = [late]
        tctx.options.update(listen_port=1234)
        _trigger(manager, flow)
        assert log == ["late.requestheaders", "late.response"] * 2
        assert manager.trigger_event == index.trigger_event


def test_a_handler_patched_at_run_time_is_the_one_called():
    # The bundle's fault-injection tests patch an addon's class while the proxy runs.
    log: list[str] = []
    with taddons.context(loadcore=False) as tctx:
        manager = tctx.master.addons
        hook_dispatch.install(manager)
        addon = Recorder("patched", log)
        manager.add(addon)
        flow = tflow.tflow(resp=True)
        _trigger(manager, flow)
        original = Recorder.response
        Recorder.response = lambda self, flow: log.append("replacement.response")
        try:
            _trigger(manager, flow)
        finally:
            Recorder.response = original
    assert log == ["patched.requestheaders", "patched.response", "patched.requestheaders", "replacement.response"]


class NotAHandler(Recorder):
    response = "a string where a hook would be"  # mitmproxy: "Addon handler response (...) not callable"


def test_an_attribute_named_like_a_hook_that_is_no_handler_fails_as_it_does_in_mitmproxy(caplog):
    def lines():  # the addon's address differs from one run to the other
        return [re.sub(r" at 0x[0-9a-f]+", "", r.getMessage()) for r in caplog.records if r.name == "mitmproxy.addonmanager"]

    caplog.set_level(logging.ERROR)
    expected = _run(False, {}, extra=[NotAHandler])
    logged = lines()
    caplog.clear()
    assert _run(True, {}, extra=[NotAHandler]) == expected
    assert lines() == logged
    assert "NotAHandler.requestheaders" in expected and any("not callable" in line for line in logged)


def test_installed_once_and_only_on_a_manager_of_the_known_shape():
    with taddons.context(loadcore=False) as tctx:
        first = hook_dispatch.install(tctx.master.addons)
        assert first is not None and hook_dispatch.install(tctx.master.addons) is first
        manager = tctx.master.addons
        assert (manager.trigger_event, manager.trigger, manager.handle_lifecycle) == (
            first.trigger_event, first.trigger, first.handle_lifecycle)

    class Unknown:
        chain: list = []
    assert hook_dispatch.install(Unknown()) is None
