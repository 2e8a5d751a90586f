"""Ranking math in NumPy: ids by similarity, Kaggle answers and MAP@5, verification metrics."""
