#!/usr/bin/env bash
# One session on the GPU machine (see bench/README.md): install Transformer Engine if its parts were copied to
# /root/te, apply the cuDNN fix, run the GPU tests and the benchmarks, write logs and JSON under $OUT.
#   usage: bash scripts/gpu_session.sh [tests] [prefill] [decode] [sweep] [e2e] [e2e32] [cpmatrix] [graphmatrix]
#          [mlatests] [mladecode] [mlasweep] [prefillmla] [e2edsv2]      (MLA: issue 21; DSV2_LAYERS=27 for the
#          [gemv] [stepprofile]   (decode GEMV sweep; 32-layer step profile per PROFILE_VARIANTS)
#   (default: tests prefill decode e2e)                                    whole DeepSeek-V2-Lite, default 4)
set -o pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
steps=${*:-tests prefill decode e2e}

if ls /root/te/part* >/dev/null 2>&1 && [ -d .te/small ]; then
  cat /root/te/part* > /root/te/transformer_engine_cu13-2.20.2-py3-none-manylinux_2_28_x86_64.whl
  python3 -m pip install -q --no-deps --no-index /root/te/transformer_engine_cu13-*.whl .te/small/*.whl 2>&1 | tail -3
  export MEGACP_REQUIRE_TE=1
fi
# Point TE (and everything else) at PyTorch's own cuDNN: the system one in /lib clashes (shared/te-wheels/README.md).
CUDNN_PATH=$(python3 -c "import nvidia.cudnn as c; print(c.__path__[0])") && export CUDNN_PATH
export LD_LIBRARY_PATH=$CUDNN_PATH/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, megacp.ops as o; from megacp.ops.backends_cuda import te_unavailable_reason as r
print('torch', torch.__version__, 'cudnn', torch.backends.cudnn.version(), 'backends', o.available_backends('cuda'),
      'te:', r() or 'ok')"

for step in $steps; do
  case $step in
    tests) timeout ${TESTS_TIMEOUT:-360} python3 -m pytest -q -m gpu -rs -s ${TESTS:-tests/test_gpu_backends.py \
             tests/test_cuda_graph.py tests/test_no_host_sync.py tests/test_training_dist.py} 2>&1 | tee "$OUT/tests.log" ;;
    prefill) timeout 140 python3 bench/prefill_split.py ${PREFILL_ARGS:-} --json-out "$OUT/prefill_split.json" 2>&1 | tail -40 ;;
    decode) timeout 200 python3 bench/decode.py --json-out "$OUT/decode.json" 2>&1 | tail -45 ;;
    sweep) timeout 240 python3 bench/decode_sweep.py ${SWEEP_ARGS:-} --json-out "$OUT/decode_sweep.json" 2>&1 | tail -30 ;;
    e2e) timeout 240 python3 bench/e2e.py ${E2E_ARGS:-} --json-out "$OUT/e2e.json" 2>&1 | tail -150 ;;
    e2e32) timeout 300 python3 bench/e2e.py --layers 32 --engines megacp transformers --prompt-lens 8192 --batch 1 \
             --reps 2 --json-out "$OUT/e2e32.json" 2>&1 | tail -60 ;;
    cpmatrix) timeout 300 torchrun --nproc-per-node 8 scripts/gpu_cp_matrix.py --json-out "$OUT/gpu_cp_matrix.json" 2>&1 | tail -30 ;;
    graphmatrix) timeout 300 torchrun --nproc-per-node 8 scripts/gpu_graph_matrix.py --json-out "$OUT/gpu_graph_matrix.json" \
             2>&1 | grep -v '^ ' | tail -40 ;;
    mlatests) timeout ${TESTS_TIMEOUT:-300} python3 -m pytest -q -m gpu -rs -s tests/test_gpu_mla_decode.py \
             tests/test_gpu_backends.py::test_backend_takes_mla_prefill_head_dims 2>&1 | tee "$OUT/mla_tests.log" \
             | grep -v '^ ' | tail -40 ;;
    mladecode) timeout 200 python3 bench/decode.py --kinds mla --json-out "$OUT/decode_mla.json" 2>&1 | tail -40 ;;
    mlasweep) timeout 300 python3 bench/decode_sweep.py --kind mla ${SWEEP_ARGS:-} \
             --json-out "$OUT/decode_sweep_mla.json" 2>&1 | tail -12 ;;
    prefillmla) timeout 150 python3 bench/prefill_mla.py --json-out "$OUT/prefill_mla.json" 2>&1 | tail -40 ;;
    gemv) timeout ${GEMV_TIMEOUT:-240} python3 bench/gemv.py ${GEMV_ARGS:---m 1 16 64} --json-out "$OUT/gemv.json" \
             2>&1 | tail -20 ;;
    stepprofile) timeout ${PROFILE_TIMEOUT:-420} python3 bench/decode_step_profile.py --layers 32 --batch 1 16 \
             --variants ${PROFILE_VARIANTS:-pdl=0,gemv=none default} --json-out "$OUT/decode_step_profile.json" \
             2>&1 | tail -20 ;;
    e2edsv2) timeout 300 python3 bench/e2e.py --model-shape deepseek-v2-lite --layers ${DSV2_LAYERS:-4} ${E2E_ARGS:-} \
             --json-out "$OUT/e2e_dsv2lite.json" 2>&1 | grep -v '^ ' | tail -30 ;;
    *) echo "unknown step $step (tests, prefill, decode, sweep, e2e, e2e32, cpmatrix, graphmatrix, mlatests, mladecode,"\
            "mlasweep, prefillmla, e2edsv2, gemv, stepprofile)" ;;
  esac
  echo "== $step exit ${PIPESTATUS[0]}"
done
