"""l4compile: a declarative graph compiler for the Llama 4 family.

This module stays import-light on purpose: `l4compile.runtime` lives in this
namespace and must import with numpy and onnxruntime only.
"""

__version__ = "0.1.0"
