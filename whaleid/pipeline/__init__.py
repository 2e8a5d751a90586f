"""The stage engine: Stage, Session, Run, fingerprints, atomic files, workers, the typed settings."""
