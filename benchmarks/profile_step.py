"""Where the time of one engine step goes, on dummy weights.

    python benchmarks/profile_step.py --model llama-7b --batches 32,128 --context 256 \
        --out-dir results/

For each batch size and for base-only and multi-adapter batches (one adapter per request,
ranks round-robin): decode steps are timed end to end and split into host phases (schedule,
launch, collect = waiting for the device, the rest), the CUDA-graph replay alone is timed
with CUDA events, and a mixed step (the decode batch plus --mixed-prompts new prompts) is
timed eagerly, wall and device; with --io-load also while the adapter I/O threads pack
adapters back to back. torch.profiler tables of the eager decode step and of the
mixed step (device time per kernel) are written to ``--out-dir``. Prints one JSON line per
scenario.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from collections import defaultdict
from pathlib import Path

import torch

from loraserve.bench.adapters import register_adapters
from loraserve.bench.workload import adapter_name
from loraserve.engine.adapters import IO_THREADS
from loraserve.engine.args import EngineArgs
from loraserve.model.loader import PRESETS
from loraserve.request import SamplingParams

IO_FIRST, IO_NAMES = 10_000, 20_000  # --io-load's adapters


def build(args: argparse.Namespace):
    engine = EngineArgs(
        model=args.model,
        load_format="dummy",
        dtype=args.dtype,
        device=args.device,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_model_len=args.context + args.steps + 64,
        max_lora_rank=args.max_lora_rank or max(args.ranks),
        max_loras=max(max(args.batches), 8),
        cuda_graph_max_batch=max(args.batches),
        max_num_batched_tokens=args.max_num_batched_tokens,
        mixed_decode_graphs=args.mixed_decode_graphs,
        # the mixed step's prompts join the step they are added before: no prefill window
        # or admission interval holding them back (session 11's mixed LoRA profile timed a
        # pure decode step that way)
        prefill_batch_window=0.0,
        admission_interval=0.0,
        overlap_steps=not args.no_overlap,
    ).create_engine()
    # (--io-load packs adapters IO_FIRST.. on the I/O threads' side: registered, not loaded)
    count = IO_FIRST + IO_NAMES if args.io_load else max(args.batches)
    register_adapters(engine, count, args.ranks, args.targets)
    return engine


class PhaseTimer:
    """Wraps bound methods of the engine to add up the host time spent in each."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)

    def wrap(self, owner, attr: str, label: str) -> None:
        fn = getattr(owner, attr)

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.totals[label] += time.perf_counter() - t

        setattr(owner, attr, timed)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def scenario(engine, args, batch: int, lora: bool, out_dir: Path) -> dict:
    vocab = engine.config.model.vocab_size
    g = torch.Generator().manual_seed(batch)
    params = SamplingParams(max_tokens=args.steps + 40, temperature=0.0, ignore_eos=True)
    ids = []
    for i in range(batch):
        prompt = torch.randint(0, vocab, (args.context,), generator=g).tolist()
        rid = f"{'l' if lora else 'b'}{batch}-{i}"
        adapter = adapter_name(i) if lora else None
        engine.add_request(prompt, params, request_id=rid, adapter=adapter)
        ids.append(rid)
    runner = engine.runner
    graphs = runner.graphs
    # Step until every request decodes (adapters loaded, prefill done).
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        before = graphs.steps
        engine.step()
        if graphs.steps > before and len(engine.scheduler.running) == batch:
            break
    for _ in range(3):  # warm: captures, compiles
        engine.step()
    sync()

    timer = PhaseTimer()
    timer.wrap(engine.scheduler, "schedule", "schedule")
    timer.wrap(runner, "launch", "launch")
    timer.wrap(runner, "collect", "collect")
    timer.wrap(engine.adapters, "prefetch", "prefetch")
    start = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    sync()
    step_ms = 1000 * (time.perf_counter() - start) / args.steps
    phases = {k: 1000 * v / args.steps for k, v in timer.totals.items()}
    for attr in ("schedule", "launch", "collect", "prefetch"):
        for owner in (engine.scheduler, runner, engine.adapters):
            owner.__dict__.pop(attr, None)
    phases["rest"] = step_ms - sum(phases.values())

    size = next(s for s in graphs.sizes if s >= batch)
    static = graphs._static[size]
    replay_ms = None
    # the per-row form (S2 n=2000's steps; the grouped form is replayed only when rows share)
    graph = static.graphs.get((graphs.targets_for(list(engine.scheduler.running)), False))
    if graph is not None:
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
        ev[0].record()
        for _ in range(args.steps):
            graph.replay()
        ev[1].record()
        sync()
        replay_ms = ev[0].elapsed_time(ev[1]) / args.steps

    # Eager decode steps (no graphs), timed and profiled.
    runner.graphs = None
    engine.step()
    sync()
    start = time.perf_counter()
    for _ in range(5):
        engine.step()
    sync()
    eager_ms = 1000 * (time.perf_counter() - start) / 5
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(3):
            engine.step()
        sync()
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    name = f"profile_{'lora' if lora else 'base'}_b{batch}.txt"
    (out_dir / name).write_text(prof.key_averages().table(sort_by=sort, row_limit=45))

    # One mixed step: the decode batch plus --mixed-prompts new prompts of args.context
    # tokens (adapters already resident, so only compute is timed), then the same again
    # under the profiler: host time (wall) against device time (CUDA events).
    def mixed_step(tag: str) -> tuple[float, float | None]:
        for k in range(args.mixed_prompts):
            prompt = torch.randint(0, vocab, (args.context,), generator=g).tolist()
            rid = f"mix{tag}{batch}{lora}-{k}"
            engine.add_request(
                prompt, params, request_id=rid, adapter=adapter_name(k) if lora else None
            )
            ids.append(rid)
        sync()
        events = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if sync_on else []
        if events:
            events[0].record()
        start = time.perf_counter()
        engine.step()
        wall = 1000 * (time.perf_counter() - start)
        if events:
            events[1].record()
        sync()
        if engine.scheduler.waiting:
            raise RuntimeError(
                f"the mixed step left {len(engine.scheduler.waiting)} of its prompts waiting "
                "(adapter not resident, or no pages): it would time a decode step"
            )
        return wall, events[0].elapsed_time(events[1]) if events else None

    sync_on = torch.cuda.is_available()
    if args.mixed_decode_graphs:  # the decode rows of the mixed step replay the graphs
        runner.graphs = graphs
    # --mixed-reps mixed steps, each with new prompts that are aborted after it (the batch
    # stays at ``batch``): the median, and every rep, of host and device time
    reps = []
    for rep in range(args.mixed_reps):
        first = len(ids)
        reps.append(mixed_step(f"r{rep}-"))
        for rid in ids[first:]:
            engine.abort(rid)
    mixed_ms = statistics.median(wall for wall, _ in reps)
    mixed_device_ms = statistics.median(d for _, d in reps) if sync_on else None
    with torch.profiler.profile(activities=activities) as prof:
        mixed_step("b")
    name = f"profile_mixed_{'lora' if lora else 'base'}_b{batch}.txt"
    (out_dir / name).write_text(prof.key_averages().table(sort_by=sort, row_limit=45))
    io = io_load(engine, mixed_step, ids, args) if args.io_load else {}
    runner.graphs = graphs
    for rid in ids:
        engine.abort(rid)
    while engine.has_unfinished():
        engine.step()
    return {
        "batch": batch,
        "lora": lora,
        "graph_step_ms": step_ms,
        "graph_step_phases_ms": phases,
        "graph_replay_ms": replay_ms,
        "eager_step_ms": eager_ms,
        "mixed_step_ms": mixed_ms,
        "mixed_step_device_ms": mixed_device_ms,
        "mixed_step_reps_ms": reps,
        "mixed_prompts": args.mixed_prompts,
        **io,
    }


def io_load(engine, mixed_step, ids: list[str], args: argparse.Namespace) -> dict:
    """Mixed steps with the adapter I/O threads idle, then with as many threads packing
    adapters back to back (names never used before, so each one is generated, as at S2
    n=2000 saturation): does their work (GIL, CPU, pinned allocations) slow the engine
    thread's launches?"""
    stop = threading.Event()
    packs = [0]

    def pack_loop(k: int) -> None:
        i = IO_FIRST + k
        while not stop.is_set() and i < IO_FIRST + IO_NAMES:
            packed = engine.adapter_cache.pack(engine.adapter_store.get(adapter_name(i)))
            engine.adapter_cache.discard(packed)
            packs[0] += 1
            i += IO_THREADS

    def timed(tag: str) -> list[float]:
        walls = []
        for k in range(args.io_steps):
            first = len(ids)
            walls.append(mixed_step(f"{tag}{k}")[0])
            for rid in ids[first:]:  # back to the same decode batch for the next one
                engine.abort(rid)
            engine.step()
        return walls

    idle = timed("idle")
    threads = [
        threading.Thread(target=pack_loop, args=(k,), daemon=True) for k in range(IO_THREADS)
    ]
    for t in threads:
        t.start()
    time.sleep(1.0)  # the threads at full speed
    busy = timed("busy")
    stop.set()
    for t in threads:
        t.join()
    return {
        "mixed_step_ms_io_idle": statistics.median(idle),
        "mixed_step_ms_io_busy": statistics.median(busy),
        "io_threads": IO_THREADS,
        "io_packs": packs[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama-7b", help="a preset or a model directory")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batches", default="32,128")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--mixed-prompts", type=int, default=1, help="new prompts in the mixed step"
    )
    parser.add_argument(
        "--mixed-reps", type=int, default=3, help="mixed steps timed (median reported)"
    )
    parser.add_argument(
        "--no-overlap",
        action="store_true",
        help="engine option --no-overlap-steps: a step's device time is its own (an overlapped "
        "step also queues the next decode step before it returns)",
    )
    parser.add_argument("--scenarios", default="base,lora", help="base,lora | lora | base")
    parser.add_argument("--ranks", default="64,32,16,8")
    parser.add_argument(
        "--max-lora-rank",
        type=int,
        default=None,
        help="engine option: the adapter tables' width (default: the largest of --ranks)",
    )
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument(
        "--mixed-decode-graphs",
        type=int,
        default=0,
        help="engine option: mixed steps replay their decode rows as a graph (N rows or more)",
    )
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.8)
    parser.add_argument("--out-dir", default=".")
    parser.add_argument(
        "--io-load",
        action="store_true",
        help="also time --io-steps mixed steps with the adapter I/O threads idle, then busy "
        "packing S2-sized adapters (engine-thread contention)",
    )
    parser.add_argument("--io-steps", type=int, default=5)
    args = parser.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    args.ranks = [int(r) for r in args.ranks.split(",")]
    args.targets = args.targets.split(",")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    engine = build(args)
    print(json.dumps({"engine_ready_s": round(time.perf_counter() - start, 1)}), flush=True)
    results = []
    for batch in args.batches:
        for lora in (s == "lora" for s in args.scenarios.split(",")):
            r = scenario(engine, args, batch, lora, out_dir)
            print(json.dumps(r), flush=True)
            results.append(r)
    (out_dir / "profile_step.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    assert PRESETS  # presets resolve by name through EngineArgs
    main()
