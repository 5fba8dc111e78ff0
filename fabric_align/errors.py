"""The errors a user can act on. ``run_program`` reports each as one ``error:`` line and exit status 1."""


class ConfigError(ValueError):
    """An out-of-range or inconsistent flag, reported before anything is loaded."""


class DataError(ValueError):
    """Bad input data. The message names the file, the line or row, and the field."""


class TrainingError(RuntimeError):
    """The run cannot go on correctly (non-finite steps, a damaged checkpoint, a failed kernel self-check)."""


def first_line(err: BaseException, limit: int | None = 200) -> str:
    """An exception's first line, whitespace collapsed (its type's name when it has no text), for one-line errors."""
    line = " ".join((str(err).strip().splitlines() or [type(err).__name__])[0].split())
    return line[:limit] if limit is not None else line
