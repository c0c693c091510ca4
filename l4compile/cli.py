"""The `l4compile` command. User errors print one line and exit non-zero; --debug shows tracebacks."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from l4compile import __version__
from l4compile.errors import BuildError, L4Error, Terminated
from l4compile.inspect import canonical_dtype, format_bytes, parse_size
from l4compile.progress import Progress, add_progress_args, current
from l4compile.runtime import options
from l4compile.runtime.options import cli_type


class Parser(argparse.ArgumentParser):
    """Usage errors in one line (exit 2), like every other error of the CLI."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _path(text: str) -> str:
    """A path given on the command line: an empty one (`-o ""`, an unset shell variable) is a usage error, not
    the default."""
    if not text:
        raise argparse.ArgumentTypeError("expected a path, found ''")
    return text


def _positive_size(text: str) -> int:
    return options.size("value", parse_size(text))


# The typed options of every command go through runtime/options.py's one adapter (`cli_type`): text that does not
# parse is "expected <what>, found '<text>'", a value out of range "<name> must be ..., got <value>".
POSITIVE_INT = cli_type(options.count("value", 1), int, "a positive integer")
SIZE = cli_type(parse_size, str, "a size")
DTYPE = cli_type(canonical_dtype, str, "a dtype")
POSITIVE_SIZE = cli_type(_positive_size, str, "a size")


def cmd_inspect(args: argparse.Namespace) -> int:
    from l4compile.inspect import build_report, format_report
    from l4compile.spec import load_spec
    spec = load_spec(args.spec)
    report = build_report(spec, context=args.context, dtype=args.dtype, budget_bytes=args.budget)
    if args.tp:
        from l4compile.shard.plan import plan_spec
        plan = plan_spec(spec, args.tp, args.dtype, max_seq=args.context, gpu_memory=args.gpu_memory)
        report["sharding"] = plan.to_dict()
    text = format_report(report) + ("\n" + "\n".join(plan.lines()) if args.tp else "")
    print(json.dumps(report, indent=2) if args.json else text)
    if args.tp:
        plan.raise_if_unfit()
    return 0


def _weights(args: argparse.Namespace, spec):
    from l4compile.weights import RandomWeights
    if args.weights == "random":
        return RandomWeights(args.seed)
    if Path(args.weights).is_dir():
        from l4compile.hf.checkpoint import HFCheckpoint
        return HFCheckpoint.for_spec(args.weights, spec, args.dtype)
    raise BuildError(f"--weights {args.weights!r}: expected 'random' or a Hugging Face checkpoint directory")


def cmd_build(args: argparse.Namespace) -> int:
    from l4compile.build import BuildOptions, build, dry_run
    from l4compile.outdir import default_output
    from l4compile.spec import load_spec
    progress = current()
    with progress.phase("load spec"):
        spec = load_spec(args.spec)
    options = BuildOptions(target=args.target, dtype=args.dtype, pipeline=args.pipeline, print_ir=args.print_ir,
                           disable_passes=tuple(args.disable_pass), print_ir_after=args.print_ir_after,
                           verify=args.verify, verbose=args.verbose, force=args.force)
    from l4compile.tokenizer_files import tokenizer_source
    options.tokenizer = tokenizer_source(args.tokenizer, args.weights)
    from l4compile.trt.cli import engine_options
    options.engine = engine_options(args)
    from l4compile.quant.cli import apply_quantize_args
    apply_quantize_args(args, options)
    options.tp = args.tp
    if options.target == "ort-genai":
        from l4compile.genai import check_options
        check_options(spec, options.tp, options.dtype)
    # --print-ir and --print-ir-after are results: stdout, unless stdout holds the --json report
    show_ir = (lambda text: print(text, file=sys.stderr)) if args.json else print
    if args.tp > 1:
        return _build_sharded(args, spec, options, show_ir)
    if args.dry_run:
        report = dry_run(spec, options, show_ir)
    else:
        if args.weights is None:
            raise BuildError("a build needs weights: --weights random [--seed N] or --weights HF_CHECKPOINT_DIR "
                             "(or --dry-run to check the graph only)")
        out = Path(args.output) if args.output else default_output(spec.name)
        with progress.phase("open weights"):
            weights = _weights(args, spec)
        report = build(spec, out, weights, options, show_ir)
    disk = _disk_space(Path(args.output) if args.output else default_output(spec.name),
                       report.total_bytes) if args.dry_run else None
    if args.json:
        result = {"command": "build", "spec": spec.name, "spec_file": str(args.spec), "target": options.target,
                  "dtype": options.dtype, "weights": None if args.dry_run else args.weights, **report.to_dict()}
        if disk is not None:
            result["disk"] = {"directory": str(disk[0]), "free_bytes": disk[1], "fits": report.total_bytes <= disk[1]}
        print(json.dumps({**result, **progress.report()}, indent=2))
        return 0
    print(f"dry run of {spec.name}: graph verified and ONNX-checked, nothing written" if args.dry_run
          else f"built {spec.name} -> {report.out_dir}")
    for name, size in report.files.items():
        print(f"  {name:<20} {format_bytes(size):>12}")
    print(f"  {report.tensors} weight tensors, largest {format_bytes(report.largest_tensor_bytes)}, "
          f"total {format_bytes(report.total_bytes)}")
    if disk is not None:
        verdict = "fits" if report.total_bytes <= disk[1] else "does NOT fit: a real build would refuse to start"
        print(f"  {disk[0]} has {format_bytes(disk[1])} free: the build {verdict}")
    return 0


def _build_sharded(args: argparse.Namespace, spec, options, show_ir) -> int:
    from l4compile.shard.build import build_sharded, dry_run_sharded
    progress, plan = current(), None
    if args.dry_run:
        report, plan = dry_run_sharded(spec, options, args.gpu_memory, show_ir)
    else:
        if args.weights is None:
            raise BuildError("a build needs weights: --weights random [--seed N] or --weights HF_CHECKPOINT_DIR "
                             "(or --dry-run to check the graph only)")
        from l4compile.outdir import default_output
        out = Path(args.output) if args.output else default_output(spec.name)
        with progress.phase("open weights"):
            weights = _weights(args, spec)
        report = build_sharded(spec, out, weights, options, args.gpu_memory, show_ir)
    if args.json:
        result = {"command": "build", "spec": spec.name, "spec_file": str(args.spec), "target": options.target,
                  "dtype": options.dtype, "tp": options.tp, "weights": None if args.dry_run else args.weights,
                  **report.to_dict(), **({"sharding": plan.to_dict()} if plan is not None else {})}
        print(json.dumps({**result, **progress.report()}, indent=2))
    else:
        if plan is not None:
            print(f"dry run of {spec.name} at --tp {options.tp}: {options.tp} rank graphs verified and checked, "
                  "nothing written")
            print("\n".join(plan.lines()))
        else:
            print(f"built {spec.name} at --tp {options.tp} -> {report.out_dir}")
        for name, size in report.files.items():
            print(f"  {name:<28} {format_bytes(size):>12}")
        print(f"  {report.tensors} weight tensors over {options.tp} ranks, largest "
              f"{format_bytes(report.largest_tensor_bytes)}")
    if plan is not None:
        plan.raise_if_unfit()
    return 0


def _disk_space(target: Path, needed: int) -> tuple[Path, int]:
    """The nearest existing directory at or above `target`, and its free bytes."""
    import shutil
    target = target.resolve()
    existing = next(p for p in (target, *target.parents) if p.exists())
    return existing, shutil.disk_usage(existing).free


def cmd_passes(args: argparse.Namespace) -> int:
    from l4compile.passes.pipelines import describe
    print(describe())
    return 0


def _id_list(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise ValueError(f"expected comma-separated token ids like 1,2,3, found {text!r}") from None
    if not ids:
        raise ValueError("expected at least one token id")
    return ids


TOKEN_IDS = cli_type(_id_list, str, "token ids")


def cmd_run(args: argparse.Namespace) -> int:
    import time

    import numpy as np
    from l4compile.runtime import Engine
    progress = current()
    with progress.phase("load engine"):
        engine = Engine.load(args.build, threads=args.threads, backend=args.backend)
    if args.prompt_ids is None:
        if args.image_token_ids:
            from l4compile.runtime.errors import RuntimeInputError
            raise RuntimeInputError("--image-token-ids goes with --prompt-ids: a text prompt's image tokens are "
                                    "those of the build's tokenizer")
        from l4compile.text_cli import run_text
        return run_text(engine, args)
    max_new_tokens = 32 if args.max_new_tokens is None else args.max_new_tokens
    stops = tuple(args.stop_ids) if args.stop_ids is not None else None
    prompt, pixels = args.prompt_ids, None
    if args.image:
        from l4compile.runtime.vision_cli import image_prompt_ids
        prompt, pixels = image_prompt_ids(engine, args.prompt_ids, args.image, args.image_token_ids)
    tokens = engine.stream(np.array(prompt), max_new_tokens, temperature=args.temperature or 0.0,
                           top_k=args.top_k or 0, top_p=1.0 if args.top_p is None else args.top_p, seed=args.seed,
                           stop_tokens=stops, pixel_values=pixels)
    # Tokens go to stdout as they come; a live bar only where it cannot land among them.
    with progress.phase("generate", total=max_new_tokens, unit="token", live=not progress.shares_stdout) as task:
        first = next(tokens, None)  # input errors surface here, before anything is printed
        if first is not None:
            task.advance(1)
            task.comment = f"first token after {time.monotonic() - task.start:.3f} s ({len(prompt)}-token prompt)"
        print(",".join(map(str, prompt + ([first] if first is not None else []))), end="", flush=True)
        for token in tokens:
            print(f",{token}", end="", flush=True)
            task.advance(1)
        print()
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="l4compile", description="Compile Llama 4 specs to ONNX, TensorRT and torch.")
    parser.add_argument("--version", action="version", version=f"l4compile {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="parameter, FLOP and memory accounting of a spec (no weights)")
    p.add_argument("spec")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--context", type=POSITIVE_INT,
                   help="KV-cache and attention numbers at this context length")
    p.add_argument("--dtype", default="bfloat16", type=DTYPE,
                   help="dtype for KV-cache bytes (default bfloat16)")
    p.add_argument("--budget", type=SIZE,
                   help="memory budget, e.g. 80GB: does it fit, per weight dtype")
    p.add_argument("--tp", type=POSITIVE_INT,
                   help="plan a --tp N sharded build: weights and KV cache (at --context, default the engine's "
                        "maximum sequence) per rank, in --dtype")
    p.add_argument("--gpu-memory", type=SIZE, default=parse_size("141GB"),
                   help="memory of one GPU for --tp (default 141GB, an H200): does each rank fit")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("build", help="compile a spec into a build directory")
    p.add_argument("spec")
    p.add_argument("--target", default="onnx", choices=["onnx", "trt", "ort-genai"],
                   help="what to emit (default onnx; trt: TensorRT-ready ONNX, its compatibility report, and an "
                        "engine where TensorRT and a GPU are present; ort-genai: a directory onnxruntime-genai "
                        "loads, with genai_config.json)")
    p.add_argument("-o", "--output", type=_path, help="build directory (default build/<spec name>)")
    p.add_argument("--weights", help="'random' or a Hugging Face checkpoint directory")
    p.add_argument("--seed", type=cli_type(options.seed, int, "a non-negative integer"), default=0,
                   help="seed of --weights random (default 0)")
    p.add_argument("--tokenizer", metavar="DIR", help="copy this Hugging Face tokenizer (tokenizer.json, its config, "
                   "chat template, generation_config.json) into the build; default: the --weights checkpoint's")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="weight and compute dtype (default float32)")
    p.add_argument("--pipeline", help="pass pipeline: a name (see `l4compile passes`; default: the target's) or a "
                                      "pipeline .yaml file; 'none' for the straight lowering")
    p.add_argument("--disable-pass", action="append", default=[], metavar="NAME",
                   help="leave this pass out of the pipeline (repeatable)")
    p.add_argument("--print-ir-after", metavar="NAME", help="print the IR after this pass")
    p.add_argument("--verify", action="store_true", help="run the IR verifier after every pass")
    add_progress_args(p)
    p.add_argument("--json", action="store_true", help="print one machine-readable report on stdout at the end "
                   "(files, sizes, pipeline, per-pass times and stats, quantization, warnings, phase times)")
    p.add_argument("--dry-run", action="store_true", help="build and check the graph, write nothing, load no weights")
    p.add_argument("--print-ir", action="store_true", help="print the IR after the pipeline")
    p.add_argument("--tp", type=POSITIVE_INT, default=1,
                   help="tensor/expert-parallel ranks (with --target trt): one graph, weights file and engine per "
                        "rank, joined by NCCL collectives (default 1)")
    p.add_argument("--gpu-memory", type=SIZE, default=parse_size("141GB"),
                   help="with --tp: memory of one GPU; a rank whose weights and KV cache (at --max-batch x "
                        "--max-seq) exceed it is an error (default 141GB, an H200)")
    p.add_argument("--force", action="store_true",
                   help="replace the output directory even if it is not an l4compile build (its files are deleted)")
    from l4compile.trt.cli import add_engine_args, add_engine_command
    add_engine_args(p, POSITIVE_INT)
    from l4compile.quant.cli import add_quant_report_command, add_quantize_args
    add_quantize_args(p)
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("passes", help="list the optimization passes and the named pipelines")
    p.set_defaults(func=cmd_passes)

    p = sub.add_parser("run", help="generate with a build (the embedded runtime): token ids, or text where the "
                                   "build has a tokenizer")
    p.add_argument("build", help="build directory")
    from l4compile.text_cli import add_chat_command, add_sampling_args, add_text_run_args
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt-ids", type=TOKEN_IDS, help="e.g. 1,2,3; prints prompt and new ids")
    add_text_run_args(p, prompt)
    p.add_argument("--max-new-tokens", type=cli_type(options.max_new_tokens, int, "a count"), help="default 32 for ids; for text the generation config's, else 256")
    add_sampling_args(p, ids=True)
    p.add_argument("--stop-ids", type=TOKEN_IDS,
                   help="stop token ids (default: the generation config's, else the spec's eos)")
    p.add_argument("--threads", type=cli_type(options.threads, int, "a thread count"),
                   help="onnxruntime intra-op threads")
    p.add_argument("--backend", choices=["onnxruntime", "tensorrt"],
                   help="run with this backend instead of the manifest's (a TensorRT build's ONNX runs on onnxruntime)")
    p.add_argument("--image", action="append", metavar="FILE",
                   help="an image (repeatable; needs Pillow): it replaces the next <|image|> of the prompt (an id "
                        "of --prompt-ids, or the text <|image|> in --prompt), or, without one, goes first (after "
                        "BOS; with --chat, as image parts before the text of the user message)")
    p.add_argument("--image-token-ids", type=TOKEN_IDS, metavar="START,END,TILE_X,TILE_Y,IMAGE,PATCH",
                   help="the image prompt's token ids (default: Llama 4's, where the build's vocabulary is Llama 4's)")
    add_progress_args(p)
    p.set_defaults(func=cmd_run)

    add_chat_command(sub)
    from l4compile.serve.command import add_serve_command
    add_serve_command(sub, POSITIVE_INT)
    from l4compile.verify import add_verify_command
    add_verify_command(sub)

    add_engine_command(sub, POSITIVE_INT)
    add_quant_report_command(sub, POSITIVE_INT)
    from l4compile.hf.commands import add_hf_commands
    add_hf_commands(sub, POSITIVE_SIZE)
    from l4compile.train.cli import add_train_command
    add_train_command(sub, POSITIVE_INT)
    return parser


def _terminate(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)   # a second SIGTERM must not interrupt the cleanup
    raise Terminated()


def _quiet_stdout() -> None:
    """After a closed pipe: send what is left of stdout to /dev/null so that the exit flush cannot fail."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    progress = Progress.from_args(args)   # progress and warnings on stderr; -q/-v where the command has them
    import threading
    handles_sigterm = (threading.current_thread() is threading.main_thread()
                       and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)
    if handles_sigterm:   # only where nobody else (a test runner, an embedding app) installed a handler
        signal.signal(signal.SIGTERM, _terminate)
    try:
        with progress.activate():
            code = args.func(args)
        if code == 0 and hasattr(args, "quiet"):
            progress.finish(args.command)
        sys.stdout.flush()
        return code
    except L4Error as exc:
        if args.debug:
            raise
        print(f"l4compile: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:   # `l4compile inspect ... | head -1`: the reader has what it wanted
        _quiet_stdout()
        return 141
    except OSError as exc:    # an output path that cannot be written, a disk that filled up
        if args.debug:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"l4compile: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:   # a message: what was kept (a training run's checkpoint)
        print("l4compile: interrupted" + (f": {exc}" if str(exc) else ""), file=sys.stderr)
        return 130
    except Terminated as exc:
        print("l4compile: terminated" + (f": {exc}" if str(exc) else ""), file=sys.stderr)
        return 143
    finally:
        if handles_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
