"""What a run shows while it trains: the progress bar, the curves, TensorBoard/W&B, model FLOPs utilisation."""
