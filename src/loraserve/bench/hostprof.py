"""Where the engine thread's host time goes during a bench run: a sampling profiler.

A daemon thread reads the engine thread's Python stack (``sys._current_frames``) every
``interval`` seconds and counts, per function, the samples it appears in (inclusive) and
the samples it is the innermost Python frame of (leaf: its own code, or a C call it made,
such as a kernel launch or a wait for the GIL, which Python cannot tell apart). Unlike
cProfile it does not slow every call down, so the run's timing stays close to an
unprofiled one; each sample costs the sampler a stack walk under the GIL (tens of us).

    loraserve bench ... --host-profile     # top functions per run, in the JSON and printed
"""

from __future__ import annotations

import os
import sys
import threading
from collections import Counter
from typing import Any

TOP = 25


def _name(code: Any) -> str:
    path = code.co_filename
    parts = path.replace("\\", "/").split("/")
    for root in ("loraserve", "triton", "torch"):
        if root in parts:
            path = "/".join(parts[parts.index(root) :])
            break
    else:
        path = os.path.basename(path)
    return f"{path}:{code.co_name}"


class StackSampler:
    """Samples the stack of the thread that creates it, between ``start`` and ``stop``.
    ``flush(kind)`` files the samples taken since the last flush under ``kind`` (the bench:
    the kind of step that just ran)."""

    def __init__(self, interval: float = 0.002, depth: int = 64, root: str | None = None) -> None:
        """``root``: keep only samples inside a function of this name (as ``_name`` writes
        it, e.g. "loraserve/engine/engine.py:step"), and only their frames from it inward."""
        if interval <= 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval}")
        self.interval = interval
        self.depth = depth
        self.root = root
        self.thread_id = threading.get_ident()
        self.kinds: dict[str, _Counts] = {}
        self._pending: list[tuple[str, ...]] = []  # stacks, innermost frame first
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> StackSampler:
        self._thread = threading.Thread(target=self._loop, name="host-profile", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self.summary()

    def sample(self) -> None:
        frame = sys._current_frames().get(self.thread_id)
        stack = []
        while frame is not None and len(stack) < self.depth:
            name = _name(frame.f_code)
            stack.append(name)
            if name == self.root:
                break
            frame = frame.f_back
        if stack and (self.root is None or stack[-1] == self.root):
            self._pending.append(tuple(stack))

    def flush(self, kind: str) -> None:
        pending, self._pending = self._pending, []  # one swap: the sampler may append
        counts = self.kinds.setdefault(kind, _Counts())
        for stack in pending:
            counts.add(stack)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def summary(self, top: int = TOP) -> dict[str, Any]:
        """Per kind: shares of its samples (0..1), largest first."""
        return {
            "interval_s": self.interval,
            "kinds": {kind: c.summary(top) for kind, c in self.kinds.items() if c.samples},
        }


class _Counts:
    def __init__(self) -> None:
        self.samples = 0
        self.inclusive: Counter[str] = Counter()
        self.leaf: Counter[str] = Counter()

    def add(self, stack: tuple[str, ...]) -> None:
        self.samples += 1
        self.leaf[stack[0]] += 1
        self.inclusive.update(set(stack))

    def summary(self, top: int) -> dict[str, Any]:
        n = self.samples

        def shares(counter: Counter[str]) -> list[tuple[str, float]]:
            return [(name, count / n) for name, count in counter.most_common(top)]

        return {"samples": n, "inclusive": shares(self.inclusive), "leaf": shares(self.leaf)}


def format_profile(profile: dict[str, Any], top: int = 12) -> str:
    lines = []
    for kind, counts in profile["kinds"].items():
        lines.append(f"    host profile of {kind} steps ({counts['samples']} samples):")
        for part in ("inclusive", "leaf"):
            items = ", ".join(f"{name} {share:.0%}" for name, share in counts[part][:top])
            lines.append(f"      {part}: {items}")
    return "\n".join(lines)
