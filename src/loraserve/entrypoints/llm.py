"""The offline API, in the shape vLLM users know:

from loraserve import LLM, SamplingParams
llm = LLM()                                          # the embedded default model
outs = llm.generate(["Hello", [1, 2, 3]], SamplingParams(max_tokens=16))
outs[0].text, outs[0].token_ids, outs[0].logprobs
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from tqdm import tqdm

from loraserve.engine.args import EngineArgs
from loraserve.engine.engine import LLMEngine, Prompt, PromptError
from loraserve.request import FinishReason, RequestOutput, SamplingParams

logger = logging.getLogger(__name__)


class LLM:
    """An engine in this process. Keyword arguments are EngineArgs fields
    (dtype, device, max_model_len, num_pages, max_num_seqs, ...)."""

    def __init__(
        self,
        model: str | None = None,
        adapters: Mapping[str, str | Path] | None = None,
        **kwargs,
    ) -> None:
        self.engine: LLMEngine = EngineArgs(model=model, **kwargs).create_engine()
        for name, path in (adapters or {}).items():
            self.add_adapter(name, path)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def add_adapter(self, name: str, path: str | Path) -> None:
        """Register a PEFT adapter directory (adapter_config.json + weights) as ``name``."""
        self.engine.add_adapter(name, path)

    def remove_adapter(self, name: str) -> None:
        """Unregister ``name``, after any request still using it has finished."""
        self.engine.check_adapter(name)
        while self.engine.adapter_in_use(name):
            self.engine.step()
        self.engine.remove_adapter(name)

    def list_adapters(self) -> list[str]:
        return self.engine.adapter_store.names()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        adapter: str | None | Sequence[str | None] = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; results in the order of the prompts.

        ``adapter``: one adapter name for all prompts, or one per prompt (None = the base
        model). Invalid sampling values raise ValueError and unknown adapters KeyError,
        before anything runs. A prompt the engine cannot serve (longer than the context
        window, say) or whose adapter fails to load gets an output with
        ``finish_reason == "error"`` and ``error`` set; the other prompts still run.
        """
        prompts = _as_list(prompts)
        params_list = _params_list(params, len(prompts))
        adapters = _adapter_list(adapter, len(prompts))
        for p in params_list:
            p.validate()
        for name in set(adapters):
            self.engine.check_adapter(name)
        results: dict[str, RequestOutput] = {}
        ids: list[str] = []
        for prompt, p, name in zip(prompts, params_list, adapters, strict=True):
            ids.append(self._add(prompt, p, name, results))
        pending = {i for i in ids if i not in results}
        bar = tqdm(total=len(pending), disable=not use_tqdm, desc="generate")
        while pending:
            for out in self.engine.step():
                if out.finished and out.request_id in pending:
                    results[out.request_id] = out
                    pending.discard(out.request_id)
                    bar.update(1)
        bar.close()
        return [results[i] for i in ids]

    def _add(
        self, prompt: Prompt, params: SamplingParams, adapter: str | None, results: dict
    ) -> str:
        try:
            return self.engine.add_request(prompt, params, adapter=adapter)
        except PromptError as e:
            request_id = f"rejected-{len(results)}-{id(prompt)}"
            logger.warning("prompt rejected: %s", e)
            results[request_id] = _error_output(request_id, prompt, str(e))
            return request_id


def _as_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one prompt given as token ids
    return prompts


def _params_list(
    params: SamplingParams | Sequence[SamplingParams] | None, n: int
) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams() for _ in range(n)]
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"got {len(params)} SamplingParams for {n} prompts: give one or one each")
    return params


def _adapter_list(adapter: str | None | Sequence[str | None], n: int) -> list[str | None]:
    if adapter is None or isinstance(adapter, str):
        return [adapter] * n
    adapters = list(adapter)
    if len(adapters) != n:
        raise ValueError(f"got {len(adapters)} adapters for {n} prompts: give one or one each")
    return adapters


def _error_output(request_id: str, prompt: Prompt, error: str) -> RequestOutput:
    return RequestOutput(
        request_id=request_id,
        prompt=prompt if isinstance(prompt, str) else None,
        prompt_token_ids=[] if isinstance(prompt, str) else list(prompt),
        text="",
        token_ids=[],
        logprobs=None,
        finished=True,
        finish_reason=FinishReason.ERROR.value,
        error=error,
    )
