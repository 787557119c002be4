"""Defaults that light modules (the CLI's argument parsers) need without importing torch or Optuna."""

DEFAULT_STORAGE = "sqlite:///storage/olmopt.db"
