"""Requests that end early or cannot be taken: a client that disconnects has its request
aborted and its pages freed; a full waiting queue answers 503 with Retry-After."""

from __future__ import annotations

import asyncio
import os
import time

import httpx
import pytest

MODEL_NAME = "tiny-llama"
LONG = {"prompt": [5, 6, 7], "max_tokens": 1000, "ignore_eos": True, "temperature": 0}


def kv_pages(server) -> float:
    return server.metric("loraserve:pages_used", kind="kv")


def aborted(server, adapter: str) -> float:
    labels = dict(adapter=adapter, finish_reason="abort")
    try:
        return server.metric("loraserve:requests_total", **labels)
    except KeyError:
        return 0.0


def test_disconnect_mid_stream_frees_the_pages(server):
    before = aborted(server, "a")
    with server.http() as http:
        body = {"model": "a", "stream": True, **LONG}
        with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            chunks = 0
            for line in r.iter_lines():
                chunks += line.startswith("data: ")
                if chunks == 3:
                    assert kv_pages(server) > 0  # generating: it holds pages
                    info = server.metric("vllm:lora_requests_info", running_lora_adapters="a")
                    assert abs(info - time.time()) < 60
                    break  # closes the response: the client is gone
    server.wait_metric("loraserve:pages_used", 0, kind="kv")
    server.wait_metric("loraserve:num_requests_running", 0, model_name=MODEL_NAME)
    assert aborted(server, "a") == before + 1


def test_disconnect_while_waiting_for_a_response_frees_the_pages(server):
    before = aborted(server, "b")
    with pytest.raises(httpx.ReadTimeout):
        server.http(timeout=0.5).post("/v1/completions", json={"model": "b", **LONG})
    server.wait_metric("loraserve:pages_used", 0, kind="kv")
    server.wait_metric("loraserve:num_requests_running", 0, model_name=MODEL_NAME)
    assert aborted(server, "b") == before + 1
    assert "unexpected error" not in server.log_tail(100_000)
    ok = server.http().post("/v1/completions", json={"model": "b", "prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200


@pytest.fixture(scope="module")
def busy_server(model_dir, engine_args, server_factory):
    """One sequence at a time and at most one waiting."""
    args = ["--model", str(model_dir), *engine_args, "--max-num-seqs", "1", "--max-waiting", "1"]
    server = server_factory(args)
    yield server
    server.stop()


def test_full_queue_answers_503_with_retry_after(busy_server):
    async def run_all():
        async with httpx.AsyncClient(base_url=busy_server.url, timeout=60) as client:
            body = {"model": MODEL_NAME, **LONG, "max_tokens": 300}
            return await asyncio.gather(
                *(client.post("/v1/completions", json=body) for _ in range(5))
            )

    responses = asyncio.run(run_all())
    statuses = sorted(r.status_code for r in responses)
    assert 200 in statuses and 503 in statuses, statuses
    busy = next(r for r in responses if r.status_code == 503)
    assert busy.headers["Retry-After"] == "1"
    error = busy.json()["error"]
    assert error["type"] == "ServiceUnavailableError" and "--max-waiting 1" in error["message"]
    ok = httpx.post(f"{busy_server.url}/v1/completions", json={"model": MODEL_NAME, "prompt": "x"})
    assert ok.status_code == 200


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs Linux /proc")
def test_idle_server_does_not_spin(server):
    server.wait_metric("loraserve:num_requests_running", 0, model_name=MODEL_NAME)
    time.sleep(0.5)  # let worker threads settle
    before = cpu_seconds(server.proc.pid)
    time.sleep(1.0)
    assert cpu_seconds(server.proc.pid) - before < 0.2
