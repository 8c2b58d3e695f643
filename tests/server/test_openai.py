"""The OpenAI client against a real server: the same tokens as the offline LLM for the same
model, adapter and seed; streaming; chat; concurrent adapters batched together."""

from __future__ import annotations

import asyncio

import pytest

from loraserve.request import SamplingParams

MODEL_NAME = "tiny-llama"  # the model directory's name (conftest)
PROMPT = "The quick brown fox"
TOKEN_IDS = {"return_token_ids": True}
PHASES = ("schedule", "launch", "prefetch", "wait", "finish")  # LLMEngine.last_step


def offline_ids(offline, prompt, adapter, **params):
    out = offline.generate([prompt], SamplingParams(**params), adapter=adapter)[0]
    return out


def chat_prompt_ids(offline, content: str) -> list[int]:
    text = offline.tokenizer.apply_chat_template([{"role": "user", "content": content}])
    return offline.tokenizer.encode(text, add_special_tokens=False)


def test_models_lists_base_and_adapters(server, adapter_dirs):
    models = {m.id: m for m in server.openai().models.list().data}
    base = models[MODEL_NAME]
    assert base.owned_by == "loraserve" and base.parent is None
    assert base.max_model_len == 1024
    for name in ("a", "b"):
        assert models[name].parent == MODEL_NAME
        assert models[name].root == str(adapter_dirs[name])


@pytest.mark.parametrize("model", [MODEL_NAME, "a", f"{MODEL_NAME}:b"])
def test_greedy_completion_matches_offline(server, offline, model):
    adapter = None if model == MODEL_NAME else model.rsplit(":", 1)[-1]
    got = server.openai().completions.create(
        model=model, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=2, extra_body=TOKEN_IDS
    )
    want = offline_ids(offline, PROMPT, adapter, max_tokens=12, temperature=0.0, logprobs=2)
    choice = got.choices[0]
    assert choice.token_ids == want.token_ids
    assert choice.text == want.text
    assert choice.finish_reason == want.finish_reason
    assert got.model == model
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)
    assert got.usage.completion_tokens == len(want.token_ids)
    lp = choice.logprobs
    assert len(lp.tokens) == len(want.token_ids) == len(lp.text_offset)
    for token, got_lp, entry in zip(want.token_ids, lp.token_logprobs, want.logprobs, strict=True):
        assert got_lp == pytest.approx(entry[token], abs=1e-4)
    assert lp.text_offset[0] == 0 and all(len(top) >= 2 for top in lp.top_logprobs)


def test_adapters_change_the_output(server):
    client = server.openai()
    texts = {
        model: client.completions.create(
            model=model, prompt=PROMPT, max_tokens=12, temperature=0, extra_body=TOKEN_IDS
        )
        .choices[0]
        .token_ids
        for model in (MODEL_NAME, "a", "b")
    }
    assert len({tuple(t) for t in texts.values()}) == 3


def test_seeded_sampling_matches_offline(server, offline):
    ids = [5, 600, 7000, 42]
    got = server.openai().completions.create(
        model="a",
        prompt=ids,
        max_tokens=16,
        temperature=1.0,
        top_p=0.9,
        seed=1234,
        extra_body={"return_token_ids": True, "top_k": 50, "ignore_eos": True},
    )
    want = offline_ids(
        offline,
        ids,
        "a",
        max_tokens=16,
        temperature=1.0,
        top_p=0.9,
        top_k=50,
        seed=1234,
        ignore_eos=True,
    )
    assert got.choices[0].token_ids == want.token_ids
    assert got.choices[0].prompt_token_ids == ids


def test_chat_matches_offline(server, offline):
    content = "Name three colours."
    got = server.openai().chat.completions.create(
        model="b",
        messages=[{"role": "user", "content": content}],
        max_completion_tokens=10,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body=TOKEN_IDS,
    )
    prompt = chat_prompt_ids(offline, content)
    want = offline_ids(offline, prompt, "b", max_tokens=10, temperature=0.0, logprobs=3)
    choice = got.choices[0]
    assert got.prompt_token_ids == prompt
    assert choice.token_ids == want.token_ids
    assert choice.message.role == "assistant" and choice.message.content == want.text
    entries = choice.logprobs.content
    assert [e.token for e in entries] == [
        offline.tokenizer.decode([t], False) for t in want.token_ids
    ]
    assert all(len(e.top_logprobs) == 3 for e in entries)
    assert entries[0].logprob == pytest.approx(want.logprobs[0][want.token_ids[0]], abs=1e-4)
    assert entries[0].top_logprobs[0].logprob >= entries[0].top_logprobs[1].logprob


def test_completion_stream_concatenates_to_the_same_text(server):
    client = server.openai()
    kw = dict(model="a", prompt=PROMPT, max_tokens=20, temperature=0, logprobs=1)
    full = client.completions.create(**kw)
    chunks = list(
        client.completions.create(stream=True, stream_options={"include_usage": True}, **kw)
    )
    assert (
        chunks[-1].choices == []
        and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    )
    body = chunks[:-1]
    assert "".join(c.choices[0].text for c in body) == full.choices[0].text
    assert body[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in body[:-1])
    tokens = [t for c in body for t in c.choices[0].logprobs.tokens]
    assert tokens == full.choices[0].logprobs.tokens
    offsets = [o for c in body for o in c.choices[0].logprobs.text_offset]
    assert offsets == full.choices[0].logprobs.text_offset


def test_chat_stream_concatenates_to_the_same_text(server):
    client = server.openai()
    kw = dict(
        model=f"{MODEL_NAME}:a",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        max_tokens=16,
        seed=3,
        temperature=0.7,
    )
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert all(c.usage is None for c in chunks)


def test_stop_string_cuts_the_text(server):
    client = server.openai()
    kw = dict(
        model="b", prompt=PROMPT, max_tokens=16, temperature=0, extra_body={"ignore_eos": True}
    )
    full = client.completions.create(logprobs=0, **kw).choices[0]
    stop = next(t for t in full.logprobs.tokens[3:] if t.strip())
    cut = client.completions.create(stop=[stop], **kw).choices[0]
    assert cut.text == full.text[: full.text.index(stop)]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop


def test_concurrent_adapters_are_batched_and_exact(server, offline):
    models = ["a", "b", "c", MODEL_NAME, "a", "b"]
    prompts = [[11 + i, 300 + 7 * i, 4000 + i] for i in range(len(models))]

    async def run_all():
        client = server.async_openai()
        calls = [
            client.completions.create(
                model=m,
                prompt=p,
                max_tokens=24,
                temperature=0,
                extra_body={"return_token_ids": True, "ignore_eos": True},
            )
            for m, p in zip(models, prompts, strict=True)
        ]
        return await asyncio.gather(*calls)

    results = asyncio.run(run_all())
    for model, prompt, got in zip(models, prompts, results, strict=True):
        adapter = None if model == MODEL_NAME else model
        want = offline_ids(
            offline, prompt, adapter, max_tokens=24, temperature=0.0, ignore_eos=True
        )
        assert got.choices[0].token_ids == want.token_ids, model
    assert server.metric("loraserve:max_batch_size") >= 2
    assert server.metric("loraserve:max_batch_adapters") >= 2
    phases = {p: server.metric("loraserve:step_phase_seconds_total", phase=p) for p in PHASES}
    assert phases["launch"] > 0 and all(v >= 0 for v in phases.values())
    assert sum(phases.values()) <= server.metric("loraserve:step_seconds_sum") * (1 + 1e-6)
