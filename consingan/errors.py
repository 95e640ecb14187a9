"""The one exception type that the CLI turns into a one-line message and exit code 2."""


class ConsinganError(Exception):
    """A problem with the user's input (file, parameters, run folder) that needs no traceback to explain."""
