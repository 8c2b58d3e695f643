"""What a user asks for (SamplingParams), what the engine tracks (Request), what comes back
(RequestOutput)."""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """Per-request sampling settings, in the shape vLLM users know.

    temperature 0 is greedy. ``logprobs=k`` returns, for every generated token, the top-k
    logprobs of the model's distribution plus the chosen token's. ``seed`` makes sampling
    reproducible for this request whatever else is in the batch.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or (self.top_k < 1 and self.top_k != -1):
            raise ValueError(f"top_k must be -1 (disabled) or >= 1, got {self.top_k!r}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or self.logprobs < 0):
            raise ValueError(f"logprobs must be an integer >= 0, got {self.logprobs!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError(
                f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


# Why a request failed (``error_type``): its adapter cannot be loaded; it waited past the
# engine's first-token deadline without starting (the engine is overloaded).
ERROR_ADAPTER = "adapter"
ERROR_DEADLINE = "deadline"


class FinishReason(enum.StrEnum):
    STOP = "stop"  # eos, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context window
    ABORT = "abort"
    ERROR = "error"


@dataclass
class Request:
    """One sequence in the engine: its tokens, how many have KV in the cache, its pages.

    ``num_computed_tokens`` counts tokens whose K/V are in the cache. Each step the
    scheduler gives a request ``num_scheduled`` new tokens to compute; when computing them
    reaches the end of ``token_ids`` a new token is sampled. Preemption sets
    ``num_computed_tokens`` back to 0 and frees the pages: the prompt and the output so far
    are recomputed when the request is scheduled again.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[dict[int, float]] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    num_preemptions: int = 0
    first_token_time: float | None = None
    first_scheduled_time: float | None = None  # first admission into a step
    generator: torch.Generator | None = None
    prompt: str | None = None
    adapter: str | None = None  # None: the base model
    adapter_slot: int | None = None  # set while the adapter is pinned for this request
    adapter_looked_up: bool = False  # counted once as a pool-tier hit or miss
    error: str | None = None
    error_type: str | None = None  # ERROR_ADAPTER | ERROR_DEADLINE, with ``error``

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def token_at(self, i: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[i] if i < n else self.output_token_ids[i - n]

    def tokens_slice(self, start: int, end: int) -> list[int]:
        """Tokens start..end-1 of prompt + output (without copying the whole sequence)."""
        n = len(self.prompt_token_ids)
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        if end <= n:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED


@dataclass
class RequestOutput:
    """The result of one request. ``logprobs`` is one {token_id: logprob} per generated
    token (the top-k and the chosen token), or None when not asked for."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None
    finished: bool
    finish_reason: str | None
    stop_reason: str | int | None = None
    error: str | None = None
    error_type: str | None = None  # why it failed: ERROR_ADAPTER | ERROR_DEADLINE
    num_preemptions: int = 0
    adapter: str | None = None
    # Seconds from arrival to the first step that computed it (waiting for room and for its
    # adapter); None until then.
    time_in_queue: float | None = None
