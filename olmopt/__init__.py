"""olmopt: black-box optimization of merged language models."""

__version__ = "0.1.0"
