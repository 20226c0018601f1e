"""Command-line entry points: argument handling only; each `python -m dcgan_dist.<command>` runs one of these."""
