"""quiet_gc: the collector's settings while serving, and their undoing."""

from __future__ import annotations

import gc

from loraserve.engine.gc_quiet import SERVING_THRESHOLDS, quiet_gc


def test_quiet_gc_freezes_raises_thresholds_and_restores():
    before = gc.get_threshold()
    kept = [[1], [2]]  # alive at the call: frozen out of the collector's sight
    restore = quiet_gc()
    try:
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == SERVING_THRESHOLDS
        assert SERVING_THRESHOLDS[0] > 10 * before[0]
    finally:
        restore()
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0
    assert kept
