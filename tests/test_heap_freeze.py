"""The bundle's last addon freezes the start-up heap (gc.freeze) once the gateway runs, unless turned off."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest
from mitmproxy.test import taddons

from auditgate.core import heap_freeze
from auditgate.core.heap_freeze import HeapFreeze


@pytest.fixture(autouse=True)
def _unfrozen(monkeypatch):
    """Each case starts with nothing frozen and leaves nothing frozen (the rest of the suite shares the process)."""
    monkeypatch.setattr(heap_freeze, "FREEZE_AFTER_SECONDS", 0.05)
    gc.unfreeze()
    yield
    gc.unfreeze()


class StartUpCycle:
    """Start-up garbage in a reference cycle: only the collector can free it."""

    def __init__(self) -> None:
        self.me = self


def test_the_heap_is_frozen_after_start_up_with_its_garbage_collected_first():
    async def scenario():
        freeze = HeapFreeze()
        with taddons.context(freeze):
            garbage = StartUpCycle()
            garbage_freed = weakref.ref(garbage)
            del garbage
            kept = StartUpCycle()  # alive at the freeze: frozen with the rest
            freeze.running()
            assert gc.get_freeze_count() == 0  # not at once: the other addons' start-up comes first
            await asyncio.sleep(0.3)
            assert freeze.frozen > 1000 and gc.get_freeze_count() > 1000
            assert garbage_freed() is None  # collected before the freeze, not kept for ever
            walked = [gc.get_objects(generation) for generation in (0, 1, 2)]  # what collections traverse
            assert not any(o is kept for objects in walked for o in objects)  # frozen: out of their way
            made_after = StartUpCycle()
            assert any(o is made_after for o in gc.get_objects(0))  # what comes later is collected as usual
            freeze.done()

    asyncio.run(scenario())


def test_turned_off_nothing_is_frozen():
    async def scenario():
        freeze = HeapFreeze()
        with taddons.context(freeze) as tctx:
            tctx.configure(freeze, gateway_gc_freeze=False)
            freeze.running()
            await asyncio.sleep(0.3)
            assert gc.get_freeze_count() == 0 and freeze.frozen == 0

    asyncio.run(scenario())


def test_stopped_before_the_freeze_nothing_is_frozen():
    async def scenario():
        freeze = HeapFreeze()
        with taddons.context(freeze):
            freeze.running()
            freeze.done()  # shut down within the first second
            await asyncio.sleep(0.3)
            assert gc.get_freeze_count() == 0

    asyncio.run(scenario())
