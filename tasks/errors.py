"""The base of every error a user can fix: its message names the file and the fix."""

from __future__ import annotations


class FanaoiError(Exception):
    """An expected failure; the CLI prints its message on one line and exits 1.

    ``transient`` says whether the same call may succeed when simply repeated later (a
    remote that did not answer, a lock held by another run, a full disk being cleaned).
    Retry decisions read this flag, never the message text. Bad data, a missing file or
    a wrong setting do not heal by waiting: those stay ``False``, the default.
    """

    transient: bool = False

    def __init__(self, message: str = "", *, transient: bool | None = None) -> None:
        super().__init__(message)
        if transient is not None:
            self.transient = transient  # an instance attribute: kept when pickled


def printable(text: str) -> str:
    """``text`` on one terminal line: control and invisible characters escaped as in repr.

    File names and what an operator types (a ``--reason``) may hold a newline or an escape
    sequence; printed raw, one verdict or history line becomes two, and the second can
    pretend to be anything.
    """
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)
