"""loraserve: one base LLM, thousands of LoRA adapters.

``LLM`` is imported lazily, so that ``import loraserve.tokenizer`` (or any other leaf
module) does not load the whole engine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from loraserve.request import RequestOutput, SamplingParams

if TYPE_CHECKING:
    from loraserve.entrypoints.llm import LLM

__all__ = ["LLM", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "LLM":
        from loraserve.entrypoints.llm import LLM

        return LLM
    raise AttributeError(f"module 'loraserve' has no attribute {name!r}")
