"""Which tile a program of a prefill-form kernel works on.

Without a tile map the grid's axes 0 and 1 are (owner, block) pairs: a sequence or LoRA
segment and a row tile of it, every pair launched, the empty ones exiting. Padded CUDA
graphs (engine/prefill_graphs.py) size grids for the worst case instead, and pass an int32
[M, 2] map of the (owner, block) pairs that have rows, padded with owner -1; program i of
axis 0 takes entry i. Persistent grids (the decode graphs' grouped LoRA) also pass the count
of live entries at the map's front: a fixed number of programs strides over them.

    first, end, step = program_entries(tile_count_ptr, PERSISTENT)
    for e in range(first, end, step):
        owner, block = tile_entry(tile_map_ptr, e, TILE_MAP, PERSISTENT, 0)
        if owner >= 0:
            ...
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


@triton.jit
def program_entries(tile_count_ptr, PERSISTENT: tl.constexpr):
    """(first, end, step) of the map entries this program takes: one (its own), or with
    PERSISTENT every num_programs(0)-th live entry from its id on."""
    first = 0
    end = 1
    step = 1
    if PERSISTENT:
        first = tl.program_id(0)
        end = tl.load(tile_count_ptr)
        step = tl.num_programs(0)
    return first, end, step


@triton.jit
def tile_entry(
    tile_map_ptr, e, TILE_MAP: tl.constexpr, PERSISTENT: tl.constexpr, OWNER_AXIS: tl.constexpr
):
    """(owner, block) of entry ``e`` of program_entries: the map's entry e (persistent), or
    this program's own (program_tile)."""
    if PERSISTENT:
        owner = tl.load(tile_map_ptr + 2 * e)
        block = tl.load(tile_map_ptr + 2 * e + 1)
    else:
        owner, block = program_tile(tile_map_ptr, TILE_MAP, OWNER_AXIS)
    return owner, block
