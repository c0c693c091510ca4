"""Emitters: IR graph -> ONNX model (+ external weights) or torch nn.Module."""
