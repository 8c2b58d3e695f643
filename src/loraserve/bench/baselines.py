"""HF PEFT, the baseline S-LoRA compares against, on the same trace.

The base model is transformers' LlamaForCausalLM (random weights from the preset's shape,
or a real ``--model DIR``); adapters are added with PEFT's ``get_peft_model`` /
``add_adapter`` (random, ``init_lora_weights=False``, in the model dtype) when a batch first
needs them, and the least recently used are deleted beyond ``max_adapters``. The driver
is FIFO, as S-LoRA's PEFT baseline: once requests have arrived, the next ``batch`` of them
in arrival order runs as one mixed-adapter ``generate(adapter_names=...)`` (left-padded,
greedy, EOS ignored); each request stops at its own output length. A time limit cuts the
run: the batch in flight stops there, and throughput counts the requests completed.
"""

from __future__ import annotations

import copy
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from pathlib import Path

import torch
import transformers
from peft import LoraConfig, get_peft_model
from tqdm import tqdm

from loraserve.bench.options import PeftOptions
from loraserve.bench.runner_inproc import BenchRequest, EngineRun, RequestState
from loraserve.bench.workload import adapter_rank
from loraserve.config import ModelConfig

logger = logging.getLogger(__name__)

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in adapter_names


def build_hf_model(
    model: str, config: ModelConfig, device: str, dtype: torch.dtype
) -> torch.nn.Module:
    """transformers' Llama: from ``model`` if it is a directory, else random weights of
    ``config``'s shape (RoPE scaling left out: it does not change the cost)."""
    if Path(model).is_dir():
        hf = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
        return hf.to(device).eval()
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings,
    )
    with torch.device(device):
        hf = transformers.LlamaForCausalLM._from_config(hf_config, dtype=dtype)
    return hf.eval()


class PeftBaseline:
    def __init__(
        self,
        model: torch.nn.Module,
        ranks: Sequence[int],
        targets: Sequence[str],
        options: PeftOptions,
    ) -> None:
        self.base = model
        # Generation ignores EOS (every request runs to its output length, as in the
        # engine's runs). generate() fills a None eos_token_id of the config it is given from
        # the model's own generation config: clear it there.
        model.generation_config.eos_token_id = None
        self.ranks = tuple(ranks)
        self.targets = list(targets)
        self.options = options
        self.peft = None  # the PeftModel, made with the first adapter
        self._loaded: OrderedDict[str, None] = OrderedDict()  # LRU
        self.adapters_added = 0
        self.adapters_deleted = 0

    def run(self, requests: list[BenchRequest]) -> EngineRun:
        queue = deque(sorted(requests, key=lambda r: r.trace.arrival))
        states = {r.trace.index: RequestState(r) for r in queue}
        limit = self.options.time_limit
        with tqdm(
            total=len(queue), desc="peft", unit="req", disable=not self.options.progress
        ) as bar:
            start = time.perf_counter()
            while queue and (now := time.perf_counter() - start) < limit:
                if queue[0].trace.arrival > now:
                    time.sleep(min(queue[0].trace.arrival, limit) - now)
                    continue
                batch = [queue.popleft()]
                while queue and len(batch) < self.options.batch and queue[0].trace.arrival <= now:
                    batch.append(queue.popleft())
                self._generate([states[r.trace.index] for r in batch], start, bar)
            wall = min(time.perf_counter() - start, limit)
        issued = [s for s in states.values() if s.request.trace.arrival <= wall]
        return EngineRun(
            records=[s.record() for s in issued],
            wall_time=wall,
            not_issued=len(states) - len(issued),
            pool={},
            adapters={"peft_added": self.adapters_added, "peft_deleted": self.adapters_deleted},
            decode={},
            extra={"peft_batch": self.options.batch, "peft_time_limit_s": limit},
        )

    def _generate(self, batch: list[RequestState], start: float, bar: tqdm) -> None:
        names = [s.request.adapter or BASE_ADAPTER for s in batch]
        model = self._with_adapters([n for n in names if n != BASE_ADAPTER])
        device = next(self.base.parameters()).device
        input_ids, mask = _left_pad([s.request.prompt for s in batch], device)
        clock = _StepClock(batch, input_ids.shape[1], start, self.options.time_limit, bar)
        config = copy.deepcopy(self.base.generation_config)
        config.eos_token_id = None  # generation ignores EOS (see __init__)
        config.pad_token_id = 0
        config.do_sample = False
        config.max_new_tokens = max(s.request.trace.output_len for s in batch)
        kwargs = {"adapter_names": names} if model is not self.base else {}
        with torch.inference_mode():
            model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                generation_config=config,
                stopping_criteria=transformers.StoppingCriteriaList([clock]),
                **kwargs,
            )

    def _with_adapters(self, names: list[str]) -> torch.nn.Module:
        """The PeftModel with every adapter of ``names`` added (the base model if none)."""
        if not names:
            return self.peft if self.peft is not None else self.base
        keep = max(self.options.max_adapters, len(set(names)))
        for name in dict.fromkeys(names):
            if name in self._loaded:
                self._loaded.move_to_end(name)
                continue
            while len(self._loaded) >= keep:
                self._delete_oldest(set(names))
            self._add(name)
        return self.peft

    def _add(self, name: str) -> None:
        rank = adapter_rank(int(name.rsplit("-", 1)[1]), self.ranks)
        config = LoraConfig(
            r=rank, lora_alpha=rank, target_modules=self.targets, init_lora_weights=False
        )
        if self.peft is None:
            self.peft = get_peft_model(
                self.base, config, adapter_name=name, autocast_adapter_dtype=False
            )
            self.peft.eval()
        else:
            self.peft.add_adapter(name, config, autocast_adapter_dtype=False)
        self._loaded[name] = None
        self.adapters_added += 1

    def _delete_oldest(self, needed: set[str]) -> None:
        victim = next(n for n in self._loaded if n not in needed)
        del self._loaded[victim]
        self.peft.delete_adapter(victim)
        self.adapters_deleted += 1


def _left_pad(prompts: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask [batch, longest], prompts right-aligned (pad id 0)."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


class _StepClock(transformers.StoppingCriteria):
    """A stopping criterion called after every generated token: records first tokens and
    finishes, stops each row at its output length and every row at the time limit."""

    def __init__(
        self, batch: list[RequestState], prompt_len: int, start: float, limit: float, bar: tqdm
    ) -> None:
        self.batch = batch
        self.prompt_len = prompt_len
        self.start = start
        self.limit = limit
        self.bar = bar

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        now = time.perf_counter() - self.start
        generated = input_ids.shape[1] - self.prompt_len
        done = []
        for state in self.batch:
            wanted = state.request.trace.output_len
            if state.first_token is None:
                state.first_token = now
            state.output_tokens = min(generated, wanted)
            if generated >= wanted and state.finish is None:
                state.finish = now
                self.bar.update(1)
            done.append(state.finish is not None or now >= self.limit)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)
