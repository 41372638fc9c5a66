"""Training: the loop, its schedules, checkpoints and data-parallel wrappers."""
