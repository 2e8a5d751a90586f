"""The model and its training: backbone + head factories, the trainer, devices and workers."""
