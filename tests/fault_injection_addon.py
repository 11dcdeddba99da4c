"""Test-only mitmproxy script: makes one hook of one bundle addon misbehave, chosen per request.

Loaded after the bundle (``-s addons/gateway.py -s tests/fault_injection_addon.py``). When the proxy is
running, it replaces each flow hook of each bundle addon's class with a wrapper. A request carrying
``x-test-fault: <module>.<hook>`` (e.g. ``policy.request``) makes that hook raise before the addon's own
code runs; ``<module>.<hook>=skip`` makes the hook return without doing anything (an addon that silently
did not run). Every other request runs the hooks untouched. The fault comes from outside the code
under test: the bundle's guard sees only a hook that raised, or did nothing.
"""

from __future__ import annotations

import inspect
import logging
import weakref

from mitmproxy import ctx
from mitmproxy.addonmanager import traverse

HEADER = "x-test-fault"
PREFIX = "auditgate_addons."
HOOKS = ("requestheaders", "request", "responseheaders", "response", "http_connect")

logger = logging.getLogger("fault_injection")


class InjectedFault(RuntimeError):
    pass


# The fault named by a flow's header, as first seen: key custody drops headers not on its allow-list
# before the later hooks run, so it is read at the flow's first hook and kept here.
_faults: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _fault_for(args: tuple) -> str | None:
    flow = args[0] if args else None
    request = getattr(flow, "request", None)
    if request is None:
        return None
    if flow not in _faults:
        _faults[flow] = request.headers.get(HEADER)
    return _faults[flow]


def _wrap(original, name: str):
    def decide(args) -> str | None:
        wanted = _fault_for(args)
        if wanted == name:
            raise InjectedFault(f"injected fault in {name}")
        return "skip" if wanted == f"{name}=skip" else None

    if inspect.iscoroutinefunction(original):
        async def hook_async(self, *args):
            if decide(args) == "skip":
                return None
            return await original(self, *args)
        return hook_async

    def hook(self, *args):
        if decide(args) == "skip":
            return None
        return original(self, *args)
    return hook


class FaultInjection:
    def __init__(self) -> None:
        self.patched: list[str] = []

    def running(self) -> None:
        for addon in traverse(ctx.master.addons.chain):
            cls = type(addon)
            if not cls.__module__.startswith(PREFIX) or getattr(cls, "_faults_injected", False):
                continue
            module = cls.__module__[len(PREFIX):]
            for hook in HOOKS:
                original = cls.__dict__.get(hook)
                if callable(original):
                    setattr(cls, hook, _wrap(original, f"{module}.{hook}"))
                    self.patched.append(f"{module}.{hook}")
            cls._faults_injected = True
        logger.warning("fault injection ready: %s", " ".join(sorted(self.patched)))


addons = [FaultInjection()]
