"""EngineArgs: the user-facing knobs of an engine, shared by LLM(), the CLI and the server.

Each field carries its help text; ``add_cli_args`` turns the dataclass into argparse flags
and ``from_cli`` back, so there is one list of options, not one per entry point.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loraserve.config import (
    LORA_BACKENDS,
    CacheConfig,
    EngineConfig,
    LoRAConfig,
    ModelConfig,
    SchedulerConfig,
    parse_dtype,
)
from loraserve.engine.engine import LLMEngine, resolve_model_path
from loraserve.model.loader import PRESETS, build_model, init_dummy_weights, load_weights
from loraserve.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# A few decode steps of a 7B model: prompts arriving within it share one (eager) prefill step.
DEFAULT_PREFILL_WINDOW = 0.05
# With CUDA graphs a mixed (prefill) step costs ~3x a graphed decode step of the same batch at
# 7B (S2 n=2000 on the H200: 70-77 ms vs 28 ms, docs/benchmarks.md): at saturation, admit in
# groups and replay the decode rows of mixed steps as graphs. Same trace, same process:
# 17.8 req/s with neither, 18.5 with the split, 20.1 with both.
DEFAULT_MIXED_DECODE_GRAPHS = 64
DEFAULT_ADMISSION_INTERVAL = 0.25


def _opt(default, help: str, **kw):  # noqa: A002 - mirrors argparse
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class EngineArgs:
    model: str | None = _opt(
        None,
        "HF model directory, or a preset name with --load-format dummy; "
        "default: the embedded SmolLM2-135M-Instruct",
    )
    load_format: str = _opt(
        "auto", "auto (safetensors) | dummy (random weights)", choices=("auto", "dummy")
    )
    dtype: str = _opt(
        "auto", "auto | float32 | float16 | bfloat16 (auto: bf16 on CUDA, fp32 on CPU)"
    )
    device: str | None = _opt(None, "cpu | cuda | cuda:N (default: cuda if available)")
    max_model_len: int | None = _opt(None, "context window (default: the model's)")
    block_size: int = _opt(16, "tokens per KV page")
    num_pages: int | None = _opt(None, "page pool size in pages (overrides the byte budget)")
    pool_bytes: int | None = _opt(None, "page pool size in bytes")
    gpu_memory_utilization: float = _opt(0.9, "share of GPU memory loraserve may use")
    max_num_seqs: int = _opt(256, "most sequences in one step")
    max_num_batched_tokens: int = _opt(8192, "most tokens in one step (prefill is chunked)")
    prefill_batch_window: float | None = _opt(
        None,
        "seconds a new prompt may wait while running requests decode, so that prompts "
        "arriving together share one prefill step (mixed prefill+decode steps run outside the "
        f"CUDA graphs); default: {DEFAULT_PREFILL_WINDOW} with CUDA graphs, else 0",
    )
    ttft_deadline: float | None = _opt(
        None,
        "fail a request that has waited S seconds without starting (S-LoRA's early abort: "
        "it can no longer meet a first-token deadline; the server answers 503); default: "
        "wait as long as it takes",
    )
    admission_interval: float | None = _opt(
        None,
        "with the batch nearly full and prompts waiting, admit new prompts at most every S "
        "seconds (unless max_num_seqs/8 slots are free), so fewer decode steps turn into "
        "mixed prefill steps at saturation; 0: admit whenever a slot frees; default: "
        f"{DEFAULT_ADMISSION_INTERVAL} with CUDA graphs, else 0",
    )
    attention_backend: str = _opt(
        "auto", "auto | torch | triton", choices=("auto", "torch", "triton")
    )
    lora_backend: str = _opt(
        "auto",
        "LoRA kernels: auto | torch | triton | bmm (bmm: S-LoRA's padded ablation)",
        choices=LORA_BACKENDS,
    )
    cuda_graph_max_batch: int | None = _opt(
        None,
        "replay decode steps of up to N requests as CUDA graphs (padded to fixed sizes, "
        "captured at startup); 0 = eager (default: max-num-seqs on CUDA, 0 on the CPU)",
    )
    overlap_steps: bool = _opt(
        True,
        "queue a graphed decode step that continues the batch unchanged before the one ahead "
        "of it has finished, so the host's work overlaps the device's (only with CUDA graphs)",
    )
    group_lora_rows: bool = _opt(
        True,
        "decode graphs also in a form that runs each adapter's rows as one LoRA segment in "
        "16-row tiles (its weights read once per step, not once per row), replayed by steps "
        "whose rows share adapters enough; off: always one segment per row",
    )
    lora_side_stream: bool = _opt(
        False,
        "run each LoRA shrink on a second CUDA stream beside its base GEMM (experimental, "
        "not yet measured on a GPU; Triton LoRA kernels only)",
    )
    lora_rank_pack: bool = _opt(
        False,
        "decode LoRA expand: a small rank's B^T rows of several output tiles in one load, "
        "also with --max-lora-rank above 16 (up to 16 it is the default; above, it lost "
        "on an H200: S2's mixed ranks 48 vs 42 us per q|k|v call; Triton LoRA kernels "
        "only)",
    )
    lora_fused_decode: bool = _opt(
        True,
        "decode steps whose adapters all have ranks up to 16 run LoRA in one launch per "
        "layer call (shrink and expand fused, a program per row and target, v kept in "
        "registers) instead of two; with --max-lora-rank above 16, from decode graphs "
        "captured for them too. On an H200, S1 (rank 8) at n = 2000: 0.940 of base with "
        "--max-lora-rank 64, 0.896 without it; at rank 64 it lost. Triton LoRA kernels only",
    )
    lora_fused_max_rank: int = _opt(
        16,
        "the largest rank of a step's adapters at which --lora-fused-decode applies, and "
        "up to which steps take LoRA tiles for that rank where --max-lora-rank is larger. "
        "On an H200, 32 won at 224 rank-32 rows (3.71 vs 3.97 ms of LoRA a decode step) "
        "and lost at 8 (1.17 vs 0.83 ms); 64 lost with S2's mixed ranks (5.70 vs 4.19 "
        "ms). Triton LoRA kernels only",
    )
    overlap_admission: bool = _opt(
        True,
        "also queue ahead a step that admits prompts: its decode rows read the tokens the "
        "step ahead samples on the device, its prompts (those at the head of the queue whose "
        "adapters are resident) are filled meanwhile (S2 n=2000 on an H200: 22.4 vs 20.8 "
        "req/s); only with CUDA graphs and no --ttft-deadline",
    )
    prefill_graphs: bool | None = _opt(
        None,
        "replay the prompt rows of a step as CUDA graphs too (up to 4 replays of up to 8 "
        "prompts and 4096 tokens each, padded to a bucket), after its decode rows' graph: no "
        "eager launches in mixed steps; default: on with CUDA graphs (but not with "
        "--lora-backend bmm, the padded ablation), else off",
    )
    mixed_decode_graphs: int | None = _opt(
        None,
        "in a step that also prefills, replay its decode rows as a CUDA graph (then run the "
        "prompt rows eagerly) when there are at least N of them: one more read of the "
        "weights, no eager launches for the decode rows; 0: off; default: "
        f"{DEFAULT_MIXED_DECODE_GRAPHS} with CUDA graphs, else 0",
    )
    max_loras: int | None = _opt(
        None,
        "most adapters resident in the page pool at once (one table slot each; the pool's "
        "pages bound them too); default: 2 x max_num_seqs, so that every row of a full batch "
        "can have an adapter of its own, with as many again cached or prefetched",
    )
    max_lora_rank: int = _opt(64, "largest adapter rank served")
    adapter_host_cache_bytes: int = _opt(8 << 30, "host-memory LRU of adapter weights, bytes")
    adapter_pool_bytes: int | None = _opt(
        None,
        "give adapters a pool of their own of this many bytes, cut from the page pool's "
        "budget (S-LoRA's 'separate buffers' ablation); default: one unified pool",
    )
    adapter_prefetch: int = _opt(
        16,
        "while the device computes a step, start loading the adapters of the first N "
        "distinct adapters among queued requests (keep N well below max_loras - max_num_seqs, "
        "or prefetched adapters evict each other); 0: load only at admission",
    )
    adapter_io_threads: int | None = _opt(
        None,
        "threads that read (or generate) and pack adapters in the background; default: "
        "half the CPU cores, 2 to 8",
    )
    adapter_copy_in_wait: bool = _opt(
        True,
        "an I/O thread that finishes packing an adapter while the engine thread waits for "
        "the device gives it pool pages and starts its copy itself, instead of leaving that "
        "to the engine thread after the step",
    )
    seed: int = _opt(
        0, "seed of the sampler for requests without their own seed", flag="engine-seed"
    )

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("engine")
        for f in dataclasses.fields(cls):
            kind = _field_type(f)
            extra = {k: v for k, v in f.metadata.items() if k not in ("help", "flag")}
            if kind is bool:  # --name / --no-name
                extra["action"] = argparse.BooleanOptionalAction
                kind = None
            group.add_argument(
                "--" + _flag(f),
                dest=_flag(f).replace("-", "_"),
                type=kind,
                default=f.default,
                help=_help(f),
                **extra,
            )

    @classmethod
    def cli_defaults(cls, args: EngineArgs) -> dict[str, object]:
        """argparse defaults (by dest) that make ``from_cli`` return ``args``."""
        return {_flag(f).replace("-", "_"): getattr(args, f.name) for f in dataclasses.fields(cls)}

    @classmethod
    def from_cli(cls, ns: argparse.Namespace) -> EngineArgs:
        return cls(
            **{f.name: getattr(ns, _flag(f).replace("-", "_")) for f in dataclasses.fields(cls)}
        )

    def _with_graphs(self, value: float | None, default: float, graph_batch: int) -> float:
        """``value`` if given, else ``default`` when decode steps replay CUDA graphs (where
        mixed steps cost several decode steps), else 0."""
        if value is not None:
            return value
        return default if graph_batch > 0 else 0

    def _prefill_graphs(self, graph_batch: int) -> bool:
        if self.prefill_graphs is not None:
            return self.prefill_graphs
        return graph_batch > 0 and self.lora_backend != "bmm"

    def _prefill_window(self, graph_batch: int) -> float:
        if self.prefill_batch_window is not None:
            return self.prefill_batch_window
        return DEFAULT_PREFILL_WINDOW if graph_batch > 0 else 0.0

    def _graph_batch(self, device: str) -> int:
        """Decode graphs: on by default on CUDA, unless a torch reference path (which reads
        its batch layout back to the host in every layer) cannot be captured."""
        cuda = torch.device(device).type == "cuda"
        host_paths = [
            f"--{flag} torch"
            for flag, value in (
                ("attention-backend", self.attention_backend),
                ("lora-backend", self.lora_backend),
            )
            if value == "torch"
        ]
        if self.cuda_graph_max_batch is not None:
            if cuda and self.cuda_graph_max_batch > 0 and host_paths:
                raise ValueError(
                    f"CUDA graphs cannot capture {' and '.join(host_paths)} (the torch "
                    "reference path syncs with the host in every layer): use the triton "
                    "backend or pass --cuda-graph-max-batch 0"
                )
            return self.cuda_graph_max_batch
        return self.max_num_seqs if cuda and not host_paths else 0

    def create_engine(self) -> LLMEngine:
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = _resolve_dtype(self.dtype, device)
        model_config, path = self._model_config()
        graph_batch = self._graph_batch(device)
        max_len = self.max_model_len or model_config.max_position_embeddings
        if max_len > model_config.max_position_embeddings:
            raise ValueError(
                f"max_model_len={max_len} exceeds the model's max_position_embeddings="
                f"{model_config.max_position_embeddings}"
            )
        config = EngineConfig(
            model=model_config,
            cache=CacheConfig(
                block_size=self.block_size,
                num_pages=self.num_pages,
                pool_bytes=self.pool_bytes,
                gpu_memory_utilization=self.gpu_memory_utilization,
            ),
            scheduler=SchedulerConfig(
                self.max_num_seqs,
                self.max_num_batched_tokens,
                self._prefill_window(graph_batch),
                self.ttft_deadline,
                self._with_graphs(self.admission_interval, DEFAULT_ADMISSION_INTERVAL, graph_batch),
            ),
            lora=LoRAConfig(
                2 * self.max_num_seqs if self.max_loras is None else self.max_loras,
                self.max_lora_rank,
                self.adapter_host_cache_bytes,
                prefetch=self.adapter_prefetch,
                adapter_pool_bytes=self.adapter_pool_bytes,
                io_threads=self.adapter_io_threads,
                copy_in_wait=self.adapter_copy_in_wait,
            ),
            lora_backend=self.lora_backend,
            cuda_graph_max_batch=graph_batch,
            overlap_steps=self.overlap_steps,
            overlap_admission=self.overlap_admission,
            group_lora_rows=self.group_lora_rows,
            lora_side_stream=self.lora_side_stream,
            lora_rank_pack=self.lora_rank_pack,
            lora_fused_decode=self.lora_fused_decode,
            lora_fused_max_rank=self.lora_fused_max_rank,
            prefill_graphs=self._prefill_graphs(graph_batch),
            mixed_decode_graphs=int(
                self._with_graphs(
                    self.mixed_decode_graphs, DEFAULT_MIXED_DECODE_GRAPHS, graph_batch
                )
            ),
            device=device,
            dtype=dtype,
            max_model_len=max_len,
            attention_backend=self.attention_backend,
            seed=self.seed,
        )
        model = build_model(model_config, dtype, device, max_len)
        if self.load_format == "dummy":
            init_dummy_weights(model, self.seed)
        else:
            load_weights(model, path)
        tokenizer = Tokenizer.from_dir(path) if path is not None else None
        return LLMEngine(config, model, tokenizer, model_path=str(path or self.model))

    def _model_config(self) -> tuple[ModelConfig, Path | None]:
        if self.load_format == "dummy" and self.model in PRESETS:
            return PRESETS[self.model], None
        if self.load_format == "dummy" and self.model is None:
            raise ValueError(
                f"--load-format dummy needs --model: a preset ({', '.join(PRESETS)}) "
                "or a directory with config.json"
            )
        path = resolve_model_path(self.model)
        return ModelConfig.from_dir(path), path


def _help(f: dataclasses.Field) -> str:
    text = f.metadata["help"]
    return text if "default" in text else f"{text} (default: {f.default})"


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag", f.name.replace("_", "-"))


def _field_type(f: dataclasses.Field) -> type:
    text = str(f.type)
    if text in ("bool", "bool | None"):  # None: a default that depends on other options
        return bool
    if "int" in text:
        return int
    if "float" in text:
        return float
    return str


def _resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return parse_dtype(dtype)
