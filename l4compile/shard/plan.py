"""Per-rank memory plan of a sharded build: weights, KV cache at the engine's maximum shapes, fits or not.

Computed from the rank graphs' parameters (the shard pass itself, no weights): exact sizes, in
about half a second per rank at full size. Replicated tensors (embeddings, lm_head, norms, router)
count on every rank, so the ranks' weights add up to the unsharded total plus (tp - 1) times the
replicated bytes. The vision encoder of a spec with a vision tower is not split: it counts, whole, on rank 0.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from l4compile.errors import BuildError
from l4compile.inspect import format_bytes
from l4compile.ir.graph import Graph
from l4compile.ir.types import DTYPE_BYTES
from l4compile.spec.model import ModelSpec

H200_BYTES = 141 * 10 ** 9
# The rank that holds the vision encoder of a sharded build (its folder holds vision.onnx); it encodes each
# prompt's images once and every rank's text graph reads the features (l4compile.shard.build).
VISION_RANK = 0


@dataclass
class RankPlan:
    rank: int
    weight_bytes: int              # the rank's text graph
    kv_cache_bytes: int
    kv_heads: int
    vision_bytes: int = 0          # the vision encoder, on rank 0 of a spec with a vision tower

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.vision_bytes + self.kv_cache_bytes


@dataclass
class ShardPlan:
    tp: int
    dtype: str
    max_batch: int
    max_seq: int
    gpu_memory: int | None
    unsharded_weight_bytes: int    # the text model's
    replicated_weight_bytes: int
    ranks: list[RankPlan] = field(default_factory=list)
    vision_weight_bytes: int = 0   # the vision encoder's, whole, on rank 0 (VISION_RANK)

    @property
    def fits(self) -> bool:
        return self.gpu_memory is None or all(r.total_bytes <= self.gpu_memory for r in self.ranks)

    def to_dict(self) -> dict:
        return {**asdict(self), "fits": self.fits}

    def lines(self) -> list[str]:
        gpu = f"{format_bytes(self.gpu_memory)} per GPU" if self.gpu_memory else "no GPU size given"
        out = [f"tp {self.tp} ({self.dtype}; KV cache at batch {self.max_batch} x {self.max_seq} tokens; {gpu}):"]
        for r in self.ranks:
            verdict = "" if self.gpu_memory is None else \
                ("  fits" if r.total_bytes <= self.gpu_memory else "  does NOT fit")
            vision = f" + vision {format_bytes(r.vision_bytes)}" if r.vision_bytes else ""
            out.append(f"  rank {r.rank}: weights {format_bytes(r.weight_bytes):>10}{vision}  KV cache "
                       f"{format_bytes(r.kv_cache_bytes):>10} ({r.kv_heads} KV heads)  total "
                       f"{format_bytes(r.total_bytes):>10}{verdict}")
        total = sum(r.weight_bytes + r.vision_bytes for r in self.ranks)
        vision = f" + vision encoder {format_bytes(self.vision_weight_bytes)} (rank {VISION_RANK} only)" \
            if self.vision_weight_bytes else ""
        out.append(f"  ranks' weights {format_bytes(total)} = unsharded {format_bytes(self.unsharded_weight_bytes)} "
                   f"+ {self.tp - 1} x replicated {format_bytes(self.replicated_weight_bytes)}{vision}")
        return out

    def raise_if_unfit(self) -> None:
        for r in self.ranks:
            if self.gpu_memory is not None and r.total_bytes > self.gpu_memory:
                vision = f" + vision {format_bytes(r.vision_bytes)}" if r.vision_bytes else ""
                raise BuildError(f"--tp {self.tp}: rank {r.rank} needs {format_bytes(r.total_bytes)} (weights "
                                 f"{format_bytes(r.weight_bytes)}{vision} + KV cache "
                                 f"{format_bytes(r.kv_cache_bytes)}) "
                                 f"but a GPU has {format_bytes(self.gpu_memory)}; use more ranks, --quantize, or a "
                                 f"smaller --max-seq/--max-batch")


def weight_bytes(graph: Graph) -> int:
    return sum(p.type.nbytes() for p in graph.params())


def kv_cache_bytes(spec: ModelSpec, kv_heads: int, dtype: str, max_batch: int, max_seq: int) -> int:
    """K and V of every layer at `max_batch` x `max_seq`: chunked layers keep at most one chunk."""
    per_position = 2 * max_batch * kv_heads * spec.attention.head_dim * DTYPE_BYTES[dtype]
    positions = sum(min(spec.attention.chunk_size, max_seq) if layer.attention == "chunked" else max_seq
                    for layer in spec.layers)
    return int(per_position * positions)


def local_kv_heads(spec: ModelSpec, tp: int) -> int:
    return max(1, spec.attention.num_kv_heads // tp)


def vision_weight_bytes(spec: ModelSpec, dtype: str) -> int:
    """The vision encoder's weights (never sharded, never quantized), or 0 for a text-only spec."""
    from l4compile.lower_vision import has_image_input, lower_vision
    return weight_bytes(lower_vision(spec, dtype)) if has_image_input(spec) else 0


def plan(spec: ModelSpec, graphs: list[Graph], unsharded: Graph, dtype: str, max_batch: int, max_seq: int,
         gpu_memory: int | None) -> ShardPlan:
    """The plan of rank graphs (from l4compile.passes.shard) against the unsharded graph; a spec with a
    vision tower adds its encoder, whole, to rank VISION_RANK."""
    tp = len(graphs)
    sliced = {p.name for p in graphs[0].params() if p.derived is not None and p.derived.scheme == "slice"}
    replicated = sum(p.type.nbytes() for p in unsharded.params() if p.name not in sliced)
    kv_heads = local_kv_heads(spec, tp)
    kv_dtype = "float16" if dtype == "float16" else ("bfloat16" if dtype == "bfloat16" else "float32")
    vision = vision_weight_bytes(spec, dtype)
    ranks = [RankPlan(r, weight_bytes(g), kv_cache_bytes(spec, kv_heads, kv_dtype, max_batch, max_seq), kv_heads,
                      vision if r == VISION_RANK else 0)
             for r, g in enumerate(graphs)]
    return ShardPlan(tp, dtype, max_batch, max_seq, gpu_memory, weight_bytes(unsharded), replicated, ranks, vision)


def plan_spec(spec: ModelSpec, tp: int, dtype: str = "bfloat16", max_batch: int = 1, max_seq: int | None = None,
              gpu_memory: int | None = H200_BYTES) -> ShardPlan:
    """`inspect --tp`: the straight lowering split by the shard pass, rank by rank (weights in `dtype`)."""
    from l4compile.lower import lower
    from l4compile.passes.shard import Shard
    max_seq = max_seq or min(spec.max_position_embeddings, _default_max_seq())
    graphs = []
    for rank in range(tp):
        graph = lower(spec, dtype)
        Shard(tp, rank).run(graph)
        graphs.append(graph)
    return plan(spec, graphs, lower(spec, dtype), dtype, max_batch, max_seq, gpu_memory)


def _default_max_seq() -> int:
    from l4compile.trt.profiles import DEFAULT_MAX_SEQ
    return DEFAULT_MAX_SEQ
