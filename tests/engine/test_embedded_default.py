"""The embedded default (SmolLM2-135M-Instruct): our greedy chat output equals transformers'
on the same weights."""

from __future__ import annotations

import pytest
import torch
import transformers

from loraserve.entrypoints.llm import LLM
from loraserve.model.embedded import embedded_model_dir
from loraserve.request import SamplingParams


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", device="cpu")  # no model: the embedded default


def test_chat_greedy_matches_transformers(llm):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = llm.tokenizer.apply_chat_template(messages)
    ours = llm.generate([prompt], SamplingParams(max_tokens=24, temperature=0.0, logprobs=1))[0]

    path = embedded_model_dir()
    hf_tok = transformers.AutoTokenizer.from_pretrained(path)
    hf_prompt = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == hf_prompt
    ids = hf_tok(hf_prompt, return_tensors="pt")["input_ids"]
    assert ours.prompt_token_ids == ids[0].tolist()
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
    want = out[0, ids.shape[1] :].tolist()
    assert ours.token_ids == want
    assert ours.text == hf_tok.decode(want, skip_special_tokens=True)
    assert "Paris" in ours.text and ours.finish_reason == "stop"


def test_stop_string_cuts_the_text(llm):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = llm.tokenizer.apply_chat_template(messages)
    full = llm.generate([prompt], SamplingParams(max_tokens=24, temperature=0.0))[0].text
    word = "Paris"
    cut = llm.generate([prompt], SamplingParams(max_tokens=24, temperature=0.0, stop=[word]))[0]
    assert cut.text == full[: full.index(word)]
    assert cut.finish_reason == "stop" and cut.stop_reason == word
    kept = llm.generate(
        [prompt],
        SamplingParams(
            max_tokens=24, temperature=0.0, stop=[word], include_stop_str_in_output=True
        ),
    )[0]
    assert kept.text == full[: full.index(word) + len(word)]
