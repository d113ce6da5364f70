"""The project's exceptions, at the ground floor: this module imports nothing of dblock.

A ``ConfigError`` is a setting out of range or unknown; ``run.py`` reports it as one
``error:`` line (exit code 2). A ``NonFiniteError`` stops training on a NaN/inf loss.
"""

from __future__ import annotations

from pathlib import Path


class ConfigError(ValueError):
    """A setting is out of range or unknown; the message names it and the allowed values."""


def first_line(err: BaseException) -> str:
    """An exception's message as one line: its first paragraph, lines joined."""
    lines = [line.strip() for line in str(err).strip().split("\n\n")[0].splitlines()]
    return " ".join(line for line in lines if line) or type(err).__name__


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or non-finite weights; the run must stop."""


class CheckpointWriteError(OSError):
    """A file of the run cannot be written (read-only or failing filesystem); the previous
    version of the file is kept. The message names the file, the reason and what to do."""

    def __init__(self, path, err: OSError) -> None:
        self.path = Path(path)
        reason = err.strerror or type(err).__name__
        super().__init__(
            err.errno,
            f"cannot write {self.path} ({reason}); the previous version of the file is kept: "
            "make the run folder writable, or copy the run folder elsewhere (cp -a) and resume "
            "the copy",
        )

    def __str__(self) -> str:
        return self.strerror
