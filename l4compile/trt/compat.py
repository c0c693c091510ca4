"""Static check of an ONNX model against what TensorRT's ONNX parser accepts.

The table (tensorrt_10_onnx_ops.json) is onnx-tensorrt's docs/operators.md for the
parser version we target, kept in the repo with its source. The check walks every
node: domain (standard ONNX only: no com.microsoft contrib ops), opset range, the
element types of its data tensors (from ONNX shape inference) against the op's
"Supported Types", and the restrictions the table states as machine checks. No
TensorRT is needed, so it runs in CI; a build fails on the first problem it finds.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from l4compile.errors import BuildError
from l4compile.trt.shapes import shape_analysis

TABLE_FILE = Path(__file__).with_name("tensorrt_10_onnx_ops.json")
REPORT_JSON, REPORT_TEXT = "compat.json", "compat.txt"
STANDARD_DOMAINS = ("", "ai.onnx")

# ONNX element type -> the names used by the TensorRT table. FP8 is E4M3FN only.
DTYPE_LABELS = {
    TensorProto.FLOAT: "FP32", TensorProto.FLOAT16: "FP16", TensorProto.BFLOAT16: "BF16",
    TensorProto.DOUBLE: "DOUBLE", TensorProto.INT32: "INT32", TensorProto.INT64: "INT64",
    TensorProto.INT8: "INT8", TensorProto.UINT8: "UINT8", TensorProto.BOOL: "BOOL",
    TensorProto.FLOAT8E4M3FN: "FP8", TensorProto.INT4: "INT4", TensorProto.FLOAT4E2M1: "FP4",
}
# Ops whose "Supported Types" covers type parameters other than the data one (see _data_params).
TYPE_PARAMS = {"Cast": ("T1", "T2"), "CastLike": ("T1", "T2"), "ConstantOfShape": ("T2",)}


def dtype_label(elem_type: int) -> str:
    return DTYPE_LABELS.get(elem_type) or TensorProto.DataType.Name(elem_type)


@lru_cache(maxsize=None)
def load_table(path: str = str(TABLE_FILE)) -> dict[str, Any]:
    """The parser table with its amendments (types the mapped TensorRT layer accepts, each with its source)."""
    table = json.loads(Path(path).read_text())
    for amendment in table.get("amendments", []):
        entry = table["ops"][amendment["op"]]
        entry["types"] = entry["types"] + [t for t in amendment["add_types"] if t not in entry["types"]]
    return table


@dataclass(frozen=True)
class Problem:
    node: str
    op: str
    reason: str

    def line(self) -> str:
        return f"node {self.node!r} ({self.op}): {self.reason}"


@dataclass
class CompatReport:
    parser: str
    table_source: dict[str, str]
    opset: int | None
    nodes: int
    op_counts: dict[str, int]
    problems: list[Problem] = field(default_factory=list)
    quantized_dq_inputs: dict[str, int] = field(default_factory=dict)   # dtype -> DequantizeLinear nodes
    shape_tensor_inputs: list[str] = field(default_factory=list)        # see l4compile.trt.shapes
    data_dependent: list[dict[str, str]] = field(default_factory=list)
    min_tensorrt: str = ""           # the oldest TensorRT whose parser takes every op (the table's, or newer)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, **asdict(self)}

    def to_text(self) -> str:
        lines = [f"TensorRT compatibility: {'OK' if self.ok else f'{len(self.problems)} problem(s)'}",
                 f"parser: {self.parser}",
                 f"table: {self.table_source.get('repository', '')} {self.table_source.get('file', '')}, "
                 f"{self.table_source.get('version', '')}",
                 f"model opset: {self.opset}; {self.nodes} nodes, {len(self.op_counts)} op types",
                 f"needs TensorRT >= {self.min_tensorrt}"]
        lines += [f"  {op:<20} {n}" for op, n in sorted(self.op_counts.items())]
        if self.quantized_dq_inputs:
            lines.append("quantized (DequantizeLinear inputs): " +
                         ", ".join(f"{k} x{v}" for k, v in sorted(self.quantized_dq_inputs.items())))
        lines.append("shape-tensor inputs (host memory, a value range per profile): " +
                     (", ".join(self.shape_tensor_inputs) or "none"))
        ops = Counter(d["op"] for d in self.data_dependent)
        lines.append(f"data-dependent shapes: {len(self.data_dependent)} node input(s)" +
                     (f" ({', '.join(f'{op} x{n}' for op, n in sorted(ops.items()))}); TensorRT 10 sizes these "
                      "while running" if ops else ""))
        lines += [f"PROBLEM {p.line()}" for p in self.problems]
        return "\n".join(lines) + "\n"

    def write(self, directory: Path, stem: str = "compat") -> None:
        """STEM.json and STEM.txt (compat.json / compat.txt for the model; vision_compat.* for a vision model)."""
        (Path(directory) / f"{stem}.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        (Path(directory) / f"{stem}.txt").write_text(self.to_text())

    def raise_if_incompatible(self) -> None:
        """One line naming the first node, its op and the reason; the count of any others."""
        if self.problems:
            more = f" (+{len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
            raise BuildError(f"TensorRT would reject this model: {self.problems[0].line()}{more}")


class _Types:
    """Element types of every named tensor: inputs, initializers, Constant outputs, shape inference."""

    def __init__(self, model: onnx.ModelProto, base_dir: Path | None) -> None:
        self.base_dir = base_dir
        self.inferred = onnx.shape_inference.infer_shapes(_collectives_as_identity(model), strict_mode=False)
        self.elem: dict[str, int] = {}
        self.constants: dict[str, TensorProto] = {}
        for g in _graphs(self.inferred.graph):
            for info in list(g.input) + list(g.output) + list(g.value_info):
                if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type:
                    self.elem[info.name] = info.type.tensor_type.elem_type
            for init in g.initializer:
                self.elem[init.name] = init.data_type
                self.constants[init.name] = init
            for node in g.node:
                if node.op_type == "Constant" and node.domain in STANDARD_DOMAINS:
                    for attr in node.attribute:
                        if attr.name == "value":
                            self.constants[node.output[0]] = attr.t
                            self.elem[node.output[0]] = attr.t.data_type

    def value(self, name: str) -> np.ndarray | None:
        tensor = self.constants.get(name)
        if tensor is None:
            return None
        if tensor.data_location == TensorProto.EXTERNAL and self.base_dir is None:
            return None
        return numpy_helper.to_array(tensor, str(self.base_dir) if self.base_dir else "")


def _collectives_as_identity(model: onnx.ModelProto) -> onnx.ModelProto:
    """For shape inference only: DistCollective (no ONNX schema) types its output like Identity.
    Exact for all_reduce, the one collective l4compile emits."""
    if not any(node.op_type == "DistCollective" for node in model.graph.node):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for node in copy.graph.node:
        if node.op_type == "DistCollective":
            node.op_type = "Identity"
            del node.attribute[:]
    return copy


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The graph and, depth first, the bodies of its control-flow nodes (Loop, If, Scan)."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                yield from _graphs(sub)


def _data_params(schema: onnx.defs.OpSchema | None, op: str) -> tuple[str, ...]:
    """The type parameters the table's "Supported Types" refers to: T (or the first input's)."""
    if op in TYPE_PARAMS:
        return TYPE_PARAMS[op]
    if schema is None:
        return ()
    formals = [p.type_str for p in list(schema.inputs) + list(schema.outputs)]
    if "T" in formals:
        return ("T",)
    return (schema.inputs[0].type_str,) if schema.inputs else (schema.outputs[0].type_str,)


def _bound(names, formals) -> list[tuple[str, str]]:
    """(tensor name, type parameter) for each present input or output; variadic tails use the last formal."""
    out = []
    for i, name in enumerate(names):
        if name and formals:
            out.append((name, formals[min(i, len(formals) - 1)].type_str))
    return out


def check_model(model: onnx.ModelProto, base_dir: Path | None = None,
                table: dict[str, Any] | None = None) -> CompatReport:
    """Check `model` (weights may stay external; base_dir finds them if a check needs a value)."""
    table = table or load_table()
    opset = next((o.version for o in model.opset_import if o.domain in STANDARD_DOMAINS), None)
    types = _Types(model, base_dir)
    nodes = [node for g in _graphs(model.graph) for node in g.node]
    report = CompatReport(f"{table['parser']}, table of TensorRT {table['tensorrt_version']}", table["source"],
                          opset, len(nodes), dict(Counter(n.op_type for n in nodes)))
    versions = [table["ops"][op]["min_tensorrt"] for op in report.op_counts
                if "min_tensorrt" in table["ops"].get(op, {})]
    report.min_tensorrt = max([str(table["tensorrt_version"])] + versions, key=_version)
    if opset is None or not table["opset_min"] <= opset <= table["opset_max"]:
        report.problems.append(Problem("<model>", "opset", f"default-domain opset {opset} is outside the "
                                       f"parser's range {table['opset_min']}..{table['opset_max']}"))
    for info in list(model.graph.input) + list(model.graph.output):
        label = dtype_label(info.type.tensor_type.elem_type)
        if label not in table["dtypes"]:
            report.problems.append(Problem(info.name, "graph I/O", f"dtype {label} is not a TensorRT type"))
    shapes = shape_analysis(model)
    report.shape_tensor_inputs, report.data_dependent = shapes["shape_tensor_inputs"], shapes["data_dependent"]
    for node in nodes:
        report.problems.extend(_check_node(node, opset or 0, types, table))
        if node.op_type == "DequantizeLinear" and node.input[0] in types.elem:
            label = dtype_label(types.elem[node.input[0]])
            report.quantized_dq_inputs[label] = report.quantized_dq_inputs.get(label, 0) + 1
    return report


def _check_node(node: onnx.NodeProto, opset: int, types: _Types, table: dict[str, Any]) -> list[Problem]:
    name, op = node.name or (node.output[0] if node.output else "?"), node.op_type

    def problem(reason: str) -> list[Problem]:
        return [Problem(name, op, reason)]

    if node.domain not in STANDARD_DOMAINS:
        return problem(f"domain {node.domain!r} is not standard ONNX (contrib/custom ops need a TensorRT plugin, "
                       "which l4compile does not ship)")
    entry = table["ops"].get(op)
    if entry is None:
        return problem("not in TensorRT's ONNX operator table")
    if not entry["supported"]:
        return problem("not supported by TensorRT's ONNX parser" +
                       (f" ({entry['restrictions']})" if entry.get("restrictions") else ""))
    try:
        schema = onnx.defs.get_schema(op, opset)
    except onnx.defs.SchemaError:
        schema = None
    problems: list[Problem] = []
    wanted = _data_params(schema, op)
    bound = (_bound(node.input, list(schema.inputs)) + _bound(node.output, list(schema.outputs))) if schema else []
    for tensor, param in bound:
        if param not in wanted:
            continue
        if tensor not in types.elem:
            problems += problem(f"element type of {tensor!r} unknown after shape inference")
            continue
        label = dtype_label(types.elem[tensor])
        if label not in entry["types"]:
            problems += problem(f"{tensor!r} is {label}; TensorRT supports {op} for {', '.join(entry['types'])}")
    if schema is None and entry["types"] and node.input and node.input[0] in types.elem:   # no ONNX schema
        label = dtype_label(types.elem[node.input[0]])
        if label not in entry["types"]:
            problems += problem(f"{node.input[0]!r} is {label}; TensorRT supports {op} for {', '.join(entry['types'])}")
    for check in entry.get("checks", []):
        reason = _restriction(check, node, types)
        if reason:
            problems += problem(f"{reason} (TensorRT: {check['why']})")
    return problems


def _attr(node: onnx.NodeProto, name: str) -> Any:
    for attr in node.attribute:
        if attr.name == name:
            value = onnx.helper.get_attribute_value(attr)
            return value.decode() if isinstance(value, bytes) else value
    return None


def _restriction(check: dict[str, Any], node: onnx.NodeProto, types: _Types) -> str | None:
    """The reason `node` breaks one table restriction, or None."""
    kind = check["check"]
    present = lambda seq, i: i < len(seq) and bool(seq[i])  # noqa: E731
    if kind == "attr_in":
        value = _attr(node, check["attr"])
        value = check.get("default") if value is None else value
        return None if value in check["values"] else f"attribute {check['attr']}={value!r}"
    if kind == "absent_attrs":
        found = [a.name for a in node.attribute if a.name in check["attrs"]]
        return f"attribute(s) {', '.join(found)} set" if found else None
    if kind == "absent_inputs":
        found = [node.input[i] for i in check["inputs"] if present(node.input, i)]
        return f"input(s) {', '.join(found)} given" if found else None
    if kind == "absent_outputs":
        found = [node.output[i] for i in check["outputs"] if present(node.output, i)]
        return f"output(s) {', '.join(found)} requested" if found else None
    i = check.get("input", check.get("output", 0))
    if kind == "output_types":
        if not present(node.output, i) or node.output[i] not in types.elem:
            return None
        label = dtype_label(types.elem[node.output[i]])
        return None if label in check["types"] else f"output {node.output[i]!r} is {label}"
    if not present(node.input, i):
        return None
    value = types.value(node.input[i])
    if kind == "const_input":
        return None if node.input[i] in types.constants else f"input {node.input[i]!r} is computed at run time"
    if kind == "const_input_below":
        return None if value is None or int(np.max(value)) < check["limit"] else \
            f"input {node.input[i]!r} is {int(np.max(value))}"
    if kind == "zero_input":
        if value is None:
            return f"input {node.input[i]!r} is not a constant"
        return None if not np.any(value.astype(np.float32) != 0) else f"input {node.input[i]!r} is not all zero"
    raise ValueError(f"unknown check {kind!r} in the TensorRT table")


def check_file(path: Path) -> CompatReport:
    """Check a saved model, reading small constants from its external data when a check needs them."""
    path = Path(path)
    return check_model(onnx.load(str(path), load_external_data=False), base_dir=path.parent)
