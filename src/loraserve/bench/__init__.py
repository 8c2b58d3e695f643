"""S-LoRA's benchmark for loraserve (``loraserve bench``).

workload.py       the synthetic trace (S-LoRA's generate_requests, draw for draw)
adapters.py       random adapters registered as generated (made on first use)
runner_inproc.py  open-loop driver of an in-process LLMEngine
runner_http.py    the same against a running server (--url)
baselines.py      HF PEFT on the same trace
metrics.py        per-request records -> throughput, latencies, SLO attainment
physics.py        the byte floor of a decode step
suite.py          points x systems -> results JSON; plot.py -> PNG
options.py        the CLI's flags -> BenchConfig
"""
