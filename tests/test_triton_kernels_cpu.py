"""megacp's Triton kernels checked on a machine without a GPU (the CI tier between pure CPU and GPU-marked tests).

- Under Triton's interpreter (``tests/triton_interpreter_checks.py``, in a subprocess because ``TRITON_INTERPRET``
  must be set before Triton is imported): every kernel against a PyTorch reference.
- Compiled for Hopper (sm_90, what the H100/H200 runs take) with the ptxas that ships in the ``triton`` wheel: a
  kernel that only the GPU compiler rejects (types, layouts, shared memory) fails here, before a scarce GPU run.

``scripts/venv.sh`` installs ``triton`` (a CPU machine can install it; no CUDA driver is needed for either check).
The GPU-marked tests in ``test_gpu_backends.py`` run the same kernels on a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton", reason="scripts/venv.sh installs triton for these checks")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kernels_match_pytorch_under_the_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, "-m", "tests.triton_interpreter_checks"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "triton interpreter checks: ok" in run.stdout, run.stdout + run.stderr[-3000:]


def _compile_for_hopper(kernel, pointers: dict[str, str], constexprs: dict, floats: tuple[str, ...] = (),
                        num_warps: int = 4, num_stages: int = 2, aligned: tuple[str, ...] = ()):
    """Compile ``kernel`` to an sm_90 cubin: pointer args typed by ``pointers``, ``floats`` as fp32, other
    non-constexpr args as i32 (how Triton specialises small strides and sizes); ``aligned`` args (and, with them,
    every pointer) are known multiples of 16, as Triton specialises them at launch for torch's tensors."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {}
    for p in kernel.params:
        if p.is_constexpr:
            signature[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            signature[p.name] = pointers[p.name]
        else:
            signature[p.name] = "fp32" if p.name in floats else "i32"
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(kernel.params)
             if aligned and (p.name in aligned or p.name.endswith("_ptr"))}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32),
                              # fp fusion on: the default of the Triton the GPU runs use (3.9 warns when unset)
                              options={"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": True})
    assert compiled.asm.get("cubin"), f"{kernel.__name__}: no cubin"
    return compiled


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="interpreted kernels cannot be compiled")
def test_kernels_compile_for_hopper():
    from megacp.ops import (decode_fused, merge_kernel, moe_combine, paged_decode, paged_mla_decode, rms_norm,
                            rope_inplace)

    for dtype, precision in (("bf16", "tf32"), ("fp32", "ieee")):
        for fused, group, block_n in ((False, 4, 64), (True, 4, 64), (True, 32, 32), (False, 16, 128)):
            _compile_for_hopper(
                paged_decode._split_kernel,
                {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "bt_ptr": "*i32",
                 "lens_ptr": "*i32", "out_ptr": "*fp32", "lse_ptr": "*fp32", "fin_out_ptr": f"*{dtype}",
                 "fin_lse_ptr": "*fp32", "counter_ptr": "*i32"},
                {"FUSED_MERGE": fused, "BLOCK_SIZE": 16, "GROUP": group, "GROUP_PAD": max(16, group),
                 "HEAD_DIM": 128, "D_PAD": 128, "BLOCK_N": block_n, "DOT_PRECISION": precision, "GDC": fused},
                floats=("scale_log2",))
        for fused, block_h, block_n, warps, ids in ((False, 16, 32, 4, 64), (True, 16, 16, 4, 0),
                                                    (False, 32, 32, 8, 1024)):
            compiled = _compile_for_hopper(
                paged_mla_decode._mla_split_kernel,
                {"q_ptr": f"*{dtype}", "c_ptr": f"*{dtype}", "bt_ptr": "*i32", "lens_ptr": "*i32", "out_ptr": "*fp32",
                 "lse_ptr": "*fp32", "fin_out_ptr": f"*{dtype}", "fin_lse_ptr": "*fp32", "counter_ptr": "*i32"},
                {"FUSED_MERGE": fused, "BLOCK_SIZE": 64, "BLOCK_H": block_h, "DV": 512, "DV_PAD": 512, "DPE": 64,
                 "DPE_PAD": 64, "HAS_PE": True, "BLOCK_N": block_n, "DOT_PRECISION": precision, "ID_TILES": ids,
                 "GDC": not fused},
                floats=("scale_log2",), num_warps=warps, num_stages=4,
                aligned=("stride_qb", "stride_qh", "stride_cn", "stride_ct", "stride_btb"))
            if ids:  # block ids read before the loop: the pipeliner keeps num_stages - 1 = 3 latent tiles in flight
                buffer = f"memdesc<3x{block_n}x512x{dtype.replace('fp', 'f')}"
                assert buffer in compiled.asm["ttgir"], "MLA tile loop not pipelined"
        for n in (2, 4):
            _compile_for_hopper(merge_kernel._merge_into_kernel,
                                {**{f"o{i}_ptr": f"*{dtype}" for i in range(4)}, **{f"l{i}_ptr": "*fp32" for i in range(4)},
                                 "out_ptr": f"*{dtype}", "lse_ptr": "*fp32"},
                                {"N": n, "HEAD_DIM": 128, "D_PAD": 128, "BLOCK_H": 16, "GDC": n == 2})
        _compile_for_hopper(merge_kernel._merge_kernel,
                            {"part_ptr": "*fp32", "part_lse_ptr": "*fp32", "out_ptr": f"*{dtype}", "lse_ptr": "*fp32"},
                            {"HEAD_DIM": 128, "D_PAD": 128, "CHUNK": 16, "GDC": True})
        _compile_for_hopper(decode_fused._rope_cache_kernel,  # slots: the decode metadata's int64 buffer
                            {"qkv_ptr": f"*{dtype}", "cos_ptr": f"*{dtype}", "sin_ptr": f"*{dtype}",
                             "q_ptr": f"*{dtype}", "k_cache_ptr": f"*{dtype}", "v_cache_ptr": f"*{dtype}",
                             "slot_ptr": "*i64"}, {"HQ": 32, "HKV": 8, "D": 128, "HALF": 64, "D_PAD": 128,
                                                    "GDC": dtype == "bf16"})
        ptx = _compile_for_hopper(decode_fused._silu_mul_kernel, {"x_ptr": f"*{dtype}", "out_ptr": f"*{dtype}"},
                                  {"BLOCK": 1024, "LIBDEVICE": True, "GDC": True}).asm["ptx"]
        assert "griddepcontrol.wait" in ptx and "griddepcontrol.launch_dependents" in ptx, "PDL handshake"
        for interleave in (True, False):
            _compile_for_hopper(rope_inplace._rope_inplace_kernel,
                                {"x_ptr": f"*{dtype}", "cos_ptr": f"*{dtype}", "sin_ptr": f"*{dtype}"},
                                {"D": 64, "HALF": 32, "D_PAD": 64, "INTERLEAVE": interleave}, num_warps=1)
        for k in (1, 6):  # the expert rows in the activations' dtype, the sorted-row positions int64
            _compile_for_hopper(moe_combine._combine_kernel, {"y_ptr": f"*{dtype}", "pos_ptr": "*i64",
                                                              "w_ptr": "*fp32", "out_ptr": f"*{dtype}"},
                                {"K": k, "BLOCK": 1024})
        if dtype == "bf16":  # the decode GEMV (half dtypes only)
            from megacp.ops import gemv

            for block_m, block_n, block_k in ((16, 32, 256), (64, 64, 128)):
                _compile_for_hopper(gemv._gemv_kernel, {"x_ptr": "*bf16", "w_ptr": "*bf16", "y_ptr": "*bf16"},
                                    {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}, num_stages=4)
        from megacp.ops import greedy

        _compile_for_hopper(greedy._greedy_kernel, {"x_ptr": f"*{dtype}", "val_ptr": "*fp32", "idx_ptr": "*i32",
                                                    "bad_ptr": "*i32", "tok_ptr": "*i64", "counter_ptr": "*i32"},
                            {"BLOCK": 4096, "CHUNKS_PAD": 32, "GDC": True}, num_warps=8)
        for residual in (True, False):
            _compile_for_hopper(rms_norm._add_rms_norm_kernel,
                                {"x_ptr": f"*{dtype}", "r_ptr": f"*{dtype}", "w_ptr": f"*{dtype}",
                                 "out_ptr": f"*{dtype}", "sum_ptr": f"*{dtype}"},
                                {"HAS_RESIDUAL": residual, "BLOCK": 4096, "GDC": residual}, floats=("eps",),
                                num_warps=8)
