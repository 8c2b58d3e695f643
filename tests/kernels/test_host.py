"""The wrappers' plain-Python integer helpers agree with Triton's constexpr functions."""

from __future__ import annotations

import triton

from loraserve.kernels.host import cdiv, next_power_of_2


def test_next_power_of_2_matches_triton():
    for n in [*range(0, 1100), 4095, 4096, 4097, 11008, 2**31 - 1, 2**31]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n


def test_cdiv_matches_triton():
    for x in range(0, 300, 7):
        for y in (1, 2, 3, 16, 64, 128, 255):
            assert cdiv(x, y) == triton.cdiv(x, y) == -(-x // y), (x, y)
