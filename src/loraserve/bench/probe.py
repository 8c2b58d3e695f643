"""The decode step at a run's operating point, with and without LoRA, on the same engine.

A run's own decode steps say what a step with adapters costs at the batch the run reached;
what the same step costs without them has to come from elsewhere. ``physics.lora_extra``
models it from the base run's bytes per ms, at that run's (smaller) batch, and the bytes
rate of a step is not constant in the batch. The probe measures it instead: after the run,
the engine decodes a synthetic batch shaped like the run's average decode step (rows,
context per row, distinct adapters, taken from the trace's own adapters), then the same
batch with every row on the base model, and reports the difference beside the adapters'
byte floor.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any

import torch

from loraserve.bench.physics import HBM_BYTES_PER_S
from loraserve.bench.runner_inproc import all_decoding
from loraserve.engine.adapters import AdapterLoadError
from loraserve.engine.engine import LLMEngine
from loraserve.request import SamplingParams

logger = logging.getLogger(__name__)

PROBE_STEPS = 20  # timed decode steps per half
PROBE_WARMUP = 3  # decode steps before the clock starts (graph capture, compiles)
PROBE_TIMEOUT_S = 60.0  # to reach a full decode batch (prefill, adapter loads)


def decode_probe(
    engine: LLMEngine,
    adapters: list[str],
    batch: int,
    context: int,
    steps: int = PROBE_STEPS,
    timeout_s: float = PROBE_TIMEOUT_S,
) -> dict[str, Any]:
    """Time ``steps`` decode steps of ``batch`` rows of ``context`` tokens, the rows on
    ``adapters`` in turn (each distinct adapter once per step), then the same rows on the
    base model. Returns the two step times, LoRA's extra time and its adapters' byte floor
    (at 4.26 TB/s); or ``{"skipped": reason}`` when the batch cannot be formed (no room in
    the pool for it, more rows than the engine runs at once, no adapters)."""
    if batch < 1 or not adapters:
        return {"skipped": "no decode steps with adapters in the run"}
    max_seqs = engine.config.scheduler.max_num_seqs
    if batch > max_seqs:
        return {"skipped": f"batch {batch} > max_num_seqs {max_seqs}"}
    adapters = list(dict.fromkeys(adapters))[:batch]
    # slack: the first rows decode while later prompts prefill (8192 tokens a step) and
    # while a nearly full batch holds admissions (--admission-interval)
    max_tokens = PROBE_WARMUP + steps + 128
    context = max(1, min(context, engine.max_model_len - max_tokens - 1))
    rows = list(itertools.islice(itertools.cycle(adapters), batch))
    missing = _load_adapters(engine, adapters, timeout_s)
    if missing:
        return {"skipped": missing}
    with_lora = _time_decode(engine, rows, context, max_tokens, steps, timeout_s, "lora")
    if isinstance(with_lora, str):
        return {"skipped": with_lora}
    without = _time_decode(engine, [None] * batch, context, max_tokens, steps, timeout_s, "base")
    if isinstance(without, str):
        return {"skipped": without}
    nbytes = sum(engine.adapter_store.nbytes(a) for a in adapters)
    floor_ms = 1e3 * nbytes / HBM_BYTES_PER_S
    extra = with_lora - without
    return {
        "batch": batch,
        "context": context,
        "distinct_adapters": len(adapters),
        "steps": steps,
        "with_lora_ms": with_lora,
        "without_lora_ms": without,
        "extra_ms": extra,
        "adapter_bytes": nbytes,
        "adapter_floor_ms": floor_ms,
        "extra_over_adapter_floor": extra / floor_ms if floor_ms > 0 else None,
        "decode_ratio": without / with_lora,
        "decode_ratio_at_adapter_floor": without / (without + floor_ms),
    }


def _load_adapters(engine: LLMEngine, names: list[str], timeout_s: float) -> str | None:
    """Bring every adapter into the pool before the rows are queued: rows whose adapters
    came late would still be waiting when the first ones reached their last token, and
    the batch would never form. Returns why not, if they cannot all be resident."""
    deadline = time.monotonic() + timeout_s
    if len(names) > engine.adapter_cache.max_loras:
        return f"{len(names)} adapters > max_loras {engine.adapter_cache.max_loras}"
    pending = list(names)
    while pending:
        try:
            pending = [n for n in pending if not engine.adapters.ensure(n)]
        except AdapterLoadError as e:
            return str(e)
        if pending and time.monotonic() > deadline:
            return f"{len(pending)} of {len(names)} adapters not resident after {timeout_s:.0f} s"
        if pending:
            time.sleep(1e-3)  # the I/O threads read and pack them (they need the GIL)
    return None


def _time_decode(
    engine: LLMEngine,
    rows: list[str | None],
    context: int,
    max_tokens: int,
    steps: int,
    timeout_s: float,
    tag: str,
) -> float | str:
    """Milliseconds per decode step of ``rows`` (an adapter name or None each), or why
    the batch never formed. Every request is aborted and drained afterwards."""
    vocab = engine.config.model.vocab_size
    g = torch.Generator().manual_seed(len(rows) * 1000 + context)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    ids = [f"probe-{tag}-{i}" for i in range(len(rows))]
    try:
        for rid, adapter in zip(ids, rows, strict=True):
            prompt = torch.randint(0, vocab, (context,), generator=g).tolist()
            engine.add_request(prompt, params, request_id=rid, adapter=adapter)
        deadline = time.monotonic() + timeout_s
        ended: dict[str, str] = {}  # probe requests that finished before the timing began
        while not _decoding(engine, len(rows)):
            if ended or time.monotonic() > deadline:
                return _why(engine, len(rows), context, timeout_s, ended, tag)
            outputs = engine.step()
            for out in outputs:
                if out.finished:
                    ended[out.request_id] = out.error or out.finish_reason or "finished"
            if not outputs and not engine.scheduler.running:
                # Only waiting for adapters: a busy loop here would hold the GIL that the
                # adapter I/O threads need between their torch calls (on a GPU, 64 S2
                # adapters did not load in 90 s that way).
                time.sleep(2e-4)
        for _ in range(PROBE_WARMUP):
            engine.step()
        # Timed between two returns of step(), each of which leaves one step queued on the
        # device (overlapped steps): the window holds ``steps`` steps' device time. A sync
        # at either end would drain or refill that queue and count one step too many.
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        elapsed = time.perf_counter() - start
        _sync(engine)
        if len(engine.scheduler.running) != len(rows):  # a row reached its last token
            return f"{tag}: {len(engine.scheduler.running)} of {len(rows)} rows left after timing"
        return 1e3 * elapsed / steps
    finally:
        for rid in ids:
            engine.abort(rid)
        while engine.has_unfinished():
            engine.step()
        engine.drain()


def _why(
    engine: LLMEngine, batch: int, context: int, timeout_s: float, ended: dict[str, str], tag: str
) -> str:
    """Why the batch never formed: rows that ended early (and how), or where the rest are."""
    sched = engine.scheduler
    where = f"{tag}: {len(sched.running)} of {batch} rows running, {len(sched.waiting)} waiting"
    if ended:
        first = next(iter(ended.items()))
        return f"{where}; {len(ended)} ended before decoding (request {first[0]}: {first[1]})"
    return (
        f"{where} after {timeout_s:.0f} s (no room in the pool for {context} tokens each, or "
        "adapters still loading?)"
    )


def _decoding(engine: LLMEngine, batch: int) -> bool:
    """Every row admitted and the next step a decode step (one token each)."""
    running = engine.scheduler.running
    return len(running) == batch and not engine.scheduler.waiting and all_decoding(running)


def _sync(engine: LLMEngine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
