"""Training, evaluation, checkpoints and distributed training."""
