"""The training loop shared by DreamBooth, LoRA and ControlNet: step, optimizer, losses, data, checkpoints."""
