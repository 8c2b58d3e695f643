"""Request token access: slices of prompt + output without building the whole sequence."""

from __future__ import annotations

from loraserve.request import Request, SamplingParams


def test_tokens_slice_and_token_at_span_prompt_and_output():
    r = Request("r", [10, 11, 12, 13], SamplingParams(max_tokens=8))
    r.output_token_ids += [20, 21, 22]
    whole = [10, 11, 12, 13, 20, 21, 22]
    for start in range(len(whole) + 1):
        for end in range(start, len(whole) + 1):
            assert r.tokens_slice(start, end) == whole[start:end], (start, end)
    assert [r.token_at(i) for i in range(len(whole))] == whole
    r.tokens_slice(4, 6).append(99)  # a copy: the request is unchanged
    assert r.output_token_ids == [20, 21, 22]
