# Sourced by the quick-start scripts: make (once) and activate ./.venv with megacp and its test deps.
# torch is pinned to the CPU build that lies on disk; an unpinned torch would pull a multi-GB CUDA build.
set -e
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ ! -x "$ROOT/.venv/bin/python" ]; then
    python3 -m venv "$ROOT/.venv"
fi
if ! "$ROOT/.venv/bin/python" -c "import megacp, torch, pytest, hypothesis, transformers, safetensors" >/dev/null 2>&1; then
    "$ROOT/.venv/bin/pip" install -q "torch==2.13.0"
    "$ROOT/.venv/bin/pip" install -q -e "$ROOT[test]"
fi
export PATH="$ROOT/.venv/bin:$PATH"
cd "$ROOT"
