"""Data sets: the synthetic demo set and catalogues imported from folders."""
