"""Optuna side of olmopt: storages, campaign plans, stage drivers and workers. Only search/ imports optuna."""
