"""Where TensorRT will need shape tensors and data-dependent shapes: a static reading of the ONNX graph.

TensorRT computes shapes from input dimensions and "shape tensors" (small int tensors it evaluates
on the host before running). An input that decides a shape (a Slice start, a Range bound, a Reshape
target) is fine when it derives from input dimensions and constants; when it derives from a small
integer network input, TensorRT makes that input a shape tensor (host memory, a value range in every
optimization profile); when it derives from the values of an execution tensor, the shape is only
known while running (a data-dependent shape), which TensorRT 10 supports at some cost (and which we
have not verified on a GPU). The report lists both; neither is an error.
"""

from __future__ import annotations

from typing import Any

import onnx

# The inputs of each op that decide output shapes (ONNX operator definitions).
SHAPE_INPUTS = {"Reshape": (1,), "Expand": (1,), "ConstantOfShape": (0,), "Slice": (1, 2, 3, 4), "Range": (0, 1, 2),
                "Tile": (1,), "Pad": (1, 3), "TopK": (1,), "Unsqueeze": (1,), "Squeeze": (1,), "Split": (1,),
                "Resize": (2, 3), "OneHot": (1,), "Loop": (0,)}
SHAPE_INPUTS.update({op: (1,) for op in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd",
                                         "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")})
ALWAYS_DATA_DEPENDENT = ("NonZero",)
SHAPE_OF = ("Shape", "Size")
INT_TYPES = (onnx.TensorProto.INT32, onnx.TensorProto.INT64)
SHAPE_TENSOR_MAX_VOLUME = 64   # TensorRT's limit on a shape tensor's element count


def shape_analysis(model: onnx.ModelProto) -> dict[str, Any]:
    """{"shape_tensor_inputs": [...], "data_dependent": [{"node", "op", "input"}]} for the main graph."""
    g = onnx.shape_inference.infer_shapes(model, strict_mode=False).graph
    infos = {i.name: i for i in list(g.input) + list(g.value_info) + list(g.output)}
    small = lambda name: name in infos and _small(infos[name])  # noqa: E731  (could be a shape tensor)
    static = {i.name for i in g.initializer}
    static |= {o for n in g.node if n.op_type == "Constant" for o in n.output}
    small_int_inputs = {i.name for i in g.input if i.type.tensor_type.elem_type in INT_TYPES and _small(i)}
    origin: dict[str, set[str]] = {name: set() for name in static}     # shape-like value -> inputs it reads
    origin.update({name: {name} for name in small_int_inputs})
    used_as_shape: set[str] = set()
    dependent = []
    for node in g.node:
        for i in SHAPE_INPUTS.get(node.op_type, ()):
            if i < len(node.input) and node.input[i]:
                name = node.input[i]
                if name in origin:
                    used_as_shape |= origin[name]
                else:
                    dependent.append({"node": node.name, "op": node.op_type, "input": name})
        if node.op_type in ALWAYS_DATA_DEPENDENT:
            dependent.append({"node": node.name, "op": node.op_type, "input": node.input[0]})
        if node.op_type in SHAPE_OF:
            origin.update({o: set() for o in node.output})
        elif node.op_type not in ALWAYS_DATA_DEPENDENT and node.input and all(not x or x in origin for x in node.input):
            reads = set().union(*(origin[x] for x in node.input if x))
            origin.update({o: reads for o in node.output if small(o)})   # a long Range is an execution tensor
    return {"shape_tensor_inputs": sorted(used_as_shape), "data_dependent": dependent}


def _small(info: onnx.ValueInfoProto) -> bool:
    """A 0-D or 1-D tensor of known length at most SHAPE_TENSOR_MAX_VOLUME."""
    if not info.type.tensor_type.HasField("shape"):
        return False
    dims = info.type.tensor_type.shape.dim
    return len(dims) <= 1 and all(d.HasField("dim_value") and d.dim_value <= SHAPE_TENSOR_MAX_VOLUME for d in dims)
