"""Quantization support: numpy weight quantizers, activation calibration, accuracy reports.

The rewrites themselves are passes (`l4compile.passes.quantize`); the ops they emit are in
`l4compile.ir.ops_quant`.
"""

# int8 / int4: the bits of the quantized embedding table and lm_head per tier, and their block size by tier and
# bits. int4 keeps the embedding table at 8 bits, in blocks of 64 (8.5 bits a weight, Q8_0's density): on the
# random-weight benchmark models it moves the logits more than any other weight (README, Quantization).
TABLE_BITS = {"int8": {"embedding": 8, "lm_head": 8}, "int4": {"embedding": 8, "lm_head": 4}}
TABLE_BLOCK_SIZE = {"int8": {8: 32}, "int4": {4: 32, 8: 64}}
