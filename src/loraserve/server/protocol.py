"""OpenAI-compatible request and response models, in the shapes vLLM serves.

Requests are strict: an unknown field, or an OpenAI field set to a value loraserve does not
implement (n > 1, tools, penalties, structured output, ...), fails validation with a message
naming the field, which the app returns as a 400. Fields that change nothing here (``user``,
``metadata``, ``store``, ...) are accepted. vLLM's extras ``top_k``, ``ignore_eos``,
``stop_token_ids``, ``include_stop_str_in_output``, ``skip_special_tokens`` and
``return_token_ids`` are accepted too.

Responses carry every field OpenAI's clients read (``null`` where not applicable).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationInfo,
    field_validator,
    model_validator,
)

from loraserve.request import SamplingParams

MAX_LOGPROBS = 20
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes

# field -> (is the value supported?, why not). Checked only for fields sent in the request.
_UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "n": (lambda v: v in (None, 1), "only n=1 is supported: send one request per choice"),
    "best_of": (lambda v: v in (None, 1), "best_of > 1 is not supported"),
    "echo": (lambda v: not v, "echo is not supported"),
    "suffix": (lambda v: not v, "suffix (insertion) is not supported"),
    "logit_bias": (lambda v: not v, "logit_bias is not supported"),
    "presence_penalty": (lambda v: not v, "presence_penalty is not supported (only 0)"),
    "frequency_penalty": (lambda v: not v, "frequency_penalty is not supported (only 0)"),
    "repetition_penalty": (lambda v: v in (None, 1), "repetition_penalty is not supported"),
    "tools": (lambda v: not v, "tools (function calling) are not supported"),
    "tool_choice": (lambda v: v in (None, "none"), "tool_choice is not supported (no tools)"),
    "functions": (lambda v: not v, "functions (function calling) are not supported"),
    "function_call": (lambda v: v in (None, "none"), "function_call is not supported"),
    "response_format": (
        lambda v: v is None or v.get("type") == "text",
        "only response_format {'type': 'text'} is supported (no JSON mode or schemas)",
    ),
    "modalities": (lambda v: v in (None, ["text"]), "only the text modality is supported"),
}


class StrictModel(BaseModel):
    """Rejects unknown fields."""

    model_config = ConfigDict(extra="forbid")


class StreamOptions(StrictModel):
    include_usage: bool = False


class _GenerationRequest(StrictModel):
    """Fields shared by completions and chat completions."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # vLLM: -1 or 0 disables
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    return_token_ids: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Known OpenAI/vLLM fields, accepted only at values that need nothing (see _UNSUPPORTED).
    n: int | None = 1
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    # Accepted and ignored: they change nothing about the generation.
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None

    @field_validator(*_UNSUPPORTED, check_fields=False)
    @classmethod
    def _supported(cls, value: Any, info: ValidationInfo) -> Any:
        ok, why = _UNSUPPORTED[info.field_name]
        if not ok(value):
            raise ValueError(why)
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _GenerationRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        """The engine's parameters; raises ValueError naming a field that is out of range."""
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k if self.top_k else -1,
            seed=self.seed,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
        )


class CompletionRequest(_GenerationRequest):
    """POST /v1/completions. ``prompt``: one string or one list of token ids (a list holding
    exactly one of those is accepted too)."""

    prompt: str | list[StrictInt]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = None
    echo: bool | None = False
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value: Any) -> Any:
        if isinstance(value, list) and value and all(isinstance(p, str | list) for p in value):
            if len(value) > 1:
                raise ValueError(
                    f"{len(value)} prompts in one request are not supported: "
                    "send one request per prompt"
                )
            return value[0]
        return value


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message. Extra keys are kept and passed to the chat template."""

    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None

    @field_validator("content")
    @classmethod
    def _text_only(cls, value: str | list[dict[str, Any]] | None) -> str | None:
        if not isinstance(value, list):
            return value
        parts = []
        for part in value:
            if part.get("type") != "text":
                raise ValueError(
                    f"content parts of type {part.get('type')!r} are not supported: "
                    "only 'text' parts"
                )
            parts.append(TextPart.model_validate(part).text)
        return "\n".join(parts)


class ChatCompletionRequest(_GenerationRequest):
    """POST /v1/chat/completions. ``max_completion_tokens`` wins over ``max_tokens``; with
    neither, generation may use the rest of the context window."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    modalities: list[str] | None = None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs to be true")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


# ---- responses --------------------------------------------------------------------------


# A field left out of the JSON when None (vLLM's extras, and chunk deltas, as OpenAI sends).
def _omit_none() -> Any:
    return Field(None, exclude_if=lambda v: v is None)


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy logprobs object: one entry per generated token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_token_ids: list[int] | None = _omit_none()
    token_ids: list[int] | None = _omit_none()


class CompletionResponse(BaseModel):
    """A completion, and also each chunk of a streamed one (OpenAI uses one shape)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = _omit_none()


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None
    prompt_token_ids: list[int] | None = _omit_none()


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = _omit_none()
    content: str | None = _omit_none()


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = _omit_none()


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "loraserve"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class LoadLoRAAdapterRequest(StrictModel):
    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(StrictModel):
    lora_name: str
    lora_int_id: int | None = None  # vLLM's; ignored


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorInfo
