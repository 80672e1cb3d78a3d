"""User-facing errors.

Anything a user can cause (a bad config key, a malformed data record, a missing
file) raises an ``AlignkitError``. The CLI prints its message on one line and
exits with status 2: no stack trace. Programming errors stay ordinary exceptions.
"""

from __future__ import annotations


class AlignkitError(Exception):
    """An error the user can fix; its message is shown as-is by the CLI."""


class ConfigError(AlignkitError):
    """A config file or override is wrong: unknown key, bad type or value."""


class DataError(AlignkitError):
    """A data record is malformed. The message names file, line/row and field."""

    def __init__(self, source: str, location: str | int | None, field: str | None, problem: str):
        self.source = source
        self.location = location
        self.field = field
        self.problem = problem
        where = source
        if location is not None:
            where += f":{location}"
        if field:
            where += f": field '{field}'"
        super().__init__(f"{where}: {problem}")


class NonFiniteError(AlignkitError):
    """A non-finite score, loss, gradient or next-token distribution: the run stops before it can
    corrupt the weights or train on garbage."""


class NotBuiltError(AlignkitError):
    """A stage that exists in the CLI but is not implemented yet."""


class ConfigWarning(UserWarning):
    """A setting that runs, but not as its value suggests (a warm-up the run never finishes, an
    evaluation interval with nothing held out to evaluate)."""
