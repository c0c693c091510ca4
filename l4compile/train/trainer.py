"""The train loop: data, forward, loss, backward, step, log, checkpoint."""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from l4compile.errors import Terminated, TrainError
from l4compile.progress import Progress, current
from l4compile.spec.model import ModelSpec
from l4compile.train import checkpoint as ckpt
from l4compile.train.data import PackedData, find_tokenizer, pack, read_token_stream
from l4compile.train.loss import cross_entropy_sum, labelled_tokens, load_balancing_sum
from l4compile.train.model import Llama4ForTraining
from l4compile.train.parallel import (World, apply_activation_checkpointing, apply_compile, close_world,
                                      init_world, parallelize)


@dataclass
class TrainOptions:
    init: str = "random"             # 'random' or an HF checkpoint directory
    data: str = ""
    seq_len: int = 256
    batch: int = 8                   # sequences per optimizer step, over all ranks and micro-batches
    steps: int = 100                 # total optimizer steps (the schedule's horizon)
    grad_accum: int = 1              # micro-batches per step on each rank
    lr: float = 3e-4
    min_lr_ratio: float = 0.1        # cosine decays to lr * min_lr_ratio
    warmup: int = 0
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0           # 0: no clipping
    aux_loss: bool = True            # add router_aux_loss_coef * load-balancing loss
    seed: int = 0
    tokenizer: str | None = None
    eval_fraction: float = 0.05
    eval_every: int = 0              # 0: only after the last step
    save_every: int = 0              # 0: only after the last step
    stop_after: int = 0              # stop (with a checkpoint) after this many steps of this invocation
    dtype: str = "float32"           # float32 | bfloat16 (autocast)
    activation_checkpointing: bool = False
    compile: bool = False
    threads: int | None = None
    log_every: int = 1


def learning_rate(step: int, opts: TrainOptions) -> float:
    """Linear warmup to lr over `warmup` steps, then cosine to lr * min_lr_ratio at `steps` (step is 1-based)."""
    if opts.warmup and step <= opts.warmup:
        return opts.lr * step / opts.warmup
    span = max(opts.steps - opts.warmup, 1)
    progress = min((step - opts.warmup) / span, 1.0)
    floor = opts.lr * opts.min_lr_ratio
    return floor + (opts.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def check_options(spec: ModelSpec, opts: TrainOptions, world_size: int) -> None:
    if opts.seq_len < 2:
        raise TrainError(f"--seq-len {opts.seq_len}: needs at least 2 tokens (one to predict from, one to predict)")
    if opts.seq_len > spec.max_position_embeddings:
        raise TrainError(f"--seq-len {opts.seq_len} is past the context of {spec.name} "
                         f"({spec.max_position_embeddings} positions); use at most that")
    per_step = world_size * opts.grad_accum
    if opts.batch % per_step:
        raise TrainError(f"--batch {opts.batch} does not split over {world_size} rank(s) x {opts.grad_accum} "
                         f"micro-batch(es); use a multiple of {per_step}")
    if opts.dtype not in ("float32", "bfloat16"):
        raise TrainError(f"--dtype {opts.dtype}: expected float32 or bfloat16")


def build_model(spec: ModelSpec, init: str, seed: int) -> Llama4ForTraining:
    """The training model with --init weights: RandomWeights(seed) (as `build --weights random --seed`) or an
    HF checkpoint, checked against the spec before any tensor is read."""
    from l4compile.train.weights import load_weights
    from l4compile.weights import RandomWeights
    model = Llama4ForTraining(spec)
    if init == "random":
        source = RandomWeights(seed)
    elif Path(init).is_dir():
        from l4compile.hf.checkpoint import HFCheckpoint
        source = HFCheckpoint.for_spec(init, spec)
    else:
        raise TrainError(f"--init {init!r}: expected 'random' or a Hugging Face checkpoint directory")
    load_weights(model, source, spec)
    return model


def make_optimizer(model: torch.nn.Module, opts: TrainOptions) -> torch.optim.Optimizer:
    """AdamW (fused: one kernel over all parameters, ~4x faster than the per-tensor loop on CPU);
    matrices decay, norm weights do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": opts.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=opts.lr, betas=(opts.beta1, opts.beta2), fused=True)


class Trainer:
    def __init__(self, spec: ModelSpec, opts: TrainOptions, out: Path, resume: Path | None = None,
                 log=None) -> None:
        self.spec, self.opts, self.out = spec, opts, out
        self.log = log   # default: the command's progress reporter (rank 0; nothing with --quiet)
        self.world: World | None = None
        self.resume = resume

    # -- setup -------------------------------------------------------------------------------------------------
    def _setup(self) -> None:
        spec, opts = self.spec, self.opts
        if opts.threads:
            torch.set_num_threads(opts.threads)
        self.world = world = init_world()
        check_options(spec, opts, world.size)
        resume_from = None
        if self.resume is not None:
            resume_from, self.start_step = ckpt.latest_checkpoint(self.resume)
            ckpt.check_resumable(ckpt.run_dir_of(resume_from), spec)
        else:
            self.start_step = 0
            if ckpt.is_run(self.out):
                raise TrainError(f"-o {self.out} already holds a training run; continue it with --resume {self.out} "
                                 "or choose a new directory")
            if self.out.exists() and (not self.out.is_dir() or any(self.out.iterdir())):
                # a run writes spec.yaml, run.json, metrics.jsonl and checkpoints/ over whatever has those names
                raise TrainError(f"-o {self.out} exists and is not an empty directory; a run goes into a new or "
                                 "empty one")
        progress = self._progress()
        with progress.phase("read data"):
            stream = read_token_stream(opts.data, spec, find_tokenizer(opts.tokenizer, opts.init))
            pad = spec.tokens.pad if spec.tokens.pad is not None else 0
            self.data: PackedData = pack(stream, opts.seq_len, pad, opts.eval_fraction, opts.seed)
        with progress.phase("load model"):
            self._load_model(resume_from)
        if resume_from is not None:
            self._log(f"resumed from {resume_from} (step {self.start_step}) on {world.size} rank(s)")
        if world.is_main:
            if resume_from is None or not ckpt.is_run(self.out):
                ckpt.write_run(self.out, spec, asdict(opts))
        dist.barrier()
        self.autocast = (torch.autocast(world.device.type, dtype=torch.bfloat16) if opts.dtype == "bfloat16"
                         else nullcontext())

    def _load_model(self, resume_from: Path | None) -> None:
        """The model (from --init, or the checkpoint `resume_from`), parallelized, and its optimizer."""
        spec, opts, world = self.spec, self.opts, self.world
        torch.manual_seed(opts.seed)
        # resuming: the weights come from the checkpoint, not from --init
        model = build_model(spec, opts.init, opts.seed) if resume_from is None else Llama4ForTraining(spec)
        if world.size > 1:
            from torch.distributed.device_mesh import init_device_mesh
            parallelize(model, init_device_mesh(world.device.type, (world.size,)))
        if opts.activation_checkpointing:
            apply_activation_checkpointing(model)
        if opts.compile:
            apply_compile(model)
        self.model = model.to(world.device)
        self.optimizer = make_optimizer(self.model, opts)
        if resume_from is not None:
            ckpt.load(resume_from, self.model, self.optimizer)

    def _progress(self) -> Progress:
        """The command's reporter on rank 0 (it reports for the job); a silent one on the others."""
        return current() if self.world is None or self.world.is_main else Progress.silent()

    def _log(self, line: str) -> None:
        if self.world is None or self.world.is_main:
            (self.log or current().note)(line)

    def _record(self, entry: dict) -> None:
        if self.world.is_main:
            with open(self.out / ckpt.METRICS_FILE, "a") as f:
                f.write(json.dumps(entry) + "\n")

    # -- steps -------------------------------------------------------------------------------------------------
    def _local_rows(self, rows: np.ndarray) -> list[np.ndarray]:
        """This rank's slice of a global batch, cut into micro-batches."""
        w = self.world
        mine = np.array_split(rows, w.size)[w.rank]
        return np.array_split(mine, self.opts.grad_accum)

    def _reduce(self, *values: float) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def train_step(self, step: int) -> dict:
        opts, data, world = self.opts, self.data, self.world
        rows = data.global_batch(step - 1, opts.batch)
        micro = self._local_rows(rows)
        labels_all = torch.from_numpy(data.train_labels[np.concatenate(micro)])
        (count,) = self._reduce(labelled_tokens(labels_all))
        count = max(count, 1.0)
        coef = self.spec.moe.router_aux_loss_coef if (opts.aux_loss and self.spec.moe) else 0.0
        top_k = self.spec.moe.top_k if self.spec.moe else 1
        lr = learning_rate(step, opts)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        ce_total = aux_total = 0.0
        for part in micro:
            ids = torch.from_numpy(data.train_ids[part]).to(world.device)
            labels = torch.from_numpy(data.train_labels[part]).to(world.device)
            with self.autocast:
                logits, router_logits = self.model(ids)
            ce = cross_entropy_sum(logits, labels)
            aux = load_balancing_sum(router_logits, top_k, len(part)).to(ce.device)
            # FSDP averages gradients over ranks: scale by the world size so the result is the global mean
            loss = (ce / count + coef * aux / opts.batch) * world.size
            loss.backward()
            ce_total += ce.item()
            aux_total += aux.item()
        grad_norm = self._clip()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        ce_sum, aux_sum = self._reduce(ce_total, aux_total)
        return {"step": step, "loss": ce_sum / count, "aux_loss": aux_sum / opts.batch, "lr": lr,
                "grad_norm": grad_norm, "tokens": int(count)}

    def _clip(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.opts.grad_clip if self.opts.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean cross-entropy over the held-out sequences (split across ranks; every rank runs the same number
        of forwards, a rank without rows runs one on a dummy row, so FSDP's collectives stay aligned)."""
        data, world = self.data, self.world
        if len(data.eval_ids) == 0:
            return None
        self.model.eval()
        rows = np.array_split(np.arange(len(data.eval_ids)), world.size)[world.rank]
        micro = max(1, self.opts.batch // (world.size * self.opts.grad_accum))
        parts = -(-(-(-len(data.eval_ids) // world.size)) // micro)
        ce_total, count = 0.0, 0
        for part in np.array_split(rows, parts):
            ids = torch.from_numpy(data.eval_ids[part if len(part) else [0]]).to(world.device)
            with self.autocast:
                logits, _ = self.model(ids)
            if len(part):
                labels = torch.from_numpy(data.eval_labels[part]).to(world.device)
                ce_total += cross_entropy_sum(logits, labels).item()
                count += labelled_tokens(labels)
        self.model.train()
        ce_sum, total = self._reduce(ce_total, count)
        return ce_sum / max(total, 1.0)

    def run(self) -> list[dict]:
        """Train from the start (or the resumed step) to --steps; returns this invocation's step metrics."""
        threads = torch.get_num_threads()
        try:
            self._setup()
            return self._loop()
        finally:
            torch.set_num_threads(threads)
            if self.world is not None:
                close_world(self.world)

    def _loop(self) -> list[dict]:
        opts, world = self.opts, self.world
        self.model.train()
        self._log(f"training {self.spec.name}: {len(self.data.train_ids)} train / {len(self.data.eval_ids)} eval "
                  f"sequences of {opts.seq_len}, batch {opts.batch} on {world.size} rank(s), steps "
                  f"{self.start_step + 1}..{opts.steps}")
        progress = self._progress()
        todo = opts.steps - self.start_step
        with progress.phase("train", total=min(todo, opts.stop_after or todo), unit="step", size_unit="token") as task:
            return self._steps(task)

    def _steps(self, task) -> list[dict]:
        opts, world = self.opts, self.world
        history, done, step = [], 0, self.start_step
        with StopRequests() as stop:
            while step < opts.steps:
                step += 1
                started = time.perf_counter()
                metrics = self.train_step(step)
                # every rank learns of a signal that reached any of them at the same step (one all-reduce)
                (stopping,) = self._reduce(float(stop.signum is not None))
                metrics["tokens_per_s"] = metrics["tokens"] / (time.perf_counter() - started)
                done += 1
                last = step == opts.steps or (opts.stop_after and done >= opts.stop_after) or stopping > 0
                self._finish_step(step, metrics, last, stopping > 0, task, history)
                if stopping:
                    raise stop.exception(f"stopped after step {step} with a checkpoint; "
                                         f"continue with --resume {self.out}")
                if last:
                    break
        return history

    def _finish_step(self, step: int, metrics: dict, last: bool, stopping: bool, task, history: list[dict]) -> None:
        """Evaluate (not when stopping on a signal: the user is waiting), record, log, checkpoint."""
        opts = self.opts
        if ((opts.eval_every and step % opts.eval_every == 0) or last) and not stopping:
            with self._progress().phase("evaluate"):
                metrics["eval_loss"] = self.evaluate()
        history.append(metrics)
        self._record(metrics)
        task.advance(1, size=metrics["tokens"])
        if step % opts.log_every == 0 or last:
            self._log(format_metrics(metrics, opts.steps))
        if last or (opts.save_every and step % opts.save_every == 0):
            with self._progress().phase("checkpoint"):
                where = ckpt.save(self.out, step, self.model, self.optimizer, self.world.is_main)
            self._log(f"checkpoint {where}")


class StopRequests:
    """SIGINT or SIGTERM during training (Ctrl-C, a scheduler's preemption, torchrun forwarding either) asks for a
    stop after the current step, with a checkpoint, so that --resume loses nothing; a second signal stops at once.
    Handlers are installed only in the main thread: elsewhere the signals belong to the embedding program."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._saved: dict[int, object] = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._saved[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        self._saved.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:   # the second signal: now
            self.__exit__()
            raise self.exception(signum=signum)
        self.signum = signum
        sys.stderr.write(f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint "
                         "(again to stop at once)\n")

    def exception(self, message: str = "", signum: int | None = None) -> BaseException:
        return (KeyboardInterrupt if (signum or self.signum) == signal.SIGINT else Terminated)(message)


def format_metrics(m: dict, steps: int) -> str:
    line = (f"step {m['step']}/{steps}  loss {m['loss']:.4f}  lr {m['lr']:.2e}  grad_norm {m['grad_norm']:.3f}  "
            f"tokens/s {m['tokens_per_s']:.0f}")
    if m.get("aux_loss"):
        line += f"  aux {m['aux_loss']:.4f}"
    if m.get("eval_loss") is not None:
        line += f"  eval_loss {m['eval_loss']:.4f}"
    return line
