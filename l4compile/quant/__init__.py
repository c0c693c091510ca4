"""Quantization support: numpy weight quantizers, activation calibration, accuracy reports.

The rewrites themselves are passes (`l4compile.passes.quantize`); the ops they emit are in
`l4compile.ir.ops_quant`.
"""

# int8 / int4: the bits of the quantized embedding table and lm_head per tier, and their block size by tier, table
# and bits. int4 keeps the embedding table at 8 bits, in blocks of 64 (8.5 bits a weight, Q8_0's density): on the
# random-weight benchmark models it moves the logits more than any other weight (README, Quantization). The
# lm_head is in blocks of 64 at either tier: against blocks of 32, bench-1b5 decodes 1.05x (int4) and 1.06x (int8)
# faster (its lm_head is a fifth of a step's bytes, and MatMulNBits runs blocks of 64 faster) for the same logit
# cosine (int8 0.9826 both; int4 0.8116 for 0.8123, over 4 prompts 0.8182 for 0.8189; Q4_0's 0.783). int8's
# embedding table stays in blocks of 32 (with both tables in blocks of 64, bench-1b5's one-prompt cosine went from
# 0.983 to 0.972; with the lm_head alone it stayed). A table tied to the lm_head takes the lm_head's.
TABLE_BITS = {"int8": {"embedding": 8, "lm_head": 8}, "int4": {"embedding": 8, "lm_head": 4}}
TABLE_BLOCK_SIZE = {"int8": {"embedding": {8: 32}, "lm_head": {8: 64}},
                    "int4": {"embedding": {4: 32, 8: 64}, "lm_head": {4: 64, 8: 64}}}

# int8 / int4: weights per scale in the layers' matmuls and experts (`build --block-size`). 64 gives 4.5 and 8.5
# bits a weight (a float32 scale a block), the densities of llama.cpp's Q4_0 and Q8_0 (a float16 scale per 32); on
# bench-1b5 it decodes 1.05-1.18x (int4) and 1.07x (int8) faster than blocks of 32, with files 9% and 5% smaller
# and int4's logit cosine still above Q4_0's (README, Quantization).
WEIGHT_BLOCK_SIZE = 64
BLOCK_SIZES = (16, 32, 64, 128)   # what MatMulNBits and QMoE take (a power of two >= 16)
