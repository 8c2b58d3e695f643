"""Bad model directories and bad prompts get errors that say what is wrong; nothing
already accepted is lost."""

from __future__ import annotations

import json
import shutil

import pytest

from loraserve.engine.args import EngineArgs
from loraserve.entrypoints.llm import LLM
from loraserve.request import SamplingParams


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def engine_for(path):
    return EngineArgs(model=str(path), dtype="float32", device="cpu").create_engine()


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_missing_directory_is_named():
    with pytest.raises(FileNotFoundError, match="no/such/dir"):
        engine_for("no/such/dir")


def test_missing_config_names_the_file(tiny_model_factory, tmp_path):
    d = copy_model(tiny_model_factory(), tmp_path / "m")
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        engine_for(d)


def test_missing_weights_names_the_files(tiny_model_factory, tmp_path):
    d = copy_model(tiny_model_factory(), tmp_path / "m")
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        engine_for(d)


def test_missing_shard_named_in_index(tiny_model_factory, tmp_path):
    d = copy_model(tiny_model_factory(), tmp_path / "m")
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    index = {
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
        }
    }
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        engine_for(d)


def test_corrupt_weights_name_the_file(tiny_model_factory, tmp_path):
    d = copy_model(tiny_model_factory(), tmp_path / "m")
    (d / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="model.safetensors"):
        engine_for(d)


def test_unsupported_architecture_names_the_field(tiny_model_factory, tmp_path):
    d = copy_model(tiny_model_factory(), tmp_path / "m")
    edit_config(d, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(ValueError, match="architectures"):
        engine_for(d)


def test_sliding_window_is_rejected_by_name(tiny_model_factory, tmp_path):
    d = copy_model(tiny_model_factory(arch="mistral"), tmp_path / "m")
    edit_config(d, sliding_window=4096)
    with pytest.raises(ValueError, match="sliding_window"):
        engine_for(d)


def test_wrong_tensor_shape_is_named(tiny_model_factory, tmp_path):
    d = copy_model(tiny_model_factory(), tmp_path / "m")
    edit_config(d, intermediate_size=100)
    with pytest.raises(ValueError, match="mlp"):
        engine_for(d)


def test_rope_type_unsupported_is_named(tiny_model_factory, tmp_path):
    d = copy_model(tiny_model_factory(), tmp_path / "m")
    edit_config(d, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(ValueError, match="rope_type"):
        engine_for(d)


def test_too_long_prompt_fails_alone(tiny_model_factory):
    llm = LLM(model=str(tiny_model_factory()), dtype="float32", device="cpu", max_model_len=64)
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    outs = llm.generate([[5, 6, 7], list(range(3, 3 + 80)), [9, 9]], params)
    assert [o.finish_reason for o in outs] == ["length", "error", "length"]
    assert "max_model_len" in outs[1].error and "80 tokens" in outs[1].error
    assert len(outs[0].token_ids) == 5 and len(outs[2].token_ids) == 5
    llm.engine.check_integrity()


def test_engine_add_request_rejects_without_disturbing_running(tiny_model_factory):
    engine = EngineArgs(
        model=str(tiny_model_factory()), dtype="float32", max_model_len=32
    ).create_engine()
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    engine.add_request([4, 5, 6], params, request_id="ok")
    engine.step()
    for bad in (list(range(3, 50)), [], [10**6], "text but no tokenizer"):
        with pytest.raises(ValueError):
            engine.add_request(bad, params)
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert outs[-1].request_id == "ok" and len(outs[-1].token_ids) == 8


def test_token_prompts_work_without_tokenizer(tiny_model_factory):
    llm = LLM(model=str(tiny_model_factory()), dtype="float32")
    assert llm.tokenizer is None
    outs = llm.generate([[1, 2, 3], [4, 5]], SamplingParams(max_tokens=3, temperature=0.0))
    assert [len(o.token_ids) for o in outs] == [3, 3] and outs[0].text == ""


def test_fused_max_rank_below_one_is_refused(tiny_model_factory):
    with pytest.raises(ValueError, match="lora_fused_max_rank must be >= 1.*--no-lora-fused"):
        EngineArgs(model=str(tiny_model_factory()), lora_fused_max_rank=0).create_engine()
