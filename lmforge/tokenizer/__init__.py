"""Byte-level BPE tokenizers trained with Hugging Face ``tokenizers``."""
