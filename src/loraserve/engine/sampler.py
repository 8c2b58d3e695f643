"""Sampling the next token of every sequence in a step, vectorised over the batch.

Order as in transformers: temperature, then top-k, then top-p. Sampling uses the
exponential-race trick (argmax of p / E with E ~ Exp(1)), so a seeded request draws its
noise from its own generator and gets the same tokens whatever else is in the batch.
Logprobs are of the model's distribution (log_softmax of the raw logits), as vLLM reports
them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraserve.request import Request


@dataclass
class SampleTensors:
    """Sampling results, not synchronised yet. On CUDA they are already being copied into
    pinned host memory; ``ready`` completes with the copies."""

    tokens: torch.Tensor  # [N] int64
    top_ids: torch.Tensor | None  # [N, k] int64, when any request asked for logprobs
    top_logprobs: torch.Tensor | None  # [N, k] fp32
    chosen_logprobs: torch.Tensor | None  # [N] fp32
    ready: torch.cuda.Event | None = None
    # The sampled tokens on the device: the next step may read them there, before the host
    # has them (see LLMEngine's overlapped decode steps).
    device_tokens: torch.Tensor | None = None

    def to_host(self) -> SampleTensors:
        """Start the device->host copies (CUDA): the step's one wait is then an event wait,
        which lets the adapter I/O threads have the GIL meanwhile (``tolist`` on a device
        tensor waits with the GIL held)."""
        if self.tokens.device.type != "cuda":
            self.device_tokens = self.tokens
            return self
        host = [
            None
            if t is None
            else torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
            for t in (self.tokens, self.top_ids, self.top_logprobs, self.chosen_logprobs)
        ]
        ready = torch.cuda.Event()
        ready.record()
        return SampleTensors(*host, ready=ready, device_tokens=self.tokens)


class Sampler:
    def __init__(self, device: torch.device | str, seed: int = 0) -> None:
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    def make_generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    def launch(self, logits: torch.Tensor, requests: list[Request]) -> SampleTensors:
        """Enqueue sampling of one token per row. logits [N, vocab] fp32."""
        if all(r.params.greedy for r in requests):
            tokens = logits.argmax(dim=-1)
        else:
            greedy = torch.tensor([r.params.greedy for r in requests], device=logits.device)
            tokens = self._sample(logits, requests, greedy)
        k = max((r.params.logprobs or 0) for r in requests)
        if all(r.params.logprobs is None for r in requests):
            return SampleTensors(tokens, None, None, None).to_host()
        logp = logits.log_softmax(dim=-1)
        top = logp.topk(k, dim=-1)
        chosen = logp.gather(1, tokens[:, None]).squeeze(1)
        return SampleTensors(tokens, top.indices, top.values, chosen).to_host()

    def collect(
        self, samples: SampleTensors, requests: list[Request]
    ) -> tuple[list[int], list[dict[int, float] | None]]:
        """Read the results back (synchronises) and shape the logprobs per request."""
        if samples.ready is not None:
            samples.ready.synchronize()  # waits without the GIL
        tokens = samples.tokens.tolist()
        if samples.top_ids is None:
            return tokens, [None] * len(requests)
        top_ids, top_vals = samples.top_ids.tolist(), samples.top_logprobs.tolist()
        chosen = samples.chosen_logprobs.tolist()
        out: list[dict[int, float] | None] = []
        for i, r in enumerate(requests):
            k = r.params.logprobs
            if k is None:
                out.append(None)
                continue
            entry = dict(zip(top_ids[i][:k], top_vals[i][:k], strict=True))
            entry[tokens[i]] = chosen[i]
            out.append(entry)
        return tokens, out

    def _sample(
        self, logits: torch.Tensor, requests: list[Request], greedy: torch.Tensor
    ) -> torch.Tensor:
        temps = torch.tensor(
            [r.params.temperature or 1.0 for r in requests], device=logits.device
        ).unsqueeze(1)
        scaled = _top_k_top_p(logits / temps, requests)
        probs = scaled.softmax(dim=-1)
        noise = self._noise(probs, requests)
        sampled = (probs / noise).argmax(dim=-1)
        return torch.where(greedy, logits.argmax(dim=-1), sampled)

    def _noise(self, probs: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for i, r in enumerate(requests):
            if r.generator is not None:
                noise[i].exponential_(generator=r.generator)
        return noise


def _top_k_top_p(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    vocab = logits.shape[-1]
    top_k = [r.params.top_k if r.params.top_k > 0 else vocab for r in requests]
    top_p = [r.params.top_p for r in requests]
    if all(k >= vocab for k in top_k) and all(p >= 1.0 for p in top_p):
        return logits
    k = torch.tensor(top_k, device=logits.device).unsqueeze(1)
    p = torch.tensor(top_p, device=logits.device, dtype=logits.dtype).unsqueeze(1)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
    sorted_logits = sorted_logits.masked_fill(ranks >= k, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    # Drop a token when the mass before it already reaches top_p (the first always stays).
    drop = (probs.cumsum(dim=-1) - probs) >= p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)
