"""Training: the loop, its configuration and its checkpoints."""
