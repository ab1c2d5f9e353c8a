"""One error type for everything a user can fix: printed as one line, exit status 1."""
import click


class XvqError(click.ClickException):
    """A user-facing failure. The message names the file and the fix, on one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def first_words(text: str, limit: int = 160) -> str:
    """The first line of a library's message, for a one-line error: cut at a word, never mid-word."""
    line = (str(text).strip().splitlines() or [""])[0]
    return line if len(line) <= limit else line[:limit].rsplit(" ", 1)[0] + " …"
