"""The one exception type a user is meant to see.

Anything raised as ``UserError`` is a mistake the user can fix (a missing file, a wrong column,
a model that does not match the index). The CLI prints its message as one line and exits 1;
every other exception is a bug in lite-influence and exits 2 (traceback only with ``--debug``).
Keep messages to one sentence that says what was wrong and how to fix it.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


class InputWarning(UserWarning):
    """An input that is accepted but does not do all it seems to ask (``--proj-dim`` wider than
    a unit): the build goes on, and the user is told once. The CLI prints it as one
    ``warning:`` line on stderr; from Python it is an ordinary ``warnings`` warning."""
