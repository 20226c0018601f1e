"""Data: WebDataset shards of face images, the synthetic face set, converters and the streaming loader."""

from dcgan_dist.data.loader import ImageBatches, check_shards, normalise, resolve_data
from dcgan_dist.data.shards import DatasetInfo, ShardWriter, expand_shards, read_classes, read_info
from dcgan_dist.data.synth import ensure_synthetic, write_synthetic_shards

__all__ = [
    "DatasetInfo",
    "ImageBatches",
    "check_shards",
    "ShardWriter",
    "ensure_synthetic",
    "expand_shards",
    "normalise",
    "resolve_data",
    "read_classes",
    "read_info",
    "write_synthetic_shards",
]
