"""Test-only mitmproxy script, loaded after the bundle: a later addon whose responseheaders hook raises.

A request carrying ``x-test-raise-after-masking`` makes this addon's responseheaders raise, after the
masking addon has put its stream masker in place. Outside the bundle, so no guard catches it:
mitmproxy logs the error and carries on with the flow, as it would for any third-party addon.
"""

from __future__ import annotations


class InjectedFault(RuntimeError):
    pass


class RaisingResponseHeaders:
    def responseheaders(self, flow) -> None:
        if flow.request.headers.get("x-test-raise-after-masking"):
            raise InjectedFault("injected: a later responseheaders hook failed")


addons = [RaisingResponseHeaders()]
