"""The one base class of errors a user can fix.

A bad file, value or request raises a subclass of :class:`UserError` (plugins too, for their
own errors); the CLI prints its message as one line and exits 1, without a traceback. Every
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem in what the user gave (a file, a value, a request), with a message that names it."""
