"""The groups of ranks whose batch-norm statistics are synchronised (dist.sync_bn).

    global  one group of every rank (torch's default group: no new group is made)
    node    the ranks on the same node (NVLink-connected GPUs): grouped by DistEnv.node_id, else the host name,
            gathered once from every rank
    N       groups of N consecutive ranks (0..N-1, N..2N-1, ...); the config check makes N divide
            dist.num_workers; an elastic group at a size N does not divide keeps a smaller last group
    off     no synchronisation: each rank's own batch

Every rank must create every process group, in the same order, even the groups it is not in
(torch.distributed.new_group's rule): `bn_groups` does that through `new_subgroups_by_enumeration`, called
alike on every rank. An elastic resize starts a new worker group with a new default group, so the BN groups
are formed again from the new membership.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from dcgan_dist.config import sync_bn_mode
from dcgan_dist.distributed.env import DistEnv


@dataclass
class BNGroups:
    """Where this rank's batch-norm statistics come from."""

    mode: str  # global, node, off or a group size ("2")
    ranks: list[list[int]]  # every group's ranks, the same list on every rank; [] for off
    group: Any = None  # this rank's process group; None: the default (global) group
    sync: bool = True  # False: plain per-rank batch norm (off, or every group has one rank)

    def mine(self, rank: int) -> list[int]:
        return next((g for g in self.ranks if rank in g), [rank])

    def describe(self, rank: int) -> str:
        if not self.sync:
            return "off (each worker's own batch)" if self.mode == "off" else f"{self.mode}: groups of one, off"
        if len(self.ranks) == 1:
            return f"{self.mode}: all {len(self.ranks[0])} workers"
        sizes = sorted({len(g) for g in self.ranks})
        size = "/".join(str(s) for s in sizes)
        return f"{self.mode}: {len(self.ranks)} groups of {size} workers, this one ranks {self.mine(rank)}"


def partition(mode: str, world_size: int, node_keys: list[str] | None = None) -> list[list[int]]:
    """The groups of ranks for a dist.sync_bn mode ([] for off). `node_keys[r]`: rank r's node (node mode)."""
    if mode == "off":
        return []
    if mode == "global":
        return [list(range(world_size))]
    if mode == "node":
        if node_keys is None or len(node_keys) != world_size:
            raise ValueError("node grouping needs every rank's node")
        order: dict[str, list[int]] = {}
        for rank, key in enumerate(node_keys):
            order.setdefault(key, []).append(rank)
        return list(order.values())
    size = int(mode)
    if size < 1:
        raise ValueError(f"group size {size} is below 1")
    return [list(range(start, min(start + size, world_size))) for start in range(0, world_size, size)]


def node_key(env: DistEnv) -> str:
    return env.node_id or socket.gethostname()


def bn_groups(env: DistEnv, mode: str | bool) -> BNGroups:
    """This rank's BN group for `mode` (dist.sync_bn; True/False: global/off). A collective when distributed and
    mode is node or a group size: every rank calls it, once, in the same place."""
    mode = sync_bn_mode(mode)
    if not env.distributed or mode == "off":
        return BNGroups(mode, [], None, sync=False)
    keys = [str(k) for k in env.gather_objects(node_key(env))] if mode == "node" else None
    ranks = partition(mode, env.world_size, keys)
    if all(len(g) == 1 for g in ranks):
        return BNGroups(mode, ranks, None, sync=False)
    if len(ranks) == 1:
        return BNGroups(mode, ranks, None)
    group, _ = dist.new_subgroups_by_enumeration(ranks)
    return BNGroups(mode, ranks, group)
