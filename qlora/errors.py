"""User-facing errors and the exit status each one maps to.

`UsageError` is raised for mistakes a user can fix (a bad recipe key, a missing file, a value out of
range, a locked run folder). The CLI prints its message without a traceback and exits with status 2.
Library callers get an ordinary exception: it subclasses `ValueError` so `except ValueError` keeps
working. `NonFiniteError` stops a run whose steps keep producing NaN / Inf (exit status 3); the
run folder keeps its last finite checkpoint.
"""

import errno


class UsageError(ValueError):
    """A mistake in user input; the message names the field, the value and what is allowed."""


class NonFiniteError(RuntimeError):
    """Training stopped by its finiteness guard (`train.max_bad_steps` bad steps in a row)."""


class Interrupted(Exception):
    """A run stopped by SIGINT / SIGTERM (`qlora.training.signals`); exit status 128 + the signal."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum


# OS errors on the user's side of the fence: the disk, the permissions, the path.
USER_OS_ERRORS = {errno.ENOSPC: "ENOSPC", errno.EDQUOT: "EDQUOT", errno.EROFS: "EROFS",
                  errno.EACCES: "EACCES", errno.EPERM: "EPERM", errno.ENOENT: "ENOENT",
                  errno.ENOTDIR: "ENOTDIR", errno.EISDIR: "EISDIR", errno.ENAMETOOLONG: "ENAMETOOLONG"}


def describe_os_error(err: OSError) -> str | None:
    """One line naming the path, the cause and its errno name, or None for an OS error we do not own."""
    name = USER_OS_ERRORS.get(err.errno or -1)
    if name is None:
        return None
    where = err.filename if err.filename is not None else "an output file"
    return f"cannot write or read {where}: {err.strerror or err} ({name})"
