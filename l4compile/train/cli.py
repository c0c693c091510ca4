"""The `train` subcommand (registered by l4compile.cli); `python -m l4compile train` under torchrun."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from l4compile.errors import L4Error, TrainError
from l4compile.runtime import options


def cmd_train(args: argparse.Namespace) -> int:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise TrainError("training needs torch: pip install 'l4compile[torch]'") from None
    from l4compile.progress import QUIET, current
    from l4compile.spec import load_spec
    from l4compile.train.trainer import Trainer, TrainOptions
    if int(os.environ.get("RANK", "0")) != 0:
        current().verbosity = QUIET  # rank 0 reports for the job
    try:
        spec = load_spec(args.spec)
        if args.output is None and args.resume is None:
            raise TrainError("say where the run goes: -o RUN (or --resume RUN to continue one)")
        out = Path(args.output) if args.output else _run_of(Path(args.resume))
        opts = TrainOptions(**{name: getattr(args, name) for name in TrainOptions.__dataclass_fields__})
        history = Trainer(spec, opts, out, Path(args.resume) if args.resume else None).run()
    except L4Error as exc:
        if int(os.environ.get("RANK", "0")) != 0:  # rank 0 reports; the others only exit
            raise SystemExit(exc.exit_code) from None
        raise
    if args.json and int(os.environ.get("RANK", "0")) == 0:
        from l4compile.train.checkpoint import latest_checkpoint
        where, step = latest_checkpoint(out)
        print(json.dumps({"command": "train", "spec": spec.name, "run": str(out), "checkpoint": str(where),
                          "step": step, "steps_run": len(history), "last": history[-1] if history else None,
                          **current().report()}, indent=2))
    return 0


def _run_of(resume: Path) -> Path:
    from l4compile.train.checkpoint import COMPLETE
    return resume.parent.parent if (resume / COMPLETE).is_file() else resume


def _number(name: str, low: float, high: float, **bounds):
    return options.cli_type(options.number(name, low, high, **bounds), float, "a number")


def _count(name: str):
    return options.cli_type(options.count(name), int, "a non-negative integer")


def add_train_command(sub: argparse._SubParsersAction, positive: type) -> None:
    p = sub.add_parser("train", help="train (or fine-tune) a spec's model with torch; torchrun for data parallel "
                                     "(FSDP2)")
    p.add_argument("spec")
    p.add_argument("--init", default="random", help="'random' (default; --seed) or a Hugging Face checkpoint directory")
    p.add_argument("--data", required=True, help=".txt or .jsonl (tokenized) or pre-tokenized .npy / .bin ids")
    p.add_argument("--tokenizer", help="tokenizer.json (or a directory holding it) for text data, or 'bytes' "
                                       "(UTF-8 bytes as ids); default: the --init checkpoint's")
    p.add_argument("--seq-len", type=positive, default=256, help="tokens per packed sequence (default 256)")
    p.add_argument("--batch", type=positive, default=8,
                   help="sequences per optimizer step over all ranks and micro-batches (default 8)")
    p.add_argument("--steps", type=positive, default=100, help="total optimizer steps (default 100)")
    p.add_argument("--grad-accum", type=positive, default=1, help="micro-batches per step on each rank")
    p.add_argument("-o", "--output", help="run directory: spec, metrics.jsonl, checkpoints")
    p.add_argument("--resume", help="continue a run (its latest checkpoint, or a given checkpoints/step-N); "
                                    "writes into it unless -o")
    p.add_argument("--lr", type=_number("lr", 0, 10, low_open=True), default=3e-4, help="peak learning rate (default 3e-4)")
    p.add_argument("--min-lr-ratio", type=_number("min_lr_ratio", 0, 1), default=0.1, help="cosine floor as a fraction of --lr")
    p.add_argument("--warmup", type=_count("warmup"), default=0, help="linear warmup steps (default 0)")
    p.add_argument("--weight-decay", type=_number("weight_decay", 0, 100), default=0.1)
    p.add_argument("--beta1", type=_number("beta1", 0, 1, high_open=True), default=0.9)
    p.add_argument("--beta2", type=_number("beta2", 0, 1, high_open=True), default=0.95)
    p.add_argument("--grad-clip", type=_number("grad_clip", 0, 1e30), default=1.0, help="max gradient norm; 0 disables (default 1.0)")
    p.add_argument("--no-aux-loss", dest="aux_loss", action="store_false",
                   help="leave out the router load-balancing loss (router_aux_loss_coef)")
    p.add_argument("--seed", type=options.cli_type(options.seed, int, "a non-negative integer"), default=0, help="weights (--init random), data order, held-out split")
    p.add_argument("--eval-fraction", type=_number("eval_fraction", 0, 1, high_open=True), default=0.05, help="held-out share of sequences (default 0.05)")
    p.add_argument("--eval-every", type=_count("eval_every"), default=0, help="evaluate every N steps (default: at the end)")
    p.add_argument("--save-every", type=_count("save_every"), default=0, help="checkpoint every N steps (default: at the end)")
    p.add_argument("--stop-after", type=_count("stop_after"), default=0,
                   help="stop with a checkpoint after N steps of this invocation (resume later)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="float32, or bfloat16 autocast (weights and optimizer stay float32)")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute each layer in backward")
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder layer")
    p.add_argument("--threads", type=options.cli_type(options.threads, int, "a thread count"),
                   help="torch intra-op threads")
    p.add_argument("--log-every", type=positive, default=1, help="print a step line every N steps")
    p.add_argument("--json", action="store_true", help="print one machine-readable report on stdout at the end "
                   "(run, last checkpoint, last step's metrics, phase times, warnings); metrics.jsonl has every step")
    from l4compile.progress import add_progress_args
    add_progress_args(p)
    p.set_defaults(func=cmd_train)
