"""Everything applied to the model from outside it, each a few lines and switchable (torchtitan-style):
the process group and device mesh, FSDP2 per decoder layer, activation checkpointing, torch.compile."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    device: torch.device
    owns_group: bool   # we created the process group (and destroy it when done)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_world() -> World:
    """Join the torchrun job (env RANK/WORLD_SIZE), or form a group of one: gloo on CPU, NCCL on GPUs."""
    cuda = torch.cuda.is_available()
    if dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), _device(cuda), owns_group=False)
    backend = "nccl" if cuda else "gloo"
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return World(dist.get_rank(), dist.get_world_size(), _device(cuda), owns_group=True)


def _device(cuda: bool) -> torch.device:
    if not cuda:
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def close_world(world: World) -> None:
    if world.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def parallelize(model: nn.Module, mesh) -> nn.Module:
    """Data parallel with FSDP2: each decoder layer is one sharded unit (gathered for its forward and backward,
    its gradients reduce-scattered), the embeddings, final norm and lm_head form the root unit."""
    from torch.distributed.fsdp import fully_shard
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each decoder layer's activations in the backward pass instead of keeping them (parameter
    names are unchanged: the layer's forward is wrapped, not the layer)."""
    from torch.utils.checkpoint import checkpoint
    for layer in model.model.layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
    return model


def apply_compile(model: nn.Module) -> nn.Module:
    """torch.compile the parts of each layer whose shapes do not depend on the routing: attention, dense MLPs,
    the shared expert (names unchanged). MoE dispatch stays eager: its per-expert token counts change every
    step and would recompile the graph each time."""
    for layer in model.model.layers:
        layer.self_attn.compile()
        ffn = layer.feed_forward
        for part in (ffn.shared_expert,) if layer.is_moe else (ffn,):
            if part is not None:
                part.compile()
    return model
