"""User-facing errors: the CLI and the stages print these as one message, without a traceback."""


class AvseError(Exception):
    """An error caused by the user's input (params, data files, checkpoints), not by a bug."""


class ConfigError(AvseError):
    """A parameter has a wrong type or value, or is unknown."""


class DataError(AvseError):
    """An input data file is missing, malformed or inconsistent."""


class DiskFullError(AvseError):
    """The disk or the quota filled up while an output was written; the output's previous version is kept."""
