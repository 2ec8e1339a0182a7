"""User-facing errors: the CLI prints the message (no traceback) and exits non-zero.

Every condition a user can cause (a bad spec, recipe, flag, file or data set) raises a
``MedxferError`` subclass whose message says how to fix it; anything else reaching the CLI is a
bug, reported as ``internal error: ...`` (see :mod:`medxfer.cli`).

Messages must never carry PHI: no patient names, IDs, dates, institutions or
source file paths (real exports name folders after patients).
"""


class MedxferError(Exception):
    exit_code = 2


class StageError(MedxferError):
    """A stage ran but cannot produce a usable result (e.g. nothing usable was ingested)."""

    exit_code = 1


class DataError(MedxferError, ValueError):
    """The data cannot give what was asked of it (e.g. a validation split with one class only).

    Also a ValueError, as the bare ValueErrors it replaces were, so existing ``except ValueError`` still catch it.
    """

    exit_code = 1
