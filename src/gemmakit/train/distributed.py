"""torch.distributed set-up: one process per device under torchrun, gloo on CPU and NCCL on GPU,
the model wrapped with DDP or FSDP2 (`fully_shard`). Without torchrun, a world of one."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def init(device: str = "cpu") -> World:
    """Joins the process group that torchrun describes in the environment, if any."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return World(device=torch.device(device))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.startswith("cuda"):
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev = torch.device(device)
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return World(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, world: World, strategy: str = "ddp") -> nn.Module:
    """DDP: a full copy per process, gradients averaged. FSDP2: parameters sharded per block."""
    if world.size == 1:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [world.device.index] if world.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in _blocks(model):
            fully_shard(block)
        fully_shard(model)
        return model
    raise ValueError(f"unknown strategy {strategy!r}")


def _blocks(model: nn.Module):
    from ..model.gemma import Block

    return [m for m in model.modules() if isinstance(m, Block)]


def all_sum(value: float | torch.Tensor, world: World) -> float:
    t = torch.as_tensor(value, dtype=torch.float64, device=world.device).clone()
    if world.size > 1:
        dist.all_reduce(t)
    return float(t)
