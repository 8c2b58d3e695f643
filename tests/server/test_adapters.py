"""Loading and unloading adapters at run time, and the --adapter-dir resolver."""

from __future__ import annotations

import json
import shutil
import threading
import time

import pytest

MODEL_NAME = "tiny-llama"


def model_ids(server) -> set[str]:
    return {m.id for m in server.openai().models.list().data}


def complete(http, model: str, **kw):
    body = {"model": model, "prompt": [5, 6, 7], "max_tokens": 3, "temperature": 0, **kw}
    return http.post("/v1/completions", json=body)


def test_load_use_unload(server, adapter_dirs):
    http = server.http()
    load = {"lora_name": "d", "lora_path": str(adapter_dirs["d"])}
    r = http.post("/v1/load_lora_adapter", json=load)
    assert r.status_code == 200, r.text
    assert "d" in model_ids(server)
    assert complete(http, "d").status_code == 200

    again = http.post("/v1/load_lora_adapter", json=load)
    assert again.status_code == 400 and "already loaded" in again.json()["error"]["message"]

    r = http.post("/v1/unload_lora_adapter", json={"lora_name": "d"})
    assert r.status_code == 200, r.text
    assert "d" not in model_ids(server)
    gone = complete(http, "d")
    assert gone.status_code == 404 and gone.json()["error"]["type"] == "NotFoundError"
    r = http.post("/v1/unload_lora_adapter", json={"lora_name": "d"})
    assert r.status_code == 404 and "not loaded" in r.json()["error"]["message"]


def test_unload_waits_for_running_requests(server, adapter_dirs):
    http = server.http()
    load = {"lora_name": "d2", "lora_path": str(adapter_dirs["d"])}
    assert http.post("/v1/load_lora_adapter", json=load).status_code == 200
    result = {}

    def generate():
        result["response"] = complete(server.http(), "d2", max_tokens=400, ignore_eos=True)
        result["done"] = time.monotonic()

    worker = threading.Thread(target=generate)
    worker.start()
    server.wait_metric("loraserve:num_requests_running", 1, model_name=MODEL_NAME)
    r = http.post("/v1/unload_lora_adapter", json={"lora_name": "d2"})
    unloaded = time.monotonic()
    worker.join()
    assert r.status_code == 200
    response = result["response"]
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] == "length"
    assert result["done"] <= unloaded + 0.5  # the unload returned after the request ended
    assert "d2" not in model_ids(server)


@pytest.mark.parametrize(
    "name, path, message",
    [
        ("../x", "adapter:d", "path separator"),
        ("..", "adapter:d", "'..'"),
        ("ok-name", "/no/such/dir", "adapter_config.json not found"),
        (MODEL_NAME, "adapter:d", "base model"),
        ("bad-config", "bad", "use_dora"),
    ],
)
def test_load_rejects_bad_input(server, adapter_dirs, tmp_path, name, path, message):
    if path == "adapter:d":
        path = str(adapter_dirs["d"])
    elif path == "bad":
        shutil.copytree(adapter_dirs["d"], tmp_path / "bad")
        config = json.loads((tmp_path / "bad" / "adapter_config.json").read_text())
        config["use_dora"] = True
        (tmp_path / "bad" / "adapter_config.json").write_text(json.dumps(config))
        path = str(tmp_path / "bad")
    r = server.http().post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
    assert name not in model_ids(server) or name == MODEL_NAME
    assert complete(server.http(), "a").status_code == 200


def test_adapter_dir_loads_on_first_use(server, adapter_dirs, offline):
    http = server.http()
    r = complete(http, "c", return_token_ids=True)
    assert r.status_code == 200, r.text
    cards = {m.id: m for m in server.openai().models.list().data}
    assert cards["c"].root == str(adapter_dirs["c"].resolve())
    again = complete(http, f"{MODEL_NAME}:c", return_token_ids=True)
    assert again.json()["choices"][0]["token_ids"] == r.json()["choices"][0]["token_ids"]


@pytest.mark.parametrize(
    "name, status, message",
    [
        ("nope", 404, "does not exist"),
        ("../a", 400, "not allowed"),
        ("..", 400, "not allowed"),
        ("/etc", 400, "not allowed"),
        ("c/../../a", 400, "not allowed"),
        ("x\x00y", 400, "not allowed"),
        ("with space", 400, "not allowed"),
        ("~root", 400, "not allowed"),
        (f"{MODEL_NAME}:../a", 400, "not allowed"),
        ("escape", 400, "outside"),  # a symbolic link in the directory pointing outside it
    ],
)
def test_adapter_dir_refuses_names_outside_it(server, adapter_dirs, name, status, message):
    link = adapter_dirs["c"].parent / "escape"
    if not link.exists():
        link.symlink_to(adapter_dirs["d"])
    r = complete(server.http(), name)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == "model" and message in error["message"], error
    assert name not in model_ids(server)
    assert complete(server.http(), "a").status_code == 200


def test_adapter_failing_in_the_engine_is_an_error_not_a_hang(server, adapter_dirs, tmp_path):
    broken = shutil.copytree(adapter_dirs["d"], tmp_path / "broken")
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    http = server.http()
    load = {"lora_name": "broken", "lora_path": str(broken)}
    assert http.post("/v1/load_lora_adapter", json=load).status_code == 200  # config is fine
    r = complete(http, "broken")
    assert r.status_code == 500
    assert "cannot be loaded" in r.json()["error"]["message"], r.text
    # Streaming too: the failure comes before the first token, so it is the HTTP status.
    body = {"model": "broken", "prompt": [5], "max_tokens": 3, "stream": True}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 500 and "cannot be loaded" in r.json()["error"]["message"], r.text
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "broken"}).status_code == 200
    assert complete(http, "a").status_code == 200
