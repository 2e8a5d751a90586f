"""The stage cache and settings: stage declarations, fingerprints, workers, the typed config."""
