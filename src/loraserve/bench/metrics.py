"""Per-request records -> the numbers S-LoRA reports.

    throughput       completed requests / wall time (and tokens / wall time)
    latency          finish - arrival, averaged over completed requests
    first token      first token - arrival (average and p99, over requests that got one)
    SLO attainment   share of issued requests that completed with their first token within
                     ``slo_s`` (6 s); aborted, failed and unfinished requests are misses

Times are seconds after the start of the run; ``arrival`` is when the request was due (an
open-loop client sends it then, however busy the server is).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

SLO_SECONDS = 6.0


class RequestRecord(NamedTuple):
    index: int
    arrival: float  # when it was due, s after the start
    input_len: int
    output_len: int  # tokens asked for
    first_token: float | None  # s after the start; None: no token came
    finish: float | None  # s after the start; None: it did not complete
    output_tokens: int  # tokens generated (unfinished requests too)
    error: str | None = None

    @property
    def completed(self) -> bool:
        return self.finish is not None and self.error is None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def latency(self) -> float | None:
        return self.finish - self.arrival if self.completed else None


@dataclass(frozen=True)
class Summary:
    issued: int
    completed: int
    unfinished: int  # issued but not completed (aborted, cut off by a time limit, failed)
    failed: int  # finished with an error
    wall_time_s: float
    throughput_req_s: float
    output_tok_s: float  # every generated token, unfinished requests' too
    total_tok_s: float  # prompt + output tokens of completed requests
    avg_latency_s: float | None
    avg_first_token_s: float | None
    p99_first_token_s: float | None
    slo_s: float
    slo_attainment: float | None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def summarize(
    records: list[RequestRecord], wall_time: float, slo_s: float = SLO_SECONDS
) -> Summary:
    if wall_time <= 0:
        raise ValueError(f"wall_time must be positive, got {wall_time}")
    done = [r for r in records if r.completed]
    ttfts = [r.ttft for r in records if r.ttft is not None]
    attained = sum(1 for r in done if r.ttft is not None and r.ttft <= slo_s)
    return Summary(
        issued=len(records),
        completed=len(done),
        unfinished=len(records) - len(done),
        failed=sum(1 for r in records if r.error is not None),
        wall_time_s=wall_time,
        throughput_req_s=len(done) / wall_time,
        output_tok_s=sum(r.output_tokens for r in records) / wall_time,
        total_tok_s=sum(r.input_len + r.output_tokens for r in done) / wall_time,
        avg_latency_s=_mean([r.latency for r in done]),
        avg_first_token_s=_mean(ttfts),
        p99_first_token_s=float(np.percentile(ttfts, 99)) if ttfts else None,
        slo_s=slo_s,
        slo_attainment=attained / len(records) if records else None,
    )


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None
