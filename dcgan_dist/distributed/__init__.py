"""Distribution: process identity and collectives, synchronised batch norm, DDP wrapping."""

from dcgan_dist.distributed.ddp import wrap_models
from dcgan_dist.distributed.env import DistEnv
from dcgan_dist.distributed.groups import BNGroups, bn_groups
from dcgan_dist.distributed.sync_batchnorm import CrossProcessBatchNorm, convert_sync_batchnorm

__all__ = ["BNGroups", "CrossProcessBatchNorm", "DistEnv", "bn_groups", "convert_sync_batchnorm", "wrap_models"]
