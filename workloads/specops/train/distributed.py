"""Process-group setup from the torchrun environment, model wrapping and the few collectives we use.

`torchrun` (or the operator's Indexed Job, which sets the same variables) exports RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; without them training runs as one process
and every collective is a no-op. CPU worlds use gloo, GPU worlds nccl.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

Strategy = Literal["ddp", "fsdp"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the world."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def init_distributed(device: str, timeout_s: float) -> DistEnv:
    """Join the torchrun world (if any) and pick this rank's device."""
    rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} must be in [0, WORLD_SIZE={world})")
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
        log.info("joined the %s process group: rank %d of world size %d on %s", backend, rank, world, dev)
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def shutdown(env: DistEnv) -> None:
    """Leave the process group (safe to call when none was joined)."""
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, env: DistEnv, strategy: Strategy) -> nn.Module:
    """DDP replicas, or FSDP2 shards per decoder layer plus the root, for drafts too big to replicate."""
    if not env.distributed:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for module in list(model.modules()):
            layers = getattr(module, "layers", None)
            if isinstance(layers, nn.ModuleList):
                for layer in layers:
                    fully_shard(layer)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def all_reduce(tensor: torch.Tensor, env: DistEnv, op: Literal["sum", "min"] = "sum") -> torch.Tensor:
    """Reduce `tensor` over ranks in place (a no-op for one process); returns it for chaining."""
    if env.distributed:
        # nccl reduces device tensors only; gloo takes either.
        work = tensor.to(env.device) if tensor.device != env.device else tensor
        dist.all_reduce(work, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MIN)
        if work is not tensor:
            tensor.copy_(work)
    return tensor


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()
