"""The model: a Llama-architecture decoder sized by one depth dial."""

from lmforge.model.model import GPT, KVCache, ModelConfig, build_model, flops_per_token, param_counts

__all__ = ["GPT", "KVCache", "ModelConfig", "build_model", "flops_per_token", "param_counts"]
