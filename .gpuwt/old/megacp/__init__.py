"""megacp: context parallelism (PCP prefill, DCP decode) for LLM inference.

The entry points::

    megacp.parallel_state            # initialize_model_parallel(...), the groups, allreduce_grads
    megacp.initialize_model_parallel, megacp.destroy_model_parallel, megacp.allreduce_grads
    megacp.ParallelContext           # one rank's layout (groups, sizes, ranks), what every constructor takes
    megacp.ParallelConfig            # the validated layout (tp, pcp, dcp, dp, interleave)
    megacp.KVSession                 # per-rank paged KV cache of a set of requests; step() -> AttentionMetadata
    megacp.AttentionMetadata, megacp.build_attention_metadata
    megacp.LLMEngine, megacp.SamplingParams, megacp.load_model

The layers a model is built from are in ``megacp.layers`` (and ``megacp.moe``).
"""

from megacp import parallel_state
from megacp.config import ParallelConfig
from megacp.engine import LLMEngine
from megacp.layers.cp_metadata import AttentionMetadata
from megacp.layers.metadata_builder import build_attention_metadata
from megacp.models.loader import load_model
from megacp.parallel_state import ParallelContext, allreduce_grads, destroy_model_parallel, initialize_model_parallel
from megacp.sampling import SamplingParams
from megacp.session import KVSession

__version__ = "0.1.0"

__all__ = [
    "AttentionMetadata",
    "KVSession",
    "LLMEngine",
    "ParallelConfig",
    "ParallelContext",
    "SamplingParams",
    "allreduce_grads",
    "build_attention_metadata",
    "destroy_model_parallel",
    "initialize_model_parallel",
    "load_model",
    "parallel_state",
]
