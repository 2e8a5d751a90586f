"""Scoring photos against the gallery: shared by evaluate and predict."""
