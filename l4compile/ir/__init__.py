"""The IR: typed values with symbolic shapes, ops with one contract each, verifier, printer."""

from l4compile.ir.graph import Graph, Node, Value
from l4compile.ir.op import Op, all_ops, get_op
from l4compile.ir.printer import print_ir
from l4compile.ir.types import TensorType
from l4compile.ir.verify import verify

__all__ = ["Graph", "Node", "Value", "Op", "TensorType", "all_ops", "get_op", "print_ir", "verify"]
