"""Attention without a [seq, seq] mask: chunked layers block by block (chunked-attention), global layers one
block of queries at a time (global-attention-blocks)."""

from __future__ import annotations

from dataclasses import dataclass

from l4compile.ir.graph import Graph
from l4compile.passes.base import Pass, PassResult
from l4compile.passes.properties import contiguous_positions
from l4compile.passes.rewrite import Match, Pat, Rewrite, Var, apply_rule

MASKED_CHUNKED_ATTENTION = Pat("attention", Var("q"), Var("k"), Var("v"),
                               Pat("attention_mask", Var("q_pos"), Var("k_pos"), bind="mask",
                                   attrs=lambda a: a["chunk_size"] > 0),
                               bind="attention")


@dataclass
class ChunkedAttention(Pass):
    """Rewrite `attention(q, k, v, attention_mask(q_pos, k_pos){chunk})` into
    `chunked_attention(q, k, v, chunked_mask(q_pos, k_pos))`: O(seq * chunk) time and memory.

    Each rewrite builds its own chunked_mask; `cse` then leaves one per model. A layer whose
    positions are not the contiguous runs of `positions` / `key_positions` keeps its mask and is
    counted as refused.
    """

    name = "chunked-attention"
    description = "compute chunked (RoPE) layers block by block: O(seq*chunk), no [seq, seq] mask"
    requires = ("attention-masked",)
    ensures = ("attention-blockwise",)

    def run(self, graph: Graph) -> PassResult:
        return _rewrite_layers(graph, Rewrite(self.name, MASKED_CHUNKED_ATTENTION, _blockwise, where=_contiguous))


def _rewrite_layers(graph: Graph, rule: Rewrite) -> PassResult:
    return apply_rule(graph, rule, "layers")


def _contiguous(graph: Graph, m: Match) -> bool:
    return contiguous_positions(graph, m.values["q_pos"], m.values["k_pos"])


def _blockwise(graph: Graph, m: Match) -> list[str]:
    mask, attention = m.nodes["mask"], m.nodes["attention"]
    chunk = mask.attrs["chunk_size"]
    masks = graph.op("chunked_mask", [m.values["q_pos"], m.values["k_pos"]], name=f"{mask.name}.blocks",
                     n_out=3, chunk_size=chunk)
    layer = attention.name.rsplit(".", 1)[0]
    return [graph.op("chunked_attention", [m.values["q"], m.values["k"], m.values["v"], *masks],
                     name=f"{layer}.chunked_attention", chunk_size=chunk, scale=attention.attrs["scale"])]


MASKED_GLOBAL_ATTENTION = Pat("attention", Var("q"), Var("k"), Var("v"),
                              Pat("attention_mask", Var("q_pos"), Var("k_pos"), bind="mask",
                                  attrs=lambda a: a["chunk_size"] == 0),
                              bind="attention")


@dataclass
class GlobalAttentionBlocks(Pass):
    """Rewrite `attention(q, k, v, attention_mask(q_pos, k_pos){chunk 0})` into
    `blocked_attention(q, k, v, q_pos, k_pos){block}`: an ONNX Loop over blocks of queries, each
    attending to the keys up to its last query. Memory O(seq * block) instead of O(seq^2), and the
    scores above the diagonal blocks are never computed. An onnxruntime choice: TensorRT's parser
    takes no Loop whose scan output has a dynamic length.
    """

    block: int = 256

    name = "global-attention-blocks"
    description = "compute global (NoPE) layers one block of queries at a time: O(seq*block) memory, no [seq, seq] mask"
    requires = ("global-attention-masked",)
    ensures = ("global-attention-blocked",)

    def run(self, graph: Graph) -> PassResult:
        return _rewrite_layers(graph, Rewrite(self.name, MASKED_GLOBAL_ATTENTION, self._blocked, where=_contiguous))

    def _blocked(self, graph: Graph, m: Match) -> list[str]:
        attention = m.nodes["attention"]
        layer = attention.name.rsplit(".", 1)[0]
        inputs = [m.values[name] for name in ("q", "k", "v", "q_pos", "k_pos")]
        return [graph.op("blocked_attention", inputs, name=f"{layer}.blocked_attention", block=self.block,
                         scale=attention.attrs["scale"])]
