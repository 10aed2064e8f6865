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
