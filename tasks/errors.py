"""The base of every error a user can fix: its message names the file and the fix."""


class FanaoiError(Exception):
    """An expected failure; the CLI prints its message on one line and exits 1."""
