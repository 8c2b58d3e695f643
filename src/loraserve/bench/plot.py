"""One PNG of a sweep: throughput and average first-token latency against n or the rate,
one line per system (loraserve and each baseline)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

AXIS_LABELS = {"n": "adapters (n)", "rate": "request rate (req/s)"}


def series(results: dict[str, Any], key: str) -> dict[str, tuple[list[float], list[float]]]:
    """label -> (x values, ``key`` of each run; NaN where missing)."""
    axis = results.get("sweep") or "n"
    out: dict[str, tuple[list[float], list[float]]] = {}
    for point in results["points"]:
        for label, run in point["runs"].items():
            xs, ys = out.setdefault(label, ([], []))
            xs.append(point[axis])
            value = run.get(key)
            ys.append(math.nan if value is None else value)
    return out


def plot_results(results: dict[str, Any], path: str | Path) -> Path:
    axis = results.get("sweep") or "n"
    fig = Figure(figsize=(11, 4.2))
    panels = (
        ("throughput_req_s", "throughput (req/s)"),
        ("avg_first_token_s", "average first-token latency (s)"),
    )
    for i, (key, title) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        for label, (xs, ys) in series(results, key).items():
            ax.plot(xs, ys, marker="o", label=label)
        _axes(ax, axis, [p[axis] for p in results["points"]], title)
    fig.suptitle(_title(results))
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


def _axes(ax: Any, axis: str, xs: list[float], title: str) -> None:
    """Labels, the sweep's values as x ticks (log scale for a wide n sweep), y from 0."""
    if axis == "n" and min(xs) > 0 and max(xs) / min(xs) >= 20:
        ax.set_xscale("log")
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.minorticks_off()
    top = ax.dataLim.ymax
    ax.set_ylim(0, 1.1 * top if math.isfinite(top) and top > 0 else None)
    ax.set_xlabel(AXIS_LABELS[axis])
    ax.set_ylabel(title)
    ax.grid(True, alpha=0.3)
    ax.legend()


def _title(results: dict[str, Any]) -> str:
    config = results["config"]
    name = config.get("setting") or Path(config["engine"]["model"]).name
    ranks = ",".join(map(str, config["ranks"]))
    gpu = results.get("environment", {}).get("gpu", "cpu")
    return f"{name} (ranks {ranks}, alpha {config['alpha']:g}, cv {config['cv']:g}) on {gpu}"
