"""The preprocess stages: dedup, formatting, tail boxes, offline augmentation, split."""
