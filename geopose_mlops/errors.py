"""Error types a user can act on: each names the file or value at fault and what was expected."""

from __future__ import annotations

from pathlib import Path


class GeoposeError(Exception):
    """Base class of every error this package raises on purpose."""


class DataError(GeoposeError):
    """A data file is missing, unreadable or inconsistent.

    Args:
        path: The file at fault.
        reason: What is wrong with it, in words a user can act on.
    """

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ConfigError(GeoposeError):
    """A configuration value or option is out of its allowed range or unknown."""


class BadFilesError(DataError):
    """Several data files are bad: every one is named with its reason (one line per file after the first).

    Args:
        path: The data set (or folder) the files belong to.
        problems: ``(file, reason)`` for every bad file found.
    """

    def __init__(self, path: str | Path, problems: list[tuple[Path, str]]) -> None:
        self.problems = [(Path(p), r) for p, r in problems]
        listed = "; ".join(f"{p}: {r}" for p, r in self.problems)
        super().__init__(path, f"{len(self.problems)} bad file(s): {listed}")


class TrackingStoreError(GeoposeError):
    """The MLflow tracking store cannot be reached or refused a request (the message names its URI)."""
