"""Denoising: schedules, guidance and the pipelines that run them."""
