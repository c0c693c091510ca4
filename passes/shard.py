"""Tensor and expert parallelism: one graph becomes rank `rank`'s part of a `tp`-way split.

    linear(x, q|k|v_proj)         -> linear(x, the rank's block of heads' columns)        (column-parallel)
    linear(h, o_proj)             -> all_reduce(linear(h, the rank's rows))               (row-parallel)
    gate/up_proj, down_proj       -> the same, column then row, for dense and shared-expert MLPs
    moe_dispatch(x, l, gu, d)     -> moe_dispatch(x, l, gu[block], d[block], expert_offset=block start)
    embeddings, norms, router, lm_head: replicated (every rank holds them whole)

Which parameter splits how is data (`RULES`, by the lowering's parameter names, the same names the
checkpoint mapping binds). A sharded parameter keeps its name and becomes a slice of the full one
(`Derived(source=full, scheme="slice")`), so weights stream per rank straight from the checkpoint.
KV heads split in blocks when `tp` divides them and are replicated (each rank keeps the one head its
query heads read) when `tp` is a multiple of them. Experts go in contiguous blocks: each rank runs its
own experts for the tokens routed to them (the router is replicated, so every rank selects the same).

Collectives follow from a propagation of each value's state, R (replicated), S (split: this rank's
heads or columns) or P (partial: a sum over ranks): an all_reduce is inserted where a P value meets
anything but another P value (the residual adds, once per attention and per FFN block: the shared
expert's and the routed experts' partial sums are added before the one all_reduce). An op that
would read S values it cannot compute per rank refuses the split, naming the node.

Refuses: heads, intermediate sizes or experts that `tp` does not divide; KV heads that neither
divide nor are divided by `tp`. After it: the graph is rank `rank`'s, with `all_reduce` nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

from l4compile.errors import PassError
from l4compile.ir.graph import Graph, Value
from l4compile.ir.op import get_op
from l4compile.passes.base import Pass, PassResult
from l4compile.weights.derived import Derived

# parameter-name suffix -> (what it is split by, axis). IR linear weights are [in, out].
RULES: tuple[tuple[str, str, int], ...] = (
    (".self_attn.q_proj", "heads", 1), (".self_attn.k_proj", "kv_heads", 1), (".self_attn.v_proj", "kv_heads", 1),
    (".self_attn.o_proj", "heads", 0),
    (".gate_proj", "columns", 1), (".up_proj", "columns", 1), (".down_proj", "columns", 0),
    ("experts.gate_up_proj", "experts", 0), ("experts.down_proj", "experts", 0),
)
# Ops that compute each head / column / expert block on its own: split inputs give split outputs.
LOCAL_OPS = frozenset({"split_heads", "rope", "l2_norm", "transpose", "kv_concat", "attention", "chunked_attention",
                       "blocked_attention", "silu_mul", "cast", "mul", "add"})
SHAPE_ONLY_OPS = frozenset({"key_positions"})   # read a cache's length, not its values
R, S, P = "replicated", "split", "partial"


@dataclass(frozen=True)
class Geometry:
    """What the split needs to know of the model, read from the graph."""

    heads: int
    kv_heads: int
    head_dim: int


@dataclass
class Shard(Pass):
    """Rank `rank` of a `tp`-way tensor/expert-parallel split (see the module docstring)."""

    tp: int = 1
    rank: int = 0

    name = "shard"
    description = "tensor/expert parallelism: this rank's heads, columns and experts, all_reduce where ranks meet"

    def __post_init__(self) -> None:
        if self.tp < 1 or not 0 <= self.rank < self.tp:
            raise PassError(f"pass {self.name}: rank {self.rank} of tp {self.tp} is not a rank")

    def run(self, graph: Graph) -> PassResult:
        if self.tp == 1:
            return PassResult(False)
        geometry = read_geometry(graph)
        check_split(geometry, self.tp, _inner_sizes(graph), _expert_counts(graph))
        sliced = self._slice_params(graph, geometry)
        self._retarget_nodes(graph, geometry)
        reduces = self._place_collectives(graph, sliced, geometry)
        retype(graph)
        graph.metadata["l4compile.shard"] = f"rank {self.rank} of {self.tp}"
        return PassResult(True, {"sliced_params": len(sliced), "all_reduce": reduces})

    # ---- parameters ---------------------------------------------------------------------------
    def block(self, kind: str, geometry: Geometry, size: int) -> tuple[int, int]:
        """[start, stop) of this rank along an axis of `size` elements split by `kind`."""
        tp, r = self.tp, self.rank
        if kind == "kv_heads":
            heads, d = geometry.kv_heads, geometry.head_dim
            if heads % tp == 0:
                n = heads // tp
                return r * n * d, (r + 1) * n * d
            head = r // (tp // heads)       # replicated: the KV head this rank's query heads read
            return head * d, (head + 1) * d
        n = size // tp
        return r * n, (r + 1) * n

    def _slice_params(self, graph: Graph, geometry: Geometry) -> dict[str, str]:
        sliced = {}
        for param in graph.params():
            rule = next(((kind, axis) for suffix, kind, axis in RULES if param.name.endswith(suffix)), None)
            if rule is None:
                continue
            kind, axis = rule
            start, stop = self.block(kind, geometry, param.type.shape[axis])
            shape = list(param.type.shape)
            shape[axis] = stop - start
            part = Value(param.name, param.type.with_shape(tuple(shape)), "param", init=param.init,
                         derived=Derived(param, "slice", "slice", (("axis", axis), ("start", start), ("stop", stop))))
            graph.values[param.name] = part
            sliced[param.name] = kind
        return sliced

    def _retarget_nodes(self, graph: Graph, geometry: Geometry) -> None:
        """Attributes that name sizes: heads per rank, the first expert of the rank's block."""
        local_kv = max(1, geometry.kv_heads // self.tp)
        for node in graph.nodes.values():
            if node.op == "split_heads":
                heads = node.attrs["num_heads"]
                node.attrs["num_heads"] = heads // self.tp if heads == geometry.heads else local_kv
            elif node.op in ("moe_dispatch", "moe_experts", "moe_dispatch_nbits", "moe_experts_nbits"):
                experts = graph.values[node.inputs[2]].derived
                if experts is not None:
                    node.attrs["expert_offset"] = dict(experts.options)["start"]
        for name in _cache_inputs(graph):
            t = graph.values[name].type     # [positions, batch, kv_heads, head_dim]
            graph.values[name].type = t.with_shape(t.shape[:2] + (local_kv,) + t.shape[3:])

    # ---- collectives --------------------------------------------------------------------------
    def _place_collectives(self, graph: Graph, sliced: dict[str, str], geometry: Geometry) -> int:
        cached = _cache_inputs(graph)
        state: dict[str, str] = {name: S if name in cached else R for name in graph.inputs}
        for name, kind in sliced.items():
            state[name] = S
        reduced: dict[str, str] = {}

        def reduce(node, i: int) -> None:
            value = node.inputs[i]
            if value not in reduced:
                reduced[value] = graph.op("all_reduce", [value], name=f"{value}.all_reduce", ranks=self.tp)
                state[reduced[value]] = R
            _rewire(graph, node, i, reduced[value])

        for node in list(graph.topo_nodes()):
            ins = [state.get(v, R) for v in node.inputs]
            out = self._rule(graph, node, ins, sliced)
            if out is None:   # P meets something other than P: reduce it first
                for i, s in enumerate(ins):
                    if s == P:
                        reduce(node, i)
                ins = [state.get(v, R) for v in node.inputs]
                out = self._rule(graph, node, ins, sliced)
            if out is None:
                bad = next(v for v, s in zip(node.inputs, ins) if s == S)
                raise PassError(f"pass shard: node {node.name!r} ({node.op}) reads {bad!r}, which is split "
                                f"across ranks, and cannot compute it per rank")
            for v in node.outputs:
                state[v] = out
        for i, v in enumerate(graph.outputs):
            if state[v] == P:
                ar = reduced.get(v) or graph.op("all_reduce", [v], name=f"{v}.all_reduce", ranks=self.tp)
                graph.outputs[i] = ar
        return sum(1 for n in graph.nodes.values() if n.op == "all_reduce")

    @staticmethod
    def _rule(graph: Graph, node, ins: list[str], sliced: dict[str, str]) -> str | None:
        """The output state of `node` from its inputs' states, or None where a P input must be reduced first."""
        if node.op in SHAPE_ONLY_OPS:
            return R
        if node.op == "linear":
            x, w = ins
            if w == R:
                return R if x == R else None
            kind_axis = next((axis for suffix, _, axis in RULES if node.inputs[1].endswith(suffix)), None)
            if kind_axis == 1 and x == R:
                return S
            if kind_axis == 0 and x == S:
                return P
            return None
        if node.op.startswith(("moe_dispatch", "moe_experts")):
            experts = ins[2]
            if ins[0] != R or ins[1] != R:
                return None
            return P if experts == S else R
        if node.op == "add" and ins == [P, P]:
            return P
        if P in ins:
            return None
        if S in ins:
            return S if node.op in LOCAL_OPS else None
        return R


def _cache_inputs(graph: Graph) -> set[str]:
    """Graph inputs that are a layer's cached keys or values (rank-local: this rank's KV heads)."""
    return {n.inputs[0] for n in graph.nodes.values() if n.op == "kv_concat" and n.inputs[0] in graph.inputs}


def _rewire(graph: Graph, node, i: int, new: str) -> None:
    old = node.inputs[i]
    node.inputs[i] = new
    graph.nx.add_edge(graph.values[new].producer, node.name)
    producer = graph.values[old].producer
    if producer is not None and not any(graph.values[v].producer == producer for v in node.inputs):
        graph.nx.remove_edge(producer, node.name)


def retype(graph: Graph) -> None:
    """Re-infer every node's output types in order (after parameters and attributes changed)."""
    for node in graph.topo_nodes():
        types = get_op(node.op).infer([graph.values[v].type for v in node.inputs], node.attrs)
        for out, t in zip(node.outputs, types):
            graph.values[out].type = t


def read_geometry(graph: Graph) -> Geometry:
    """Heads, KV heads and head size, from the split_heads of the first layer's q and k projections."""
    found: dict[str, tuple[int, int]] = {}
    for node in graph.nodes.values():
        if node.op != "linear":
            continue
        for suffix in (".self_attn.q_proj", ".self_attn.k_proj"):
            if node.inputs[1].endswith(suffix) and suffix not in found:
                split = next((u for u in graph.users(node.outputs[0]) if u.op == "split_heads"), None)
                if split is not None:
                    found[suffix] = (split.attrs["num_heads"], split.attrs["head_dim"])
    if len(found) < 2:
        raise PassError("pass shard: no attention projections (q_proj, k_proj) found to split by heads")
    (heads, head_dim), (kv_heads, _) = found[".self_attn.q_proj"], found[".self_attn.k_proj"]
    return Geometry(heads, kv_heads, head_dim)


def _inner_sizes(graph: Graph) -> dict[str, int]:
    return {p.name: p.type.shape[1] for p in graph.params() if p.name.endswith((".gate_proj", ".up_proj"))}


def _expert_counts(graph: Graph) -> dict[str, int]:
    return {p.name: p.type.shape[0] for p in graph.params() if p.name.endswith("experts.gate_up_proj")}


def check_split(geometry: Geometry, tp: int, inner: dict[str, int], experts: dict[str, int]) -> None:
    """One clear error for a split that cannot be made exactly."""
    where = f"--tp {tp}"
    if geometry.heads % tp:
        raise PassError(f"{where}: {geometry.heads} attention heads do not split evenly over {tp} ranks")
    kv = geometry.kv_heads
    if kv % tp and tp % kv:
        raise PassError(f"{where}: {kv} KV heads neither split evenly over {tp} ranks nor replicate evenly "
                        f"(tp must divide or be a multiple of {kv})")
    for name, size in inner.items():
        if size % tp:
            raise PassError(f"{where}: {name} has {size} columns, not divisible by {tp}")
    for name, count in experts.items():
        if count % tp:
            raise PassError(f"{where}: {name.rsplit('.', 1)[0]} has {count} experts, not divisible by {tp} "
                            f"(experts go in equal contiguous blocks, one per rank)")
