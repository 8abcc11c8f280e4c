"""User-facing errors: the CLI and the stages print these as one message, without a traceback."""


class AvseError(Exception):
    """An error caused by the user's input (params, data files, checkpoints), not by a bug."""


class ConfigError(AvseError):
    """A parameter has a wrong type or value, or is unknown."""


class DataError(AvseError):
    """An input data file is missing, malformed or inconsistent."""


class DiskFullError(AvseError):
    """The disk or the quota filled up while an output was written; the output's previous version is kept."""


class UnwritableError(AvseError):
    """An output's folder cannot be written (a read-only file system, no permission); the output's previous version is kept."""


class OutputBusyError(AvseError):
    """Another process is writing the same output (it holds the output's writer lock)."""


class Interrupted(AvseError):
    """A stop signal ended a command before it finished; outputs it had not finished are not written."""
