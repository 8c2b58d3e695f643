"""RequestOutput -> OpenAI responses, stream chunks and server-sent events.

Outputs are cumulative; a stream chunk carries what is new since the previous chunk: the new
text, the logprobs of the tokens generated since, and (with ``return_token_ids``) their ids.
A chunk is sent when there is new text or the request finished, so tokens whose text is not
visible yet (half a UTF-8 character, a possible stop string) travel with the next chunk.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import NamedTuple

from pydantic import BaseModel

from loraserve.request import ERROR_DEADLINE, FinishReason, RequestOutput
from loraserve.server.async_engine import EngineDeadError
from loraserve.server.errors import RETRY_AFTER_S, APIError, from_engine_error
from loraserve.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    TokenLogprob,
    TopLogprob,
    UsageInfo,
)
from loraserve.tokenizer import Tokenizer

MIN_LOGPROB = -9999.0  # -inf is not JSON; vLLM clamps the same way


class ResponseMeta(NamedTuple):
    id: str
    created: int  # unix seconds
    model: str  # as the client named it


class TokenText:
    """Token id -> the text OpenAI's logprobs show for it: the token decoded on its own
    (``token_id:N`` for a model without a tokenizer)."""

    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            if self.tokenizer is None:
                text = f"token_id:{token_id}"
            else:
                text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._cache[token_id] = text
        return text


def check_output(out: RequestOutput) -> RequestOutput:
    """``out``, unless the engine failed the request: a 503 (with Retry-After) when it
    waited past the first-token deadline of an overloaded engine, else a 500 with the
    engine's message (e.g. its adapter could not be loaded)."""
    if out.finish_reason == FinishReason.ERROR:
        if out.error_type == ERROR_DEADLINE:
            raise APIError(
                503,
                out.error or "the engine is overloaded",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        raise APIError(500, out.error or "the request failed in the engine")
    return out


def usage(out: RequestOutput) -> UsageInfo:
    prompt, completion = len(out.prompt_token_ids), len(out.token_ids)
    return UsageInfo(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


def _finish(out: RequestOutput) -> str | None:
    return out.finish_reason if out.finished else None


def _sorted(entry: dict[int, float]) -> list[tuple[int, float]]:
    return sorted(entry.items(), key=lambda item: -item[1])


def _logprob(value: float | None) -> float | None:
    return None if value is None else max(value, MIN_LOGPROB)


# ---- completions --------------------------------------------------------------------------


def completion_logprobs(
    out: RequestOutput, start: int, text: TokenText, offset: int
) -> tuple[CompletionLogprobs, int]:
    """Legacy logprobs of tokens ``start:``; ``offset`` is the text offset of token
    ``start``. Returns the object and the offset after the last token."""
    logprobs = CompletionLogprobs()
    for token, entry in zip(out.token_ids[start:], (out.logprobs or [])[start:], strict=True):
        piece = text(token)
        logprobs.tokens.append(piece)
        logprobs.token_logprobs.append(_logprob(entry.get(token)))
        logprobs.top_logprobs.append({text(t): _logprob(v) for t, v in _sorted(entry)})
        logprobs.text_offset.append(offset)
        offset += len(piece)
    return logprobs, offset


def completion_response(
    out: RequestOutput, req: CompletionRequest, meta: ResponseMeta, text: TokenText
) -> CompletionResponse:
    logprobs = completion_logprobs(out, 0, text, 0)[0] if req.logprobs is not None else None
    choice = CompletionChoice(
        text=out.text,
        logprobs=logprobs,
        finish_reason=out.finish_reason,
        stop_reason=out.stop_reason,
        prompt_token_ids=out.prompt_token_ids if req.return_token_ids else None,
        token_ids=out.token_ids if req.return_token_ids else None,
    )
    return CompletionResponse(
        id=meta.id, created=meta.created, model=meta.model, choices=[choice], usage=usage(out)
    )


async def completion_chunks(
    outputs: AsyncIterator[RequestOutput],
    req: CompletionRequest,
    meta: ResponseMeta,
    text: TokenText,
) -> AsyncIterator[CompletionResponse]:
    offset, last = 0, None
    async for delta in _deltas(outputs):
        out, logprobs = delta.out, None
        if req.logprobs is not None:
            logprobs, offset = completion_logprobs(out, delta.start, text, offset)
        choice = CompletionChoice(
            text=delta.text,
            logprobs=logprobs,
            finish_reason=_finish(out),
            stop_reason=out.stop_reason,
            prompt_token_ids=out.prompt_token_ids
            if req.return_token_ids and not delta.start
            else None,
            token_ids=out.token_ids[delta.start :] if req.return_token_ids else None,
        )
        yield CompletionResponse(
            id=meta.id, created=meta.created, model=meta.model, choices=[choice]
        )
        last = out
    if req.include_usage and last is not None:
        yield CompletionResponse(
            id=meta.id, created=meta.created, model=meta.model, choices=[], usage=usage(last)
        )


# ---- chat completions ---------------------------------------------------------------------


def chat_logprobs(out: RequestOutput, start: int, k: int, text: TokenText) -> ChoiceLogprobs:
    """Chat logprobs of tokens ``start:``, each with its ``k`` most likely alternatives."""
    content = []
    for token, entry in zip(out.token_ids[start:], (out.logprobs or [])[start:], strict=True):
        piece = text(token)
        top = [_top_logprob(text(t), v) for t, v in _sorted(entry)[:k]]
        content.append(
            TokenLogprob(
                token=piece,
                logprob=_logprob(entry.get(token, MIN_LOGPROB)),
                bytes=list(piece.encode("utf-8")),
                top_logprobs=top,
            )
        )
    return ChoiceLogprobs(content=content)


def _top_logprob(piece: str, value: float) -> TopLogprob:
    return TopLogprob(token=piece, logprob=_logprob(value), bytes=list(piece.encode("utf-8")))


def chat_response(
    out: RequestOutput, req: ChatCompletionRequest, meta: ResponseMeta, text: TokenText
) -> ChatCompletionResponse:
    k = req.num_logprobs
    choice = ChatChoice(
        message=AssistantMessage(content=out.text),
        logprobs=chat_logprobs(out, 0, k, text) if k is not None else None,
        finish_reason=out.finish_reason,
        stop_reason=out.stop_reason,
        token_ids=out.token_ids if req.return_token_ids else None,
    )
    return ChatCompletionResponse(
        id=meta.id,
        created=meta.created,
        model=meta.model,
        choices=[choice],
        usage=usage(out),
        prompt_token_ids=out.prompt_token_ids if req.return_token_ids else None,
    )


async def chat_chunks(
    outputs: AsyncIterator[RequestOutput],
    req: ChatCompletionRequest,
    meta: ResponseMeta,
    text: TokenText,
) -> AsyncIterator[ChatCompletionChunk]:
    """The role first (as OpenAI and vLLM send it), then the content as it comes."""
    yield _chat_chunk(meta, ChatChunkChoice(delta=DeltaMessage(role="assistant", content="")))
    k, last = req.num_logprobs, None
    async for delta in _deltas(outputs):
        out = delta.out
        choice = ChatChunkChoice(
            delta=DeltaMessage(content=delta.text),
            logprobs=chat_logprobs(out, delta.start, k, text) if k is not None else None,
            finish_reason=_finish(out),
            stop_reason=out.stop_reason,
            token_ids=out.token_ids[delta.start :] if req.return_token_ids else None,
        )
        yield _chat_chunk(meta, choice)
        last = out
    if req.include_usage and last is not None:
        yield ChatCompletionChunk(
            id=meta.id, created=meta.created, model=meta.model, choices=[], usage=usage(last)
        )


def _chat_chunk(meta: ResponseMeta, choice: ChatChunkChoice) -> ChatCompletionChunk:
    return ChatCompletionChunk(id=meta.id, created=meta.created, model=meta.model, choices=[choice])


# ---- streaming ----------------------------------------------------------------------------


class _Delta(NamedTuple):
    out: RequestOutput
    text: str  # new since the previous delta
    start: int  # index of the first token not yet sent


async def _deltas(outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[_Delta]:
    """What is new in each output; raises APIError (500) if the engine fails the request.

    An output with no new text (a partial UTF-8 character, a held-back stop-string prefix,
    a model without tokenizer) is skipped, except the first token's: clients time the first
    token by the first chunk."""
    sent_text = sent_tokens = 0
    async for out in outputs:
        check_output(out)
        new_text = out.text[sent_text:]
        first = sent_tokens == 0 and bool(out.token_ids)
        if not new_text and not out.finished and not first:
            continue
        yield _Delta(out, new_text, sent_tokens)
        sent_text, sent_tokens = len(out.text), len(out.token_ids)


async def sse(chunks: AsyncIterator[BaseModel]) -> AsyncIterator[str]:
    """Server-sent events: ``data: {json}`` per chunk, an error event if the request fails
    midway, then ``data: [DONE]``."""
    try:
        async for chunk in chunks:
            yield f"data: {chunk.model_dump_json()}\n\n"
    except APIError as e:
        yield f"data: {e.body_json()}\n\n"
    except EngineDeadError as e:
        yield f"data: {from_engine_error(e).body_json()}\n\n"
    yield "data: [DONE]\n\n"
