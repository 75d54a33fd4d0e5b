"""The project's user-facing error type."""


class PactError(Exception):
    """An error caused by user input (a file, a flag, a model) with a message meant for the user.

    The command-line entry points print these without a traceback and exit 2.
    """
