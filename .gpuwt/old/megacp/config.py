"""Parallel configuration and every check of the parallel layout against itself, the world and the model.

Each ``validate_*`` function checks one concern and raises ``ValueError`` with one actionable message that names the
Python arguments involved (``initialize_model_parallel``'s and ``ParallelConfig``'s names, e.g.
``tensor_model_parallel_size=3``) and proposes a valid alternative computed from the numbers given. They are pure, so
every rank runs them before any collective and a bad configuration fails fast everywhere. ``ParallelConfig`` is the
validated layout: constructing one runs the checks that need nothing else, ``check_world_size`` / ``check_model`` the
ones that need the world or the model. A command line maps the argument names to its flags (``name=value`` ->
``--flag value``; examples/infer_llama.py's ``cli_message``). Checks of single user values and of requests are
elsewhere: ``megacp.checks`` (scalars, token ids, memory) and ``megacp.session`` (requests against a KV cache).
``kv_head_layout`` is the one statement of which KV heads a TP rank holds (DESIGN §3 GQA).
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass

TP = "tensor_model_parallel_size"
PCP = "prefill_context_parallel_size"
DCP = "decode_context_parallel_size"
DP = "data_parallel_size"
INTERLEAVE = "cp_kv_cache_interleave_size"
BLOCK_SIZE = "block_size"
WORLD_SIZE = "world_size"


def launched_by_torchrun() -> bool:
    """Whether a launcher (torchrun, or anything that sets its environment) started this process."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


@functools.cache
def debug_checks() -> bool:
    """``MEGACP_DEBUG_CHECKS=1``: also run the index checks that cost a device sync on CUDA (on CPU they always run).

    Read once per process, at the first check that asks (steps ask it on CUDA: the environment is not read per step).
    The checks are host-side and run no collective, so ranks need not agree on it."""
    return os.environ.get("MEGACP_DEBUG_CHECKS") == "1"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _fmt(values: list[int]) -> str:
    return ", ".join(str(v) for v in values)


def validate_sizes(tp: int = 1, pcp: int = 1, dcp: int = 1, dp: int = 1) -> None:
    """Every parallel size is an integer >= 1."""
    for name, value in ((TP, tp), (PCP, pcp), (DCP, dcp), (DP, dp)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}; use {name}=1 to disable it")


def validate_world_size(world_size: int, tp: int = 1, pcp: int = 1, dp: int = 1, launched: bool = True) -> None:
    """``world_size == dp·pcp·tp`` (pipeline parallel is 1; DCP reuses TP ranks and adds none).

    ``launched=False``: this is a plain ``python`` process that no launcher started (world size 1); the message
    then says to start the processes with torchrun.
    """
    expected = dp * pcp * tp
    if world_size == expected:
        return
    if world_size < 1:
        raise ValueError(f"{WORLD_SIZE} must be >= 1, got {world_size} (the number of ranks started)")
    sizes = f"dp·pcp·tp = {dp}·{pcp}·{tp} = {expected} ({DP}={dp}, {PCP}={pcp}, {TP}={tp})"
    plain = world_size == 1 and not launched
    if plain:  # not started by a launcher: say which one, and how
        script = sys.argv[0] if sys.argv and sys.argv[0].endswith(".py") else "your_script.py"
        fixes = [f"start {expected} processes with torchrun --nproc-per-node {expected} {script} ..."]
    else:
        fixes = [f"launch with {WORLD_SIZE}={expected}"]
    if world_size % (dp * pcp) == 0:
        fixes.append(f"use {TP}={world_size // (dp * pcp)}")
    if world_size % (dp * tp) == 0:
        fixes.append(f"use {PCP}={world_size // (dp * tp)}")
    head = f"this is one plain python process but {sizes}" if plain else f"{WORLD_SIZE}={world_size} but {sizes}"
    raise ValueError(f"{head}; {', or '.join(fixes)} (the product of the three sizes must be the world size)")


def validate_dcp(tp: int, dcp: int) -> None:
    """DCP groups are contiguous runs inside a TP group, so ``dcp`` must divide ``tp``."""
    if tp % dcp != 0:
        raise ValueError(
            f"{DCP}={dcp} must divide {TP}={tp} (DCP reuses the TP ranks); "
            f"legal {DCP} values for {TP}={tp}: {_fmt(_divisors(tp))}"
        )


def validate_kv_interleave(interleave: int, block_size: int | None = None) -> None:
    """``1 <= interleave <= block_size`` and ``block_size % interleave == 0`` (DESIGN §2)."""
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"{BLOCK_SIZE} must be an integer >= 1, got {block_size!r}; e.g. {BLOCK_SIZE}=16")
    if isinstance(interleave, bool) or not isinstance(interleave, int) or interleave < 1:
        hint = f"legal values for {BLOCK_SIZE}={block_size}: {_fmt(_divisors(block_size))}" if block_size else "e.g. 1"
        raise ValueError(f"{INTERLEAVE} must be an integer >= 1, got {interleave!r}; {hint}")
    if block_size is None:
        return
    if interleave > block_size or block_size % interleave != 0:
        raise ValueError(
            f"{INTERLEAVE}={interleave} must divide {BLOCK_SIZE}={block_size} (1 <= interleave <= block size); "
            f"legal values: {_fmt(_divisors(block_size))}, or raise {BLOCK_SIZE} to a multiple of {interleave}"
        )


def validate_moe_data_parallel(is_moe: bool, dp: int) -> None:
    """Data-parallel replicas run independent schedules, which MoE layers cannot follow: they gather tokens over all
    dp·pcp·tp ranks in every step, so every replica would have to step in lock-step (inference engines only)."""
    if is_moe and dp > 1:
        raise ValueError(
            f"{DP}={dp} is not supported for MoE models (their expert layers gather tokens over all dp·pcp·tp ranks "
            f"every step, and data-parallel replicas run different steps); use {DP}=1 and put the ranks into "
            f"{TP} / {PCP} instead"
        )


def _gqa_ok(num_heads: int, num_kv_heads: int, tp: int, dcp: int) -> bool:
    if num_heads % tp != 0:
        return False
    if tp > num_kv_heads:
        return tp % num_kv_heads == 0 and (tp // num_kv_heads) % dcp == 0
    return num_kv_heads % tp == 0 and dcp == 1


def _layout_ok(num_heads: int, num_kv_heads: int, intermediate_size: int | None, tp: int, dcp: int) -> bool:
    return _gqa_ok(num_heads, num_kv_heads, tp, dcp) and (intermediate_size is None or intermediate_size % tp == 0)


def model_layouts(num_heads: int, num_kv_heads: int, intermediate_size: int | None = None,
                  mla: bool = False) -> list[tuple[int, int]]:
    """Every ``(tp, dcp)`` under which a model with these sizes loads, for any ``pcp`` and ``dp``; sorted.

    The rules, all at once: ``tp`` divides the attention heads; it divides the KV heads (then ``dcp = 1``) or is a
    multiple of them with ``dcp | tp / num_kv_heads`` (DESIGN §3 GQA); it divides the dense MLP's
    ``intermediate_size`` (None: the model has no dense MLP layer; MoE experts split unevenly, so they add no rule).
    The vocabulary adds none either: it is padded to a multiple of ``tp``. ``mla`` (multi-head latent attention,
    DESIGN §3b): one latent row per token that every TP rank needs, so ``num_kv_heads`` adds no rule and any
    ``dcp | tp`` shards it.
    """
    if mla:
        return [(t, d) for t in _divisors(num_heads) for d in _divisors(t)
                if intermediate_size is None or intermediate_size % t == 0]
    return [
        (t, d)
        for t in _divisors(num_heads)
        for d in _divisors(t)
        if _layout_ok(num_heads, num_kv_heads, intermediate_size, t, d)
    ]


def _validate_mla_parallel(num_heads: int, tp: int, dcp: int, intermediate_size: int | None) -> None:
    """MLA: ``tp`` divides the heads and the dense MLP size, ``dcp`` divides ``tp`` (the only DCP rule)."""
    legal_tp = sorted({t for t, _ in model_layouts(num_heads, 1, intermediate_size, mla=True)})
    problems = []
    if num_heads % tp:
        problems.append(f"the {num_heads} attention heads (num_attention_heads) are not divisible by {tp}")
    if intermediate_size is not None and intermediate_size % tp:
        problems.append(f"the dense MLP intermediate size {intermediate_size} (intermediate_size) is not divisible "
                        f"by {tp}")
    if tp % dcp:
        problems.append(f"{DCP}={dcp} does not divide {TP}={tp} (DCP reuses the TP ranks)")
    if not problems:
        return
    # The example: this tp when it is legal, else the largest legal tp below it (1 always is).
    t = tp if tp in legal_tp else max(v for v in legal_tp if v <= tp)
    mlp = f" and dense MLP intermediate size {intermediate_size}" if intermediate_size is not None else ""
    raise ValueError(
        f"{TP}={tp} with {DCP}={dcp} does not fit a multi-head latent attention model with {num_heads} attention "
        f"heads{mlp} ({'; '.join(problems)}); MLA layouts (with any {PCP} and {DP}): legal {TP} values: "
        f"{_fmt(legal_tp)}, each with any {DCP} that divides it (legal {DCP} values for {TP}={t}: "
        f"{_fmt(_divisors(t))})" + (f"; e.g. {TP}={t} {DCP}={t} shards the latent cache over all {t} TP ranks"
                                     if t > 1 else "")
    )


def _describe(num_heads: int, num_kv_heads: int, intermediate_size: int | None) -> str:
    mlp = f" and MLP intermediate size {intermediate_size}" if intermediate_size is not None else ""
    return f"a model with {num_heads} attention heads, {num_kv_heads} KV heads{mlp}"


def _no_dcp_note(num_heads: int, num_kv_heads: int, intermediate_size: int | None, dcp: int) -> str:
    """Why no ``tp`` allows ``dcp`` (called only then), the layouts that do load, and the way to shard the KV cache."""
    gqa_only = [t for t in _divisors(num_heads) if t > num_kv_heads and _gqa_ok(num_heads, num_kv_heads, t, dcp)]
    if gqa_only:
        why = (f"{TP} in ({_fmt(gqa_only)}) would let DCP groups of {dcp} ranks share a KV head, but does not "
               f"divide the MLP intermediate size {intermediate_size}")
    else:
        why = (f"DCP needs {TP} to be a multiple of the {num_kv_heads} KV heads, with tp/{num_kv_heads} divisible "
               f"by the DCP size, that divides the {num_heads} attention heads; there is none")
    layouts = ", ".join(f"({TP}={t}, {DCP}={d})" for t, d in model_layouts(num_heads, num_kv_heads, intermediate_size))
    return (
        f"; no layout of this model allows {DCP}={dcp}: {why}. Layouts that load this model (with any {PCP} and "
        f"{DP}): {layouts}; to shard the KV cache use {PCP} (each rank stores 1/(pcp·dcp) of every sequence)"
    )


def validate_model_parallel(
    num_heads: int, num_kv_heads: int, tp: int, dcp: int = 1, intermediate_size: int | None = None, mla: bool = False
) -> None:
    """Model sizes vs TP/DCP: every rule of ``model_layouts`` at once, so a suggestion never fails later.

    ``num_heads % tp == 0``. With ``tp > num_kv_heads`` each KV head is replicated on ``tp / num_kv_heads`` adjacent
    TP ranks and a DCP group must hold one KV head, so ``tp % num_kv_heads == 0`` and ``dcp | tp / num_kv_heads``;
    with ``tp <= num_kv_heads`` the KV heads are split, so ``num_kv_heads % tp == 0`` and ``dcp == 1`` (DESIGN §3).
    ``intermediate_size`` (the dense MLP's, None when every layer is MoE) must be divisible by ``tp``. Every value
    the message proposes satisfies all of them. Pure: runs on every rank before any collective.
    ``mla``: multi-head latent attention (DESIGN §3b): heads and dense MLP divisible by ``tp``, ``tp % dcp == 0``;
    the message lists the MLA layouts.
    """
    if mla:
        _validate_mla_parallel(num_heads, tp, dcp, intermediate_size)
        return
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
            dcp_hint = (f"; with {DCP}={dcp}, legal {TP} values: {_fmt(with_dcp)}" if with_dcp else
                        _no_dcp_note(num_heads, num_kv_heads, intermediate_size, dcp))
        raise ValueError(
            f"{TP}={tp} does not fit {_describe(num_heads, num_kv_heads, intermediate_size)} "
            f"({'; '.join(problems)}); legal {TP} values: {_fmt(legal_tp)}{dcp_hint}"
        )
    if not _layout_ok(num_heads, num_kv_heads, intermediate_size, tp, dcp):
        legal_dcp = [d for t, d in layouts if t == tp]
        if tp <= num_kv_heads:
            why = f"with {TP}={tp} <= {num_kv_heads} KV heads every TP rank holds distinct KV heads"
        else:
            why = f"each KV head is replicated on tp/num_kv_heads = {tp // num_kv_heads} ranks and a DCP group must share one"
        alt = (f"; or keep {DCP}={dcp} with {TP}={with_dcp[0]}" if with_dcp else
               _no_dcp_note(num_heads, num_kv_heads, intermediate_size, dcp))
        raise ValueError(
            f"{DCP}={dcp} is not allowed: {why}; legal {DCP} values for {TP}={tp}: {_fmt(legal_dcp)}{alt}"
        )


@dataclass(frozen=True)
class ParallelConfig:
    """The parallel layout, validated when it is made (the arguments of ``initialize_model_parallel``).

    Construction checks everything that needs no more information (sizes, ``dcp | tp``, the KV interleave against
    ``block_size`` when given) and raises ``ValueError``; ``check_world_size`` and ``check_model`` add the checks
    that need the world size or the model. ``initialize_model_parallel`` builds one (``parallel_state
    .get_parallel_config()``), ``load_model`` runs ``check_model`` on it.
    """

    tensor_model_parallel_size: int = 1
    prefill_context_parallel_size: int = 1
    decode_context_parallel_size: int = 1
    data_parallel_size: int = 1
    enable_expert_parallel: bool = False
    cp_kv_cache_interleave_size: int = 1
    block_size: int | None = None

    def __post_init__(self) -> None:
        validate_sizes(self.tensor_model_parallel_size, self.prefill_context_parallel_size,
                       self.decode_context_parallel_size, self.data_parallel_size)
        validate_dcp(self.tensor_model_parallel_size, self.decode_context_parallel_size)
        validate_kv_interleave(self.cp_kv_cache_interleave_size, self.block_size)
        if not isinstance(self.enable_expert_parallel, bool):
            raise ValueError(f"enable_expert_parallel must be True or False, got {self.enable_expert_parallel!r}")

    @property
    def world_size(self) -> int:
        return self.data_parallel_size * self.prefill_context_parallel_size * self.tensor_model_parallel_size

    @property
    def cp_world_size(self) -> int:
        """Ranks sharing one sequence's KV cache: ``pcp·dcp``."""
        return self.prefill_context_parallel_size * self.decode_context_parallel_size

    def check_world_size(self, world_size: int, launched: bool = True) -> None:
        """``world_size == dp·pcp·tp`` (``launched``: see ``validate_world_size``)."""
        validate_world_size(world_size, self.tensor_model_parallel_size, self.prefill_context_parallel_size,
                            self.data_parallel_size, launched)

    def check_model(self, num_heads: int, num_kv_heads: int, intermediate_size: int | None = None,
                    is_moe: bool = False, mla: bool = False) -> None:
        """The model's sizes against this layout (``validate_model_parallel``: heads, KV heads / GQA and DCP, the
        dense MLP's ``intermediate_size``, or the MLA rules with ``mla``) and, for MoE models,
        ``data_parallel_size == 1``."""
        validate_model_parallel(num_heads, num_kv_heads, self.tensor_model_parallel_size,
                                self.decode_context_parallel_size, intermediate_size, mla)
        validate_moe_data_parallel(is_moe, self.data_parallel_size)

    def validate(self, world_size: int | None = None, num_heads: int | None = None, num_kv_heads: int | None = None,
                 intermediate_size: int | None = None, is_moe: bool = False, mla: bool = False) -> None:
        """``check_world_size`` when ``world_size`` is given, ``check_model`` when the head counts are."""
        if world_size is not None:
            self.check_world_size(world_size)
        if num_heads is not None and num_kv_heads is not None:
            self.check_model(num_heads, num_kv_heads, intermediate_size, is_moe, mla)

    def initialize_kwargs(self) -> dict[str, object]:
        """Keyword arguments for ``parallel_state.initialize_model_parallel``."""
        return dict(
            tensor_model_parallel_size=self.tensor_model_parallel_size,
            prefill_context_parallel_size=self.prefill_context_parallel_size,
            decode_context_parallel_size=self.decode_context_parallel_size,
            data_parallel_size=self.data_parallel_size,
            enable_expert_parallel=self.enable_expert_parallel,
            cp_kv_cache_interleave_size=self.cp_kv_cache_interleave_size,
        )


def kv_head_layout(num_kv_heads: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """``(num_local_kv_heads, first_kv_head)`` of a TP rank.

    tp ≤ num_kv_heads: KV heads are split evenly. tp > num_kv_heads: each rank holds one KV head, replicated on
    ``tp / num_kv_heads`` adjacent ranks (DESIGN §3 GQA), so rank r holds head ``r // (tp / num_kv_heads)``.
    The sizes must pass ``megacp.config.validate_model_parallel`` (``QKVParallelLinear`` checks them).
    """
    if tp_size <= num_kv_heads:
        n = num_kv_heads // tp_size
        return n, tp_rank * n
    return 1, tp_rank // (tp_size // num_kv_heads)
