"""Errors of the data package: bad data files and records, and judges that cannot answer.

Both are ``ValueError`` subclasses, so a command line that turns bad input into one line and exit status 2
treats them the same way; each message is one line naming the file (or endpoint), the place and the field.
"""
from __future__ import annotations

__all__ = ["DataError", "JudgeError", "JudgeUnreachable"]


class DataError(ValueError):
    """A missing data file, an unknown schema, or a record without a required field (one line)."""


class JudgeError(ValueError):
    """A judge that answered with an error status or a reply that cannot be read (one line)."""


class JudgeUnreachable(JudgeError):
    """A judge endpoint that cannot be reached at all (refused connection, unknown host, timeout)."""
