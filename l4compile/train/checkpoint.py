"""A training run directory and its sharded checkpoints (torch.distributed.checkpoint).

    RUN/spec.yaml          the spec trained (its content hash guards --resume)
    RUN/run.json           the options of the first invocation, the spec hash
    RUN/metrics.jsonl      one object per step (and per evaluation)
    RUN/checkpoints/step-000123/   DCP files: {"model": ..., "optim": ...}; `.complete` once fully written

DCP stores each tensor's global shape and every rank's piece of it, so a checkpoint saved by W ranks loads on
any number of ranks (or on none: export-hf reads it in one process).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from l4compile.errors import TrainError
from l4compile.spec.model import ModelSpec

RUN_FILE, SPEC_FILE, METRICS_FILE = "run.json", "spec.yaml", "metrics.jsonl"
COMPLETE = ".complete"


def is_run(path: Path) -> bool:
    return (path / RUN_FILE).is_file()


def step_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:06d}"


def latest_checkpoint(path: Path) -> tuple[Path, int]:
    """The newest complete checkpoint of a run directory (or the given checkpoint directory itself)."""
    if (path / COMPLETE).is_file():
        return path, int(path.name.split("-")[-1])
    done = sorted(p for p in (path / "checkpoints").glob("step-*") if (p / COMPLETE).is_file())
    if not done:
        raise TrainError(f"{path}: no complete checkpoint (expected {path}/checkpoints/step-N written by "
                         "`l4compile train`)")
    return done[-1], int(done[-1].name.split("-")[-1])


def run_dir_of(checkpoint: Path) -> Path:
    return checkpoint.parent.parent


def write_run(run: Path, spec: ModelSpec, options: dict) -> None:
    from l4compile.spec import dump_spec_yaml
    run.mkdir(parents=True, exist_ok=True)
    (run / SPEC_FILE).write_text(dump_spec_yaml(spec))
    (run / RUN_FILE).write_text(json.dumps({"spec_hash": spec.content_hash(), "spec_name": spec.name,
                                            "options": options}, indent=2) + "\n")


def run_spec(run: Path) -> ModelSpec:
    from l4compile.spec import load_spec
    return load_spec(run / SPEC_FILE)


def check_resumable(run: Path, spec: ModelSpec) -> None:
    """--resume RUN with SPEC: the run must have trained the same math."""
    if not is_run(run):
        raise TrainError(f"--resume {run}: not a training run directory (no {RUN_FILE})")
    saved = json.loads((run / RUN_FILE).read_text())
    if saved["spec_hash"] != spec.content_hash():
        raise TrainError(f"--resume {run}: it was trained with spec {saved['spec_name']!r} (hash {saved['spec_hash']}), "
                         f"not with {spec.name!r} (hash {spec.content_hash()}); pass {run / SPEC_FILE} as the spec")


def save(run: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, is_main: bool) -> Path:
    """Collective: every rank writes its shards; rank 0 marks the checkpoint complete after all have."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    where = step_dir(run, step)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(where))
    dist.barrier()
    if is_main:
        (where / COMPLETE).write_text(f"{step}\n")
    dist.barrier()
    return where


def load(where: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Collective: load model and optimizer state, resharded to this job's ranks."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(where))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def load_model_state(where: Path, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint, whole, in this process (no process group needed): for export."""
    from l4compile.train.model import Llama4ForTraining
    with torch.device("meta"):
        model = Llama4ForTraining(spec)
    state = {"model": {name: torch.empty(p.shape, dtype=p.dtype) for name, p in model.state_dict().items()}}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(where))
    return state["model"]
