"""Tiny random checkpoints in the official layouts, for trying the pipeline and testing code built on it."""
