"""Records -> summary, by hand."""

from __future__ import annotations

import numpy as np
import pytest

from loraserve.bench.metrics import RequestRecord, summarize


def _record(i, arrival, first, finish, tokens=10, error=None, input_len=5):
    return RequestRecord(i, arrival, input_len, 10, first, finish, tokens, error)


def test_hand_built_records():
    records = [
        _record(0, 0.0, 1.0, 3.0),  # ttft 1, latency 3
        _record(1, 1.0, 8.0, 9.0),  # ttft 7: misses the 6 s SLO
        _record(2, 2.0, 4.0, 6.0),  # ttft 2, latency 4
        _record(3, 3.0, 5.0, None, tokens=4),  # unfinished (cut off): a miss
        _record(4, 4.0, None, 5.0, tokens=0, error="adapter failed"),  # failed: a miss
    ]
    s = summarize(records, wall_time=10.0)
    assert (s.issued, s.completed, s.unfinished, s.failed) == (5, 3, 2, 1)
    assert s.throughput_req_s == pytest.approx(0.3)
    assert s.output_tok_s == pytest.approx((10 + 10 + 10 + 4) / 10)
    assert s.total_tok_s == pytest.approx(3 * 15 / 10)
    assert s.avg_latency_s == pytest.approx((3 + 8 + 4) / 3)
    ttfts = [1.0, 7.0, 2.0, 2.0]
    assert s.avg_first_token_s == pytest.approx(np.mean(ttfts))
    assert s.p99_first_token_s == pytest.approx(np.percentile(ttfts, 99))
    assert s.slo_attainment == pytest.approx(2 / 5)
    assert summarize(records, 10.0, slo_s=7.0).slo_attainment == pytest.approx(3 / 5)


def test_p99_of_many():
    records = [_record(i, 0.0, i / 100, 2.0) for i in range(101)]  # ttft 0.00 .. 1.00
    s = summarize(records, wall_time=4.0)
    assert s.p99_first_token_s == pytest.approx(0.99)
    assert s.avg_first_token_s == pytest.approx(0.5)
    assert s.slo_attainment == 1.0 and s.throughput_req_s == pytest.approx(101 / 4)


def test_nothing_completed():
    s = summarize([_record(0, 0.0, None, None, tokens=0)], wall_time=1.0)
    assert s.completed == 0 and s.slo_attainment == 0.0
    assert s.avg_latency_s is None and s.avg_first_token_s is None and s.p99_first_token_s is None
    with pytest.raises(ValueError):
        summarize([], wall_time=0.0)
