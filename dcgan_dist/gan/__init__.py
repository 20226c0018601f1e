"""The GAN itself: the networks, the training step, EMA, numeric precision, and sample-quality metrics."""
