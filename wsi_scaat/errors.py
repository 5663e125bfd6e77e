"""Errors that reach the user as one line naming the file and the cause."""

from __future__ import annotations

from pathlib import Path


class WsiScaatError(Exception):
    """Base error: ``str(err)`` is a single line fit for the terminal and the run summary."""

    def __init__(self, path: str | Path | None, cause: str) -> None:
        self.path = None if path is None else str(path)
        self.cause = " ".join(str(cause).split())  # one line, whatever the library said
        super().__init__(f"{self.path}: {self.cause}" if self.path else self.cause)


class SlideOpenError(WsiScaatError):
    """The slide cannot be opened by any reader backend."""


class SlideReadError(WsiScaatError):
    """The slide opened but its pixel data could not be read."""


class MppUnknownError(WsiScaatError):
    """The slide carries no microns-per-pixel and no override was given."""


class ConfigError(WsiScaatError):
    """A configuration file or value is invalid."""


class StoreError(WsiScaatError):
    """A patch store is missing, incomplete or inconsistent."""
