"""The train stage: the loop, its callbacks, distributed set-up, unfreezing, losses, EMA, checkpoints."""
