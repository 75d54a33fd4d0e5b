"""The project's user-facing error types and the exit codes the commands give them."""

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


class InvalidSetting(PactError):
    """A configuration field holds a value it cannot take; `field` names it, so a command line can name its flag."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
