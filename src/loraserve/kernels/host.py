"""Host-side integer helpers for the kernel wrappers.

``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr functions: called from Python
each goes through Triton's wrapper (~6 us), and a LoRA call used nine of them, more than
its kernel launches cost. These are the same arithmetic in plain Python.
"""

from __future__ import annotations


def cdiv(x: int, y: int) -> int:
    return -(-x // y)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (as Triton's: 0 for n <= 0)."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()
