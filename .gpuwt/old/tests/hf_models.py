"""Tiny random Hugging Face checkpoints (made with ``transformers`` + ``save_pretrained``) and their references.

Each model is built once per test process, fp32, with several layers, GQA and a vocabulary of >= 256 ids, and saved
in a temporary directory that is removed at exit. Kinds:

- ``llama``:   8 heads / 1 KV head, so every dcp that divides tp is legal (tp 4 -> dcp 1, 2, 4); Llama-3 rope scaling.
- ``llama_sharded``: the same weights saved as several safetensors shards with an index file.
- ``mistral``: 8 heads / 2 KV heads (dcp > 1 with tp 2 is illegal for it: used by the error tests).
- ``qwen2``:   8 heads / 2 KV heads, qkv bias, tied input/output embeddings.

The references are plain ``transformers`` calls: greedy ``generate`` (no EOS stop, so every prompt gets exactly
``max_new_tokens`` tokens) and the logits of the last prompt position.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import torch

VOCAB_SIZE = 320
EOS_TOKEN_ID = 2
MAX_POSITIONS = 256

_ROOT: str | None = None
_DIRS: dict[str, str] = {}


def _root() -> str:
    global _ROOT
    if _ROOT is None:
        _ROOT = tempfile.mkdtemp(prefix="megacp-hf-models-")
        atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)
    return _ROOT


def _common(num_kv_heads: int) -> dict:
    return dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=num_kv_heads,
        head_dim=8,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=EOS_TOKEN_ID,
        torch_dtype="float32",
    )


def _build(kind: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed({"llama": 0, "mistral": 1, "qwen2": 2}[kind])
    if kind == "llama":
        rope = {
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        }
        model = LlamaForCausalLM(LlamaConfig(**_common(1), rope_scaling=rope))
    elif kind == "mistral":
        model = MistralForCausalLM(MistralConfig(**_common(2), sliding_window=None))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**_common(2), tie_word_embeddings=True))
    else:
        raise ValueError(f"unknown tiny model kind {kind!r}; use llama, llama_sharded, mistral or qwen2")
    # The default init (std 0.02) makes near-uniform logits where greedy ties are likely; larger weights give
    # clear argmax margins so the fp32 comparison with transformers is about the math, not about rounding.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15)
    return model.float().eval()


def model_dir(kind: str) -> str:
    """Directory of a saved tiny checkpoint (``config.json`` + safetensors), built on first use."""
    if kind not in _DIRS:
        base = kind.removesuffix("_sharded")
        path = os.path.join(_root(), kind)
        model = _build(base)
        if kind.endswith("_sharded"):
            model.save_pretrained(path, max_shard_size="60KB")
        else:
            model.save_pretrained(path)
        _DIRS[kind] = path
    return _DIRS[kind]


def load_reference(path: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def greedy_reference(path: str, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers' greedy ``generate`` for each prompt (run alone, no EOS stop): the new token ids."""
    from transformers import GenerationConfig

    model = load_reference(path)
    config = GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=0, eos_token_id=None, pad_token_id=0
    )
    outs = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            y = model.generate(x, attention_mask=torch.ones_like(x), generation_config=config)
            outs.append(y[0, len(ids) :].tolist())
    return outs


def last_logits_reference(path: str, prompts: list[list[int]]) -> list[torch.Tensor]:
    """transformers' fp32 logits at the last position of each prompt: one [vocab] tensor per prompt."""
    model = load_reference(path)
    with torch.no_grad():
        return [model(torch.tensor([ids])).logits[0, -1].float() for ids in prompts]


def truncate_at_eos(tokens: list[int], eos_ids: set[int]) -> list[int]:
    """What a generator that stops at EOS returns: ``tokens`` up to and including the first EOS."""
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return tokens[: i + 1]
    return tokens


def save_word_tokenizer(path: str):
    """Write a whitespace word-level ``tokenizer.json`` covering all ``VOCAB_SIZE`` ids into ``path``; return it."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = "the quick brown fox jumps over lazy dog".split()
    vocab = {f"tok{i}": i for i in range(VOCAB_SIZE)}
    for i, w in enumerate(words):
        del vocab[f"tok{10 + i}"]
        vocab[w] = 10 + i
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="tok0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(os.path.join(path, "tokenizer.json"))
    return tokenizer
