"""Training: configuration, run set-up, step plan, masked loss, the loop, optimizer, checkpoints."""
