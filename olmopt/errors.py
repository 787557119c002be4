"""Typed errors. Library code raises these; the CLI turns them into one line and an exit code."""


class OlmoptError(Exception):
    """Base class for every error olmopt reports to users; ``exit_code`` is the CLI's exit status."""

    exit_code = 1


class InputError(OlmoptError):
    """Bad user input: a file, a flag, a config key, a model that does not fit. Exit status 2."""

    exit_code = 2


class ModelError(InputError):
    """A model that cannot be found, loaded or that does not match the pool."""


class StudyKeyError(InputError):
    """A study-file key refused by a check that needs more than the file (the pool, the machine); the
    command that read the file puts its name in front, as schema errors have it."""


class StorageError(InputError):
    """An unreachable or malformed storage URL, or a study that does (not) exist."""
