"""Domain errors: what a user can fix, as opposed to a bug.

Every layer raises these for problems with its input; the CLI prints their message as one
line and exits 2. Any other exception is a bug: the CLI shows a short traceback and exits 1.

    KnowError        base class; its message is one actionable line
      BadInput       a setting or argument is wrong (name the option and the fix)
      MissingData    a file, data set or model the command needs is not there
      StoreState     the store is not in the state the command needs (run missing,
                     not complete, damaged)
      NonFinite      weights hold NaN or inf (a diverged run or predictor)

Example:
    >>> from know_core.errors import BadInput, KnowError
    >>> isinstance(BadInput("--r 1.5: must satisfy 0 < r < 1"), KnowError)
    True
"""
from __future__ import annotations


class KnowError(Exception):
    """A problem the user can fix; the message is one line that says how."""


class BadInput(KnowError, ValueError):
    """A setting or argument is invalid. Subclasses ValueError so that pure callers that
    catch ValueError (e.g. config validation) keep working."""


class MissingData(KnowError, FileNotFoundError):
    """A file, data set or trained model that the command needs does not exist."""


class StoreState(KnowError):
    """The store (or a run, checkpoint or prediction in it) is not in the state needed."""


class NonFinite(KnowError):
    """A tensor holds NaN or inf values."""


def one_line(error: BaseException) -> str:
    """The first line of an error's message (its class name when it has none)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


__all__ = ["KnowError", "BadInput", "MissingData", "StoreState", "NonFinite", "one_line"]
