"""The one exception type for problems a user can cause and fix; `cli/` shows it as one line."""

from __future__ import annotations

import errno
from pathlib import Path


class EnsError(Exception):
    """A user-fixable problem. The message names the problem and the fix; `exit_code` is what `ens` exits with."""

    exit_code = 1

    def __init__(self, message: object = "", *args):
        # one line, whatever the message quotes (a parser's multi-line report, a path with a newline): cli/
        # prints `error: <message>` and tests and scripts read exactly one line
        super().__init__(" ".join(str(message).split()), *args)


class ConfigError(EnsError):
    """Bad input in a YAML file or on the command line (exit code 2)."""

    exit_code = 2


class KaggleError(EnsError):
    """A Kaggle call that failed. `str(error)` is one line naming the problem and the fix; `reason` is a short
    form for the submission history; `transient` is True when the same call may well succeed later; `kind` and
    `detail` say how the call failed (the child's classification, or 'timeout' / 'crashed' in the parent), from
    which `submit` judges `maybe_submitted`."""

    def __init__(self, message: str, reason: str | None = None, transient: bool = False, kind: str | None = None,
                 detail: str = ""):
        super().__init__(message)  # one line: EnsError collapses the whitespace
        self.reason = " ".join(str(reason or self).split())
        self.transient = transient
        self.kind, self.detail = kind, detail
        self.maybe_submitted = False


def disk_full(e: OSError) -> bool:
    """Whether an OSError means no space (or quota) left: every writer turns it into `disk_full_error`."""
    return e.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full_error(folder: Path, what: str) -> EnsError:
    return EnsError(f"the disk is full while writing {what} in {folder}: free some space there (`df -h {folder}`) "
                    "and run again; nothing finished was lost")
