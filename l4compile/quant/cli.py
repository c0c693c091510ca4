"""Command-line parts of quantization: `build --quantize ...` and `l4compile quant-report`."""

from __future__ import annotations

import argparse
import json

from l4compile.progress import add_progress_args, current


def add_quantize_args(p: argparse.ArgumentParser) -> None:
    from l4compile.quant import BLOCK_SIZES, WEIGHT_BLOCK_SIZE
    p.add_argument("--quantize", choices=["fp8", "int8", "int4"],
                   help=f"store weights quantized: int8 or int4 (blocks of {WEIGHT_BLOCK_SIZE} with a scale each, onnxruntime "
                        "MatMulNBits and QMoE: the CPU tiers, the peers of llama.cpp's Q8_0 and Q4_0), or fp8 (E4M3, "
                        "per-output-channel scales: for GPU targets; on CPU onnxruntime dequantizes fp8 weights to "
                        "float when the session loads, so fp8 buys a smaller file only, not speed or memory); the "
                        "router and norms stay high precision")
    p.add_argument("--quantize-activations", action=argparse.BooleanOptionalAction, default=None,
                   help="fp8: calibrated per-tensor Q/DQ on activations too, as TensorRT expects (default: on for "
                        "--target trt, off for onnx)")
    p.add_argument("--quantize-embeddings", action=argparse.BooleanOptionalAction, default=None,
                   help="quantize the embedding table too (default: on for int8 and int4, in 8-bit blocks, see "
                        "--embedding-bits; off for fp8, where it gives int8 rows); a table tied to the lm_head follows "
                        "both options")
    p.add_argument("--quantize-lm-head", action=argparse.BooleanOptionalAction, default=True,
                   help="int8 / int4: quantize the lm_head like the other matmuls (default: on; "
                        "--no-quantize-lm-head keeps it in the build dtype)")
    p.add_argument("--embedding-bits", type=int, choices=[4, 8], default=None,
                   help="int4: bits of the quantized embedding table (default 8, blocks of 64; 4: blocks of 32, the "
                        "smallest file); int8 keeps it at 8")
    p.add_argument("--lm-head-bits", type=int, choices=[4, 8], default=None,
                   help="int4: bits of the quantized lm_head and of a table tied to it (default 4; 8: closer to float, a "
                        "larger file; blocks of 64 either way); int8 keeps it at 8")
    p.add_argument("--block-size", type=int, choices=BLOCK_SIZES, default=None,
                   help=f"int8 / int4: weights per scale in the layers' matmuls and experts (default "
                        f"{WEIGHT_BLOCK_SIZE}: 4.5 and 8.5 bits a weight, the densities of llama.cpp's Q4_0 and Q8_0; "
                        "32: a little closer to float, files 5-9%% larger, decode slower; a weight whose input features "
                        "it does not divide takes the largest power of two down to 16 that does); the embedding table "
                        "and lm_head keep their own blocks (--embedding-bits, --lm-head-bits)")
    p.add_argument("--int4-method", choices=["auto", "gptq", "rtn"], default="auto",
                   help="int4: gptq (codes chosen with GPTQ from calibration Hessians), rtn (round to "
                        "nearest), auto (default: gptq where the float32 model fits in a third of memory)")


def apply_quantize_args(args: argparse.Namespace, options) -> None:
    """Copy the --quantize flags onto BuildOptions."""
    options.quantize = args.quantize
    options.quantize_activations = args.quantize_activations
    options.quantize_embeddings = args.quantize_embeddings
    options.quantize_lm_head = args.quantize_lm_head
    options.embedding_bits = args.embedding_bits
    options.lm_head_bits = args.lm_head_bits
    options.int4_method = args.int4_method
    options.block_size = args.block_size


def cmd_quant_report(args: argparse.Namespace) -> int:
    from l4compile.quant.report import compare_builds, format_comparison
    report = compare_builds(args.build, args.reference, batches=args.batches, batch_size=args.batch_size,
                            seq_len=args.seq_len, threads=args.threads)
    if args.json:
        print(json.dumps({"command": "quant-report", **report, **current().report()}, indent=2))
    else:
        print(format_comparison(report), end="")
    return 0


def add_quant_report_command(sub, positive_int) -> None:
    p = sub.add_parser("quant-report", help="accuracy and size of a quantized build against an unquantized one")
    p.add_argument("build", help="the quantized build directory")
    p.add_argument("--reference", required=True, help="the unquantized build directory of the same spec")
    p.add_argument("--batches", type=positive_int, default=4, help="prompt batches (default 4)")
    p.add_argument("--batch-size", type=positive_int, default=2, help="prompts per batch (default 2)")
    p.add_argument("--seq-len", type=positive_int, default=64, help="tokens per prompt (default 64)")
    from l4compile.runtime import options
    p.add_argument("--threads", type=options.cli_type(options.threads, int, "a thread count"),
                   help="onnxruntime intra-op threads")
    p.add_argument("--json", action="store_true", help="machine-readable output (with phase times and warnings)")
    add_progress_args(p)
    p.set_defaults(func=cmd_quant_report)
