"""adapters/peft.py against real PEFT: adapters made with get_peft_model + save_pretrained on a
tiny random Llama must read back as exactly PEFT's lora_A / lora_B / scaling, and adapters we
write must load in PeftModel.from_pretrained with the logits our reading implies."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraserve.adapters.peft import (
    AdapterError,
    LoRAWeights,
    config_from_dict,
    estimate_nbytes,
    load_adapter,
    make_random_adapter,
    module_name,
    random_lora_weights,
    read_adapter_config,
    write_adapter,
)
from loraserve.config import LORA_TARGETS, ModelConfig

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TINY = dict(
    vocab_size=211,
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
)


@pytest.fixture(scope="module")
def base_dir(tiny_model_factory) -> Path:
    return tiny_model_factory(**TINY)


@pytest.fixture(scope="module")
def model(base_dir) -> ModelConfig:
    return ModelConfig.from_dir(base_dir)


def make_peft(
    out: Path,
    base: Path,
    *,
    dtype: torch.dtype | None = None,
    safe: bool = True,
    seed: int = 0,
    **lora_kw,
):
    """Save a real PEFT LoRA (random nonzero A and B) made on the model in ``base``."""
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM.from_pretrained(base)
    lora = peft.LoraConfig(init_lora_weights=False, **lora_kw)
    pm = peft.get_peft_model(hf, lora)
    if dtype is not None:
        pm = pm.to(dtype)
    pm.save_pretrained(out, safe_serialization=safe)
    return out, pm


def peft_modules(pm) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]]:
    out = {}
    for name, mod in pm.named_modules():
        if isinstance(mod, peft.tuners.lora.LoraLayer):
            m = re.search(r"layers\.(\d+)\.\w+\.(\w+)$", name)
            a = mod.lora_A["default"].weight.detach()
            b = mod.lora_B["default"].weight.detach()
            out[(int(m[1]), m[2])] = (a, b, mod.scaling["default"])
    return out


def assert_same_as_peft(weights: LoRAWeights, pm, dtype: torch.dtype = torch.float32) -> None:
    theirs = peft_modules(pm)
    assert set(weights.modules) == set(theirs)
    for key, (a, b, scaling) in theirs.items():
        ours = weights.modules[key]
        assert ours.a.dtype == dtype and ours.b.dtype == dtype
        assert torch.equal(ours.a, a.to(dtype)), key
        assert torch.equal(ours.b, b.to(dtype)), key
        assert ours.scaling == scaling, (key, ours.scaling, scaling)
        assert weights.rank(*key) == a.shape[0]


def merged_logits(base: Path, weights: LoRAWeights, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the base model with W += scaling * B @ A for each of our modules."""
    hf = transformers.LlamaForCausalLM.from_pretrained(base)
    with torch.no_grad():
        for (layer, target), m in weights.modules.items():
            linear = hf.get_submodule(module_name(layer, target))
            linear.weight += m.scaling * (m.b.float() @ m.a.float())
        return hf(ids).logits


def peft_logits(base: Path, adapter: Path, ids: torch.Tensor) -> torch.Tensor:
    hf = transformers.LlamaForCausalLM.from_pretrained(base)
    pm = peft.PeftModel.from_pretrained(hf, adapter)
    with torch.no_grad():
        return pm(ids).logits


IDS = torch.tensor([[1, 5, 17, 42, 99, 3, 150]])

CASES = {
    **{f"single-{t}": dict(target_modules=[t]) for t in LORA_TARGETS},
    "all-seven": dict(target_modules=list(LORA_TARGETS)),
    "all-linear": dict(target_modules="all-linear"),
    "regex": dict(target_modules=r".*\.layers\.[02]\.(self_attn\.(q|v)_proj|mlp\.down_proj)"),
    "r1": dict(r=1, lora_alpha=3, target_modules=["q_proj", "v_proj"]),
    "r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "up_proj"]),
    "r64": dict(r=64, lora_alpha=32, target_modules=["k_proj", "down_proj"]),
    "rslora": dict(r=16, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "o_proj"]),
    "patterns": dict(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
        rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 12, r"layers\.2\..*gate_proj": 6},
        alpha_pattern={"v_proj": 3, "model.layers.0.mlp.down_proj": 20},
    ),
    "patterns-rslora": dict(
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=["q_proj", "down_proj"],
        rank_pattern={"down_proj": 9},
        alpha_pattern={"layers.2.self_attn.q_proj": 5},
    ),
    "layers-list": dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[0, 2]),
    "layers-int": dict(target_modules=["v_proj"], layers_to_transform=1),
    "layers-pattern": dict(
        target_modules=["o_proj"], layers_to_transform=[1, 2], layers_pattern="layers"
    ),
    "exclude": dict(target_modules="all-linear", exclude_modules=["k_proj", "up_proj"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_reads_what_peft_saved(tmp_path, base_dir, model, case):
    adapter, pm = make_peft(tmp_path / "a", base_dir, **CASES[case])
    weights = load_adapter("x", adapter, model, torch.float32)
    assert_same_as_peft(weights, pm)
    config = read_adapter_config(adapter)
    assert estimate_nbytes(config, model, torch.float32) == weights.nbytes
    assert estimate_nbytes(config, model, torch.bfloat16) * 2 == weights.nbytes


@pytest.mark.parametrize("case", ["patterns", "patterns-rslora", "all-linear", "layers-list"])
def test_logits_match_peft(tmp_path, base_dir, model, case):
    adapter, _ = make_peft(tmp_path / "a", base_dir, **CASES[case])
    weights = load_adapter("x", adapter, model, torch.float32)
    theirs = peft_logits(base_dir, adapter, IDS)
    torch.testing.assert_close(merged_logits(base_dir, weights, IDS), theirs, atol=1e-5, rtol=0)
    base = transformers.LlamaForCausalLM.from_pretrained(base_dir)(IDS).logits
    assert (theirs - base).abs().max() > 1e-3, "the adapter should change the logits"


@pytest.mark.parametrize("saved", [torch.float16, torch.bfloat16])
def test_half_precision_weights_are_converted(tmp_path, base_dir, model, saved):
    adapter, pm = make_peft(tmp_path / "a", base_dir, dtype=saved, target_modules="all-linear")
    assert next(iter(load_file(adapter / "adapter_model.safetensors").values())).dtype == saved
    weights = load_adapter("x", adapter, model, torch.float32)
    assert_same_as_peft(weights, pm)


def test_converts_to_requested_dtype(tmp_path, base_dir, model):
    adapter, pm = make_peft(tmp_path / "a", base_dir, target_modules=["q_proj", "down_proj"])
    weights = load_adapter("x", adapter, model, torch.bfloat16)
    assert_same_as_peft(weights, pm, dtype=torch.bfloat16)
    assert weights.flat is not None and weights.flat.values.dtype == torch.bfloat16
    assert all(m.a.is_contiguous() for m in weights.modules.values())


@pytest.mark.parametrize(
    ("stored", "served"),
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float32, torch.bfloat16),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float16),
    ],
)
def test_safetensors_weights_read_flat_match_the_file(tmp_path, model, stored, served):
    """The safetensors reader (numpy views, one copy: no GIL hand-offs) gives exactly the
    file's tensors in the served dtype; a .bin adapter takes the per-module path."""
    targets = ["q_proj", "v_proj", "down_proj"]
    path = make_random_adapter(tmp_path / "a", model, 4, targets, seed=3, dtype=stored)
    weights = load_adapter("x", path, model, served)
    assert weights.flat is not None and weights.flat.values.dtype == served
    tensors = load_file(path / "adapter_model.safetensors")
    assert len(weights.modules) == len(tensors) // 2
    for (layer, target), m in weights.modules.items():
        key = f"base_model.model.{module_name(layer, target)}"
        assert torch.equal(m.a, tensors[f"{key}.lora_A.weight"].to(served))
        assert torch.equal(m.b, tensors[f"{key}.lora_B.weight"].to(served))
        assert m.scaling == 1.0


def test_reads_bin_weights(tmp_path, base_dir, model):
    adapter, pm = make_peft(tmp_path / "a", base_dir, safe=False, target_modules=["q_proj"])
    assert (adapter / "adapter_model.bin").is_file()
    assert not (adapter / "adapter_model.safetensors").exists()
    assert_same_as_peft(load_adapter("x", adapter, model, torch.float32), pm)


def test_tolerates_adapter_name_in_keys(tmp_path, base_dir, model):
    adapter, pm = make_peft(tmp_path / "a", base_dir, target_modules=["q_proj", "v_proj"])
    file = adapter / "adapter_model.safetensors"
    tensors = {k.replace(".weight", ".default.weight"): v for k, v in load_file(file).items()}
    save_file(tensors, file)
    assert_same_as_peft(load_adapter("x", adapter, model, torch.float32), pm)


# ---- matching semantics against PEFT's own functions ----------------------------------

MATCH_CONFIGS = [
    dict(target_modules=["q_proj", "mlp.up_proj"]),
    dict(target_modules=["model.layers.1.self_attn.k_proj", "down_proj"]),
    dict(target_modules=["q_proj", "model.layers.2.mlp.gate_proj"], layers_to_transform=[0, 1]),
    dict(target_modules=["v_proj"], layers_to_transform=2, layers_pattern=["blocks", "layers"]),
    dict(target_modules=["o_proj"], layers_to_transform=[0], layers_pattern="blocks"),
    dict(target_modules=r".*layers\.1.*proj"),
    dict(target_modules=r"model\.layers\.\d+\.mlp\..*", exclude_modules=r".*\.2\..*"),
    dict(target_modules=["proj"]),
    dict(target_modules=["q_proj", "k_proj"], exclude_modules=["model.layers.0.self_attn.q_proj"]),
]


@pytest.mark.parametrize("kw", MATCH_CONFIGS)
def test_target_matching_is_peft_s(model, kw):
    from peft.tuners.tuners_utils import check_target_module_exists

    theirs = peft.LoraConfig(**kw)
    ours = config_from_dict(dict(kw), Path("cfg"))
    for layer in range(model.num_hidden_layers):
        for target in LORA_TARGETS:
            name = module_name(layer, target)
            expected = check_target_module_exists(theirs, name)
            expected = bool(expected) and type(expected).__name__ != "_ExcludedModule"
            assert ours.targets(name) == expected, (kw, name)


def test_pattern_keys_are_peft_s(model):
    from peft.utils.other import get_pattern_key

    patterns = {"q_proj": 2, r"layers\.1\..*": 3, "1.mlp.down_proj": 4, "mlp": 5, "up": 6}
    config = config_from_dict(
        {"target_modules": "all-linear", "r": 7, "rank_pattern": patterns}, Path("cfg")
    )
    for layer in range(model.num_hidden_layers):
        for target in LORA_TARGETS:
            name = module_name(layer, target)
            key = get_pattern_key(patterns.keys(), name)
            assert config.module_rank(name) == patterns.get(key, 7), name


# ---- writing ------------------------------------------------------------------------


def test_write_adapter_loads_in_peft(tmp_path, base_dir, model):
    gen = torch.Generator().manual_seed(3)
    ranks = {"q_proj": 3, "down_proj": 5}
    modules = {}
    for layer in (0, 2):
        for target, r in ranks.items():
            in_f, out_f = model.lora_shape(target)
            a = torch.randn(r, in_f, generator=gen) * 0.2
            modules[(layer, target)] = (a, torch.randn(out_f, r, generator=gen) * 0.2)
    adapter = write_adapter(
        tmp_path / "w",
        modules,
        r=3,
        lora_alpha=6,
        target_modules=["q_proj", "down_proj"],
        rank_pattern={"down_proj": 5},
        alpha_pattern={"layers.2.self_attn.q_proj": 11},
        layers_to_transform=[0, 2],
        use_rslora=True,
        base_model_name_or_path=str(base_dir),
    )
    ours = load_adapter("w", adapter, model, torch.float32)
    for key, (a, b) in modules.items():
        assert torch.equal(ours.modules[key].a, a) and torch.equal(ours.modules[key].b, b)
    pm = peft.PeftModel.from_pretrained(
        transformers.LlamaForCausalLM.from_pretrained(base_dir), adapter
    )
    assert_same_as_peft(ours, pm)
    torch.testing.assert_close(
        merged_logits(base_dir, ours, IDS), peft_logits(base_dir, adapter, IDS), atol=1e-5, rtol=0
    )


def test_write_adapter_rejects_modules_the_config_does_not_describe(tmp_path, model):
    a, b = torch.zeros(4, 48), torch.zeros(48, 4)
    with pytest.raises(AdapterError, match="model.layers.0.self_attn.q_proj"):
        write_adapter(tmp_path / "w", {(0, "q_proj"): (a, b)}, 4, 8, ["v_proj"])
    with pytest.raises(AdapterError, match="rank_pattern"):
        write_adapter(tmp_path / "w", {(0, "q_proj"): (a, b)}, 2, 8, ["q_proj"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_random_adapter_round_trip(tmp_path, base_dir, model, dtype):
    targets = ["v_proj", "q_proj", "up_proj"]
    adapter = make_random_adapter(
        tmp_path / "rnd", model, rank=4, targets=targets, seed=7, lora_alpha=8, dtype=dtype
    )
    saved = load_file(adapter / "adapter_model.safetensors")
    assert {t.dtype for t in saved.values()} == {dtype}
    ours = load_adapter("rnd", adapter, model, torch.float32)
    assert len(ours.modules) == 3 * model.num_hidden_layers
    assert all(m.b.abs().sum() > 0 and m.scaling == 2.0 for m in ours.modules.values())
    pm = peft.PeftModel.from_pretrained(
        transformers.LlamaForCausalLM.from_pretrained(base_dir), adapter
    )
    assert_same_as_peft(ours, pm)
    theirs = peft_logits(base_dir, adapter, IDS)
    torch.testing.assert_close(merged_logits(base_dir, ours, IDS), theirs, atol=1e-5, rtol=0)
    base = transformers.LlamaForCausalLM.from_pretrained(base_dir)(IDS).logits
    assert (theirs - base).abs().max() > 1e-3


def test_random_lora_weights_equal_the_written_adapter(tmp_path, model):
    targets = ["q_proj", "down_proj"]
    adapter = make_random_adapter(tmp_path / "rnd", model, rank=8, targets=targets, seed=11)
    loaded = load_adapter("g", adapter, model, torch.bfloat16)
    made = random_lora_weights("g", model, rank=8, targets=targets, seed=11, dtype=torch.bfloat16)
    assert set(made.modules) == set(loaded.modules)
    for key, m in made.modules.items():
        assert torch.equal(m.a, loaded.modules[key].a) and torch.equal(m.b, loaded.modules[key].b)
        assert m.scaling == loaded.modules[key].scaling == 1.0
    assert made.nbytes == loaded.nbytes == estimate_nbytes(made.config, model, torch.bfloat16)


# ---- errors -------------------------------------------------------------------------


def edit_config(adapter: Path, **changes) -> None:
    file = adapter / "adapter_config.json"
    raw = json.loads(file.read_text())
    raw.update(changes)
    file.write_text(json.dumps(raw))


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(target_modules=["q_proj"], use_dora=True), "use_dora"),
        (dict(target_modules=["q_proj"], modules_to_save=["lm_head"]), "modules_to_save"),
        (dict(target_modules=["q_proj"], lora_bias=True), "lora_bias"),
        (dict(target_modules=["embed_tokens", "q_proj"]), "target_modules"),
        (dict(target_modules=["q_proj", "lm_head"]), "target_modules"),
    ],
)
def test_rejects_unsupported_peft_features(tmp_path, base_dir, model, kw, field):
    adapter, _ = make_peft(tmp_path / "a", base_dir, **kw)
    with pytest.raises(AdapterError, match=f"adapter_config.json field {field}=") as e:
        load_adapter("x", adapter, model, torch.float32)
    assert str(adapter) in str(e.value)


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(bias="all"), "bias"),
        (dict(peft_type="IA3"), "peft_type"),
        (dict(r=0), "r"),
        (dict(target_modules=None), "target_modules"),
        (dict(target_modules=r".*\.mlp"), "target_modules"),
        (dict(target_modules=["norm", "q_proj"]), "target_modules"),
        (dict(target_modules=["k_proj"], layers_to_transform=[7]), "target_modules"),
        (dict(target_modules=r".*q_proj", layers_to_transform=[0]), "layers_to_transform"),
        (dict(rank_pattern={"q_proj": "big"}), "rank_pattern"),
        (dict(alpha_pattern={"q_proj(": 2}), "alpha_pattern"),
        (dict(use_rslora="yes"), "use_rslora"),
    ],
)
def test_rejects_bad_config_fields(tmp_path, base_dir, model, changes, field):
    adapter, _ = make_peft(tmp_path / "a", base_dir, target_modules=["q_proj"])
    edit_config(adapter, **changes)
    with pytest.raises(AdapterError, match=f"field {re.escape(field)}"):
        load_adapter("x", adapter, model, torch.float32)


def test_rejects_rank_that_disagrees_with_config(tmp_path, base_dir, model):
    adapter, _ = make_peft(tmp_path / "a", base_dir, r=4, target_modules=["q_proj"])
    edit_config(adapter, r=5)
    with pytest.raises(AdapterError, match=r"q_proj has rank 4 .* give 5"):
        load_adapter("x", adapter, model, torch.float32)


def test_rejects_weights_the_config_does_not_target(tmp_path, base_dir, model):
    adapter, _ = make_peft(tmp_path / "a", base_dir, target_modules=["q_proj", "v_proj"])
    edit_config(adapter, target_modules=["q_proj"])
    with pytest.raises(AdapterError, match=r"v_proj but adapter_config.json field target_modules"):
        load_adapter("x", adapter, model, torch.float32)


def test_rejects_wrong_shapes(tmp_path, tiny_model_factory, model):
    other = tiny_model_factory(**{**TINY, "hidden_size": 64})
    adapter, _ = make_peft(tmp_path / "a", other, target_modules=["q_proj"])
    with pytest.raises(AdapterError) as e:
        load_adapter("x", adapter, model, torch.float32)
    msg = str(e.value)
    assert "q_proj.lora_A.weight has shape (8, 64), expected (8, 48)" in msg, msg


def test_rejects_layer_out_of_range(tmp_path, tiny_model_factory, model):
    deeper = tiny_model_factory(**{**TINY, "num_hidden_layers": 4})
    adapter, _ = make_peft(tmp_path / "a", deeper, target_modules=["q_proj"])
    with pytest.raises(AdapterError, match=r"layers\.3\..* layer 3 .*num_hidden_layers=3"):
        load_adapter("x", adapter, model, torch.float32)


@pytest.mark.parametrize(
    "key, reason",
    [
        ("base_model.model.model.embed_tokens.lora_embedding_A", "embeddings or lm_head"),
        ("base_model.model.lm_head.lora_A.weight", "embeddings or lm_head"),
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", "DoRA"),
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias", "bias"),
        ("base_model.model.model.layers.0.mlp.q_proj.lora_A.weight", "not a lora_A/lora_B"),
        ("something.else", "not a lora_A/lora_B"),
    ],
)
def test_rejects_foreign_tensors(tmp_path, base_dir, model, key, reason):
    adapter, _ = make_peft(tmp_path / "a", base_dir, target_modules=["q_proj"])
    file = adapter / "adapter_model.safetensors"
    save_file({**load_file(file), key: torch.zeros(4, 4)}, file)
    with pytest.raises(AdapterError, match=re.escape(key) + ".*" + reason):
        load_adapter("x", adapter, model, torch.float32)


def test_rejects_a_without_b(tmp_path, base_dir, model):
    adapter, _ = make_peft(tmp_path / "a", base_dir, target_modules=["q_proj"])
    file = adapter / "adapter_model.safetensors"
    tensors = load_file(file)
    del tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
    save_file(tensors, file)
    with pytest.raises(
        AdapterError, match=r"layers\.1\.self_attn\.q_proj has lora_A but no lora_B"
    ):
        load_adapter("x", adapter, model, torch.float32)


def test_missing_files(tmp_path, base_dir, model):
    with pytest.raises(AdapterError, match="adapter_config.json not found"):
        load_adapter("x", tmp_path / "nowhere", model, torch.float32)
    adapter, _ = make_peft(tmp_path / "a", base_dir, target_modules=["q_proj"])
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="no weights file .adapter_model.safetensors"):
        load_adapter("x", adapter, model, torch.float32)


def test_safetensors_of_mixed_dtypes_load_per_module(tmp_path, model):
    """A file whose tensors are not all of one dtype takes the per-module path, and gives
    the same weights."""
    path = make_random_adapter(tmp_path / "a", model, 4, ["q_proj", "o_proj"], seed=5)
    file = path / "adapter_model.safetensors"
    tensors = load_file(file)
    mixed = {k: t.to(torch.bfloat16) if "lora_B" in k else t for k, t in tensors.items()}
    save_file(mixed, file)
    weights = load_adapter("x", path, model, torch.float32)
    assert weights.flat is None
    for (layer, target), m in weights.modules.items():
        key = f"base_model.model.{module_name(layer, target)}"
        assert torch.equal(m.a, mixed[f"{key}.lora_A.weight"])
        assert torch.equal(m.b, mixed[f"{key}.lora_B.weight"].float())


def test_corrupt_files(tmp_path, base_dir, model):
    adapter, _ = make_peft(tmp_path / "a", base_dir, target_modules=["q_proj"])
    file = adapter / "adapter_model.safetensors"
    whole = file.read_bytes()
    for cut in (100, len(whole) - 10):  # in the header; in the last tensor's data
        file.write_bytes(whole[:cut])
        with pytest.raises(AdapterError, match="cannot read adapter_model.safetensors"):
            load_adapter("x", adapter, model, torch.float32)
    (adapter / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="adapter_config.json is not valid JSON"):
        read_adapter_config(adapter)


def test_other_base_model_is_a_warning(tmp_path, base_dir, model, caplog):
    adapter, pm = make_peft(tmp_path / "a", base_dir, target_modules=["q_proj"])
    with caplog.at_level(logging.WARNING, logger="loraserve.adapters.peft"):
        load_adapter("x", adapter, model, torch.float32)
    assert not caplog.records
    edit_config(adapter, base_model_name_or_path="meta-llama/Llama-3.1-8B")
    with caplog.at_level(logging.WARNING, logger="loraserve.adapters.peft"):
        assert_same_as_peft(load_adapter("x", adapter, model, torch.float32), pm)
    assert "Llama-3.1-8B" in caplog.text
