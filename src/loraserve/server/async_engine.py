"""AsyncEngine: one LLMEngine on a dedicated thread, driven from an asyncio event loop.

    event loop (HTTP handlers)                  engine thread (owns the LLMEngine)
    --------------------------                  ----------------------------------
    add_request / abort / add_adapter ... --->  queue.Queue of commands
        await an asyncio.Future  <--settle--    run each command, then engine.step()
    RequestStream (newest output) <--outputs--  loop.call_soon_threadsafe(_dispatch, outputs)

Thread contract:
- Only the engine thread calls the LLMEngine. The event loop sends it commands through a
  thread-safe queue and awaits their results as asyncio futures; the thread settles them with
  ``loop.call_soon_threadsafe``. Commands run in the order they were sent, before the next step.
- Every step's outputs go back to the loop in one ``call_soon_threadsafe`` call, which puts each
  output on its request's ``RequestStream``. Streams are touched by the loop only.
- With no unfinished request the thread blocks on the command queue (no busy polling); while
  requests wait only for adapters being read from disk it polls every few milliseconds.
- The loop may read, without a command, the engine's immutable parts (config, tokenizer), the
  AdapterStore's registry (``names``/``config``/``__contains__``, which take the store's lock)
  and ``stats``, a snapshot the thread replaces after every iteration.
- If the thread dies (a bug in a step), every open stream and pending command fails with
  EngineDeadError and ``is_alive`` turns False.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import torch

from loraserve.adapters.store import StoreStats
from loraserve.engine.engine import LLMEngine, Prompt, StepTiming
from loraserve.memory.adapter_cache import CacheStats
from loraserve.memory.pool import PageKind
from loraserve.request import RequestOutput, SamplingParams

logger = logging.getLogger(__name__)

STALL_POLL_S = 0.005  # wait between steps while requests wait only for adapter reads


class EngineDeadError(RuntimeError):
    """The engine thread has stopped; nothing more will be served."""


class QueueFullError(RuntimeError):
    """The waiting queue already holds ``max_waiting`` requests."""


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine, taken on the engine thread after every iteration."""

    time: float = 0.0  # wall clock (time.time()) when it was taken
    num_running: int = 0
    num_waiting: int = 0
    running_adapters: tuple[str, ...] = ()  # distinct, in queue order
    waiting_adapters: tuple[str, ...] = ()
    pages_total: int = 0
    pages_kv: int = 0
    pages_adapter: int = 0
    pages_free: int = 0
    max_loras: int = 0
    adapters_registered: int = 0
    adapters_resident: int = 0
    gpu: CacheStats = field(default_factory=CacheStats)
    host: StoreStats = field(default_factory=StoreStats)


class StepStats(NamedTuple):
    """What one engine step did; given to the ``on_step`` listener on the engine thread."""

    outputs: list[RequestOutput]  # one per request that got a token (or failed)
    seconds: float
    timing: StepTiming | None = None  # where the step's wall time went (LLMEngine.last_step)


class _Command(NamedTuple):
    fn: Callable[[], Any]
    future: asyncio.Future | None  # None: fire and forget (errors are logged)


_STOP = object()


class RequestStream:
    """The outputs of one request, in order, as an async iterator.

    Outputs are cumulative (each holds all the text, tokens and logprobs so far), so the
    stream keeps only the newest one: a slow reader skips intermediate outputs and memory
    stays bounded. Iteration ends after the output with ``finished`` set. ``abort()`` stops
    the request early and frees its pages; it is idempotent and a no-op once the request has
    finished. Raises EngineDeadError if the engine thread dies.
    """

    def __init__(self, request_id: str, engine: AsyncEngine) -> None:
        self.request_id = request_id
        self.finished = False
        self._engine = engine
        self._latest: RequestOutput | BaseException | None = None
        self._ready = asyncio.Event()

    def put(self, item: RequestOutput | BaseException) -> None:
        """Replace the unread output (an error is kept: it is the stream's end)."""
        if not isinstance(self._latest, BaseException):
            self._latest = item
            self._ready.set()

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        await self._ready.wait()
        self._ready.clear()
        item, self._latest = self._latest, None
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.finished
        return item

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self._engine.abort(self.request_id)


class AsyncEngine:
    """Serves an LLMEngine to coroutines (see the module docstring for the thread contract).

    ``max_waiting``: add_request raises QueueFullError while the engine's waiting queue holds
    that many requests (None: no limit). ``on_step`` is called on the engine thread after
    every step that ran (it must be thread-safe and quick, e.g. prometheus metrics).
    """

    def __init__(
        self,
        engine: LLMEngine,
        max_waiting: int | None = None,
        on_step: Callable[[StepStats], None] | None = None,
    ) -> None:
        if max_waiting is not None and max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {max_waiting}")
        self.engine = engine
        self.max_waiting = max_waiting
        self.on_step = on_step
        self.stats = EngineStats()
        self._commands: queue.Queue[_Command | object] = queue.Queue()
        self._streams: dict[str, RequestStream] = {}  # event loop only
        self._unloads: dict[str, list[asyncio.Future]] = {}  # engine thread only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stalled = False

    # ---- life cycle (event loop) ----------------------------------------------------

    def start(self) -> None:
        """Start the engine thread; call from the event loop that will use this engine."""
        if self._thread is not None:
            raise RuntimeError("the engine thread is already started")
        self._loop = asyncio.get_running_loop()
        self.stats = self._snapshot()
        self._thread = threading.Thread(target=self._run, name="loraserve-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the thread to finish after its current step and wait for it."""
        if self._thread is None:
            return
        self._commands.put(_STOP)
        self._thread.join(timeout)
        self.engine.shutdown()

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- requests (event loop) ------------------------------------------------------

    async def add_request(
        self, prompt: Prompt, params: SamplingParams, adapter: str | None, request_id: str
    ) -> RequestStream:
        """Queue a request and return its stream. Raises what LLMEngine.add_request raises
        (KeyError: unknown adapter; ValueError/PromptError: bad input), QueueFullError, or
        EngineDeadError."""
        stream = RequestStream(request_id, self)
        self._streams[request_id] = stream
        try:
            await self._call(partial(self._add, prompt, params, adapter, request_id))
        except BaseException:
            self._streams.pop(request_id, None)
            self.abort(request_id)  # in case it was added after we stopped waiting
            raise
        return stream

    def abort(self, request_id: str) -> None:
        """Stop a request and free its pages (fire and forget; safe for unknown ids)."""
        self._streams.pop(request_id, None)
        if self.is_alive:
            self._commands.put(_Command(partial(self.engine.abort, request_id), None))

    # ---- adapters (event loop) ------------------------------------------------------

    async def add_adapter(self, name: str, path: str | Path, exist_ok: bool = False) -> None:
        """Register the PEFT directory ``path`` as ``name`` (validates its config).

        Raises AdapterError (a ValueError) for a bad adapter, ValueError for a bad name or,
        unless ``exist_ok`` and the same path, a name already registered; KeyError while an
        adapter of that name is being unloaded."""
        await self._call(partial(self._register, name, path, exist_ok))

    async def remove_adapter(self, name: str) -> None:
        """Unregister ``name`` once its queued and running requests have finished; new
        requests for it are refused meanwhile. KeyError if it is not registered."""
        loop = self._running_loop()
        future = loop.create_future()
        self._send(_Command(partial(self._begin_unload, name, future), None), future)
        await future

    # ---- plumbing (event loop) ------------------------------------------------------

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        if not self.is_alive or self._loop is None:
            raise EngineDeadError("the engine thread is not running")
        return self._loop

    async def _call(self, fn: Callable[[], Any]) -> Any:
        future = self._running_loop().create_future()
        self._send(_Command(fn, future), future)
        return await future

    def _send(self, command: _Command, future: asyncio.Future) -> None:
        self._commands.put(command)
        if not self.is_alive:  # died between the check and the put: nobody will answer
            _settle(future, error=EngineDeadError("the engine thread is not running"))

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            stream.put(out)
            if out.finished:
                del self._streams[out.request_id]

    def _fail_all(self, error: BaseException) -> None:
        for stream in self._streams.values():
            stream.put(error)
        self._streams.clear()

    # ---- the engine thread ----------------------------------------------------------

    def _run(self) -> None:
        device = self.engine.device
        try:
            if device.type == "cuda" and device.index is not None:  # new threads use device 0
                torch.cuda.set_device(device)
            while self._run_commands():
                if self.engine.has_unfinished():
                    self._step()
                self._settle_unloads()
                self.stats = self._snapshot()
        except BaseException as e:
            logger.exception("the engine thread died")
            self._die(EngineDeadError(f"the engine thread died: {e!r}"))
        else:
            self._die(EngineDeadError("the engine was stopped"))

    def _run_commands(self) -> bool:
        """Run the queued commands; False when asked to stop. Blocks while there is no
        work, polls briefly while requests wait only for adapters."""
        if not self.engine.has_unfinished():
            timeout = None
        elif self._stalled:
            timeout = STALL_POLL_S
        else:
            timeout = 0.0
        try:
            command = self._commands.get(timeout=timeout) if timeout != 0.0 else None
        except queue.Empty:
            command = None
        while True:
            if command is _STOP:
                return False
            if command is not None:
                self._execute(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _execute(self, command: _Command) -> None:
        try:
            result = command.fn()
        except Exception as e:
            if command.future is None:
                logger.warning("engine command %s failed: %s", command.fn, e)
            else:
                self._post(partial(_settle, command.future, error=e))
            return
        if command.future is not None:
            self._post(partial(_settle, command.future, result))

    def _step(self) -> None:
        start = time.perf_counter()
        outputs = self.engine.step()
        seconds = time.perf_counter() - start
        self._stalled = not outputs and not self.engine.scheduler.running
        if outputs:
            self._post(partial(self._dispatch, outputs))
            if self.on_step is not None:
                self.on_step(StepStats(outputs, seconds, self.engine.last_step))

    def _add(
        self, prompt: Prompt, params: SamplingParams, adapter: str | None, request_id: str
    ) -> None:
        if adapter is not None and adapter in self._unloads:
            raise KeyError(f"adapter {adapter!r} is being unloaded")
        waiting = len(self.engine.scheduler.waiting)
        if self.max_waiting is not None and waiting >= self.max_waiting:
            raise QueueFullError(
                f"the server is busy: {waiting} requests are already waiting "
                f"(--max-waiting {self.max_waiting}); retry later"
            )
        self.engine.add_request(prompt, params, request_id, adapter)

    def _register(self, name: str, path: str | Path, exist_ok: bool) -> None:
        if name in self._unloads:
            raise KeyError(f"adapter {name!r} is being unloaded")
        if not exist_ok and name in self.engine.adapter_store:
            raise ValueError(
                f"adapter {name!r} is already loaded: unload it first or choose another name"
            )
        self.engine.add_adapter(name, path)

    def _begin_unload(self, name: str, future: asyncio.Future) -> None:
        if name not in self._unloads and name not in self.engine.adapter_store:
            self._post(partial(_settle, future, error=KeyError(f"adapter {name!r} is not loaded")))
            return
        self._unloads.setdefault(name, []).append(future)

    def _settle_unloads(self) -> None:
        for name in [n for n in self._unloads if not self.engine.adapter_in_use(n)]:
            futures = self._unloads.pop(name)
            error: Exception | None = None
            try:
                self.engine.remove_adapter(name)
            except (KeyError, RuntimeError) as e:
                error = e
            for future in futures:
                self._post(partial(_settle, future, error=error))

    def _snapshot(self) -> EngineStats:
        engine = self.engine
        scheduler, pool = engine.scheduler, engine.pool
        return EngineStats(
            time=time.time(),
            num_running=len(scheduler.running),
            num_waiting=len(scheduler.waiting),
            running_adapters=_adapter_names(scheduler.running),
            waiting_adapters=_adapter_names(scheduler.waiting),
            pages_total=pool.num_pages,
            pages_kv=pool.num_used(PageKind.KV),
            pages_adapter=engine.adapter_cache.pool.num_used(PageKind.ADAPTER),
            pages_free=pool.num_free,
            max_loras=engine.config.lora.max_loras,
            adapters_registered=len(engine.adapter_store.names()),
            adapters_resident=sum(1 for _ in engine.adapter_cache.resident()),
            gpu=replace(engine.adapter_cache.stats),
            host=engine.adapter_store.stats,
        )

    def _post(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` on the event loop (dropped if the loop has already closed)."""
        try:
            self._loop.call_soon_threadsafe(fn)
        except RuntimeError:
            logger.debug("event loop closed; dropped %s", fn)

    def _die(self, error: EngineDeadError) -> None:
        """Fail every pending command and open stream (the thread is ending)."""
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if isinstance(command, _Command) and command.future is not None:
                self._post(partial(_settle, command.future, error=error))
        for futures in self._unloads.values():
            for future in futures:
                self._post(partial(_settle, future, error=error))
        self._unloads.clear()
        self._post(partial(self._fail_all, error))


def _settle(future: asyncio.Future, result: Any = None, error: BaseException | None = None) -> None:
    """Resolve ``future`` unless its awaiter has gone (cancelled); runs on the loop."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _adapter_names(requests: Any) -> tuple[str, ...]:
    return tuple(dict.fromkeys(r.adapter for r in requests if r.adapter is not None))
