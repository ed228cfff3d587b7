"""The one error type for user mistakes.

Anything the user can fix (a wrong path, a bad shape, a missing weight file) raises
:class:`HyperfaceError` with a message that says what to do. The CLI prints it as one line and
exits with status 2; everything else is a bug and keeps its traceback.
"""


class HyperfaceError(Exception):
    """A problem with the user's input or environment, explained in one actionable message."""
