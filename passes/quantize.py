"""Weight quantization passes: FP8 (E4M3) and INT4 weight-only (activations: quantize_activations.py).

  quantize-fp8       every weight an op declares (`Op.weight_inputs`: linear, moe_experts,
                     moe_dispatch, ...) becomes float8e4m3fn codes and one float scale per output
                     channel, read through `dequantize` (ONNX DequantizeLinear). Runs anywhere
                     DequantizeLinear does; the files shrink, the compute stays in the build dtype.
  quantize-int4      linear -> matmul_nbits, moe_experts -> moe_experts_nbits, moe_dispatch ->
                     moe_dispatch_nbits: 4-bit codes in blocks along the input features, one scale
                     per block, run by onnxruntime's com.microsoft MatMulNBits (and QMoE for a dispatch
                     lowered with impl "ort"): an ORT-target choice, refused for --target trt.
                     method "rtn" rounds each weight to nearest; "gptq" chooses the codes with GPTQ
                     (`l4compile.quant.gptq`) from Hessians of calibration inputs, same layout.
  quantize-int8      the same rewrites with 8-bit codes (MatMulNBits bits=8, QMoE expert_weight_bits=8),
                     blocks of `block_size` (`build`'s default 64) with one scale each, symmetric (absmax / 127);
                     round to nearest. The CPU peer of Q8_0; onnxruntime ORT-target only, like int4.
  quantize-fp8-activations (passes/quantize_activations.py)
                     after quantize-fp8: calibrated per-tensor Q/DQ on the inputs of ops with fp8
                     weights, the explicit quantization TensorRT builds FP8 kernels from.

The router, norms and embeddings stay in high precision: the router because a flipped top-1 choice
changes a token's whole expert, norms because they are tiny. `embeddings=True` quantizes the
embedding table too (`build` turns it on by default for int8 and int4, as llama.cpp does): quantize-int8
and quantize-int4 store it in their own blocks (`embedding_nbits`, onnxruntime's GatherBlockQuantized; a
table tied to the lm_head once, for both uses), quantize-fp8 as int8 rows (ONNX Gather has no float8
kernel; the rows are gathered as int8, then dequantized). Quantized parameters are *derived* (`l4compile.weights.derived`): the weight
stream computes them from the original tensor as it is written, one tensor at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from l4compile.errors import PassError
from l4compile.ir.graph import Graph, Node, Value
from l4compile.ir.op import get_op
from l4compile.ir.types import TensorType
from l4compile.passes.base import Pass, PassResult
from l4compile.passes.properties import Property, register_property
from l4compile.passes.rewrite import Match, Pat, Rewrite, Var, apply_rewrites
from l4compile.weights.derived import Derived, is_quantized

CODE_DTYPES = ("float8e4m3fn", "int8", "uint8", "int4")
HIGH_PRECISION_ROLES = ("router", "norm", "embedding")   # Value.init, as lowering sets it
CPU_FLOATS = ("float32", "float16")                       # onnxruntime CPU MatMulNBits kernels


# ---- properties ---------------------------------------------------------------------------

def _quantized(graph: Graph) -> list[str]:
    """Weights stored quantized: the source of derived parameters, or parameters of a code dtype."""
    names = [v.derived.source.name if is_quantized(v) else v.name for v in graph.params()
             if is_quantized(v) or v.type.dtype in CODE_DTYPES]
    return list(dict.fromkeys(names))


def _check_unquantized(graph: Graph) -> str | None:
    done = _quantized(graph)
    return f"{len(done)} weight(s) are already quantized ({', '.join(done[:3])})" if done else None


def _check_quantized(graph: Graph) -> str | None:
    return None if _quantized(graph) else "no parameter is quantized"


def fp8_weight_readers(graph: Graph) -> list[Node]:
    """Nodes that read a float8 weight through `dequantize` at one of their weight inputs."""
    readers = []
    for node in graph.nodes.values():
        for index in get_op(node.op).weight_inputs(node.attrs):
            producer = graph.values[node.inputs[index]].producer
            dq = graph.nodes.get(producer) if producer else None
            if dq is not None and dq.op == "dequantize" and graph.type_of(dq.inputs[0]).dtype == "float8e4m3fn":
                readers.append(node)
                break
    return readers


def _check_fp8_weights(graph: Graph) -> str | None:
    return None if fp8_weight_readers(graph) else "no op reads float8 weights"


def _check_cpu_float(graph: Graph) -> str | None:
    other = sorted({v.type.dtype for v in graph.params() if v.type.dtype not in CPU_FLOATS + CODE_DTYPES})
    return f"weights are {', '.join(other)}" if other else None


def _check_weights_apart(graph: Graph) -> str | None:
    joined = [n.name for n in graph.nodes.values()
              if n.op == "concat" and any(graph.values[v].kind == "param" for v in n.inputs)]
    return (f"{len(joined)} weight join(s) ({', '.join(joined[:2])}): fuse-gate-up ran before quantization; in a "
            "pipeline file, list it under late:") if joined else None


register_property(Property("weights-unquantized", "weights are plain floats, none quantized yet", _check_unquantized))
register_property(Property("weights-apart", "no weight is joined with another (a joined weight is not quantized)",
                           _check_weights_apart))
register_property(Property("weights-quantized", "some weights are stored quantized", _check_quantized))
register_property(Property("weights-fp8", "some ops read float8 weights through dequantize", _check_fp8_weights))
register_property(Property("weights-cpu-float", "weights are float32 or float16, the input types of "
                           "onnxruntime's CPU MatMulNBits", _check_cpu_float))


# ---- shared helpers -----------------------------------------------------------------------

def _weight_axis(graph: Graph, value: str, ops: tuple[str, ...] | None = None) -> int | None:
    """The input-feature axis of a parameter that every reader declares as a weight on that axis
    (and, with `ops`, every reader is one of them); None when it is not a quantizable weight."""
    param = graph.values[value]
    if param.kind != "param" or is_quantized(param) or param.init in HIGH_PRECISION_ROLES \
            or param.type.dtype not in ("float32", "float16", "bfloat16") or param.type.rank < 2:
        return None
    axes = set()
    for node in graph.users(value):
        declared = get_op(node.op).weight_inputs(node.attrs)
        indices = [i for i, v in enumerate(node.inputs) if v == value]
        if (ops is not None and node.op not in ops) or any(i not in declared for i in indices):
            return None
        axes.update(declared[i] for i in indices)
    return axes.pop() if len(axes) == 1 else None


def _derived_param(graph: Graph, source: Value, suffix: str, dtype: str, shape: tuple[int, ...],
                   scheme: str, part: str, inputs: tuple[tuple[str, Any], ...] = (), **options: Any) -> str:
    derived = Derived(source, scheme, part, tuple(sorted(options.items())), inputs)
    return graph.add_param(graph.fresh_name(f"{source.name}.{suffix}"), TensorType(dtype, shape),
                           init=source.init, derived=derived)


def _drop_unread_params(graph: Graph, names: list[str]) -> None:
    for name in names:
        if name in graph.values and not graph.users(name) and name not in graph.outputs:
            del graph.values[name]


def _size_stats(graph: Graph, before: int) -> dict[str, int]:
    return {"weight_bytes_before": before, "weight_bytes_after": sum(v.type.nbytes() for v in graph.params())}


# ---- FP8 weight-only ----------------------------------------------------------------------

@dataclass
class QuantizeFP8(Pass):
    """Weights -> float8e4m3fn codes x per-output-channel scales, read through `dequantize`."""

    embeddings: bool = False

    name: ClassVar[str] = "quantize-fp8"
    description: ClassVar[str] = ("weights to float8 (E4M3) with per-output-channel scales, read through "
                                  "DequantizeLinear; router, norms and embeddings stay high precision")
    requires: ClassVar[tuple[str, ...]] = ("weights-unquantized", "weights-apart")
    ensures: ClassVar[tuple[str, ...]] = ("weights-fp8",)

    def run(self, graph: Graph) -> PassResult:
        before = sum(v.type.nbytes() for v in graph.params())
        originals = [v.name for v in graph.params()]
        quantized = 0
        for param in list(graph.params()):
            axis = _weight_axis(graph, param.name)
            if axis is not None:
                graph.replace_uses(param.name, _fp8_dequantize(graph, param, axis))
                quantized += 1
        embedded = _quantize_embeddings(graph) if self.embeddings else 0
        _drop_unread_params(graph, originals)
        return PassResult(bool(quantized or embedded), {"weights_fp8": quantized, "embeddings_int8": embedded,
                                                        **_size_stats(graph, before)})


def _fp8_dequantize(graph: Graph, param: Value, axis: int) -> str:
    """dequantize(codes, scale): a 2-D weight gets a 1-D per-channel scale (DequantizeLinear's
    per-axis form, what TensorRT expects); stacked expert weights one scale per (expert, channel)."""
    shape = param.type.shape
    if len(shape) == 2:
        layout = {"axis": 1 - axis, "block_size": 0}
        scale_shape: tuple[int, ...] = (shape[1 - axis],)
    else:
        layout = {"axis": axis, "block_size": shape[axis]}
        scale_shape = tuple(1 if i == axis else d for i, d in enumerate(shape))
    codes = _derived_param(graph, param, "fp8", "float8e4m3fn", shape, "fp8", "q", axis=axis)
    scale = _derived_param(graph, param, "fp8_scale", param.type.dtype, scale_shape, "fp8", "scale", axis=axis)
    return graph.op("dequantize", [codes, scale], name=f"{param.name}.dequantize", **layout)


def _quantize_embeddings(graph: Graph) -> int:
    """embedding(ids, table) -> dequantize(embedding(ids, int8 rows), embedding(ids, row scales))."""
    count = 0
    for param in list(graph.params()):
        readers = graph.users(param.name)
        if param.init != "embedding" or is_quantized(param) or param.type.rank != 2 or not readers \
                or any(n.op != "embedding" or n.inputs[1] != param.name for n in readers):
            continue
        vocab, hidden = param.type.shape
        codes = _derived_param(graph, param, "int8", "int8", (vocab, hidden), "int8", "q", axis=1)
        scale = _derived_param(graph, param, "int8_scale", param.type.dtype, (vocab, 1), "int8", "scale", axis=1)
        for node in readers:
            ids = node.inputs[0]
            rows = graph.op("embedding", [ids, codes], name=f"{node.name}.codes")
            row_scale = graph.op("embedding", [ids, scale], name=f"{node.name}.scales")
            out = graph.op("dequantize", [rows, row_scale], name=f"{node.name}.dequantize",
                           axis=graph.type_of(rows).rank - 1, block_size=hidden)
            graph.replace_uses(node.outputs[0], out)
            graph.remove_node(node.name)
        count += 1
    return count


# ---- INT4 weight-only (onnxruntime MatMulNBits) -------------------------------------------

@dataclass
class QuantizeINT4(Pass):
    """Weights of linear and MoE ops -> 4-bit blocks for onnxruntime's MatMulNBits.

    `accuracy_level` is MatMulNBits' attribute: 0 computes in the input's float type, 4 lets the CPU
    kernel quantize activations to int8 per block (faster, slightly less exact). `method` "gptq" asks
    `hessians(graph, weights)` (`Calibration.hessians`, which `build` supplies from its weights) for
    each weight's input Hessian; a weight it gives none for (none at all: a dry run) is rounded to nearest.
    """

    block_size: int = 32                      # `build` sets WEIGHT_BLOCK_SIZE (--block-size)
    accuracy_level: int = 4
    embeddings: bool = False
    method: str = "rtn"
    hessians: Callable[[Graph, list[str]], dict[str, Any]] | None = None
    lm_head: bool = True
    lm_head_bits: int | None = None           # the lm_head's (and a tied table's) bits; None: the tier's
    lm_head_block_size: int | None = None     # None: `block_size`
    embedding_bits: int | None = None         # an untied embedding table's bits; None: the tier's
    embedding_block_size: int | None = None   # None: `block_size`

    bits: ClassVar[int] = 4
    name: ClassVar[str] = "quantize-int4"
    description: ClassVar[str] = ("linear and MoE weights to 4-bit blocks for onnxruntime's MatMulNBits "
                                  "(weight-only); router, norms and embeddings stay high precision")
    requires: ClassVar[tuple[str, ...]] = ("weights-unquantized", "weights-cpu-float", "weights-apart")
    ensures: ClassVar[tuple[str, ...]] = ("weights-quantized",)

    def run(self, graph: Graph) -> PassResult:
        before = sum(v.type.nbytes() for v in graph.params())
        originals = [v.name for v in graph.params()]
        methods = INT4_METHODS if self.bits == 4 else ("rtn",)
        if self.method not in methods:
            raise PassError(f"unknown int{self.bits} method {self.method!r}; choose one of {', '.join(methods)}")
        self._cache: dict[str, list[str]] = {}
        self._hessians: dict[str, Any] = {}
        if self.method == "gptq" and self.hessians is not None:
            candidates = [v.name for v in graph.params()
                          if self._quantizable(graph, v.name) and self._precision(v.name)[0] == 4]
            self._hessians = self.hessians(graph, candidates) if candidates else {}
        counts = apply_rewrites(graph, self._rules())
        embedded = self._quantize_tables(graph) if self.embeddings else 0
        _drop_unread_params(graph, originals)
        kept = [v.name for v in graph.params() if _weight_axis(graph, v.name) is not None]
        stats = {f"{rule}": n for rule, n in counts.items()}
        gptq = sum(1 for name in self._cache if name in self._hessians)
        self._hessians = {}
        return PassResult(bool(counts or embedded), {**stats, f"embeddings_int{self.bits}": embedded,
                                                     "weights_gptq": gptq,
                                                     "weights_kept_float": len(kept), **_size_stats(graph, before)})

    def _rules(self) -> list[Rewrite]:
        return [self._rule("linear", "matmul_nbits", 2),
                self._rule("moe_experts", "moe_experts_nbits", 4),
                self._rule("moe_dispatch", "moe_dispatch_nbits", 4, keep=("top_k", "impl"))]

    def _rule(self, op: str, quantized_op: str, arity: int, keep: tuple[str, ...] = ()) -> Rewrite:
        """op(..., weight, ...) -> quantized_op(..., codes, scales, ...), each declared weight input
        replaced by its two 4-bit parameters; the attributes in `keep` carry over."""
        def weights(m: Match) -> dict[int, int]:
            return get_op(op).weight_inputs(m.root.attrs)

        def replace(g: Graph, m: Match) -> list[str]:
            bits, block = self._precision(m.root.inputs[min(weights(m))])
            # One block size for the op's weights (QMoE's fc1 and fc2 too): halved, down to 16, until it divides
            # every weight's input features, so that no block is padding (a toy model's 32 features in blocks of
            # 64 would be stored twice over).
            features = [g.type_of(m.root.inputs[i]).shape[axis] for i, axis in weights(m).items()]
            while block > 16 and any(k % block for k in features):
                block //= 2
            inputs: list[str] = []
            for i, value in enumerate(m.root.inputs):
                inputs += self._codes(g, value, weights(m)[i], precision=(bits, block)) if i in weights(m) else [value]
            attrs = {k: m.root.attrs[k] for k in keep} | ({"bits": bits} if bits != 4 else {})
            return [g.op(quantized_op, inputs, name=m.root.name, block_size=block,
                         accuracy_level=self.accuracy_level, **attrs)]

        return Rewrite(f"{op}->{quantized_op}", Pat(op, *(Var(f"in{i}") for i in range(arity))), replace,
                       where=lambda g, m: all(self._quantizable(g, m.root.inputs[i]) for i in weights(m)))

    def _quantizable(self, graph: Graph, value: str) -> bool:
        """A weight of the ops this pass rewrites (the lm_head only with `lm_head`)."""
        return _weight_axis(graph, value, INT4_OPS) is not None and (self.lm_head or value != "lm_head")

    def _precision(self, value: str, role: str | None = None) -> tuple[int, int]:
        """(bits, block_size) of a weight: the lm_head's (`lm_head_bits`, `lm_head_block_size`; also for a
        table tied to it, `role` "lm_head"), an embedding table's (`role` "embedding"), the tier's otherwise."""
        if role == "lm_head" or value == "lm_head":
            return self.lm_head_bits or self.bits, self.lm_head_block_size or self.block_size
        if role == "embedding":
            return self.embedding_bits or self.bits, self.embedding_block_size or self.block_size
        return self.bits, self.block_size

    def _quantize_tables(self, graph: Graph) -> int:
        """Embedding tables -> blocks of `embedding_bits` (default: the matmuls' blocks; `embedding_nbits`:
        onnxruntime's GatherBlockQuantized), as llama.cpp's Q8_0 / Q4_0 files store token_embd. A table tied to
        the lm_head (linear with transpose_weight) is quantized once, at the lm_head's bits, [V, H] blocked
        along H, which is also MatMulNBits' layout for N=V, K=H: both uses read the same codes. Tied, it is
        quantized only where the lm_head is too (`lm_head`): otherwise both uses keep it in high precision. A
        hidden size that is not a multiple of the block keeps the int8 rows of `_quantize_embeddings`."""
        count = 0
        for param in list(graph.params()):
            readers = graph.users(param.name)
            if param.init != "embedding" or is_quantized(param) or param.type.rank != 2 or not readers:
                continue
            lookups = [n for n in readers if n.op == "embedding" and n.inputs[1] == param.name]
            tied = [n for n in readers if n.op == "linear" and n.inputs[1] == param.name
                    and n.inputs[0] != param.name and n.attrs.get("transpose_weight")]
            if len(lookups) + len(tied) != len(readers) or (tied and not self.lm_head):
                continue
            bits, block = self._precision(param.name, "lm_head" if tied else "embedding")
            if param.type.shape[1] % block:
                count += _quantize_embeddings(graph) if not tied else 0
                continue
            codes, scales = self._codes(graph, param.name, axis=1, gptq=False, precision=(bits, block))
            for node in lookups:
                out = graph.op("embedding_nbits", [node.inputs[0], codes, scales], name=node.name,
                               block_size=block, **({"bits": 8} if bits == 8 else {}))
                graph.replace_uses(node.outputs[0], out)
                graph.remove_node(node.name)
            for node in tied:
                out = graph.op("matmul_nbits", [node.inputs[0], codes, scales], name=node.name,
                               block_size=block, accuracy_level=self.accuracy_level,
                               **({"bits": 8} if bits == 8 else {}))
                graph.replace_uses(node.outputs[0], out)
                graph.remove_node(node.name)
            count += 1
        return count

    def _codes(self, graph: Graph, value: str, axis: int, gptq: bool = True,
               precision: tuple[int, int] | None = None) -> list[str]:
        """The [codes, scales] parameters of weight `value` (input features along `axis`), made once;
        `precision` (bits, block_size) defaults to the weight's own (`_precision`)."""
        if value not in self._cache:
            bits, block = precision or self._precision(value)
            param = graph.values[value]
            shape = param.type.shape
            out_shape = tuple(d for i, d in enumerate(shape) if i != axis)    # [..., N]
            blocks = -(-shape[axis] // block)
            options = {"axis": axis, "block_size": block}
            scheme, inputs, tag = ("int4", (), "int4") if bits == 4 else ("int8_blocks", (), "int8")
            if gptq and bits == 4 and value in self._hessians:
                scheme, inputs = "int4_gptq", (("hessian", self._hessians[value]),)
            codes = _derived_param(graph, param, tag, "uint8", out_shape + (blocks, block * bits // 8),
                                   scheme, "q", inputs, **options)
            scales = _derived_param(graph, param, f"{tag}_scale", param.type.dtype, out_shape + (blocks,),
                                    scheme, "scale", inputs, **options)
            self._cache[value] = [codes, scales]
        return self._cache[value]


@dataclass
class QuantizeINT8(QuantizeINT4):
    """Weights of linear and MoE ops -> 8-bit blocks (MatMulNBits bits=8; QMoE expert_weight_bits=8), the
    peer of llama.cpp's Q8_0. Round to nearest; `accuracy_level` 4 (int8 activations per block) is what
    onnxruntime's CPU kernel runs fast: at 0 it dequantizes the whole weight on every call."""

    bits: ClassVar[int] = 8
    name: ClassVar[str] = "quantize-int8"
    description: ClassVar[str] = ("linear and MoE weights to 8-bit blocks for onnxruntime's MatMulNBits and QMoE "
                                  "(weight-only); router, norms and embeddings stay high precision")


INT4_OPS = ("linear", "moe_experts", "moe_dispatch")
INT4_METHODS = ("rtn", "gptq")


def quantization_passes(quantization: dict | None, target: str = "onnx",
                        calibrate: Callable[[Graph, list[str]], dict[str, float]] | None = None,
                        hessians: Callable[[Graph, list[str]], dict[str, Any]] | None = None) -> list[Pass]:
    """The passes `build --quantize` appends to a pipeline, from `BuildOptions.quantization()`;
    `calibrate` gives activation ranges (fp8 activations), `hessians` input Hessians (int4 gptq)."""
    if quantization is None:
        return []
    scheme, activations = quantization["weights"], quantization.get("activations") is not None
    embeddings = quantization.get("embeddings") is not None
    if scheme == "fp8":
        from l4compile.passes.quantize_activations import QuantizeActivationsFP8
        return [QuantizeFP8(embeddings)] + ([QuantizeActivationsFP8(calibrate)] if activations else [])
    if scheme in ("int4", "int8"):
        if activations:
            raise PassError(f"{scheme} is weight-only: activation quantization needs --quantize fp8")
        if target == "trt":
            raise PassError(f"--quantize {scheme} emits onnxruntime's MatMulNBits, which TensorRT does not parse; "
                            "use --quantize fp8 for --target trt")
        lm_head = {"lm_head": quantization.get("lm_head") != "kept", "block_size": quantization.get("block_size", 32),
                   **{key: quantization.get(key) for key in ("lm_head_bits", "lm_head_block_size", "embedding_bits",
                                                             "embedding_block_size")}}
        if scheme == "int8":
            return [QuantizeINT8(embeddings=embeddings, **lm_head)]
        return [QuantizeINT4(embeddings=embeddings, method=quantization.get("method", "rtn"), hessians=hessians,
                             **lm_head)]
    raise PassError(f"unknown quantization {scheme!r}; choose fp8, int8 or int4")
