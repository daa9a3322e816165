"""Training: the train state and step, the optimizer, checkpoints, metrics and the loop."""
