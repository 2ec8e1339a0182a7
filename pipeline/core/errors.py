"""User-facing errors: the CLI prints the message (no traceback) and exits non-zero.

Messages must never carry PHI: no patient names, IDs, dates, institutions or
source file paths (real exports name folders after patients).
"""


class MedxferError(Exception):
    exit_code = 2


class StageError(MedxferError):
    """A stage ran but cannot produce a usable result (e.g. nothing usable was ingested)."""

    exit_code = 1
