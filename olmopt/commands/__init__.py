"""CLI subcommands; each module exposes ``register(subparsers)`` (see olmopt.cli)."""
