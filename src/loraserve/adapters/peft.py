"""PEFT LoRA adapter directories: read, validate, write.

The on-disk format is what ``peft`` (0.21) ``save_pretrained`` writes::

    adapter_dir/
      adapter_config.json          LoraConfig as JSON (r, lora_alpha, target_modules, ...)
      adapter_model.safetensors    or adapter_model.bin (a pickled state dict)
        base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight   [r, in_features]
        base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight   [out_features, r]
        ...                         (mlp.gate_proj / mlp.up_proj / mlp.down_proj likewise)

The adapter name (".default") is not part of saved keys; it is tolerated if present.
Module names are matched exactly as PEFT matches them on ``LlamaForCausalLM``, whose modules
are named ``model.layers.{i}.self_attn.q_proj`` etc.:

- ``target_modules`` list: a module is targeted if its full name is in the list or ends
  with ``.{entry}``; only then do ``layers_to_transform``/``layers_pattern`` filter it.
- ``target_modules`` string: ``re.fullmatch`` against the full name; ``"all-linear"`` means
  every linear layer except ``lm_head``, i.e. all seven projections.
- ``rank_pattern``/``alpha_pattern``: the first key (in file order) for which
  ``re.match(rf"(.*\\.)?({key})$", name)`` succeeds gives the module's r / alpha.
- scaling = alpha / r, or alpha / sqrt(r) with ``use_rslora``, with the per-module r and alpha.

Runtime code reads files with ``safetensors``/``torch`` only; ``peft`` is a test oracle.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from loraserve.config import LORA_TARGETS, ModelConfig

logger = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"

_PARENT = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
# Modules of a Llama-family model that are not projections; targeting any is rejected.
_OTHER_MODULES = ("model.embed_tokens", "lm_head", "model.norm", "model.rotary_emb")
_OTHER_LAYER_MODULES = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")
_WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_KEY_RE = re.compile(
    r"(?:base_model\.model\.)?(?P<module>model\.layers\.(?P<layer>\d+)\.(?P<parent>\w+)\."
    r"(?P<target>\w+))\.lora_(?P<ab>[AB])(?:\.default)?\.weight"
)
# Config fields that change what an adapter computes in ways loraserve does not serve.
# Each maps to the value PEFT treats as "off" (falsy covers None, False, [], {}).
_UNSUPPORTED_FIELDS = {
    "use_dora": "DoRA adds a magnitude vector per module; merge or retrain without DoRA",
    "modules_to_save": "fully trained modules (e.g. lm_head) cannot be served per request",
    "lora_bias": "LoRA-B bias terms are not supported; retrain with lora_bias=False",
    "target_parameters": "LoRA on raw parameters (MoE experts) is not supported",
    "layer_replication": "layer replication changes the base model's depth",
    "trainable_token_indices": "trained token embeddings cannot be served per request",
    "alora_invocation_tokens": "activated LoRA (aLoRA) is not supported",
    "velora_config": "the VeLoRA variant is not supported",
    "monteclora_config": "the MonteCLoRA variant is not supported",
    "use_bdlora": "the BD-LoRA variant is not supported",
    "arrow_config": "Arrow routing is not supported",
    "kasa_config": "the KaSA variant is not supported",
    "use_qalora": "QA-LoRA is not supported",
}
# init_lora_weights values that also modify the base weights unless converted at save time.
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "lora_ga")


class AdapterError(ValueError):
    """An adapter directory that cannot be served. The message names the adapter path,
    the offending file/field/tensor, and how to fix it."""


# (field, value, why) -> an AdapterError naming the adapter, its config file and the field.
_ErrorFactory = Callable[[str, Any, str], AdapterError]


def module_name(layer: int, target: str) -> str:
    """The PEFT module name of a projection in a Llama-family ``*ForCausalLM``."""
    return f"model.layers.{layer}.{_PARENT[target]}.{target}"


@dataclass(frozen=True)
class AdapterConfig:
    """A parsed and validated ``adapter_config.json`` (see ``read_adapter_config``)."""

    path: Path
    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: list[str] | str  # as given; "all-linear" is kept as written
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    layers_to_transform: tuple[int, ...] | None
    base_model_name_or_path: str | None
    raw: dict[str, Any]
    layers_pattern: tuple[str, ...] | None = None
    exclude_modules: list[str] | str | None = None

    def targets(self, name: str) -> bool:
        """Whether PEFT would put a LoRA on module ``name`` (``check_target_module_exists``)."""
        if self._excluded(name):
            return False
        tm = self.target_modules
        if isinstance(tm, str):
            if tm.lower() == "all-linear":
                return name.rsplit(".", 1)[-1] in LORA_TARGETS and name.startswith("model.layers.")
            return re.fullmatch(tm, name) is not None
        if name in tm:
            return True
        if not any(name.endswith(f".{t}") for t in tm):
            return False
        return self._layer_selected(name)

    def _excluded(self, name: str) -> bool:
        ex = self.exclude_modules
        if not ex:
            return False
        if isinstance(ex, str):
            return re.fullmatch(ex, name) is not None
        return name in ex or any(name.endswith(f".{e}") for e in ex)

    def _layer_selected(self, name: str) -> bool:
        if not self.layers_to_transform:
            return True
        if not self.layers_pattern:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
        else:
            match = None
            for pattern in self.layers_pattern:
                match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
                if match is not None:
                    break
        return match is not None and int(match["idx"]) in self.layers_to_transform

    def module_rank(self, name: str) -> int:
        """r of module ``name``: the first matching ``rank_pattern`` key, else ``r``."""
        return self.rank_pattern.get(_pattern_key(self.rank_pattern, name), self.r)

    def module_alpha(self, name: str) -> float:
        return self.alpha_pattern.get(_pattern_key(self.alpha_pattern, name), self.lora_alpha)

    def scaling(self, name: str) -> float:
        """PEFT's ``scaling[adapter]`` for module ``name``."""
        r, alpha = self.module_rank(name), self.module_alpha(name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _pattern_key(patterns: dict[str, Any], name: str) -> str:
    """PEFT's ``get_pattern_key``: first key matching a dotted suffix of ``name``."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return name


@dataclass(frozen=True)
class LoRAModule:
    """One adapted projection: delta(x) = scaling * (x @ a.T) @ b.T."""

    a: torch.Tensor  # [r, in_features]  (PEFT lora_A.weight)
    b: torch.Tensor  # [out_features, r] (PEFT lora_B.weight)
    scaling: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass(frozen=True)
class FlatEntry:
    """One adapted projection in a FlatLoRA: A's rows [rank, in_features] from ``a_offset``;
    from ``b_offset`` B^T's rows [rank, out_features] (``b_rows``) or B as PEFT stores it,
    [out_features, rank] (B^T's rows are then its columns)."""

    layer: int
    target: str
    rank: int
    in_features: int
    out_features: int
    a_offset: int
    b_offset: int
    b_rows: bool
    scaling: float


@dataclass
class FlatLoRA:
    """An adapter's A and B matrices in one 1-D tensor: a generated adapter (A's rows, then
    B^T's, per projection) or a safetensors file's data as read (one dtype).

    Packing reads it through numpy views and ``torch.from_numpy``, which keep the GIL: on
    a thread beside the busy engine thread every torch call that gives the GIL up (``view``,
    ``t``, ``narrow``, ``to``) waits up to the switch interval to get it back, and the ~900
    of them that per-matrix tensors took made a generated S2 adapter cost ~0.45 s of an I/O
    thread (H200 host, session 8)."""

    values: torch.Tensor  # 1-D, contiguous
    entries: list[FlatEntry]


@dataclass
class LoRAWeights:
    """One adapter in host memory: plain (unpinned) CPU tensors in the served dtype, as one
    LoRAModule per projection or as a FlatLoRA (its modules then made on first use)."""

    name: str
    config: AdapterConfig
    _modules: dict[tuple[int, str], LoRAModule] | None = None  # (layer, target) -> weights
    flat: FlatLoRA | None = None

    def __post_init__(self) -> None:
        if (self._modules is None) == (self.flat is None):
            raise ValueError("LoRAWeights takes modules or flat weights, exactly one")

    @property
    def modules(self) -> dict[tuple[int, str], LoRAModule]:
        """(layer, target in LORA_TARGETS) -> weights (views of the flat rows, if flat)."""
        if self._modules is None:
            assert self.flat is not None
            modules = {}
            values = self.flat.values
            for e in self.flat.entries:
                a = values[e.a_offset : e.a_offset + e.rank * e.in_features]
                b = values[e.b_offset : e.b_offset + e.rank * e.out_features]
                a = a.view(e.rank, e.in_features)
                if e.b_rows:
                    b = b.view(e.rank, e.out_features).t()
                else:
                    b = b.view(e.out_features, e.rank)
                modules[(e.layer, e.target)] = LoRAModule(a, b, e.scaling)
            self._modules = modules
        return self._modules

    def module_entries(self) -> list[tuple[int, str, int, float]]:
        """(layer, target, rank, scaling) of every module, without making flat views."""
        if self.flat is not None:
            return [(e.layer, e.target, e.rank, e.scaling) for e in self.flat.entries]
        return [(lay, t, m.rank, m.scaling) for (lay, t), m in self.modules.items()]

    @property
    def nbytes(self) -> int:
        """Bytes of all A and B tensors."""
        if self.flat is not None:
            return _nbytes(self.flat.values)
        return sum(_nbytes(m.a) + _nbytes(m.b) for m in self.modules.values())

    def rank(self, layer: int, target: str) -> int:
        """Rank at (layer, target); 0 where the adapter has no LoRA."""
        if self.flat is None:
            module = self.modules.get((layer, target))
            return 0 if module is None else module.rank
        for lay, t, rank, _ in self.module_entries():
            if (lay, t) == (layer, target):
                return rank
        return 0


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# ---- reading the config --------------------------------------------------------------


def read_adapter_config(path: str | Path) -> AdapterConfig:
    """Read and validate ``path/adapter_config.json`` alone (no weights are opened).

    Raises AdapterError for a missing/invalid file, a non-LoRA adapter, or any field that
    loraserve cannot serve (DoRA, modules_to_save, lora_bias, embedding/lm_head targets...).
    """
    path = Path(path)
    file = path / CONFIG_FILE
    if not file.is_file():
        raise AdapterError(
            f"adapter {path}: {CONFIG_FILE} not found; an adapter directory is what PEFT's "
            "save_pretrained writes (adapter_config.json + adapter_model.safetensors)"
        )
    try:
        raw = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(
            f"adapter {path}: {file.name} is not valid JSON ({e}); re-save it"
        ) from e
    if not isinstance(raw, dict):
        raise AdapterError(f"adapter {path}: {file.name} must hold a JSON object")
    return config_from_dict(raw, path)


def config_from_dict(raw: dict[str, Any], path: Path) -> AdapterConfig:
    """Validate an adapter_config dict (as in the JSON file) and build an AdapterConfig."""
    err = _field_error(path)
    if raw.get("peft_type", "LORA") != "LORA":
        raise err("peft_type", raw["peft_type"], "only LoRA adapters (peft_type LORA) are served")
    _check_unsupported(raw, path, err)
    config = AdapterConfig(
        path=path,
        r=_positive_int(raw.get("r", 8), "r", err),
        lora_alpha=_number(raw.get("lora_alpha", 8), "lora_alpha", err),
        use_rslora=_bool(raw.get("use_rslora", False), "use_rslora", err),
        target_modules=_target_modules(raw.get("target_modules"), err),
        rank_pattern=_patterns(raw.get("rank_pattern"), "rank_pattern", err, _positive_int),
        alpha_pattern=_patterns(raw.get("alpha_pattern"), "alpha_pattern", err, _number),
        layers_to_transform=_layers(raw.get("layers_to_transform"), err),
        base_model_name_or_path=_optional_str(raw.get("base_model_name_or_path")),
        raw=raw,
        layers_pattern=_str_tuple(raw.get("layers_pattern"), "layers_pattern", err),
        exclude_modules=_str_or_list(raw.get("exclude_modules"), "exclude_modules", err),
    )
    if isinstance(config.target_modules, str) and (
        config.layers_to_transform or config.layers_pattern
    ):
        raise err(
            "layers_to_transform",
            raw.get("layers_to_transform"),
            "cannot be combined with a regex target_modules (PEFT rejects it too); "
            "select layers in the regex instead",
        )
    _check_not_embeddings(config, err)
    return config


def _field_error(path: Path) -> _ErrorFactory:
    def make(field: str, value: Any, why: str) -> AdapterError:
        return AdapterError(f"adapter {path}: {CONFIG_FILE} field {field}={value!r}: {why}")

    return make


def _check_unsupported(raw: dict[str, Any], path: Path, err: _ErrorFactory) -> None:
    for field, why in _UNSUPPORTED_FIELDS.items():
        if raw.get(field):
            raise err(field, raw[field], why)
    if raw.get("bias", "none") != "none":
        raise err("bias", raw["bias"], "trained base biases are not supported; use bias='none'")
    init = raw.get("init_lora_weights")
    if isinstance(init, str) and init.startswith(_BASE_MODIFYING_INITS):
        logger.warning(
            "adapter %s: init_lora_weights=%r modifies the base weights; unless it was saved "
            "with path_initial_model_for_weight_conversion it needs that modified base model",
            path,
            init,
        )


def _optional_str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _positive_int(value: Any, field: str, err: _ErrorFactory) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise err(field, value, "must be a positive integer")
    return value


def _number(value: Any, field: str, err: _ErrorFactory) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise err(field, value, "must be a finite number")
    return float(value)


def _bool(value: Any, field: str, err: _ErrorFactory) -> bool:
    if not isinstance(value, bool):
        raise err(field, value, "must be true or false")
    return value


def _regex(value: str, field: str, err: _ErrorFactory) -> str:
    try:
        re.compile(value)
    except re.error as e:
        raise err(field, value, f"is not a valid regular expression ({e})") from e
    return value


def _target_modules(value: Any, err: _ErrorFactory) -> list[str] | str:
    if isinstance(value, str) and value:
        return _regex(value, "target_modules", err)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    raise err(
        "target_modules",
        value,
        "must be a non-empty list of module names, a regex string, or 'all-linear'",
    )


def _patterns(value: Any, field: str, err: _ErrorFactory, check: Callable) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise err(field, value, "must be an object mapping module patterns to values")
    return {_regex(str(k), field, err): check(v, f"{field}[{k!r}]", err) for k, v in value.items()}


def _layers(value: Any, err: _ErrorFactory) -> tuple[int, ...] | None:
    if value is None or value == []:
        return None
    values = [value] if isinstance(value, int) else value
    if not isinstance(values, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values
    ):
        raise err("layers_to_transform", value, "must be a layer index or a list of them")
    return tuple(values)


def _str_tuple(value: Any, field: str, err: _ErrorFactory) -> tuple[str, ...] | None:
    if value is None or value == [] or value == "":
        return None
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise err(field, value, "must be a string or a list of strings")
    return tuple(_regex(v, field, err) for v in values)


def _str_or_list(value: Any, field: str, err: _ErrorFactory) -> list[str] | str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return _regex(value, field, err)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise err(field, value, "must be a regex string or a list of module names")


def _check_not_embeddings(config: AdapterConfig, err: _ErrorFactory) -> None:
    for name in _OTHER_MODULES:
        if config.targets(name):
            raise err(
                "target_modules",
                config.target_modules,
                f"targets {name}; loraserve serves LoRA on the q/k/v/o/gate/up/down "
                "projections only (drop embeddings, lm_head and norms from target_modules)",
            )


# ---- which modules an adapter has ----------------------------------------------------


def expected_ranks(config: AdapterConfig, model: ModelConfig) -> dict[tuple[int, str], int]:
    """(layer, target) -> rank for every projection of ``model`` the config targets.

    Raises AdapterError if it targets a non-projection module of a layer, or nothing at all.
    """
    err = _field_error(config.path)
    out = {}
    for layer in range(model.num_hidden_layers):
        for other in _OTHER_LAYER_MODULES:
            if config.targets(f"model.layers.{layer}.{other}"):
                raise err(
                    "target_modules",
                    config.target_modules,
                    f"targets model.layers.{layer}.{other}, which is not a linear projection",
                )
        for target in LORA_TARGETS:
            name = module_name(layer, target)
            if config.targets(name):
                out[(layer, target)] = config.module_rank(name)
    if not out:
        raise err(
            "target_modules",
            config.target_modules,
            f"matches none of the {model.num_hidden_layers} layers' projections "
            f"({', '.join(LORA_TARGETS)}) of the served model",
        )
    return out


def estimate_nbytes(
    config: AdapterConfig,
    model: ModelConfig,
    dtype: torch.dtype,
    expected: dict[tuple[int, str], int] | None = None,  # expected_ranks(config, model)
) -> int:
    """Bytes the adapter's A and B take in ``dtype``, from the config alone."""
    size = torch.empty((), dtype=dtype).element_size()
    total = 0
    if expected is None:
        expected = expected_ranks(config, model)
    for (_, target), r in expected.items():
        in_f, out_f = model.lora_shape(target)
        total += r * (in_f + out_f) * size
    return total


# ---- loading weights -----------------------------------------------------------------


def load_adapter(
    name: str,
    path: str | Path,
    model: ModelConfig,
    dtype: torch.dtype,
    config: AdapterConfig | None = None,
    expected: dict[tuple[int, str], int] | None = None,
) -> LoRAWeights:
    """Read and validate a PEFT adapter directory into host tensors of ``dtype``.

    Every tensor must be a lora_A/lora_B of a projection the config targets, with the shape
    the base model and the config's rank imply. A targeted module with no tensors in the
    file is served without LoRA (as PEFT's default B=0 init would) and logged.

    ``config`` and ``expected`` (``expected_ranks(config, model)``), if given, are the
    directory's config as read when it was registered: its tensors are read now, its
    config is not read again (the engine's I/O threads share the GIL with its step loop).
    """
    if config is None:
        config = read_adapter_config(path)
        warn_base_model(config, model)
    if expected is None:
        expected = expected_ranks(config, model)
    stored = _read_stored(config.path / SAFETENSORS_FILE)
    if stored is not None:
        data, tensors = stored
        pairs = _pair_tensors(tensors, config.path, model)
        return _flat_weights(name, config, model, data, pairs, expected, dtype)
    pairs = _pair_tensors(_read_tensors(config.path), config.path, model)
    modules = {}
    for key in sorted(pairs, key=lambda k: (k[0], LORA_TARGETS.index(k[1]))):
        a, b = pairs[key]
        _check_module(config, model, key, a, b, expected)
        scaling = config.scaling(module_name(*key))
        modules[key] = LoRAModule(a.to(dtype).contiguous(), b.to(dtype).contiguous(), scaling)
    _warn_missing(config, expected, set(modules))
    return LoRAWeights(name, config, modules)


# safetensors dtype -> (torch dtype, numpy dtype of its bits)
_STORED_DTYPES = {
    "F32": (torch.float32, np.float32),
    "F16": (torch.float16, np.float16),
    "BF16": (torch.bfloat16, np.int16),
}


@dataclass(frozen=True)
class _Stored:
    """A tensor of a safetensors file: its dtype, shape and element offset in the file's
    data (all tensors of one dtype), for validation without making tensors."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int

    def dim(self) -> int:
        return len(self.shape)


def _read_stored(file: Path) -> tuple[np.ndarray, dict[str, _Stored]] | None:
    """A safetensors file's data as numpy elements (one read, no torch call) and its
    tensors; None if the file is missing or malformed, or its tensors are not all of one
    float dtype (``load_file`` then reads it, or says what is wrong with it)."""
    try:
        raw = np.fromfile(file, dtype=np.uint8)  # writable, as torch.from_numpy wants
        n = int.from_bytes(raw[:8].tobytes(), "little")
        header = json.loads(raw[8 : 8 + n].tobytes())
        header.pop("__metadata__", None)
        kinds = {info["dtype"] for info in header.values()}
        if len(kinds) != 1 or next(iter(kinds)) not in _STORED_DTYPES:
            return None
        torch_dtype, np_dtype = _STORED_DTYPES[kinds.pop()]
        size = np.dtype(np_dtype).itemsize
        out, data_end = {}, 0
        for key, info in header.items():
            shape = tuple(int(d) for d in info["shape"])
            start, end = (int(o) for o in info["data_offsets"])
            if end - start != math.prod(shape) * size or start % size:
                return None
            out[key] = _Stored(torch_dtype, shape, start // size)
            data_end = max(data_end, end)
        if 8 + n + data_end > raw.size or (8 + n) % 8:  # (the format aligns the data)
            return None
        return raw[8 + n : 8 + n + data_end].view(np_dtype), out
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _flat_weights(
    name: str,
    config: AdapterConfig,
    model: ModelConfig,
    data: np.ndarray,
    pairs: dict[tuple[int, str], tuple[_Stored, _Stored]],
    expected: dict[tuple[int, str], int],
    dtype: torch.dtype,
) -> LoRAWeights:
    """Validated pairs as a FlatLoRA over the file's data as read (B as stored, [out, r]):
    no per-matrix tensors; one more call converts to ``dtype`` if the file's differs."""
    order = sorted(pairs, key=lambda k: (k[0], LORA_TARGETS.index(k[1])))
    entries = []
    for layer, target in order:
        a, b = pairs[(layer, target)]
        _check_module(config, model, (layer, target), a, b, expected)
        (rank, in_f), out_f = a.shape, b.shape[0]
        scaling = config.scaling(module_name(layer, target))
        entries.append(
            FlatEntry(layer, target, rank, in_f, out_f, a.offset, b.offset, False, scaling)
        )
    values = torch.from_numpy(data)
    if data.dtype == np.int16:  # bfloat16's bits
        values = values.view(torch.bfloat16)
    if values.dtype != dtype:
        values = values.to(dtype)
    _warn_missing(config, expected, set(order))
    return LoRAWeights(name, config, flat=FlatLoRA(values, entries))


def _warn_missing(
    config: AdapterConfig, expected: dict[tuple[int, str], int], have: set[tuple[int, str]]
) -> None:
    missing = sorted(set(expected) - have)
    if missing:
        logger.warning(
            "adapter %s: %d targeted modules have no weights (e.g. %s); they get no LoRA",
            config.path,
            len(missing),
            module_name(*missing[0]),
        )


def warn_base_model(config: AdapterConfig, model: ModelConfig) -> None:
    """Log a warning if the adapter names a base model other than the served one."""
    theirs = Path(config.base_model_name_or_path or "").name
    ours = Path(model.name or "").name
    if theirs and ours and theirs.lower() != ours.lower():
        logger.warning(
            "adapter %s was trained on base model %r but the served model is %r",
            config.path,
            config.base_model_name_or_path,
            model.name,
        )


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    st, pt = path / SAFETENSORS_FILE, path / BIN_FILE
    try:
        if st.is_file():
            return load_file(st, device="cpu")
        if pt.is_file():
            return _load_bin(pt)
    except AdapterError:
        raise
    except Exception as e:
        file = st if st.is_file() else pt
        raise AdapterError(
            f"adapter {path}: cannot read {file.name} ({type(e).__name__}: {e}); "
            "the file is corrupt or truncated: re-save the adapter"
        ) from e
    raise AdapterError(
        f"adapter {path}: no weights file ({SAFETENSORS_FILE} or {BIN_FILE}); "
        "save the adapter with PEFT's save_pretrained"
    )


def _load_bin(file: Path) -> dict[str, torch.Tensor]:
    state = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AdapterError(f"adapter {file.parent}: {file.name} is not a state dict of tensors")
    return state


def _pair_tensors(
    tensors: dict[str, torch.Tensor], path: Path, model: ModelConfig
) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """Group tensors into (A, B) per (layer, target); reject any other key."""
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        layer, target, ab = _parse_key(key, path, model)
        if tensor.dtype not in _WEIGHT_DTYPES:
            raise AdapterError(
                f"adapter {path}: tensor {key} has dtype {tensor.dtype}; "
                "LoRA weights must be float32, float16 or bfloat16"
            )
        parts.setdefault((layer, target), {})[ab] = tensor
    for (layer, target), ab in parts.items():
        if len(ab) == 1:
            have, lack = ("A", "B") if "A" in ab else ("B", "A")
            raise AdapterError(
                f"adapter {path}: {module_name(layer, target)} has lora_{have} but no "
                f"lora_{lack} tensor in the weights file; re-save the adapter"
            )
    return {k: (v["A"], v["B"]) for k, v in parts.items()}


def _parse_key(key: str, path: Path, model: ModelConfig) -> tuple[int, str, str]:
    m = _KEY_RE.fullmatch(key)
    if m is None or m["target"] not in _PARENT or _PARENT[m["target"]] != m["parent"]:
        raise AdapterError(f"adapter {path}: tensor {key}: {_unknown_key_reason(key)}")
    layer = int(m["layer"])
    if layer >= model.num_hidden_layers:
        raise AdapterError(
            f"adapter {path}: tensor {key} is for layer {layer} but the served model has "
            f"num_hidden_layers={model.num_hidden_layers}; the adapter was made for a "
            "different (deeper) base model"
        )
    return layer, m["target"], m["ab"]


def _unknown_key_reason(key: str) -> str:
    if "lora_embedding" in key or "embed_tokens" in key or "lm_head" in key:
        return "LoRA on embeddings or lm_head is not supported; retrain without them"
    if "lora_magnitude_vector" in key:
        return "DoRA magnitude vectors are not supported; retrain with use_dora=False"
    if key.endswith(".bias"):
        return "bias tensors are not supported; retrain with bias='none', lora_bias=False"
    return (
        "is not a lora_A/lora_B weight of a q/k/v/o/gate/up/down projection "
        "(expected e.g. base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight)"
    )


def _check_module(
    config: AdapterConfig,
    model: ModelConfig,
    key: tuple[int, str],
    a: torch.Tensor,
    b: torch.Tensor,
    expected: dict[tuple[int, str], int],
) -> None:
    path, name = config.path, module_name(*key)
    if key not in expected:
        raise AdapterError(
            f"adapter {path}: the weights file has {name} but {CONFIG_FILE} field "
            f"target_modules={config.target_modules!r} (with layers_to_transform/"
            "exclude_modules) does not target it; fix the config or the weights"
        )
    in_f, out_f = model.lora_shape(key[1])
    r = a.shape[0] if a.dim() == 2 else -1
    for ab, tensor, want in (("A", a, (r, in_f)), ("B", b, (out_f, r))):
        if tensor.dim() != 2 or tuple(tensor.shape) != want:
            raise AdapterError(
                f"adapter {path}: tensor {name}.lora_{ab}.weight has shape "
                f"{tuple(tensor.shape)}, expected {want} for the served model "
                f"(in_features={in_f}, out_features={out_f}); the adapter was made for a "
                "different base model"
            )
    if r != expected[key]:
        raise AdapterError(
            f"adapter {path}: {name} has rank {r} in the weights file but {CONFIG_FILE} "
            f"fields r/rank_pattern give {expected[key]}; fix r or rank_pattern"
        )


# ---- writing -------------------------------------------------------------------------


def write_adapter(
    path: str | Path,
    modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]],
    r: int,
    lora_alpha: float,
    target_modules: Sequence[str] | str,
    base_model_name_or_path: str | None = None,
    use_rslora: bool = False,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    layers_to_transform: Sequence[int] | None = None,
) -> Path:
    """Write ``modules`` ((layer, target) -> (A [r, in], B [out, r])) as a PEFT adapter dir.

    The result loads with ``PeftModel.from_pretrained`` and with ``load_adapter``. Raises
    AdapterError if a module is not targeted by the config or its rank disagrees with it.
    """
    path = Path(path)
    raw = _peft_config_dict(
        r,
        lora_alpha,
        target_modules,
        base_model_name_or_path=base_model_name_or_path,
        use_rslora=use_rslora,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        layers_to_transform=layers_to_transform,
    )
    config = config_from_dict(raw, path)
    tensors = {}
    for (layer, target), (a, b) in modules.items():
        name = module_name(layer, target)
        rank = config.module_rank(name)
        if not config.targets(name) or a.shape[0] != rank or b.shape[1] != rank:
            raise AdapterError(
                f"adapter {path}: {name} (A {tuple(a.shape)}, B {tuple(b.shape)}) does not "
                f"fit target_modules/r/rank_pattern of the config being written"
            )
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.detach().cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.detach().cpu().contiguous()
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / SAFETENSORS_FILE, metadata={"format": "pt"})
    (path / CONFIG_FILE).write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    return path


def _peft_config_dict(
    r: int,
    lora_alpha: float,
    target_modules: Sequence[str] | str,
    *,
    base_model_name_or_path: str | None = None,
    use_rslora: bool = False,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    layers_to_transform: Sequence[int] | None = None,
) -> dict[str, Any]:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": lora_alpha,
        "target_modules": target_modules
        if isinstance(target_modules, str)
        else list(target_modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": use_rslora,
        "use_dora": False,
        "lora_bias": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "exclude_modules": None,
        "rank_pattern": dict(rank_pattern or {}),
        "alpha_pattern": dict(alpha_pattern or {}),
        "layers_to_transform": list(layers_to_transform) if layers_to_transform else None,
        "layers_pattern": None,
    }


def random_modules(
    model: ModelConfig, rank: int, targets: Sequence[str], seed: int
) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic random fp32 (A, B) for every layer and target.

    A ~ N(0, 1/in_features) and B ~ N(0, 0.01/rank): with scaling 1 each output moves by
    about 0.1x the input's scale: enough to change generations, small enough to stay sane.
    """
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown or not targets or rank <= 0:
        raise ValueError(f"targets must be a non-empty subset of {LORA_TARGETS} and rank > 0")
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(model.num_hidden_layers):
        for target in LORA_TARGETS:
            if target in targets:
                in_f, out_f = model.lora_shape(target)
                a = torch.randn(rank, in_f, generator=gen) / math.sqrt(in_f)
                b = torch.randn(out_f, rank, generator=gen) * (0.1 / math.sqrt(rank))
                out[(layer, target)] = (a, b)
    return out


def make_random_adapter(
    path: str | Path,
    model: ModelConfig,
    rank: int,
    targets: Sequence[str],
    seed: int,
    lora_alpha: float | None = None,
    dtype: torch.dtype = torch.float32,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write a random PEFT adapter (nonzero B, see ``random_modules``) for demos and benches.

    ``lora_alpha`` defaults to ``rank`` (scaling 1). Tensors are saved in ``dtype``.
    """
    modules = {
        k: (a.to(dtype), b.to(dtype))
        for k, (a, b) in random_modules(model, rank, targets, seed).items()
    }
    return write_adapter(
        path,
        modules,
        r=rank,
        lora_alpha=float(rank) if lora_alpha is None else lora_alpha,
        target_modules=[t for t in LORA_TARGETS if t in targets],
        base_model_name_or_path=base_model_name_or_path or model.name or None,
    )


def random_lora_weights(
    name: str,
    model: ModelConfig,
    rank: int,
    targets: Sequence[str],
    seed: int,
    dtype: torch.dtype = torch.float32,
    lora_alpha: float | None = None,
) -> LoRAWeights:
    """The LoRAWeights ``make_random_adapter`` would write, built in memory (no files);
    for ``AdapterStore.register_generated``."""
    alpha = float(rank) if lora_alpha is None else lora_alpha
    targets = [t for t in LORA_TARGETS if t in targets]
    raw = _peft_config_dict(rank, alpha, targets, base_model_name_or_path=model.name or None)
    config = config_from_dict(raw, Path(f"<generated {name}>"))
    modules = {
        k: LoRAModule(a.to(dtype), b.to(dtype), alpha / rank)
        for k, (a, b) in random_modules(model, rank, targets, seed).items()
    }
    return LoRAWeights(name, config, modules)
