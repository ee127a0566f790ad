#!/usr/bin/env bash
# Quick-start command 1: the built-in tiny Llama on CPU over 4 processes, tp 2 x pcp 2 with dcp 2 (the KV cache of
# every sequence is sharded over all 4 ranks). Extra arguments go to examples/infer_llama.py, e.g. --model DIR.
source "$(dirname "$0")/venv.sh"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
torchrun --standalone --nproc-per-node 4 examples/infer_llama.py \
    -tp 2 -pcp 2 -dcp 2 --device cpu \
    --prompt "Hello, megacp" --prompt "Context parallelism splits long prompts across ranks." \
    --max-new-tokens 16 --json-out out/example.json "$@"
