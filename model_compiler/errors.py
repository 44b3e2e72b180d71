"""Compiler errors, each naming the cause and the fix.

CompileError
├── SourceError        the model cannot be loaded or exported
├── DataError          calibration/validation data missing or of the wrong shape
└── GateFailed         no variant passed the accuracy gate for a profile
"""


class CompileError(Exception):
    pass


class SourceError(CompileError):
    pass


class DataError(CompileError):
    pass


class GateFailed(CompileError):
    pass
