"""A training run: the Trainer, its step-number Schedule, and the parts it drives (metrics, checkpoints,
sample grids, quality tracking, W&B)."""
