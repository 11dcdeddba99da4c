"""mitmproxy's event dispatch, with the walk over the addons done once per addon set instead of per event.

For each event mitmproxy walks every addon of its chain (nested ones through generators: a script's
addons sit three deep, under the script loader, the script and its module), asks each for a method
of the event's name, and enters an exception guard per top-level addon, handler or not; after each
flow event it sends an ``update`` event the same way. That is about ten walks over some sixty
addons per request: in a profile of the gateway under load, 0.9 ms of the proxy's CPU per request,
more than masking. ``ChainIndex`` remembers, per event name, which top-level addons have handlers and
which of their (nested) addons those are, and calls exactly what mitmproxy's own ``trigger_event`` (and
its synchronous ``trigger``, which carries every log record as an ``add_log`` event) would call, in the
same order, with the same exception handling:

- which addons handle an event is found with mitmproxy's own ``_iter_hooks`` (the same walk, done once);
- each top-level addon's handlers run as inside mitmproxy's ``safecall`` (an exception is logged by
  safecall itself and the next top-level addon goes on; ``AddonHalt`` ends the event), an awaitable
  result is awaited;
- ``handle_lifecycle`` sends ``update`` after a flow's event only where some addon handles ``update``
  (mitmweb's view does; no addon of mitmdump does, so there the event is not made);
- the handler is looked up on its addon at each call (a method patched at run time runs);
- where mitmproxy's own walk fails for an event (an attribute of a hook's name that is no handler), that
  event goes to mitmproxy's own dispatch, which fails at the very place it would;
- the index is forgotten whenever the addon set can change: an addon registered, added or removed,
  the chain cleared, or any option changed (the script loader reorders scripts on ``scripts``).

Installed by the bundle (``DispatchIndex``, the first addon of ``addons/gateway.py``'s list) only
where mitmproxy's addon manager has the shape this relies on; otherwise mitmproxy's dispatch stays.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

from mitmproxy import addonmanager, exceptions, flow, hooks

logger = logging.getLogger(__name__)

_NEEDED = ("chain", "register", "add", "remove", "clear", "trigger", "trigger_event", "handle_lifecycle",
           "_iter_hooks")


class ChainIndex:
    """Per event name: the top-level addons that handle it, each with its handling addons in walk order."""

    def __init__(self, manager: addonmanager.AddonManager) -> None:
        self.manager = manager
        self._walk_each_time = manager.trigger_event  # mitmproxy's own, for an event the index cannot hold
        self._walk_each_time_sync = manager.trigger
        self._by_event: dict[str, tuple[tuple[tuple[Any, ...], ...], ...] | None] = {}

    def forget(self, *_: Any, **__: Any) -> None:
        self._by_event = {}

    def handlers(self, event: hooks.Hook) -> tuple[tuple[tuple[Any, ...], ...], ...] | None:
        """((addon, ...) for each top-level addon with handlers), found with mitmproxy's own walk; None where
        that walk fails (an attribute of the event's name that is no handler): mitmproxy's own dispatch
        then handles the event, with its error at the very place it would have it."""
        name = event.name
        if name in self._by_event:
            return self._by_event[name]
        groups = []
        try:
            for top in list(self.manager.chain):
                addons = tuple(addon for addon, _ in self.manager._iter_hooks(top, event))
                if addons:
                    groups.append(addons)
        except Exception:
            found = None
        else:
            found = tuple(groups)
        self._by_event[name] = found
        return found

    async def trigger_event(self, event: hooks.Hook) -> None:
        """What ``AddonManager.trigger_event`` does, without walking the addons again."""
        await self._trigger_event(event, None)

    async def _trigger_event(self, event: hooks.Hook, args: list | None, sync: bool = False) -> None:
        """trigger_event, with the event's arguments where the caller has them already; with ``sync``, what
        mitmproxy's synchronous ``trigger`` does instead (an async handler refused, nothing awaited)."""
        groups = self.handlers(event)
        if groups is None:
            if sync:
                self._walk_each_time_sync(event)
            else:
                await self._walk_each_time(event)
            return
        name = event.name
        for group in groups:
            # mitmproxy's safecall, without a context manager per addon: the same exceptions pass, the same
            # log line for the others (safecall itself writes it, from the exception re-raised inside it).
            try:
                if args is None:
                    args = event.args()
                for addon in group:
                    handler = getattr(addon, name, None)
                    if not callable(handler):  # gone since the index was made: mitmproxy would skip it too
                        continue
                    if sync and inspect.iscoroutinefunction(handler):  # as mitmproxy's invoke_addon_sync
                        raise exceptions.AddonManagerError(
                            f"Async handler {name} ({addon}) cannot be called from sync context")
                    result = handler(*args)
                    if not sync and result is not None and inspect.isawaitable(result):
                        await result
            except exceptions.AddonHalt:
                return
            except exceptions.OptionsError:
                raise
            except Exception as error:
                _log_as_mitmproxy_does(error)

    def trigger(self, event: hooks.Hook) -> None:
        """What ``AddonManager.trigger`` (the synchronous dispatch) does, without walking the addons again.

        mitmproxy sends each log record through it as an ``add_log`` event (from the event loop, a call per
        record: four per connection at the default verbosity), which no addon of mitmdump handles."""
        dispatch = self._trigger_event(event, None, sync=True)
        try:
            dispatch.send(None)  # nothing in it awaits when sync: it runs to its end in this call
        except StopIteration:
            return
        dispatch.close()
        raise RuntimeError("the synchronous dispatch was suspended")  # unreachable: nothing is awaited

    async def handle_lifecycle(self, event: hooks.Hook) -> None:
        """What ``AddonManager.handle_lifecycle`` does: the event, then ``update`` for a flow's event, which
        is not even made where no addon handles it (none of mitmdump's does)."""
        args = event.args()  # made once here: each call walks the event's dataclass fields
        message = args[0]
        await self._trigger_event(event, args)
        if isinstance(message, flow.Flow) and self.handlers(_UPDATE) != ():  # None: mitmproxy's dispatch decides
            await self.trigger_event(hooks.UpdateHook([message]))


_UPDATE = hooks.UpdateHook([])  # the event whose handlers handle_lifecycle asks for


def _log_as_mitmproxy_does(error: Exception) -> None:
    try:
        with addonmanager.safecall():
            raise error
    except exceptions.AddonHalt:  # safecall lets only these through; error is neither (caught above)
        pass


def install(manager: Any) -> ChainIndex | None:
    """Put a ChainIndex in front of `manager`'s dispatch (once); None where its shape is not the expected one."""
    existing = getattr(manager, "_auditgate_index", None)
    if existing is not None:
        return existing
    if not all(hasattr(manager, attribute) for attribute in _NEEDED) or not hasattr(addonmanager, "safecall"):
        logger.warning("mitmproxy's addon manager is not the one the gateway's dispatch index knows; "
                       "mitmproxy's own dispatch stays (slower, the same behaviour)")
        return None
    index = ChainIndex(manager)

    def forgetting(method):
        def call(*args, **kwargs):
            index.forget()
            try:
                return method(*args, **kwargs)
            finally:
                index.forget()  # what the call changed (a script's module is set after its register)
        return call

    for method in ("register", "add", "remove", "clear"):
        setattr(manager, method, forgetting(getattr(manager, method)))
    manager.master.options.changed.connect(index.forget)
    manager.trigger_event = index.trigger_event
    manager.trigger = index.trigger
    manager.handle_lifecycle = index.handle_lifecycle
    manager._auditgate_index = index
    return index


class DispatchIndex:
    """The addon that installs the index when the bundle is loaded."""

    def load(self, loader) -> None:
        install(loader.master.addons)
