"""loraserve: one base LLM, thousands of LoRA adapters."""
