"""The `l4compile` command. User errors print one line and exit non-zero; --debug shows tracebacks."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from l4compile import __version__
from l4compile.errors import BuildError, L4Error
from l4compile.inspect import canonical_dtype, parse_size


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def _argtype(convert, what: str):
    """An argparse type from a converter that raises ValueError: a bad value is a usage error (exit 2)."""
    def parse(text: str):
        try:
            return convert(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    parse.__name__ = what
    return parse


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"expected a positive integer, found {text}")
    return value


def cmd_inspect(args: argparse.Namespace) -> int:
    from l4compile.inspect import build_report, format_report
    from l4compile.spec import load_spec
    spec = load_spec(args.spec)
    report = build_report(spec, context=args.context, dtype=args.dtype, budget_bytes=args.budget)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _weights(args: argparse.Namespace, spec):
    from l4compile.weights import RandomWeights
    if args.weights == "random":
        return RandomWeights(args.seed)
    raise BuildError(f"--weights {args.weights!r}: expected 'random' or a Hugging Face checkpoint directory")


def cmd_build(args: argparse.Namespace) -> int:
    from l4compile.build import BuildOptions, build, dry_run
    from l4compile.spec import load_spec
    spec = load_spec(args.spec)
    options = BuildOptions(target=args.target, dtype=args.dtype, pipeline=args.pipeline, print_ir=args.print_ir)
    if args.dry_run:
        report = dry_run(spec, options)
        print(f"dry run of {spec.name}: graph verified and ONNX-checked, nothing written")
    else:
        if args.weights is None:
            raise BuildError("a build needs weights: --weights random [--seed N] or --weights HF_CHECKPOINT_DIR "
                             "(or --dry-run to check the graph only)")
        out = Path(args.output or Path("build") / spec.name)
        report = build(spec, out, _weights(args, spec), options)
        print(f"built {spec.name} -> {out}")
    for name, size in report.files.items():
        print(f"  {name:<20} {_size(size):>12}")
    print(f"  {report.tensors} weight tensors, largest {_size(report.largest_tensor_bytes)}, "
          f"total {_size(report.total_bytes)}")
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="l4compile", description="Compile Llama 4 specs to ONNX, TensorRT and torch.")
    parser.add_argument("--version", action="version", version=f"l4compile {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="parameter, FLOP and memory accounting of a spec (no weights)")
    p.add_argument("spec")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--context", type=_argtype(_positive_int, "context"),
                   help="KV-cache and attention numbers at this context length")
    p.add_argument("--dtype", default="bfloat16", type=_argtype(canonical_dtype, "dtype"),
                   help="dtype for KV-cache bytes (default bfloat16)")
    p.add_argument("--budget", type=_argtype(parse_size, "size"),
                   help="memory budget, e.g. 80GB: does it fit, per weight dtype")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("build", help="compile a spec into a build directory")
    p.add_argument("spec")
    p.add_argument("--target", default="onnx", choices=["onnx"], help="what to emit (default onnx)")
    p.add_argument("-o", "--output", help="build directory (default build/<spec name>)")
    p.add_argument("--weights", help="'random' or a Hugging Face checkpoint directory")
    p.add_argument("--seed", type=int, default=0, help="seed of --weights random (default 0)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="weight and compute dtype (default float32)")
    p.add_argument("--pipeline", help="pass pipeline (default: the target's)")
    p.add_argument("--dry-run", action="store_true", help="build and check the graph, write nothing, load no weights")
    p.add_argument("--print-ir", action="store_true", help="print the IR after the pipeline")
    p.set_defaults(func=cmd_build)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except L4Error as exc:
        if args.debug:
            raise
        print(f"l4compile: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("l4compile: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
