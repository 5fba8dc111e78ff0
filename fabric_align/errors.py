"""The errors a user can act on. ``run_program`` reports each as one ``error:`` line and exit status 1."""


class ConfigError(ValueError):
    """An out-of-range or inconsistent flag, reported before anything is loaded."""


class DataError(ValueError):
    """Bad input data. The message names the file, the line or row, and the field."""


class TrainingError(RuntimeError):
    """The run cannot go on correctly (non-finite steps, a damaged checkpoint, a failed kernel self-check)."""
