"""Training: the loop, the pure train/eval steps, state, optimiser, checkpoints, metrics."""
