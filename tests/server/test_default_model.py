"""``loraserve serve`` with no model: the embedded SmolLM2-135M-Instruct and its demo
adapters, answering a chat that names one (the README's first command). The conversion of the
embedded model is cached under $LORASERVE_CACHE (passed through unchanged)."""

from __future__ import annotations


def test_serve_without_arguments_answers_a_demo_adapter(server_factory):
    server = server_factory([], timeout=300)
    models = {m.id: m for m in server.openai().models.list().data}
    assert {"SmolLM2-135M-Instruct", "demo-a", "demo-b", "demo-c"} <= set(models)
    assert models["demo-a"].parent == "SmolLM2-135M-Instruct"
    reply = server.openai().chat.completions.create(
        model="demo-a",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=12,
        temperature=0,
    )
    assert reply.model == "demo-a" and reply.choices[0].message.content.strip()
    assert reply.usage.completion_tokens > 0
    served = server.metric(
        "loraserve:requests_total",
        adapter="demo-a",
        finish_reason=reply.choices[0].finish_reason,
    )
    assert served == 1
    server.stop()
