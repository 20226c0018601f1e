"""Data: WebDataset shards of face images, the synthetic face set, converters and the streaming loader."""

from .loader import ImageBatches, normalise
from .shards import DatasetInfo, ShardWriter, expand_shards, read_info
from .synth import ensure_synthetic, write_synthetic_shards

__all__ = [
    "DatasetInfo",
    "ImageBatches",
    "ShardWriter",
    "ensure_synthetic",
    "expand_shards",
    "normalise",
    "read_info",
    "write_synthetic_shards",
]
