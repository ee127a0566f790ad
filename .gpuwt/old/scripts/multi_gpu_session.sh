#!/usr/bin/env bash
# One session on a multi-GPU machine of the device tool (see bench/README.md "Several GPUs"): NCCL correctness
# checks, one real torchrun of the example CLI, and the PCP/DCP scaling benchmark; logs and JSON go to $OUT.
#   usage: bash scripts/multi_gpu_session.sh [check] [cli] [bench]      (default: all three)
#   NPROC (default: every visible GPU) ranks; BENCH_ARGS are passed to bench/multi_gpu.py.
set -o pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
# NVLink multicast stays off on these shared hosts (KINDS.md): NCCL, PyTorch symmetric memory, NVSHMEM.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} OMP_NUM_THREADS=4
# PyTorch's own cuDNN first (the system copy clashes with it once Transformer Engine is loaded; harmless without TE).
CUDNN_PATH=$(python3 -c "import nvidia.cudnn as c; print(c.__path__[0])") && export CUDNN_PATH
export LD_LIBRARY_PATH=$CUDNN_PATH/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
NPROC=${NPROC:-$(nvidia-smi -L | wc -l)}
steps=${*:-check cli bench}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
nvidia-smi topo -m 2>&1 | head -8
python3 -c "import torch, transformers, triton, megacp.ops as o
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl', '.'.join(map(str, torch.cuda.nccl.version())),
      'cudnn', torch.backends.cudnn.version(), 'triton', triton.__version__, 'transformers', transformers.__version__,
      'backends', o.available_backends('cuda'))"

for step in $steps; do
  case $step in
    check) timeout 240 torchrun --nproc-per-node "$NPROC" scripts/nccl_check.py --device cuda \
             --json-out "$OUT/nccl_check.json" 2>&1 | grep -v "Loading weights\|Writing model" | tee "$OUT/nccl_check.log" ;;
    cli) timeout 60 torchrun --nproc-per-node "$NPROC" examples/infer_llama.py -pcp "$NPROC" --device cuda \
           --dtype float32 --prompt "Hello, megacp" --max-new-tokens 16 --json-out "$OUT/cli.json" 2>&1 | tail -8 ;;
    bench) timeout ${BENCH_TIMEOUT:-480} torchrun --nproc-per-node "$NPROC" bench/multi_gpu.py ${BENCH_ARGS:-} \
             --json-out "$OUT/multi_gpu.json" 2>&1 | tee "$OUT/multi_gpu.log" | tail -60 ;;
    context) timeout ${BENCH_TIMEOUT:-480} torchrun --nproc-per-node "$NPROC" bench/context_prefill.py \
               --layouts ${CONTEXT_LAYOUTS:-1,$NPROC,1} --json-out "$OUT/context_prefill.json" 2>&1 \
               | tee "$OUT/context_prefill.log" | grep " ms; " ;;
    *) echo "unknown step $step (check, cli, bench, context)" ;;
  esac
  echo "== $step exit ${PIPESTATUS[0]}"
done
