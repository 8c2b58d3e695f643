"""``loraserve bench --url``: the open-loop client against a real ``loraserve serve``."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import httpx
import pytest

from loraserve.cli import main


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server_url(tiny_model, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("bench-server") / "server.log"
    cmd = [sys.executable, "-m", "loraserve.cli", "serve", "--model", str(tiny_model)]
    cmd += ["--port", str(port), "--dtype", "float32", "--device", "cpu"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, url, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_ready(proc: subprocess.Popen, url: str, log, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"the server was not ready:\n{log.read_text()[-3000:]}")


def test_bench_against_a_server(server_url, tiny_model, tmp_path):
    out = tmp_path / "http.json"
    args = ["bench", "--url", server_url, "--model", str(tiny_model), "--ranks", "8,4"]
    args += ["-n", "3", "--rate", "15", "--duration", "1", "--input-range", "4,12"]
    args += ["--output-range", "4,12", "--baselines", "base", "--no-progress"]
    args += ["--adapter-files", str(tmp_path / "adapters"), "--out", str(out)]
    assert main(args) == 0
    results = json.loads(out.read_text())
    runs = results["points"][0]["runs"]
    assert set(runs) == {"loraserve", "base"}
    for result in runs.values():
        assert result["issued"] == result["completed"] == 15, result
        assert result["failed"] == 0 and result["slo_attainment"] == 1.0
        assert 0 < result["avg_first_token_s"] <= result["avg_latency_s"]
        assert result["output_tok_s"] > 0
    served = httpx.get(f"{server_url}/v1/models").json()["data"]
    names = {card["id"] for card in served}
    assert {p.name for p in (tmp_path / "adapters").iterdir()} <= names
    assert len(names) > 1  # the trace's adapters were loaded


def test_http_refuses_engine_only_baselines(server_url, tiny_model):
    args = ["bench", "--url", server_url, "--model", str(tiny_model), "--baselines", "padded"]
    assert main(args) == 2


def test_time_limit_cancels_requests_in_flight(server_url, tiny_model, tmp_path):
    out = tmp_path / "cut.json"
    args = ["bench", "--url", server_url, "--model", str(tiny_model), "--ranks", "4"]
    args += ["-n", "2", "--rate", "20", "--duration", "2", "--input-range", "4,8"]
    args += ["--output-range", "200,220", "--time-limit", "0.5", "--no-progress"]
    args += ["--adapter-files", str(tmp_path / "adapters"), "--out", str(out)]
    start = time.perf_counter()
    assert main(args) == 0
    assert time.perf_counter() - start < 10
    result = json.loads(out.read_text())["points"][0]["runs"]["loraserve"]
    assert result["wall_time_s"] <= 0.5 and result["unfinished"] > 0
    assert result["not_issued"] > 0 and result["issued"] + result["not_issued"] == 40
    assert httpx.get(f"{server_url}/health").status_code == 200
