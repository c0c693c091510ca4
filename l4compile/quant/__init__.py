"""Quantization support: numpy weight quantizers, activation calibration, accuracy reports.

The rewrites themselves are passes (`l4compile.passes.quantize`); the ops they emit are in
`l4compile.ir.ops_quant`.
"""
