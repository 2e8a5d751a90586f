"""The trained model at work: the embedding, the one ranking path, and evaluate, predict and identify."""
