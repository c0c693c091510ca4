"""Command-line pieces of the TensorRT target: engine flags of `build --target trt`, and `l4compile engine`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

from l4compile.errors import BuildError
from l4compile.trt.profiles import DEFAULT_MAX_SEQ, DEFAULT_MAX_TILES, PRECISIONS, EngineOptions

FLAGS = ("precision", "max_batch", "max_seq", "timing_cache", "max_tiles")


def add_engine_args(p: argparse.ArgumentParser, positive_int: Callable[[str], int]) -> None:
    p.add_argument("--precision", choices=PRECISIONS,
                   help="TensorRT engine precision (default fp16; fp8 for a model with FP8 Q/DQ)")
    p.add_argument("--max-batch", type=positive_int, help="largest batch the engine's profiles cover (default 1)")
    p.add_argument("--max-seq", type=positive_int,
                   help=f"longest sequence, prompt plus generated tokens (default min(context, {DEFAULT_MAX_SEQ}))")
    p.add_argument("--timing-cache", type=Path, help="TensorRT timing cache to reuse and update "
                   "(default BUILD_DIR/timing.cache)")
    p.add_argument("--max-tiles", type=positive_int, help="a vision build: the largest batch of image tiles its "
                   f"vision engine runs at once (default {DEFAULT_MAX_TILES}; more are encoded in batches)")


def engine_options(args: argparse.Namespace) -> EngineOptions:
    given = [f for f in FLAGS if getattr(args, f, None) is not None]
    if given and getattr(args, "target", "trt") != "trt":
        flags = ", ".join("--" + f.replace("_", "-") for f in given)
        raise BuildError(f"{flags}: TensorRT engine options apply to --target trt only")
    return EngineOptions(args.precision, args.max_batch, args.max_seq, args.timing_cache, args.max_tiles)


def cmd_engine(args: argparse.Namespace) -> int:
    from l4compile.progress import current
    from l4compile.trt.target import engine_command
    manifest = engine_command(Path(args.build), engine_options(args))
    trt = manifest.trt or {}
    if args.json:
        print(json.dumps({"command": "engine", "build": str(args.build), "trt": trt, **current().report()}, indent=2))
        return 0
    vision = (manifest.vision or {}).get("trt") or {}
    also = f" and vision engine ({vision['precision']}, max {vision['max_tiles']} tiles)" if vision else ""
    print(f"built TensorRT engine {Path(args.build) / trt['engine']} ({trt['precision']}, max batch "
          f"{trt['max_batch']}, max seq {trt['max_seq']}){also}; `l4compile run {args.build}` now uses TensorRT")
    return 0


def add_engine_command(sub: argparse._SubParsersAction, positive_int: Callable[[str], int]) -> None:
    p = sub.add_parser("engine", help="build the TensorRT engine of a --target trt build (on a GPU host)")
    p.add_argument("build", help="build directory written by `l4compile build --target trt`")
    add_engine_args(p, positive_int)
    p.add_argument("--json", action="store_true", help="print the engine's description (precision, profiles, "
                   "limits), phase times and warnings as JSON on stdout")
    from l4compile.progress import add_progress_args
    add_progress_args(p)
    p.set_defaults(func=cmd_engine)
