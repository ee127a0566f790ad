"""DeepSeek-V2/V3's MoE block: ``MoELayer`` with DeepSeek's router and always-on shared experts (DESIGN §3b, §4).

    out = Σ_k w_k · expert_{id_k}(x) + shared_experts(x)        (deepseek_route for (w, id); no shared gate)

What differs from Mixtral / Qwen2-MoE, all else (TP-sharded or expert-parallel experts over the flattened
``dp·pcp·tp`` group, tokens gathered over PCP/DP before the experts and reduce-scattered after) is ``MoELayer``'s:

- The router runs in float32 whatever the model's dtype: ``router_weight`` [E, H] and V3's
  ``e_score_correction_bias`` [E] are made float32 and stay so (also through ``.to(bfloat16)``: ``_apply``), and
  the logits are ``x.float() @ router_weight.T``. They are
  computed on every rank from the gathered tokens (``LOGITS_TRAVEL_WITH_TOKENS = False``): sending float32 logits
  beside bf16 tokens would need a second gather or a float32 payload, while the router is ~E/(3·k·I) of the
  experts' work. Values are the same either way (each token's logits come from the same row and weights).
- ``n_shared_experts`` shared experts are one SwiGLU of ``n_shared_experts · moe_intermediate_size`` applied to every
  token, sharded over the intermediate dimension of the flattened group like Qwen2-MoE's shared expert (each rank's
  slice is part of the partial sum the reduce-scatter adds up: no collective of its own), without a gate.
- Checkpoint names: ``gate.weight``, ``gate.e_score_correction_bias`` (V3), ``shared_experts.{gate,up,down}_proj
  .weight``, experts per expert or fused (``MoELayer.load_weight``).

The first ``first_k_dense_replace`` layers (and those off ``moe_layer_freq``) are dense MLPs: not this module.
Gradients: the bias is a buffer (no gradient, as in transformers); the rest as ``MoELayer``'s.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from megacp.moe.config import MoEParallelConfig
from megacp.moe.layer import MoELayer
from megacp.moe.routing import RouterSpec, deepseek_route
from megacp.parallel_state import ParallelContext
from megacp.weights import load_shard


class DeepseekMoE(MoELayer):
    """``forward(hidden [T, H]) -> [T, H]``, a collective over the expert group like ``MoELayer``'s.

    ``router``: the routing (``RouterSpec.from_config(model_config)``); ``shared_intermediate_size``:
    ``n_shared_experts · moe_intermediate_size`` (0/None: no shared experts). Parameters as ``MoELayer``'s (no
    ``shared_gate_weight``), ``router_weight`` float32, plus the float32 buffer ``e_score_correction_bias`` [E] when
    ``router.topk_method == "noaux_tc"``.
    """

    SHARED_PREFIX = "shared_experts"
    LOGITS_TRAVEL_WITH_TOKENS = False  # float32 logits, computed from the gathered tokens (module docstring)

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        router: RouterSpec,
        shared_intermediate_size: int | None = None,
        parallel_config: MoEParallelConfig | None = None,
        placement: str = "linear",
        params_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        parallel_context: ParallelContext | None = None,
    ):
        super().__init__(hidden_size, intermediate_size, router.num_experts, router.top_k, router.norm_topk_prob,
                         shared_intermediate_size or None, parallel_config, placement, params_dtype, device,
                         parallel_context, shared_expert_gate=False)
        self.router = router
        groups = self.router_weight.grad_reduce_groups
        self.router_weight = torch.nn.Parameter(
            torch.empty(router.num_experts, hidden_size, dtype=torch.float32, device=device))
        self.router_weight.grad_reduce_groups = groups
        if router.biased:
            self.register_buffer("e_score_correction_bias",
                                 torch.zeros(router.num_experts, dtype=torch.float32, device=device))
        else:
            self.e_score_correction_bias = None

    @classmethod
    def from_config(
        cls,
        config: Any,
        parallel_config: MoEParallelConfig | None = None,
        params_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        placement: str = "linear",
        parallel_context: ParallelContext | None = None,
    ) -> "DeepseekMoE":
        """The MoE block of a DeepSeek ``megacp.models.config.ModelConfig`` (one of its ``moe_layers``);
        ``parallel_config=None``: ``MoEParallelConfig.make`` of the resolved ``parallel_context``."""
        if not config.model_type.startswith("deepseek"):
            raise ValueError(f"DeepseekMoE.from_config: model_type {config.model_type!r} is not a DeepSeek model; "
                             f"its MoE layers are MoELayer's")
        return cls(config.hidden_size, config.moe_intermediate_size, RouterSpec.from_config(config),
                   config.shared_expert_intermediate_size, parallel_config, placement, params_dtype, device,
                   parallel_context)

    def _apply(self, fn: Any, recurse: bool = True) -> "DeepseekMoE":
        """``.to(bfloat16)``, ``.half()``, ``.cuda()``...: the router weight and bias follow the device, never the
        dtype (transformers' ``_keep_in_fp32_modules_strict``): their float32 values are kept, not rounded."""
        router, bias = self.router_weight.data, self.e_score_correction_bias
        super()._apply(fn, recurse)
        self.router_weight.data = router.to(self.router_weight.device, torch.float32)
        if bias is not None:
            self.e_score_correction_bias = bias.to(self.e_score_correction_bias.device, torch.float32)
        return self

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, H] (any dtype) -> float32 logits [N, E] (transformers: ``F.linear(x.float(), weight.float())``)."""
        return F.linear(x.float(), self.router_weight.float())

    def select_experts(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bias = self.e_score_correction_bias
        return deepseek_route(router_logits, self.router, None if bias is None else bias.float())

    # ------------------------------------------------------------------------------------------- loading
    def _named_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = super()._named_shapes()
        if self.router.biased:
            shapes["gate.e_score_correction_bias"] = (self.num_experts,)
        return shapes

    def load_weight(self, name: str, weight: Any) -> bool:
        """``MoELayer.load_weight`` plus ``gate.e_score_correction_bias`` [E] (V3); ``shared_experts.*`` names."""
        if name == "gate.e_score_correction_bias":
            load_shard(self.e_score_correction_bias, weight, (slice(None),), self.checkpoint_shape(name))
            return True
        return super().load_weight(name, weight)
