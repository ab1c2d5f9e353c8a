"""One error type for everything a user can fix: printed as one line, exit status 1."""
import click


class XvqError(click.ClickException):
    """A user-facing failure. The message names the file and the fix, on one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
