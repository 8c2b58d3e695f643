"""Sampling: seeds, top-k/top-p, stop conditions, logprobs, invalid values."""

from __future__ import annotations

import math

import pytest

from loraserve.engine.args import EngineArgs
from loraserve.entrypoints.llm import LLM
from loraserve.request import SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_model_factory):
    return LLM(model=str(tiny_model_factory()), dtype="float32", device="cpu")


PROMPTS = [[5, 9, 13, 40], [7] * 11, [100, 3, 8]]


def test_same_seed_same_output_whatever_the_batch(llm):
    params = SamplingParams(max_tokens=20, temperature=1.0, seed=1234, ignore_eos=True)
    alone = llm.generate([PROMPTS[0]], params)[0].token_ids
    others = SamplingParams(max_tokens=20, temperature=1.3, ignore_eos=True)
    batch = llm.generate(PROMPTS, [params, others, others])[0].token_ids
    again = llm.generate([PROMPTS[0]], params)[0].token_ids
    assert alone == batch == again


def test_different_seeds_differ(llm):
    outs = [
        llm.generate(
            [PROMPTS[1]], SamplingParams(max_tokens=20, temperature=1.5, seed=s, ignore_eos=True)
        )[0].token_ids
        for s in range(4)
    ]
    assert len({tuple(o) for o in outs}) > 1


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=12, temperature=0.8, top_k=1, seed=3, ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=0.8, top_p=1e-6, seed=3, ignore_eos=True),
    ],
)
def test_top_k_1_and_tiny_top_p_are_greedy(llm, params):
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    assert llm.generate(PROMPTS, params)[1].token_ids == llm.generate(PROMPTS, greedy)[1].token_ids


def test_top_k_restricts_to_the_k_most_likely(llm):
    params = SamplingParams(max_tokens=1, temperature=2.0, top_k=3, logprobs=3, ignore_eos=True)
    for seed in range(8):
        params.seed = seed
        out = llm.generate([PROMPTS[2]], params)[0]
        top3 = sorted(out.logprobs[0].items(), key=lambda kv: -kv[1])[:3]
        assert out.token_ids[0] in {t for t, _ in top3}


def test_logprobs_are_top_k_plus_chosen(llm):
    out = llm.generate(
        PROMPTS, SamplingParams(max_tokens=6, temperature=1.0, seed=0, logprobs=4, ignore_eos=True)
    )
    for o in out:
        assert len(o.logprobs) == len(o.token_ids)
        for token, lp in zip(o.token_ids, o.logprobs, strict=True):
            assert token in lp and 4 <= len(lp) <= 5
            assert all(v <= 0.0 for v in lp.values())
            assert sum(math.exp(v) for v in lp.values()) <= 1.0 + 1e-5
    assert llm.generate(PROMPTS[:1], SamplingParams(max_tokens=2))[0].logprobs is None


def test_stop_token_ids_and_max_tokens(llm):
    greedy = llm.generate(
        PROMPTS[:1], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    )
    tokens = greedy[0].token_ids
    stop_at = tokens[4]
    out = llm.generate(
        PROMPTS[:1],
        SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=[stop_at], ignore_eos=True),
    )[0]
    assert out.token_ids == tokens[: tokens.index(stop_at) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at
    assert greedy[0].finish_reason == "length" and len(tokens) == 10


def test_eos_stops_unless_ignored(tiny_model_factory):
    engine = EngineArgs(model=str(tiny_model_factory()), dtype="float32").create_engine()
    greedy = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    engine.add_request(PROMPTS[0], greedy, request_id="a")
    tokens = []
    while engine.has_unfinished():
        tokens = [o.token_ids for o in engine.step()] or tokens
    eos = tokens[0][3]
    engine.eos_token_ids = frozenset({eos})
    for ignore in (False, True):
        params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=ignore)
        engine.add_request(PROMPTS[0], params, request_id=f"b{ignore}")
        outs = []
        while engine.has_unfinished():
            outs += engine.step()
        final = outs[-1]
        expected = tokens[0] if ignore else tokens[0][: tokens[0].index(eos) + 1]
        assert final.token_ids == expected


@pytest.mark.parametrize(
    "field,value",
    [
        ("max_tokens", -1),
        ("max_tokens", 0),
        ("top_p", 1.5),
        ("top_p", 0.0),
        ("temperature", -0.1),
        ("top_k", 0),
        ("logprobs", -2),
        ("stop", [""]),
    ],
)
def test_invalid_sampling_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})
