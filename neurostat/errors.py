"""Errors shared across the pipeline.  The command line reports a ``ValueError`` or a :class:`UserError`
as one line naming the problem (exit 1) and an :class:`OptionError` as a usage error (exit 2)."""


class UserError(Exception):
    """A problem with the user's input or files that is not a ``ValueError`` (its message says what to do)."""


class OptionError(ValueError):
    """Options that are missing or do not go together."""
