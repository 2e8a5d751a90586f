"""Reading photos and the Kaggle tables: what every step takes in."""
