"""The embedded runtime: load a build directory and run it.

Imports numpy and onnxruntime only (tensorrt when a build asks for it);
never torch, networkx or the compiler. The build's manifest is the contract.
"""

from l4compile.runtime.engine import Engine
from l4compile.runtime.errors import RuntimeInputError
from l4compile.runtime.manifest import Manifest

__all__ = ["Engine", "Manifest", "RuntimeInputError"]
