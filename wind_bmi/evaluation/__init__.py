"""Scores, baselines and experiments (``wind-bmi evaluate``)."""
