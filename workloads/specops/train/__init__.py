"""The speculator trainer: loop, losses, metrics, checkpoints, distributed setup."""
