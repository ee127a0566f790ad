from setuptools import find_packages, setup

setup(
    name="megacp",
    version="0.1.0",
    description="Context parallelism (PCP prefill, DCP decode) for LLM inference, Megatron style",
    packages=find_packages(include=["megacp", "megacp.*"]),
    python_requires=">=3.10",
    install_requires=["torch", "einops", "numpy"],
    extras_require={
        "test": ["pytest", "hypothesis", "transformers", "safetensors"],
        "te": ["transformer_engine[pytorch]"],
    },
)
