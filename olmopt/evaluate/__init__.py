"""Evaluation: datasets and their cache, metrics, and the batched engine."""
