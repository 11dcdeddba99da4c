"""The bundle's last addon freezes the start-up heap (gc.freeze) once the gateway runs, unless turned off."""

from __future__ import annotations

import gc
import weakref

import pytest
from mitmproxy.test import taddons

from auditgate.core.heap_freeze import HeapFreeze


@pytest.fixture(autouse=True)
def _unfrozen():
    """Each case starts with nothing frozen and leaves nothing frozen (the rest of the suite shares the process)."""
    gc.unfreeze()
    yield
    gc.unfreeze()


class StartUpCycle:
    """Start-up garbage in a reference cycle: only the collector can free it."""

    def __init__(self) -> None:
        self.me = self


def test_the_heap_is_frozen_when_the_gateway_runs_with_its_garbage_collected_first():
    freeze = HeapFreeze()
    with taddons.context(freeze):
        garbage = StartUpCycle()
        garbage_freed = weakref.ref(garbage)
        del garbage
        kept = StartUpCycle()  # alive at the freeze: frozen with the rest
        assert gc.get_freeze_count() == 0  # loaded and configured: not yet
        freeze.running()
        assert freeze.frozen > 1000 and gc.get_freeze_count() > 1000
        assert garbage_freed() is None  # collected before the freeze, not kept for ever
        walked = [gc.get_objects(generation) for generation in (0, 1, 2)]  # what collections traverse
        assert not any(o is kept for objects in walked for o in objects)  # frozen: out of their way
        made_after = StartUpCycle()
        assert any(o is made_after for o in gc.get_objects(0))  # what comes later is collected as usual
        frozen = freeze.frozen
        freeze.running()  # a second `running` (mitmproxy sends it once) freezes nothing more
        assert freeze.frozen == frozen


def test_turned_off_nothing_is_frozen():
    freeze = HeapFreeze()
    with taddons.context(freeze) as tctx:
        tctx.configure(freeze, gateway_gc_freeze=False)
        freeze.running()
        assert gc.get_freeze_count() == 0 and freeze.frozen == 0
