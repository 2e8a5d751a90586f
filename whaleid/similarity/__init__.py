"""Comparing photos, in NumPy: the gallery and its best photo per id, answers, local matching, fusion, the threshold."""
