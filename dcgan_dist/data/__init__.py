"""Data: WebDataset shards of face images, the synthetic face set, converters and the streaming loader."""

from .loader import ImageBatches, check_shards, normalise, resolve_data
from .shards import DatasetInfo, ShardWriter, expand_shards, read_info
from .synth import ensure_synthetic, write_synthetic_shards

__all__ = [
    "DatasetInfo",
    "ImageBatches",
    "check_shards",
    "ShardWriter",
    "ensure_synthetic",
    "expand_shards",
    "normalise",
    "resolve_data",
    "read_info",
    "write_synthetic_shards",
]
