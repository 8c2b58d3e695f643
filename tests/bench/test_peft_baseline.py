"""The HF PEFT baseline on the tiny model: mixed-adapter FIFO batches on the same trace."""

from __future__ import annotations

import time

import torch

from loraserve.bench.baselines import PeftBaseline, build_hf_model
from loraserve.bench.options import PeftOptions
from loraserve.bench.suite import bench_requests, model_config
from loraserve.bench.workload import QKVO, WorkloadConfig

WORKLOAD = WorkloadConfig(
    num_adapters=3, rate=10, duration=0.6, input_range=(4, 12), output_range=(4, 12)
)


def _hf(tiny_model):
    config = model_config(str(tiny_model))
    return build_hf_model(str(tiny_model), config, "cpu", torch.float32), config


def test_peft_completes_every_request(tiny_model):
    hf, config = _hf(tiny_model)
    requests = bench_requests(WORKLOAD, config.vocab_size, None)
    requests.append(requests[0]._replace(trace=requests[0].trace._replace(index=99)))
    requests[-1] = requests[-1]._replace(adapter=None)  # a base-model request in the mix
    baseline = PeftBaseline(hf, (8, 4), QKVO, PeftOptions(batch=2, max_adapters=2, progress=False))
    run = baseline.run(requests)
    result = run.result()
    assert result["completed"] == result["issued"] == len(requests)
    for record in run.records:
        assert record.arrival <= record.first_token <= record.finish
        assert record.output_tokens == record.output_len
    used = {r.adapter for r in requests} - {None}
    assert result["adapter_loads"]["peft_added"] >= len(used)
    assert result["adapter_loads"]["peft_deleted"] == result["adapter_loads"]["peft_added"] - 2


def test_peft_time_limit(tiny_model):
    hf, config = _hf(tiny_model)
    slow = WorkloadConfig(2, rate=40, duration=2.0, input_range=(4, 8), output_range=(200, 210))
    requests = bench_requests(slow, config.vocab_size, None)
    options = PeftOptions(batch=4, time_limit=0.5, progress=False)
    start = time.perf_counter()
    run = PeftBaseline(hf, (4,), QKVO, options).run(requests)
    # the batch in flight stopped at the limit (uncut: 20 batches of 200+ tokens; the
    # bound leaves room for a loaded machine)
    assert time.perf_counter() - start < 3.0
    result = run.result()
    assert run.wall_time <= 0.5
    assert result["unfinished"] > 0 and result["not_issued"] > 0
    assert result["issued"] + result["not_issued"] == len(requests)


def test_peft_runs_past_eos_to_each_output_length(tiny_model):
    """A model that always predicts EOS still generates every request's output length (the
    model's own generation config must not bring EOS stopping back)."""
    hf, config = _hf(tiny_model)
    eos = hf.generation_config.eos_token_id
    assert eos is not None

    def prefer_eos(module, inputs, logits):
        logits[..., eos] += 1e4
        return logits

    hf.lm_head.register_forward_hook(prefer_eos)
    requests = bench_requests(WORKLOAD, config.vocab_size, None)
    baseline = PeftBaseline(hf, (8, 4), QKVO, PeftOptions(batch=2, max_adapters=2, progress=False))
    run = baseline.run(requests)
    assert run.result()["completed"] == len(requests)
    assert all(r.output_tokens == r.output_len for r in run.records)
