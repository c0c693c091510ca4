"""The `train` subcommand (registered by l4compile.cli); `python -m l4compile train` under torchrun."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from l4compile.errors import L4Error, TrainError


def cmd_train(args: argparse.Namespace) -> int:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise TrainError("training needs torch: pip install 'l4compile[torch]'") from None
    from l4compile.spec import load_spec
    from l4compile.train.trainer import Trainer, TrainOptions
    try:
        spec = load_spec(args.spec)
        if args.output is None and args.resume is None:
            raise TrainError("say where the run goes: -o RUN (or --resume RUN to continue one)")
        out = Path(args.output) if args.output else _run_of(Path(args.resume))
        opts = TrainOptions(**{name: getattr(args, name) for name in TrainOptions.__dataclass_fields__})
        Trainer(spec, opts, out, Path(args.resume) if args.resume else None).run()
    except L4Error as exc:
        if int(os.environ.get("RANK", "0")) != 0:  # rank 0 reports; the others only exit
            raise SystemExit(exc.exit_code) from None
        raise
    return 0


def _run_of(resume: Path) -> Path:
    from l4compile.train.checkpoint import COMPLETE
    return resume.parent.parent if (resume / COMPLETE).is_file() else resume


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
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (default 3e-4)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor as a fraction of --lr")
    p.add_argument("--warmup", type=int, default=0, help="linear warmup steps (default 0)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.95)
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm; 0 disables (default 1.0)")
    p.add_argument("--no-aux-loss", dest="aux_loss", action="store_false",
                   help="leave out the router load-balancing loss (router_aux_loss_coef)")
    p.add_argument("--seed", type=int, default=0, help="weights (--init random), data order, held-out split")
    p.add_argument("--eval-fraction", type=float, default=0.05, help="held-out share of sequences (default 0.05)")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (default: at the end)")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (default: at the end)")
    p.add_argument("--stop-after", type=int, default=0,
                   help="stop with a checkpoint after N steps of this invocation (resume later)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="float32, or bfloat16 autocast (weights and optimizer stay float32)")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute each layer in backward")
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder layer")
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    p.add_argument("--log-every", type=positive, default=1, help="print a step line every N steps")
    p.set_defaults(func=cmd_train)
