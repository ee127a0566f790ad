#!/usr/bin/env bash
# Issue 22 on one H200 (~8 min; step caps 80 + 110 + 280 + 70 s): the GPU checks of the fused decode kernels and
# the one-call PCP split, then the split efficiencies, megacp against transformers-static (32 layers) with kernels
# per decode step, and the GEMV sweep.
# JSON and logs under $OUT.
#   usage: bash scripts/gpu_speed.sh [tests] [prefill] [e2e32] [gemv] [e2e4]     (default: the first four)
#   e2e4 (optional, ~3 min): 4 layers, megacp vs eager transformers and transformers-static, kernels per step.
set -o pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
CUDNN_PATH=$(python3 -c "import nvidia.cudnn as c; print(c.__path__[0])") && export CUDNN_PATH
export LD_LIBRARY_PATH=$CUDNN_PATH/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
steps=${*:-tests prefill e2e32 gemv}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
      'transformers', transformers.__version__)"

for step in $steps; do
  case $step in
    tests) timeout 80 python3 -m pytest -q -m gpu -rs tests/test_gpu_decode_fused.py \
             tests/test_gpu_backends.py::test_backend_pcp_chunk_equals_full_causal_rows 2>&1 \
             | tee "$OUT/speed_tests.log" | tail -25 ;;
    prefill) timeout 110 python3 bench/prefill_split.py --tokens 32768 131072 --pcp 1 2 4 8 --layouts shared \
             --rounds 3 --json-out "$OUT/prefill_split.json" 2>&1 | tail -70 ;;
    e2e32) timeout 280 python3 bench/e2e.py --layers 32 --engines megacp transformers-static --prompt-lens 8192 \
             --batch 1 16 64 --new-tokens 32 --reps 2 --count-kernels --json-out "$OUT/e2e32_static.json" 2>&1 \
             | grep -v '^ ' | tail -20 ;;
    gemv) timeout 70 python3 bench/gemv.py --m 1 4 16 64 --json-out "$OUT/gemv.json" 2>&1 | grep -v '^ ' | tail -24 ;;
    e2e4) timeout 200 python3 bench/e2e.py --layers 4 --engines megacp transformers transformers-static \
             --prompt-lens 8192 32768 --batch 1 16 64 --reps 2 --count-kernels --json-out "$OUT/e2e4_peers.json" 2>&1 \
             | grep -v '^ ' | tail -20 ;;
    *) echo "unknown step $step (tests, prefill, e2e32, gemv, e2e4)" ;;
  esac
  echo "== $step exit ${PIPESTATUS[0]}"
done
