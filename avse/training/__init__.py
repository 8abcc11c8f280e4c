"""Training: distributed helpers, optimisation, checkpoints and the loop."""
