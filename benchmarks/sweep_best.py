"""The fastest tile variants per case of a ``bench_lora.py --sweep`` report, beside the
default's times and the case's byte floor.

    python benchmarks/sweep_best.py bench_lora_sweep.json [--top 3]
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report")
    parser.add_argument("--top", type=int, default=3)
    args = parser.parse_args()
    with open(args.report) as f:
        rows = json.load(f)["sweep"]
    cases = defaultdict(list)
    for r in rows:
        cases[(r["phase"], r["call"], r["rank"], r["tokens"], r["distinct"])].append(r)
    for key, variants in cases.items():
        default = next((r for r in variants if r["default"]), variants[0])
        floor = default.get("a_bytes_us", 0.0)
        times = f"{default['shrink_us']:.1f} / {default['expand_us']:.1f} us (shrink / expand)"
        print(f"{' '.join(map(str, key))}: default {times}, A bytes {floor:.1f} us")
        for r in variants:
            r["total_us"] = r["shrink_us"] + r["expand_us"]
        parts = ["shrink_us", "expand_us", "total_us"]
        if all("apply_us" in r for r in variants):  # the fused phase: whole calls, one graph
            parts.append("apply_us")
            print(f"    default apply {default['apply_us']:.1f} us (two launches)")
        for part in parts:
            ok = [r for r in variants if not math.isnan(r[part])]
            if part == "shrink_us":
                ok = [r for r in ok if r["shrink_us"] > 0]  # not session 11's fused-kernel rows
            for r in sorted(ok, key=lambda r: r[part])[: args.top]:
                print(f"    best {part[:-3]:6} {r[part]:7.1f}  {r['tiles']}")


if __name__ == "__main__":
    main()
