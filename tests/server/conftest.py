"""Fixtures for the server tests: a tiny random Llama with the SmolLM2 tokenizer, PEFT-made
adapters, and ``loraserve serve`` running as a real subprocess on a free port."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch

from loraserve.model.embedded import embedded_model_dir

DEVICE = os.environ.get("LORASERVE_TEST_DEVICE", "cpu")  # as tests/engine/test_lora_parity.py
MODEL_NAME = "tiny-llama"
API_KEY = "test-key"
MAX_MODEL_LEN = 1024
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
# name -> LoraConfig kwargs; "c" and "d" are not given to the main server at start.
ADAPTERS = {
    "a": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "b": dict(r=16, lora_alpha=16, target_modules="all-linear"),
    "c": dict(r=4, lora_alpha=8, target_modules=["o_proj", "down_proj"]),
    "d": dict(r=2, lora_alpha=4, target_modules=["up_proj", "k_proj"]),
}


def make_tiny_chat_model(path: Path) -> Path:
    """A random 2-layer Llama (hidden 48) with SmolLM2's vocabulary and tokenizer, so that
    text and chat prompts work. Weights are large enough for peaky logits (few greedy ties)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=49152,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_MODEL_LEN,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.08)
    model.save_pretrained(path)
    source = embedded_model_dir()
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, path / name)
    return path


def make_peft_adapter(base: Path, path: Path, seed: int, **lora_kwargs) -> Path:
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora_kwargs))
    with torch.no_grad():  # moderate deltas: outputs differ from the base, greedy stays stable
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(0.5)
    peft_model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_chat_model(tmp_path_factory.mktemp("models") / MODEL_NAME)


@pytest.fixture(scope="session")
def adapter_dirs(model_dir, tmp_path_factory) -> dict[str, Path]:
    """a, b: served from the start; c: only in the adapter directory; d: for load/unload."""
    root = tmp_path_factory.mktemp("adapters")
    (root / "dir").mkdir()
    dirs = {}
    for seed, (name, kwargs) in enumerate(ADAPTERS.items()):
        parent = root / "dir" if name == "c" else root
        dirs[name] = make_peft_adapter(model_dir, parent / name, seed=10 + seed, **kwargs)
    return dirs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m loraserve.cli serve`` in a subprocess, on a free port."""

    def __init__(self, args: list[str], log: Path, api_key: str | None = None) -> None:
        self.port = free_port()
        self.api_key = api_key
        self.log = log
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "loraserve.cli", "serve", "--port", str(self.port), *args]
        self._log_file = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._log_file, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the server exited ({self.proc.returncode}):\n{self.log_tail()}"
                )
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"the server was not ready in {timeout} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text()[-n:]

    def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after 15 s); idempotent."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def http(self, timeout: float = 30) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers(), timeout=timeout)

    def openai(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=self.api_key or "none", max_retries=0, **kw
        )

    def async_openai(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=f"{self.url}/v1", api_key=self.api_key or "none", max_retries=0
        )

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample of GET /metrics (labels must match exactly those given)."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        for line in text.splitlines():
            if line.startswith(name) and _labels_match(line, name, labels):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(f"no sample {name} {labels} in /metrics")

    def wait_metric(self, name: str, value: float, timeout: float = 10, **labels: str) -> None:
        deadline = time.monotonic() + timeout
        while self.metric(name, **labels) != value:
            if time.monotonic() > deadline:
                raise AssertionError(f"{name}{labels} = {self.metric(name, **labels)}, not {value}")
            time.sleep(0.05)


def _labels_match(line: str, name: str, labels: dict[str, str]) -> bool:
    rest = line[len(name) :]
    if not labels:
        return rest.startswith(" ")
    return rest.startswith("{") and all(f'{k}="{v}"' in rest for k, v in labels.items())


@pytest.fixture(scope="session")
def server_factory(tmp_path_factory) -> Iterator[Callable[..., ServerProcess]]:
    """start(args, api_key=None, timeout=60) -> a ready ServerProcess; every server still
    running is stopped at the end of the session (stop one earlier with .stop())."""
    started: list[ServerProcess] = []

    def start(args: list[str], api_key: str | None = None, timeout: float = 60) -> ServerProcess:
        log = tmp_path_factory.mktemp("logs") / "server.log"
        server = ServerProcess(args, log, api_key)
        started.append(server)
        server.wait_ready(timeout)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def engine_args() -> list[str]:
    return ["--dtype", "float32", "--device", DEVICE]


@pytest.fixture(scope="session")
def server(model_dir, adapter_dirs, engine_args, server_factory) -> ServerProcess:
    """The main server: tiny model, adapters a and b, the adapter directory holding c,
    and an API key."""
    args = ["--model", str(model_dir), *engine_args]
    args += ["--lora-modules", f"a={adapter_dirs['a']}", f"b={adapter_dirs['b']}"]
    args += ["--adapter-dir", str(adapter_dirs["c"].parent), "--api-key", API_KEY]
    return server_factory(args, api_key=API_KEY)


@pytest.fixture(scope="session")
def offline(model_dir, adapter_dirs):
    """The same model and adapters in this process (loraserve.LLM), as the reference."""
    from loraserve import LLM

    adapters = {name: adapter_dirs[name] for name in ("a", "b", "c")}
    return LLM(model=str(model_dir), adapters=adapters, dtype="float32", device=DEVICE)
