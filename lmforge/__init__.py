"""lmforge: build your own GPT-style language model end to end, predictably."""

__version__ = "0.1.0"
