"""User-facing errors.

`UsageError` is raised for mistakes a user can fix (a bad recipe key, a missing file, a value out of
range). The CLI prints its message without a traceback and exits with status 2. Library callers get
an ordinary exception: it subclasses `ValueError` so `except ValueError` keeps working.
"""


class UsageError(ValueError):
    """A mistake in user input; the message names the field, the value and what is allowed."""
