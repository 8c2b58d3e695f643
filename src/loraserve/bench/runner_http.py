"""Open-loop driver of a running ``loraserve serve`` (or any server with vLLM's
OpenAI-compatible completions API) at ``--url``.

Each request is a streaming ``POST /v1/completions`` sent at its arrival time, whatever is
still in flight: ``model`` names its adapter (or the base model), ``prompt`` is its token
ids, ``max_tokens`` its output length, ``ignore_eos`` set, greedy. The first streamed chunk
that carries a token is its first-token time; the final usage chunk gives the tokens.

Adapters: ``load_adapters`` writes PEFT directories of the adapters a trace uses and
registers them with ``POST /v1/load_lora_adapter`` (the server must see the same file
system); a server that already serves ``adapter-0000 ..`` (``serve --adapter-dir`` over
``loraserve make-adapters`` output) needs nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
from tqdm import tqdm

from loraserve.adapters.peft import make_random_adapter
from loraserve.bench.runner_inproc import BenchRequest, EngineRun, RequestState, RunOptions
from loraserve.bench.workload import adapter_rank
from loraserve.config import ModelConfig

logger = logging.getLogger(__name__)


@dataclass
class HttpTarget:
    url: str
    api_key: str | None = None

    def client(self) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        return httpx.AsyncClient(
            base_url=self.url.rstrip("/"), headers=headers, timeout=None, limits=limits
        )


async def base_model_name(client: httpx.AsyncClient) -> str:
    """The served base model's name: the card of /v1/models without a parent."""
    response = await client.get("/v1/models")
    response.raise_for_status()
    cards = response.json()["data"]
    return next(c["id"] for c in cards if not c.get("parent"))


def load_adapters(
    target: HttpTarget,
    names: Sequence[str],
    model: ModelConfig,
    ranks: Sequence[int],
    targets: Sequence[str],
    directory: Path,
) -> None:
    """Write random PEFT adapters ``names`` (adapter i: rank ranks[i % len]) under
    ``directory`` and load those the server does not serve yet."""
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    with httpx.Client(base_url=target.url.rstrip("/"), headers=headers, timeout=300) as client:
        served = {card["id"] for card in client.get("/v1/models").raise_for_status().json()["data"]}
        for name in names:
            if name not in served:
                path = _write_adapter(directory / name, model, ranks, targets)
                body = {"lora_name": name, "lora_path": str(path.resolve())}
                response = client.post("/v1/load_lora_adapter", json=body)
                if response.status_code != 200:
                    raise RuntimeError(
                        f"loading {name}: HTTP {response.status_code} {response.text}"
                    )


def _write_adapter(
    path: Path, model: ModelConfig, ranks: Sequence[int], targets: Sequence[str]
) -> Path:
    """adapter-NNNN: rank ranks[NNNN % len(ranks)], seed NNNN (kept if already written)."""
    index = int(path.name.rsplit("-", 1)[1])
    if not path.is_dir():
        rank = adapter_rank(index, tuple(ranks))
        make_random_adapter(path, model, rank, targets, index, dtype=torch.bfloat16)
    return path


def run_http(target: HttpTarget, requests: list[BenchRequest], options: RunOptions) -> EngineRun:
    return asyncio.run(_run(target, sorted(requests, key=lambda r: r.trace.arrival), options))


async def _run(target: HttpTarget, requests: list[BenchRequest], options: RunOptions) -> EngineRun:
    limit = options.time_limit
    states = [RequestState(r) for r in requests]
    async with target.client() as client:
        base = await base_model_name(client)
        with tqdm(
            total=len(states), desc=options.label, unit="req", disable=not options.progress
        ) as bar:
            start = time.perf_counter()
            tasks = await _issue(client, base, states, start, limit, bar)
            await _wait(tasks, None if limit is None else start + limit)
            wall = time.perf_counter() - start
    wall = wall if limit is None else min(wall, limit)
    records = [s.record() for s in states[: len(tasks)]]
    return EngineRun(records, wall, len(states) - len(tasks), pool={}, adapters={}, decode={})


async def _issue(
    client: httpx.AsyncClient,
    base: str,
    states: list[RequestState],
    start: float,
    limit: float | None,
    bar: tqdm,
) -> list[asyncio.Task]:
    """Send each request at its arrival time (none due after ``limit``)."""
    tasks = []
    for state in states:
        arrival = state.request.trace.arrival
        if limit is not None and arrival > limit:
            break
        await asyncio.sleep(max(0.0, start + arrival - time.perf_counter()))
        tasks.append(asyncio.create_task(_send(client, base, state, start, bar)))
    return tasks


async def _wait(tasks: list[asyncio.Task], deadline: float | None) -> None:
    """Wait for ``tasks``; at the deadline, cancel the rest (the server aborts them)."""
    if not tasks:
        return
    timeout = None if deadline is None else max(0.0, deadline - time.perf_counter())
    _, late = await asyncio.wait(tasks, timeout=timeout)
    for task in late:
        task.cancel()
    await asyncio.gather(*late, return_exceptions=True)


def _body(request: BenchRequest, base: str) -> dict:
    return {
        "model": request.adapter or base,
        "prompt": request.prompt,
        "max_tokens": request.trace.output_len,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,
    }


async def _send(
    client: httpx.AsyncClient, base: str, state: RequestState, start: float, bar: tqdm
) -> None:
    try:
        async with client.stream(
            "POST", "/v1/completions", json=_body(state.request, base)
        ) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                state.error = f"HTTP {response.status_code}: {text[:300]}"
                return
            async for line in response.aiter_lines():
                if line.startswith("data:") and not _on_event(line[5:].strip(), state, start):
                    break
        if state.error is None:
            state.finish = time.perf_counter() - start
    except httpx.HTTPError as e:
        state.error = f"{type(e).__name__}: {e}"
    finally:
        if state.finish is not None or state.error is not None:
            bar.update(1)


def _on_event(data: str, state: RequestState, start: float) -> bool:
    """Update ``state`` from one SSE event; False at the end of the stream."""
    if data == "[DONE]":
        return False
    chunk = json.loads(data)
    if "error" in chunk:
        state.error = str(chunk["error"].get("message", chunk["error"]))
        return False
    for choice in chunk.get("choices") or []:
        tokens = len(choice.get("token_ids") or [])
        if (tokens or choice.get("text")) and state.first_token is None:
            state.first_token = time.perf_counter() - start
        state.output_tokens += tokens
    usage = chunk.get("usage")
    if usage:
        state.output_tokens = usage["completion_tokens"]
    return True
