"""Llama-family models and the Hugging Face checkpoint loader."""

from megacp.models.config import ModelConfig, build_tiny_llama_config, load_model_config, supported_model_types
from megacp.models.llama import LlamaForCausalLM
from megacp.models.loader import load_model

__all__ = [
    "LlamaForCausalLM",
    "ModelConfig",
    "build_tiny_llama_config",
    "load_model",
    "load_model_config",
    "supported_model_types",
]
