"""Parallel configuration and every configuration check, in one place.

Each ``validate_*`` function checks one concern and raises ``ValueError`` with one actionable message: it names the
command-line flag (vLLM spelling, see DESIGN §5) and proposes a valid alternative computed from the numbers given.
They are pure, so every rank runs them before any collective and a bad configuration fails fast everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

TP_FLAG = "--tensor-parallel-size/-tp"
PCP_FLAG = "--prefill-context-parallel-size/-pcp"
DCP_FLAG = "--decode-context-parallel-size/-dcp"
DP_FLAG = "--data-parallel-size/-dp"
INTERLEAVE_FLAG = "--cp-kv-cache-interleave-size"
BLOCK_SIZE_FLAG = "--block-size"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _fmt(values: list[int]) -> str:
    return ", ".join(str(v) for v in values)


def validate_sizes(tp: int = 1, pcp: int = 1, dcp: int = 1, dp: int = 1) -> None:
    """Every parallel size is an integer >= 1."""
    for flag, value in ((TP_FLAG, tp), (PCP_FLAG, pcp), (DCP_FLAG, dcp), (DP_FLAG, dp)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{flag} must be an integer >= 1, got {value!r}; use {flag.split('/')[-1]} 1 to disable it")


def validate_world_size(world_size: int, tp: int = 1, pcp: int = 1, dp: int = 1) -> None:
    """``world_size == dp·pcp·tp`` (pipeline parallel is 1; DCP reuses TP ranks and adds none)."""
    expected = dp * pcp * tp
    if world_size == expected:
        return
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size} (the number of ranks torchrun started)")
    fixes = [f"launch with --nproc-per-node {expected}"]
    if world_size % (dp * pcp) == 0:
        fixes.append(f"use -tp {world_size // (dp * pcp)}")
    if world_size % (dp * tp) == 0:
        fixes.append(f"use -pcp {world_size // (dp * tp)}")
    raise ValueError(
        f"torchrun --nproc-per-node {world_size} but dp·pcp·tp = {dp}·{pcp}·{tp} = {expected}; "
        f"{' or '.join(fixes)} (change {TP_FLAG} / {PCP_FLAG} / {DP_FLAG} so that their product is the world size)"
    )


def validate_dcp(tp: int, dcp: int) -> None:
    """DCP groups are contiguous runs inside a TP group, so ``dcp`` must divide ``tp``."""
    if tp % dcp != 0:
        raise ValueError(
            f"{DCP_FLAG} {dcp} must divide {TP_FLAG} {tp} (DCP reuses the TP ranks); "
            f"legal -dcp values for -tp {tp}: {_fmt(_divisors(tp))}"
        )


def validate_kv_interleave(interleave: int, block_size: int | None = None) -> None:
    """``1 <= interleave <= block_size`` and ``block_size % interleave == 0`` (DESIGN §2)."""
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"{BLOCK_SIZE_FLAG} must be an integer >= 1, got {block_size!r}; e.g. {BLOCK_SIZE_FLAG} 16")
    if isinstance(interleave, bool) or not isinstance(interleave, int) or interleave < 1:
        hint = f"legal values for {BLOCK_SIZE_FLAG} {block_size}: {_fmt(_divisors(block_size))}" if block_size else "e.g. 1"
        raise ValueError(f"{INTERLEAVE_FLAG} must be an integer >= 1, got {interleave!r}; {hint}")
    if block_size is None:
        return
    if interleave > block_size or block_size % interleave != 0:
        raise ValueError(
            f"{INTERLEAVE_FLAG} {interleave} must divide {BLOCK_SIZE_FLAG} {block_size} (1 <= interleave <= block size); "
            f"legal values: {_fmt(_divisors(block_size))}, or raise {BLOCK_SIZE_FLAG} to a multiple of {interleave}"
        )


def _gqa_ok(num_heads: int, num_kv_heads: int, tp: int, dcp: int) -> bool:
    if num_heads % tp != 0:
        return False
    if tp > num_kv_heads:
        return tp % num_kv_heads == 0 and (tp // num_kv_heads) % dcp == 0
    return num_kv_heads % tp == 0 and dcp == 1


def _layout_ok(num_heads: int, num_kv_heads: int, intermediate_size: int | None, tp: int, dcp: int) -> bool:
    return _gqa_ok(num_heads, num_kv_heads, tp, dcp) and (intermediate_size is None or intermediate_size % tp == 0)


def model_layouts(num_heads: int, num_kv_heads: int, intermediate_size: int | None = None) -> list[tuple[int, int]]:
    """Every ``(tp, dcp)`` under which a model with these sizes loads, for any ``pcp`` and ``dp``; sorted.

    The rules, all at once: ``tp`` divides the attention heads; it divides the KV heads (then ``dcp = 1``) or is a
    multiple of them with ``dcp | tp / num_kv_heads`` (DESIGN §3 GQA); it divides the dense MLP's
    ``intermediate_size`` (None: the model has no dense MLP layer; MoE experts split unevenly, so they add no rule).
    The vocabulary adds none either: it is padded to a multiple of ``tp``.
    """
    return [
        (t, d)
        for t in _divisors(num_heads)
        for d in _divisors(t)
        if _layout_ok(num_heads, num_kv_heads, intermediate_size, t, d)
    ]


def _describe(num_heads: int, num_kv_heads: int, intermediate_size: int | None) -> str:
    mlp = f" and MLP intermediate size {intermediate_size}" if intermediate_size is not None else ""
    return f"a model with {num_heads} attention heads, {num_kv_heads} KV heads{mlp}"


def _no_dcp_note(num_heads: int, num_kv_heads: int, intermediate_size: int | None, dcp: int) -> str:
    """Why no ``tp`` allows ``dcp`` (called only then), the layouts that do load, and the way to shard the KV cache."""
    gqa_only = [t for t in _divisors(num_heads) if t > num_kv_heads and _gqa_ok(num_heads, num_kv_heads, t, dcp)]
    if gqa_only:
        why = (f"-tp {_fmt(gqa_only)} would let DCP groups of {dcp} ranks share a KV head, but does not divide the "
               f"MLP intermediate size {intermediate_size}")
    else:
        why = (f"DCP needs -tp a multiple of the {num_kv_heads} KV heads, with tp/{num_kv_heads} divisible by the "
               f"-dcp size, that divides the {num_heads} attention heads; there is none")
    layouts = ", ".join(f"-tp {t} -dcp {d}" for t, d in model_layouts(num_heads, num_kv_heads, intermediate_size))
    return (
        f"; no layout of this model allows {DCP_FLAG} {dcp}: {why}. Layouts that load this model (with any -pcp and "
        f"-dp): {layouts}; to shard the KV cache use {PCP_FLAG} (each rank stores 1/(pcp·dcp) of every sequence)"
    )


def validate_model_parallel(
    num_heads: int, num_kv_heads: int, tp: int, dcp: int = 1, intermediate_size: int | None = None
) -> None:
    """Model sizes vs TP/DCP: every rule of ``model_layouts`` at once, so a suggestion never fails later.

    ``num_heads % tp == 0``. With ``tp > num_kv_heads`` each KV head is replicated on ``tp / num_kv_heads`` adjacent
    TP ranks and a DCP group must hold one KV head, so ``tp % num_kv_heads == 0`` and ``dcp | tp / num_kv_heads``;
    with ``tp <= num_kv_heads`` the KV heads are split, so ``num_kv_heads % tp == 0`` and ``dcp == 1`` (DESIGN §3).
    ``intermediate_size`` (the dense MLP's, None when every layer is MoE) must be divisible by ``tp``. Every value
    the message proposes satisfies all of them. Pure: runs on every rank before any collective.
    """
    if num_kv_heads < 1 or num_heads % num_kv_heads != 0:
        raise ValueError(
            f"model has {num_heads} attention heads and {num_kv_heads} KV heads; num_attention_heads must be a "
            f"multiple of num_key_value_heads (check the checkpoint's config.json)"
        )
    layouts = model_layouts(num_heads, num_kv_heads, intermediate_size)
    legal_tp = sorted({t for t, _ in layouts})
    with_dcp = [t for t, d in layouts if d == dcp]
    if not _layout_ok(num_heads, num_kv_heads, intermediate_size, tp, 1):
        problems = []
        if num_heads % tp or not _gqa_ok(num_heads, num_kv_heads, tp, 1):
            problems.append("tp must divide the attention heads, and divide or be a multiple of the KV heads")
        if intermediate_size is not None and intermediate_size % tp:
            problems.append(f"the MLP intermediate size {intermediate_size} is not divisible by {tp}")
        dcp_hint = ""
        if dcp > 1:
            dcp_hint = (f"; with -dcp {dcp}: -tp {_fmt(with_dcp)}" if with_dcp else
                        _no_dcp_note(num_heads, num_kv_heads, intermediate_size, dcp))
        raise ValueError(
            f"{TP_FLAG} {tp} does not fit {_describe(num_heads, num_kv_heads, intermediate_size)} "
            f"({'; '.join(problems)}); legal -tp values: {_fmt(legal_tp)}{dcp_hint}"
        )
    if not _layout_ok(num_heads, num_kv_heads, intermediate_size, tp, dcp):
        legal_dcp = [d for t, d in layouts if t == tp]
        if tp <= num_kv_heads:
            why = f"with -tp {tp} <= {num_kv_heads} KV heads every TP rank holds distinct KV heads"
        else:
            why = f"each KV head is replicated on tp/num_kv_heads = {tp // num_kv_heads} ranks and a DCP group must share one"
        alt = (f"; or keep -dcp {dcp} with -tp {with_dcp[0]}" if with_dcp else
               _no_dcp_note(num_heads, num_kv_heads, intermediate_size, dcp))
        raise ValueError(
            f"{DCP_FLAG} {dcp} is not allowed: {why}; legal -dcp values for -tp {tp}: {_fmt(legal_dcp)}{alt}"
        )


def validate_parallel_config(
    world_size: int | None,
    tp: int = 1,
    pcp: int = 1,
    dcp: int = 1,
    dp: int = 1,
    cp_kv_cache_interleave_size: int = 1,
    block_size: int | None = None,
) -> None:
    """All process-layout checks (world size skipped when ``None``); model checks are ``validate_model_parallel``."""
    validate_sizes(tp, pcp, dcp, dp)
    validate_dcp(tp, dcp)
    if world_size is not None:
        validate_world_size(world_size, tp, pcp, dp)
    validate_kv_interleave(cp_kv_cache_interleave_size, block_size)


@dataclass(frozen=True)
class ParallelConfig:
    """The user's parallel settings (CLI flags of examples/infer_llama.py)."""

    tensor_parallel_size: int = 1
    prefill_context_parallel_size: int = 1
    decode_context_parallel_size: int = 1
    data_parallel_size: int = 1
    enable_expert_parallel: bool = False
    cp_kv_cache_interleave_size: int = 1
    block_size: int | None = None

    @property
    def world_size(self) -> int:
        return self.data_parallel_size * self.prefill_context_parallel_size * self.tensor_parallel_size

    @property
    def cp_world_size(self) -> int:
        """Ranks sharing one sequence's KV cache: ``pcp·dcp``."""
        return self.prefill_context_parallel_size * self.decode_context_parallel_size

    def validate(
        self,
        world_size: int | None = None,
        num_heads: int | None = None,
        num_kv_heads: int | None = None,
        intermediate_size: int | None = None,
    ) -> None:
        """Raise ``ValueError`` on the first problem; model checks run when the head counts are given
        (``intermediate_size``: the dense MLP's, see ``validate_model_parallel``)."""
        validate_parallel_config(
            world_size,
            tp=self.tensor_parallel_size,
            pcp=self.prefill_context_parallel_size,
            dcp=self.decode_context_parallel_size,
            dp=self.data_parallel_size,
            cp_kv_cache_interleave_size=self.cp_kv_cache_interleave_size,
            block_size=self.block_size,
        )
        if num_heads is not None and num_kv_heads is not None:
            validate_model_parallel(
                num_heads, num_kv_heads, self.tensor_parallel_size, self.decode_context_parallel_size, intermediate_size
            )

    def initialize_kwargs(self) -> dict[str, object]:
        """Keyword arguments for ``parallel_state.initialize_model_parallel``."""
        return dict(
            tensor_model_parallel_size=self.tensor_parallel_size,
            prefill_context_parallel_size=self.prefill_context_parallel_size,
            decode_context_parallel_size=self.decode_context_parallel_size,
            data_parallel_size=self.data_parallel_size,
            enable_expert_parallel=self.enable_expert_parallel,
            cp_kv_cache_interleave_size=self.cp_kv_cache_interleave_size,
        )
