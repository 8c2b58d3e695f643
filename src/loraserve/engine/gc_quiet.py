"""Python's cyclic garbage collector, quieted for serving.

A collection runs on whichever thread allocates when a threshold trips and holds the GIL
throughout, so the engine thread stops launching steps meanwhile. With thousands of
adapters loaded and packed during a run (objects by the million), the default thresholds
ran ~1,400 collections a minute on an H200 S1 run, ten of them full ones of up to 70 ms,
while a decode step leaves the host ~13 ms of slack before the device idles. So: what
exists at start-up (the model, the engine, registered adapters) is frozen out of the
collector's sight, and collections come ~30x less often (each young one walks more objects,
about the same work in all; full ones nearly never).
"""

from __future__ import annotations

import gc
from collections.abc import Callable

SERVING_THRESHOLDS = (20_000, 10, 10)


def quiet_gc() -> Callable[[], None]:
    """Collect once, freeze what survives, raise the thresholds; returns a function that
    undoes both (the bench, between runs in one process)."""
    before = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(*SERVING_THRESHOLDS)

    def restore() -> None:
        gc.set_threshold(*before)
        gc.unfreeze()

    return restore
