"""Which process this is, and the few collectives the training loop needs beyond DDP's own."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    """This training process: its rank among `world_size` processes, and its device.

    With world_size 1 (local mode) every collective is the identity and needs no process group.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    node_id: str = ""
    # Host-side agreements (agree_max) go over gloo; with NCCL as the default backend, a gloo group of all
    # ranks (made by every rank alike, e.g. dist.new_group(backend="gloo")), so that they never wait on the GPU.
    cpu_group: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """Mean over ranks (a new tensor; the input is unchanged)."""
        if not self.distributed:
            return tensor
        out = tensor.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out / self.world_size

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, indexed by rank, on every rank."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def gather_scalars(self, value: float) -> list[float]:
        """Every rank's number, indexed by rank (one small all-reduce)."""
        if not self.distributed:
            return [value]
        slots = torch.zeros(self.world_size, dtype=torch.float64, device=self.device)
        slots[self.rank] = value
        dist.all_reduce(slots, op=dist.ReduceOp.SUM)
        return slots.tolist()

    def agree_max(self, value: int) -> int:
        """The largest of every rank's `value`, on every rank: a decision all ranks take alike."""
        if not self.distributed:
            return value
        out = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(out, op=dist.ReduceOp.MAX, group=self.cpu_group)
        return int(out.item())

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()
