"""The TensorRT target: a compatibility check of the TensorRT-flavoured ONNX against the parser's
operator table (compat), engine profiles and flags (profiles), engine building with the TensorRT
Python API where it is installed (builder), and the `build --target trt` / `l4compile engine` glue
(target, cli). Nothing here imports `tensorrt` at module import time."""
