"""Wrapping G and D for data-parallel training."""

from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dcgan_dist.distributed.env import DistEnv
from dcgan_dist.distributed.groups import BNGroups, bn_groups
from dcgan_dist.distributed.sync_batchnorm import convert_sync_batchnorm


def wrap_models(
    G: nn.Module, D: nn.Module, env: DistEnv, sync_bn: str | bool, groups: BNGroups | None = None
) -> tuple[nn.Module, nn.Module]:
    """Synchronised batch norm (dist.sync_bn: global, node, a group size, off; True/False: global/off) and one
    DDP wrapper per network; identity for one process. `groups`: made already by `bn_groups(env, sync_bn)`
    (a collective), else made here.

    DDP broadcasts rank 0's parameters and buffers at construction, so all ranks start identical.
    `forward_sync_buffers=False`: DDP must not overwrite batch-norm buffers in place before each forward.
    With D called twice per step (real, fake) before one backward, that in-place broadcast is what breaks
    autograd in GANs ("modified by an inplace operation"). With sync_bn the running statistics are
    computed from global batch statistics and stay identical on every rank anyway; with groups they are
    identical within a group; without sync, each rank keeps its own (samples are drawn on rank 0, with rank 0's).
    """
    if not env.distributed:
        return G, D
    groups = groups or bn_groups(env, sync_bn)
    if groups.sync:
        G = convert_sync_batchnorm(G, env.device.type, groups.group)
        D = convert_sync_batchnorm(D, env.device.type, groups.group)
    device_ids = (
        [env.device.index if env.device.index is not None else env.local_rank] if env.device.type == "cuda" else None
    )
    G = DDP(G, device_ids=device_ids, forward_sync_buffers=False)
    D = DDP(D, device_ids=device_ids, forward_sync_buffers=False)
    return G, D
