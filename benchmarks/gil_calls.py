"""What a torch call costs on a thread beside one that holds the GIL (the adapter I/O threads
beside the engine thread): a call that gives the GIL up waits up to the switch interval
(5 ms) to get it back, so per-matrix ``view``/``t()`` calls, not the copies, set the cost of
packing an adapter (GPU session 8: 0.45 s of an I/O thread per S2 adapter).

    python benchmarks/gil_calls.py [--calls 40]

Prints milliseconds per call of each operation, measured while a pure-Python thread spins.
No GPU is needed.
"""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=40)
    args = parser.parse_args()
    stop = threading.Event()

    def hog() -> None:  # an engine thread in Python: holds the GIL but for the switches
        x = 0
        while not stop.is_set():
            x += 1

    flat = torch.zeros(1 << 20, dtype=torch.bfloat16)
    rows = flat[: 64 * 4096].view(64, 4096)
    array = np.zeros(1 << 20, dtype=np.int16)
    ops = {
        "1-D slice": lambda i: flat[i : i + 100],
        "narrow": lambda i: flat.narrow(0, i, 100),
        "view": lambda i: rows.view(4096, 64),
        "t()": lambda i: rows.t(),
        "unbind (64 views)": lambda i: rows.unbind(0),
        "numpy slice": lambda i: array[i : i + 100],
    }
    thread = threading.Thread(target=hog, daemon=True)
    thread.start()
    try:
        for name, op in ops.items():
            start = time.perf_counter()
            for i in range(args.calls):
                op(i)
            ms = 1e3 * (time.perf_counter() - start) / args.calls
            print(f"{name:18} {ms:8.3f} ms per call")
    finally:
        stop.set()
        thread.join()


if __name__ == "__main__":
    main()
