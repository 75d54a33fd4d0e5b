"""The project's user-facing error types, the exit codes the commands give them, and how a failed file
operation is described in their messages."""

import errno

EXIT_FAILED_CHECK = 1
EXIT_BAD_INPUT = 2


class PactError(Exception):
    """An error caused by user input (a file, a flag, a model) with a message meant for the user.

    The command-line entry points print these without a traceback and exit 2.
    """

    exit_code = EXIT_BAD_INPUT


class CheckFailed(PactError):
    """A check the user asked for ran and found a problem (a corrupt cache, a non-finite loss); exit 1."""

    exit_code = EXIT_FAILED_CHECK


class WriteError(PactError):
    """Writing a file failed (disk full, permission denied, ...); nothing was half-written."""


class InvalidSetting(PactError):
    """A configuration field holds a value it cannot take; `field` names it, so a command line can name its flag."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def os_error_reason(err: BaseException) -> str:
    """`No space left on device (ENOSPC)` for an `OSError`; the message of any other error."""
    if not isinstance(err, OSError) or not err.strerror:
        return str(err)
    name = errno.errorcode.get(err.errno, "") if err.errno else ""
    return f"{err.strerror}{f' ({name})' if name else ''}"
