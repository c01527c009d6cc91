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


class CorruptionError(TeachxError):
    """A file teachx wrote and trusts (checkpoint, map store, stage record, ...) whose content no
    longer matches the digest written with it: bit rot, a bad disk, or an edit by hand.

    Built with :meth:`of`, so the message always has the same shape -- ``<what> '<path>' is
    corrupted (<problem>); <fix>`` -- and a caller that knows more (e.g. which stage of a run made
    the file) can replace the fix with :meth:`with_fix`.
    """

    path: str = ""
    problem: str = ""
    what: str = "file"

    @classmethod
    def of(cls, path, problem: str, fix: str, what: str = "file") -> "CorruptionError":
        err = cls(f"{what} '{path}' is corrupted ({problem}); {fix}")
        err.path, err.problem, err.what = str(path), problem, what
        return err

    def with_fix(self, fix: str) -> "CorruptionError":
        return type(self).of(self.path, self.problem, fix, self.what)


class CorruptCheckpointError(CheckpointError, CorruptionError):
    """A checkpoint whose tensors or metadata do not match its content digest."""


class OutputError(TeachxError, OSError):
    """A file teachx could not write (read-only or full file system, no permission).

    Also an ``OSError``, so code that tolerates a failed optional write (a cache) still does.
    """

    def __init__(self, message: str, errno: int | None = None, path: str | None = None):
        super().__init__(message)
        self.os_errno, self.path = errno, path
