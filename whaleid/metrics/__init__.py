"""What is measured: MAP@5 and the Kaggle file check, verification and one-shot metrics, evaluate's summary."""
