"""Which tile a program of a prefill-form kernel works on.

Without a tile map the grid's axes 0 and 1 are (owner, block) pairs: a sequence or LoRA
segment and a row tile of it, every pair launched, the empty ones exiting. Padded CUDA
graphs (engine/prefill_graphs.py) size grids for the worst case instead, and pass an int32
[M, 2] map of the (owner, block) pairs that have rows, padded with owner -1; program i of
axis 0 takes entry i.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def program_tile(tile_map_ptr, TILE_MAP: tl.constexpr, OWNER_AXIS: tl.constexpr):
    """(owner, block) of this program; owner < 0: a padding entry of the map (exit)."""
    if TILE_MAP:
        owner = tl.load(tile_map_ptr + 2 * tl.program_id(0))
        block = tl.load(tile_map_ptr + 2 * tl.program_id(0) + 1)
    else:
        owner = tl.program_id(OWNER_AXIS)
        block = tl.program_id(1 - OWNER_AXIS)
    return owner, block
