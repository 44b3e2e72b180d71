"""Compiler errors, each naming the cause and the fix.

CompileError
├── SourceError        the model cannot be loaded or exported
├── DataError          calibration/validation data missing or of the wrong shape
└── GateFailed         no variant passed the accuracy gate for a profile (``attempts``: each one's outcome)
"""

from __future__ import annotations

from typing import Any


class CompileError(Exception):
    pass


class SourceError(CompileError):
    pass


class DataError(CompileError):
    pass


class GateFailed(CompileError):
    def __init__(self, message: str, attempts: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.attempts = attempts or []
