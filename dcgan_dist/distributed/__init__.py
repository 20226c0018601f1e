"""Distribution: process identity and collectives, synchronised batch norm, DDP wrapping, the Ray launcher."""

from .ddp import wrap_models
from .env import DistEnv
from .sync_batchnorm import CrossProcessBatchNorm, convert_sync_batchnorm

__all__ = ["CrossProcessBatchNorm", "DistEnv", "convert_sync_batchnorm", "wrap_models"]
