"""Launching runs on Ray: Ray Train workers for one run, Ray Tune sweeps over many."""
