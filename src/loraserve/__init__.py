"""loraserve: one base LLM, thousands of LoRA adapters."""

from loraserve.entrypoints.llm import LLM
from loraserve.request import RequestOutput, SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
