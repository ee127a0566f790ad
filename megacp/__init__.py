"""megacp: context parallelism (PCP prefill, DCP decode) for LLM inference."""

__version__ = "0.1.0"
