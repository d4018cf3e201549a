"""Project exceptions: every message names the file, column, key or value and what was expected."""

from __future__ import annotations


class Ex2lError(Exception):
    """Base class of every error the toolkit raises on bad input; the CLI prints it as one line."""


class ConfigError(Ex2lError):
    """A configuration key, value or type is wrong."""


class DataError(Ex2lError):
    """A dataset root, file, column or value is missing or malformed."""


class TrainingError(Ex2lError):
    """Training cannot go on (a NaN loss, an unreadable checkpoint, ...)."""
