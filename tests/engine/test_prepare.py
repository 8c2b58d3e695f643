"""ModelRunner.prepare: the eager step's inputs, checked row by row against their meaning."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from loraserve.engine.runner import ModelRunner
from loraserve.engine.scheduler import ScheduledBatch
from loraserve.engine.upload import Upload
from loraserve.memory.adapter_cache import AdapterCache
from loraserve.memory.kv_cache import kv_slot
from loraserve.memory.pool import PagePool
from loraserve.model.loader import PRESETS
from loraserve.request import Request, SamplingParams

BLOCK = 4


def _request(rng: random.Random, i: int, total: int, computed: int, slot: int | None) -> Request:
    r = Request(str(i), [rng.randrange(1000) for _ in range(total)], SamplingParams())
    r.num_computed_tokens = computed
    r.block_table = rng.sample(range(500), -(-total // BLOCK) + rng.randrange(3))
    r.adapter_slot = slot
    return r


@pytest.fixture
def runner():
    pool = PagePool(4, 1 << 16, torch.float32, "cpu")
    cache = AdapterCache(pool, PRESETS["llama-7b"], max_loras=8, max_rank=16)
    return ModelRunner(None, BLOCK, torch.device("cpu"), None, adapter_cache=cache)


def test_prepare_matches_each_requests_tokens_positions_and_slots(runner):
    rng = random.Random(0)
    batch = ScheduledBatch()
    for i in range(30):
        total = rng.randrange(2, 60)
        if rng.random() < 0.7:  # decode: one new token
            batch.add(_request(rng, i, total, total - 1, rng.choice([None, 0, 1, 2])), 1)
        else:  # (chunked) prefill
            computed = rng.randrange(0, total - 1)
            n = rng.randrange(2, total - computed + 1)
            batch.add(_request(rng, i, total, computed, rng.choice([None, 3, 4])), n)
    forward, sampling = runner.prepare(batch)
    n_decode = forward.num_decode_seqs
    # The prefill part's attention inputs: the same rows, in tensors of their own, aligned.
    tables, lens, starts_p = forward.prefill_part
    assert torch.equal(tables, forward.block_tables[n_decode:])
    assert torch.equal(lens, forward.seq_lens[n_decode:])
    assert torch.equal(starts_p, forward.query_start_loc[n_decode:])
    assert all(t.data_ptr() % 16 == 0 for t in forward.prefill_part)
    starts = forward.query_start_loc.tolist()
    by_id = dict(zip((r.request_id for r in batch.requests), batch.num_scheduled, strict=True))
    order = []
    for s in range(forward.num_seqs):
        rows = slice(starts[s], starts[s + 1])
        # Which request owns these rows: the one whose tokens and context length match.
        seq_len = int(forward.seq_lens[s])
        n = starts[s + 1] - starts[s]
        req = next(
            r
            for r in batch.requests
            if r.num_computed_tokens + by_id[r.request_id] == seq_len
            and by_id[r.request_id] == n
            and r.tokens_slice(seq_len - n, seq_len) == forward.input_ids[rows].tolist()
            and r not in order
        )
        order.append(req)
        positions = list(range(seq_len - n, seq_len))
        assert forward.positions[rows].tolist() == positions
        assert forward.slot_mapping[rows].tolist() == [kv_slot(req, p, BLOCK) for p in positions]
        table = forward.block_tables[s].tolist()
        assert table[: len(req.block_table)] == req.block_table
        assert not any(table[len(req.block_table) :])
        assert (n == 1) == (s < n_decode)  # decode rows first
    assert forward.max_q_len == max(batch.num_scheduled)
    assert forward.max_seq_len == int(forward.seq_lens.max())
    finished = [r for r in order if r.num_computed_tokens + by_id[r.request_id] == r.num_tokens]
    assert sampling == finished
    ends = [starts[order.index(r) + 1] - 1 for r in finished]
    assert forward.logits_indices.tolist() == ends
    # LoRA: decode rows of adapters one segment each; prefill rows one per adapter run.
    lora = forward.lora
    decode_rows = [starts[s] for s, r in enumerate(order[:n_decode]) if r.adapter_slot is not None]
    assert lora.decode.seg_start.tolist()[:-1] == decode_rows
    assert lora.decode.seg_slot.tolist() == [
        r.adapter_slot for r in order[:n_decode] if r.adapter_slot is not None
    ]
    prefill_slots = [r.adapter_slot for r in order[n_decode:] if r.adapter_slot is not None]
    assert lora.meta.seg_slot.tolist() == sorted(set(prefill_slots))
    assert lora.meta.max_seg_len == max(
        sum(by_id[r.request_id] for r in order[n_decode:] if r.adapter_slot == slot)
        for slot in set(prefill_slots)
    )


def test_upload_keeps_shapes_dtypes_and_order():
    upload = Upload(torch.device("cpu"))
    arrays = [
        np.arange(6, dtype=np.int64).reshape(2, 3),
        np.array([7, 8], np.int32),
        np.array([], np.int64),
        np.arange(12, dtype=np.int32).reshape(3, 4),
    ]
    out = upload(arrays)
    for a, t in zip(arrays, out, strict=True):
        assert t.dtype == torch.from_numpy(a).dtype and tuple(t.shape) == a.shape
        assert t.is_contiguous() and t.tolist() == a.tolist()
    with pytest.raises(TypeError, match="int64 and int32"):
        upload([np.zeros(2, np.float32)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned staging is CUDA only")
def test_upload_reuses_its_pinned_buffer_without_corrupting_earlier_steps():
    upload = Upload(torch.device("cuda"))
    first = upload([np.arange(1000, dtype=np.int64)])[0]
    second = upload([np.arange(1000, 2000, dtype=np.int64)])[0]
    assert first.tolist() == list(range(1000)) and second.tolist() == list(range(1000, 2000))


def test_upload_views_start_16_byte_aligned():
    """Triton specialises pointer arguments on 16-byte alignment: a view at a size-dependent
    offset would compile a new kernel variant mid-serving."""
    upload = Upload(torch.device("cpu"))
    arrays = [np.arange(n, dtype=dt) for n in (1, 3, 5, 2, 7) for dt in (np.int64, np.int32)]
    out = upload(arrays)
    for a, t in zip(arrays, out, strict=True):
        assert t.data_ptr() % 16 == 0, (a.dtype, a.size)
        assert t.tolist() == a.tolist()
