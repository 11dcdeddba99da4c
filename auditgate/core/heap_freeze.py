"""The start-up heap moved out of the garbage collector's way, once the gateway is up.

Why: the gateway process holds some 190,000 objects from start-up (mitmproxy, Presidio and its
recognizers, the rules, the audit and recording machinery) that live as long as the process. Python's
cyclic collector traverses all of them at every full collection and, while they are young, at each
collection of the younger generations too: under 8 concurrent clients that was ~150 us of the proxy's
CPU per request, against ~50 us in bare mitmdump, which collects the same cyclic garbage (mitmproxy's
own: about 120 objects a flow, the same in both). ``gc.freeze()`` after a last full collection puts the
start-up objects in the permanent generation, which no collection traverses: ~60 us per request
(measured with ``gc.callbacks``), and no full collection of the whole heap (a ~150 ms pause) any more.

What it costs: an object frozen here that later becomes garbage in a reference cycle is never freed
(garbage without a cycle is freed by reference counting as always). Only objects that exist when the
gateway starts can be frozen, once, so the most this can hold on to is the start-up heap itself (e.g.
the first rules' compiled objects after a reload). Everything made later is collected as usual.

``--set gateway_gc_freeze=false`` keeps Python's default behaviour.
"""

from __future__ import annotations

import gc
import logging

from mitmproxy import ctx

logger = logging.getLogger(__name__)


class HeapFreeze:
    """Freezes the heap (gc.freeze) once the proxy runs: the bundle's last addon, so its ``running`` comes after
    the other addons' (their rules, engines and stores are made by then). The full collection before it takes
    ~0.1 s once, at start (a request arriving in that moment waits for it), and never again while serving."""

    def __init__(self) -> None:
        self.frozen = 0  # objects moved to the permanent generation (0: not yet, or turned off)

    def load(self, loader) -> None:
        loader.add_option("gateway_gc_freeze", bool, True,
                          "Move the objects made at start-up out of the garbage collector's way once the "
                          "gateway runs (gc.freeze): less CPU per request, no full-heap collection pauses.")

    def running(self) -> None:
        if not ctx.options.gateway_gc_freeze or self.frozen:
            return
        gc.collect()  # start-up garbage first: frozen, it could never be freed
        gc.freeze()
        self.frozen = gc.get_freeze_count()
        logger.info("start-up heap frozen: %d objects out of the collector's way", self.frozen)


addons = [HeapFreeze()]
