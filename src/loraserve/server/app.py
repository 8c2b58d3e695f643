"""The OpenAI-compatible HTTP app (FastAPI), in the shapes vLLM serves.

    GET  /health                     200 while the engine thread lives, else 503
    GET  /metrics                    Prometheus text (see metrics.py)
    GET  /v1/models                  the base model and every adapter
    POST /v1/completions             prompt: text or token ids; stream: SSE
    POST /v1/chat/completions        messages through the model's chat template; stream: SSE
    POST /v1/load_lora_adapter       {"lora_name", "lora_path"}
    POST /v1/unload_lora_adapter     {"lora_name"}; waits for the adapter's requests to end

``model`` names the base model (the served name), an adapter, or ``base:adapter``; with an
adapter directory, an unknown adapter name is loaded from it on first use. With an API key,
every /v1 route wants ``Authorization: Bearer <key>``. A client that disconnects has its
request aborted and its pages freed. Errors: see errors.py.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from loraserve.adapters.store import AdapterStore
from loraserve.engine.engine import Prompt
from loraserve.request import RequestOutput, SamplingParams
from loraserve.server import render
from loraserve.server.async_engine import AsyncEngine, EngineDeadError, RequestStream
from loraserve.server.errors import (
    APIError,
    from_engine_error,
    install_error_handlers,
    validation_error,
)
from loraserve.server.metrics import CONTENT_TYPE, ServerMetrics
from loraserve.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoRAAdapterRequest,
    ModelCard,
    ModelList,
    UnloadLoRAAdapterRequest,
)
from loraserve.server.resolver import (
    AdapterNotFound,
    AdapterResolver,
    UnsafeAdapterName,
    check_name,
)

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 32 << 20
_RESERVED_TEMPLATE_KWARGS = {"messages", "tools", "documents", "add_generation_prompt"}
M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class ServerConfig:
    served_model_name: str
    model_path: str = ""  # "root" of the base model in /v1/models
    api_key: str | None = None
    adapter_dir: Path | None = None


class ServerState:
    """What the routes share: the engine, config, metrics, adapter resolver and tokenizer."""

    def __init__(self, engine: AsyncEngine, config: ServerConfig) -> None:
        self.engine = engine
        self.config = config
        self.metrics = ServerMetrics(config.served_model_name, engine)
        self.resolver = AdapterResolver(config.adapter_dir) if config.adapter_dir else None
        self.tokenizer = engine.engine.tokenizer
        self.token_text = render.TokenText(self.tokenizer)
        self.max_model_len = engine.engine.max_model_len
        self.created = int(time.time())

    @property
    def adapters(self) -> AdapterStore:
        """The adapter registry; thread-safe, read from the loop (see async_engine)."""
        return self.engine.engine.adapter_store

    async def resolve_model(self, name: str) -> str | None:
        """The adapter that ``name`` asks for (None: the base model); loads it from the
        adapter directory on first use. APIError 404 for an unknown model, 400 for a name
        that would leave the adapter directory or an adapter that is not valid."""
        base = self.config.served_model_name
        if name == base:
            return None
        if name in self.adapters:
            return name
        adapter = name.removeprefix(base + ":")
        if adapter != name and adapter in self.adapters:
            return adapter
        if self.resolver is None:
            raise APIError(404, self._unknown_model(name), param="model")
        return await self._load_from_dir(adapter)

    async def _load_from_dir(self, name: str) -> str:
        try:
            path = self.resolver.resolve(name)
        except UnsafeAdapterName as e:
            raise APIError(400, str(e), param="model") from e
        except AdapterNotFound as e:
            raise APIError(404, f"{self._unknown_model(name)} ({e})", param="model") from e
        try:
            await self.engine.add_adapter(name, path, exist_ok=True)
        except (KeyError, ValueError, EngineDeadError) as e:
            raise from_engine_error(e) from e
        logger.info("loaded adapter %r from %s on first use", name, path)
        return name

    def _unknown_model(self, name: str) -> str:
        names = sorted(self.adapters.names())
        listed = ", ".join([self.config.served_model_name, *names[:10]])
        more = f" and {len(names) - 10} more" if len(names) > 10 else ""
        return f"the model {name!r} does not exist (served: {listed}{more})"

    def chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        """Token ids of the conversation rendered with the model's chat template (the template
        adds any BOS itself, so no special tokens are added)."""
        if self.tokenizer is None:
            raise APIError(400, "this model has no tokenizer: use /v1/completions with token ids")
        kwargs = body.chat_template_kwargs or {}
        reserved = sorted(_RESERVED_TEMPLATE_KWARGS & set(kwargs))
        if reserved:
            raise APIError(
                400, f"chat_template_kwargs may not set {reserved}", "chat_template_kwargs"
            )
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        try:
            text = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=body.add_generation_prompt, **kwargs
            )
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from e
        return self.tokenizer.encode(text, add_special_tokens=False)

    def completion_prompt(self, prompt: Prompt) -> Prompt:
        """Text is tokenized here, as the engine would (with the tokenizer's special
        tokens), so that its length is known and the engine thread does less."""
        if isinstance(prompt, str) and self.tokenizer is not None:
            return self.tokenizer.encode(prompt)
        return prompt

    def rest_of_context(self, prompt: Prompt) -> int:
        """The default max_tokens: the rest of the context window (at least 1, so that a
        prompt that is too long gets the engine's error naming max_model_len)."""
        return max(1, self.max_model_len - (len(prompt) if isinstance(prompt, list) else 1))

    async def submit(
        self,
        prompt: Prompt,
        params: SamplingParams,
        adapter: str | None,
        request_id: str,
        arrival: float,
    ) -> tuple[RequestStream, AsyncIterator[RequestOutput]]:
        """Queue a request: its stream (to abort) and its outputs (with metrics)."""
        try:
            stream = await self.engine.add_request(prompt, params, adapter, request_id)
        except Exception as e:
            raise from_engine_error(e) from e
        return stream, self.metrics.track(stream, adapter, arrival)


# ---- shared helpers -------------------------------------------------------------------------


def get_state(request: Request) -> ServerState:
    return request.app.state.server


State = Annotated[ServerState, Depends(get_state)]


async def check_api_key(request: Request) -> None:
    """401 unless the request carries ``Authorization: Bearer <key>`` (when a key is set)."""
    key = get_state(request).config.api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(
        token.strip().encode(), key.encode()
    ):
        raise APIError(
            401,
            "missing or invalid API key: send the header 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )


def json_body(model: type[M]) -> Callable[[Request], Awaitable[M]]:
    """A dependency parsing the body as ``model``: 400 for malformed JSON or invalid fields
    (whatever the Content-Type), 413 for a body over MAX_BODY_BYTES."""

    async def parse(request: Request) -> M:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise APIError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
        try:
            return model.model_validate_json(bytes(body))
        except ValidationError as e:
            raise validation_error(e.errors()) from e

    return parse


def sampling_params(
    body: CompletionRequest | ChatCompletionRequest, max_tokens: int, logprobs: int | None
) -> SamplingParams:
    try:
        return body.sampling_params(max_tokens, logprobs)
    except ValueError as e:
        raise APIError(400, str(e)) from e


def _json(model: BaseModel) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")


def _meta(prefix: str, body: CompletionRequest | ChatCompletionRequest) -> render.ResponseMeta:
    return render.ResponseMeta(f"{prefix}-{uuid.uuid4().hex}", int(time.time()), body.model)


def _event_stream(chunks: AsyncIterator[BaseModel], stream: RequestStream) -> StreamingResponse:
    """SSE of ``chunks``; the request is aborted when the stream ends early (the client
    went away: Starlette cancels the generator)."""

    async def events() -> AsyncIterator[str]:
        try:
            async for event in render.sse(chunks):
                yield event
        finally:
            stream.abort()

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


async def _final_output(
    outputs: AsyncIterator[RequestOutput], stream: RequestStream, request: Request
) -> RequestOutput:
    """The finished output. If the client disconnects first, the request is aborted."""

    async def last() -> RequestOutput:
        final = None
        async for out in outputs:
            final = out
        return final

    return await _unless_disconnected(last(), stream, request)


async def _first_output(
    outputs: AsyncIterator[RequestOutput], stream: RequestStream, request: Request
) -> AsyncIterator[RequestOutput]:
    """``outputs`` once its first output is in, so that a request the engine fails before
    its first token (an adapter that cannot be loaded, the first-token deadline) gets its
    real status instead of a 200 and an error event."""
    first = await _unless_disconnected(anext(outputs), stream, request)

    async def chained() -> AsyncIterator[RequestOutput]:
        yield first
        async for out in outputs:
            yield out

    return chained()


async def _unless_disconnected(
    awaitable: Awaitable[RequestOutput], stream: RequestStream, request: Request
) -> RequestOutput:
    """``awaitable``'s output, checked (``render.check_output``); the request is aborted
    and a 499 raised if the client disconnects first."""
    done = asyncio.ensure_future(awaitable)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not done.done():  # the client left (or this handler was cancelled)
            done.cancel()
            stream.abort()
    if not done.done() or done.cancelled():
        logger.info("client disconnected: aborted %s", stream.request_id)
        raise APIError(499, "client disconnected")
    try:
        return render.check_output(done.result())
    except EngineDeadError as e:
        raise from_engine_error(e) from e


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (ASGI http.disconnect; the body is read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# ---- routes -----------------------------------------------------------------------------------

router = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])
open_router = APIRouter()


@open_router.get("/health")
async def health(state: State) -> Response:
    if not state.engine.is_alive:
        raise APIError(503, "the engine thread is not running")
    return Response(status_code=200)


@open_router.get("/metrics")
async def metrics(state: State) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)


@router.get("/models")
async def list_models(state: State) -> Response:
    base = state.config.served_model_name
    cards = [
        ModelCard(
            id=base,
            created=state.created,
            root=state.config.model_path,
            max_model_len=state.max_model_len,
        )
    ]
    for name in sorted(state.adapters.names()):
        try:
            config = state.adapters.config(name)
        except KeyError:  # unloaded meanwhile
            continue
        root = str(config.path) if config is not None else name
        cards.append(
            ModelCard(
                id=name,
                created=state.created,
                root=root,
                parent=base,
                max_model_len=state.max_model_len,
            )
        )
    return _json(ModelList(data=cards))


@router.post("/completions")
async def create_completion(
    body: Annotated[CompletionRequest, Depends(json_body(CompletionRequest))],
    state: State,
    request: Request,
) -> Response:
    arrival = time.monotonic()
    adapter = await state.resolve_model(body.model)
    prompt = state.completion_prompt(body.prompt)
    max_tokens = body.max_tokens or state.rest_of_context(prompt)
    params = sampling_params(body, max_tokens, body.logprobs)
    meta = _meta("cmpl", body)
    stream, outputs = await state.submit(prompt, params, adapter, meta.id, arrival)
    if body.stream:
        outputs = await _first_output(outputs, stream, request)
        return _event_stream(
            render.completion_chunks(outputs, body, meta, state.token_text), stream
        )
    out = await _final_output(outputs, stream, request)
    return _json(render.completion_response(out, body, meta, state.token_text))


@router.post("/chat/completions")
async def create_chat_completion(
    body: Annotated[ChatCompletionRequest, Depends(json_body(ChatCompletionRequest))],
    state: State,
    request: Request,
) -> Response:
    arrival = time.monotonic()
    adapter = await state.resolve_model(body.model)
    prompt = state.chat_prompt(body)
    max_tokens = body.requested_max_tokens or state.rest_of_context(prompt)
    params = sampling_params(body, max_tokens, body.num_logprobs)
    meta = _meta("chatcmpl", body)
    stream, outputs = await state.submit(prompt, params, adapter, meta.id, arrival)
    if body.stream:
        outputs = await _first_output(outputs, stream, request)
        return _event_stream(render.chat_chunks(outputs, body, meta, state.token_text), stream)
    out = await _final_output(outputs, stream, request)
    return _json(render.chat_response(out, body, meta, state.token_text))


@router.post("/load_lora_adapter")
async def load_lora_adapter(
    body: Annotated[LoadLoRAAdapterRequest, Depends(json_body(LoadLoRAAdapterRequest))],
    state: State,
) -> Response:
    name = body.lora_name
    try:
        check_name(name)
    except UnsafeAdapterName as e:
        raise APIError(400, str(e), param="lora_name") from e
    if name == state.config.served_model_name:
        raise APIError(400, f"{name!r} is the base model's name", param="lora_name")
    try:
        await state.engine.add_adapter(name, Path(body.lora_path).expanduser())
    except KeyError as e:  # being unloaded
        raise APIError(400, str(e.args[0]), param="lora_name") from e
    except (ValueError, EngineDeadError) as e:
        raise from_engine_error(e) from e
    logger.info("loaded adapter %r from %s", name, body.lora_path)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


@router.post("/unload_lora_adapter")
async def unload_lora_adapter(
    body: Annotated[UnloadLoRAAdapterRequest, Depends(json_body(UnloadLoRAAdapterRequest))],
    state: State,
) -> Response:
    try:
        await state.engine.remove_adapter(body.lora_name)
    except (KeyError, EngineDeadError) as e:
        raise from_engine_error(e) from e
    logger.info("unloaded adapter %r", body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


# ---- the app ----------------------------------------------------------------------------------


def create_app(engine: AsyncEngine, config: ServerConfig) -> FastAPI:
    """An app serving ``engine``; its lifespan starts and stops the engine thread."""
    state = ServerState(engine, config)
    engine.on_step = state.metrics.on_step

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="loraserve", lifespan=lifespan)
    app.state.server = state
    install_error_handlers(app)
    app.include_router(open_router)
    app.include_router(router)
    return app
