"""dcgan_dist: distributed DCGAN training on faces (PyTorch DDP on Ray Train, WebDataset shards)."""

__version__ = "0.1.0"
