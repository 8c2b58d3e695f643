"""Test setup: Triton kernels run under the interpreter on machines without a GPU.

TRITON_INTERPRET must be set before any kernel is defined, so it is set here, before
loraserve is imported by any test module.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
