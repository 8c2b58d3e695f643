"""How many compiled variants of our Triton kernels exist in this process.

Triton compiles a kernel once per distinct set of compile-time parameters (constexprs, and
the int arguments it specialises: value 1, divisibility by 16). A variant first met in the
middle of serving stalls that step for the compile (0.2-2 s): the engine compiles what it
needs at start-up, and the bench reports any compile during its timed run.
"""

from __future__ import annotations

import importlib

_MODULES = ("loraserve.kernels.attention", "loraserve.kernels.fused", "loraserve.kernels.lora")


def compiled_variants() -> dict[str, int]:
    """Kernel name -> variants compiled so far (empty under TRITON_INTERPRET)."""
    counts: dict[str, int] = {}
    for name in _MODULES:
        module = importlib.import_module(name)
        for attr, fn in vars(module).items():
            caches = getattr(fn, "device_caches", None)
            if not isinstance(caches, dict):
                continue
            n = sum(len(entry[0]) for entry in caches.values())
            if n:
                counts[attr] = n
    return counts


def new_variants(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Variants compiled between two ``compiled_variants()`` calls."""
    return {k: v - before.get(k, 0) for k, v in after.items() if v > before.get(k, 0)}
