"""IR graph -> ONNX model with weights streamed, one tensor at a time, into one external-data file.

The model proto holds the graph and small constants only; every parameter is
an external initializer, so model size is unbounded and peak memory stays near
the largest tensor. Without a weight source (dry run) offsets are computed and
nothing is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from l4compile import __version__
from l4compile.errors import WeightError
from l4compile.ir.graph import Graph, Value
from l4compile.ir.op import ONNX_DTYPES, OnnxBuilder, get_op
from l4compile.ir.types import TensorType
from l4compile.progress import Task
from l4compile.runtime.integrity import HashingWriter
from l4compile.weights.base import WeightSource
from l4compile.weights.derived import with_derived

OPSET = 21  # DequantizeLinear / QuantizeLinear with float8 (19) and block-wise scales (21)
ALIGN = 64  # byte alignment of each tensor in the data file (keeps mmap reads aligned)


@dataclass
class OnnxArtifact:
    model: onnx.ModelProto
    data_file: str
    weight_bytes: int
    tensors: int
    largest_tensor_bytes: int
    metadata: dict[str, str] = field(default_factory=dict)
    data_sha256: str | None = None   # of the data file, hashed as it was written (None: nothing written)


def _value_info(name: str, t: TensorType) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, ONNX_DTYPES[t.dtype], [d if isinstance(d, int) else d for d in t.shape])


def _external_initializer(param: Value, offset: int, length: int, location: str) -> TensorProto:
    tensor = TensorProto()
    tensor.name = param.name
    tensor.data_type = ONNX_DTYPES[param.type.dtype]
    tensor.dims.extend(param.type.shape)
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def _write_tensor(out: BinaryIO, param: Value, array: np.ndarray) -> int:
    if tuple(array.shape) != tuple(param.type.shape):
        raise WeightError(f"tensor {param.name}: shape {tuple(array.shape)} does not match expected "
                          f"{tuple(param.type.shape)}")
    array = np.ascontiguousarray(array)
    if array.dtype.byteorder == ">":
        array = array.byteswap().view(array.dtype.newbyteorder("<"))
    out.write(memoryview(array.reshape(-1).view(np.uint8)))
    return array.nbytes


def emit_onnx(graph: Graph, out_dir: Path | None, weights: WeightSource | None,
              data_file: str = "model.onnx.data", metadata: dict[str, str] | None = None,
              progress: Task | None = None, logits_first: bool = True, first_output: str = "logits") -> OnnxArtifact:
    """Lower every IR node to ONNX; stream parameters into out_dir/data_file (skipped when weights is None).
    `progress` (a phase of `l4compile.progress`) advances by one tensor and its bytes per tensor written.
    The first graph output is named `first_output` (`logits` by default; passes may have renamed the value)
    unless `logits_first` is False (a segment of a sharded build)."""
    b = OnnxBuilder(OPSET)
    weights = with_derived(weights) if weights is not None else None
    env = {name: name for name in graph.inputs}
    initializers: list[TensorProto] = []
    for const in graph.consts():
        initializers.append(numpy_helper.from_array(const.data, const.name))
        env[const.name] = const.name

    offset, largest = 0, 0
    params = graph.params()
    sink = HashingWriter(open(out_dir / data_file, "wb")) if (weights is not None and out_dir is not None) else None
    try:
        for param in params:
            offset = -(-offset // ALIGN) * ALIGN
            length = param.type.nbytes()
            if sink is not None:
                sink.write(b"\0" * (offset - sink.tell()))
                length = _write_tensor(sink, param, weights.get(param))
                if progress is not None:
                    progress.advance(1, length, param.name)
            initializers.append(_external_initializer(param, offset, length, data_file))
            env[param.name] = param.name
            offset += length
            largest = max(largest, length)
    finally:
        if sink is not None:
            sink.close()

    for node in graph.topo_nodes():
        b.scope = node.name
        types = [graph.values[v].type for v in node.inputs]
        outs = get_op(node.op).onnx(b, [env[v] for v in node.inputs], node.attrs, types)
        env.update(zip(node.outputs, outs))

    outputs = []
    producers = {out: node for node in b.nodes for out in node.output}
    consumed = {i for node in b.nodes for i in node.input}
    renamed: dict[str, str] = {}
    for name in graph.outputs:
        first = name == graph.outputs[0] and logits_first
        public = first_output if first else name
        source = env[name]
        producer = producers.get(source)
        if not first and producer is not None and source not in consumed and source not in renamed:
            # The node writes the output itself: no Identity copy between it and a buffer the runtime
            # binds (an in-place KV cache must be the very buffer the attention node writes).
            producer.output[list(producer.output).index(source)] = renamed[source] = public
        else:
            b.scope = "outputs"
            b.nodes.append(helper.make_node("Identity", [renamed.get(source, source)], [public], name=f"output/{public}"))
        outputs.append(_value_info(public, graph.values[name].type))

    onnx_graph = helper.make_graph(
        b.nodes, graph.name,
        inputs=[_value_info(v, graph.values[v].type) for v in graph.inputs],
        outputs=outputs,
        initializer=initializers + b.initializers,
    )
    contrib = sorted({n.domain for n in b.nodes if n.domain})  # com.microsoft where a pass chose ORT ops
    model = helper.make_model(onnx_graph, opset_imports=[helper.make_opsetid("", OPSET)] +
                              [helper.make_opsetid(domain, 1) for domain in contrib],
                              producer_name="l4compile", producer_version=__version__)
    model.ir_version = 10  # opset 21; readable by onnxruntime >= 1.18
    meta = {**graph.metadata, **(metadata or {})}
    helper.set_model_props(model, meta)
    return OnnxArtifact(model, data_file, offset, len(params), largest, meta,
                        sink.hexdigest() if sink is not None else None)
