"""Pretrained networks and their offline ImageNet weights (read without torch)."""
