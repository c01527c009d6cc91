"""User-facing errors.

Every problem a user can fix (bad option, missing file, mismatched checkpoint) raises a
``TeachxError`` whose message is one line naming the problem and the fix. The CLI prints it as
``teachx: error: <message>`` and exits with code 2, without a traceback.
"""

from __future__ import annotations


class TeachxError(Exception):
    """A problem the user can fix; the message says what is wrong and how to fix it."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line


class ConfigError(TeachxError):
    """Unknown key, bad value or bad combination of options."""


class DataError(TeachxError):
    """Missing, corrupted or unexpected data files or images."""


class CheckpointError(TeachxError):
    """A checkpoint that is missing, corrupted or does not match the model."""


class RunDirError(TeachxError):
    """A run directory that exists and would be overwritten."""
