"""Bad input gets the right status and a message saying what is wrong, in OpenAI's error
shape; the server serves the next request normally."""

from __future__ import annotations

import openai
import pytest

MODEL_NAME = "tiny-llama"
CMPL = "/v1/completions"
CHAT = "/v1/chat/completions"
OK_CHAT = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def cmpl(**kw) -> dict:
    return {"model": "a", "prompt": "hello", "max_tokens": 2, **kw}


def chat(**kw) -> dict:
    return {**OK_CHAT, **kw}


CASES = [
    # (route, JSON body or raw bytes, status, text in the message)
    (CMPL, b"{not json", 400, "malformed JSON"),
    (CMPL, b"", 400, "malformed JSON"),
    (CMPL, b"[1, 2]", 400, "invalid request"),
    (CMPL, {"prompt": "x"}, 400, "model: field required"),
    (CMPL, cmpl(model="no-such-adapter"), 404, "does not exist"),
    (CMPL, cmpl(top_p=2), 400, "top_p"),
    (CMPL, cmpl(top_p=0), 400, "top_p"),
    (CMPL, cmpl(max_tokens=-1), 400, "max_tokens"),
    (CMPL, cmpl(temperature=-0.5), 400, "temperature"),
    (CMPL, cmpl(top_k=-2), 400, "top_k"),
    (CMPL, cmpl(logprobs=21), 400, "logprobs"),
    (CMPL, cmpl(stop_token_ids=[-1]), 400, "stop_token_ids"),
    (CMPL, cmpl(stop=[""]), 400, "stop"),
    (CMPL, cmpl(seed="x"), 400, "seed"),
    (CMPL, cmpl(n=2), 400, "n=1"),
    (CMPL, cmpl(best_of=3), 400, "best_of"),
    (CMPL, cmpl(echo=True), 400, "echo"),
    (CMPL, cmpl(suffix="x"), 400, "suffix"),
    (CMPL, cmpl(logit_bias={"5": 10}), 400, "logit_bias"),
    (CMPL, cmpl(presence_penalty=0.5), 400, "presence_penalty"),
    (CMPL, cmpl(frequency_penalty=1), 400, "frequency_penalty"),
    (CMPL, cmpl(repetition_penalty=1.2), 400, "repetition_penalty"),
    (CMPL, cmpl(min_p=0.1), 400, "min_p: unknown or unsupported field"),
    (CMPL, cmpl(prompt=["one", "two"]), 400, "2 prompts in one request"),
    (CMPL, cmpl(prompt=[[1, 2], [3]]), 400, "2 prompts in one request"),
    (CMPL, cmpl(prompt=[1, "x"]), 400, "prompt"),
    (CMPL, cmpl(prompt=""), 400, "empty"),
    (CMPL, cmpl(prompt=[5, 10**6]), 400, "outside the vocabulary"),
    (CMPL, cmpl(prompt=list(range(10, 1100))), 400, "max_model_len"),
    (CMPL, cmpl(stream_options={"include_usage": True}), 400, "stream_options"),
    (CHAT, chat(messages=[]), 400, "messages"),
    (CHAT, chat(messages=[{"content": "no role"}]), 400, "messages[0].role"),
    (CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools"),
    (CHAT, chat(tool_choice="auto"), 400, "tool_choice"),
    (CHAT, chat(response_format={"type": "json_object"}), 400, "response_format"),
    (CHAT, chat(top_logprobs=2), 400, "top_logprobs needs logprobs"),
    (CHAT, chat(logprobs=True, top_logprobs=30), 400, "top_logprobs"),
    (CHAT, chat(max_completion_tokens=0), 400, "max_completion_tokens"),
    (
        CHAT,
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
        400,
        "'image_url' are not supported",
    ),
    (CHAT, chat(messages=[{"role": "user", "content": "x " * 1100}]), 400, "max_model_len"),
    (CHAT, chat(model=f"{MODEL_NAME}:zzz"), 404, "does not exist"),
    ("/v1/nope", {}, 404, "Not Found"),
]


@pytest.mark.parametrize("route, body, status, message", CASES)
def test_bad_input_is_named_and_the_server_carries_on(server, route, body, status, message):
    http = server.http()
    if isinstance(body, bytes):
        r = http.post(route, content=body, headers={"Content-Type": "application/json"})
    else:
        r = http.post(route, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert message in error["message"], error
    assert error["code"] == status and error["type"].endswith("Error")
    assert http.post(CHAT, json=OK_CHAT).status_code == 200


def test_field_errors_name_the_param(server):
    r = server.http().post(CMPL, json=cmpl(top_p=2))
    assert r.json()["error"]["param"] == "top_p"


def test_openai_client_sees_the_message(server):
    client = server.openai()
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.completions.create(model="a", prompt="x", top_p=1.5)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="zzz", messages=[{"role": "user", "content": "x"}])


def test_api_key_is_required_on_v1_only(server):
    import httpx

    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "test-key"}):
        for method, route in (
            ("GET", "/v1/models"),
            ("POST", CMPL),
            ("POST", "/v1/load_lora_adapter"),
        ):
            r = httpx.request(method, server.url + route, headers=headers, json=cmpl())
            assert r.status_code == 401, (headers, route)
            assert "API key" in r.json()["error"]["message"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200


def test_content_type_is_not_required(server):
    r = server.http().post(
        CHAT,
        content=b'{"model": "a", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}',
    )
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("error_type", "status"), [("deadline", 503), ("adapter", 500), (None, 500)]
)
def test_failed_request_status_follows_the_engine_reason(error_type, status):
    from loraserve.request import RequestOutput
    from loraserve.server.errors import APIError
    from loraserve.server.render import check_output

    out = RequestOutput(
        "r", None, [1, 2], "", [], None, True, "error", error="why", error_type=error_type
    )
    with pytest.raises(APIError) as caught:
        check_output(out)
    assert caught.value.status == status and caught.value.message == "why"
    assert ("Retry-After" in caught.value.headers) == (status == 503)
    ok = RequestOutput("r", None, [1, 2], "x", [3], None, True, "length")
    assert check_output(ok) is ok
