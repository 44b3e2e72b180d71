"""What a compile is asked for (CompileOptions) and what it reports per profile (ProfileReport)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model_compiler.errors import CompileError


@dataclass(frozen=True)
class CompileOptions:
    name: str
    version: str
    key_path: Path
    release: int = 0  # 0: the release of this version's artifacts already in the output directory, else Unix time
    metric: str = "top1"
    tolerance: float | None = None
    latency_batch: int = 1
    expires_days: int = 365
    max_batch: int = 0  # the most rows one call may carry, part of the interface; 0: no limit

    def check(self) -> None:
        """Raise CompileError for options that contradict each other."""
        if self.release < 0 or self.max_batch < 0 or self.latency_batch < 1:
            raise CompileError("--release and --max-batch must be 0 or positive, --latency-batch positive")
        if self.max_batch and self.latency_batch > self.max_batch:
            raise CompileError(f"--latency-batch {self.latency_batch} is over --max-batch {self.max_batch}; "
                               "time at a batch the interface allows")  # fmt: skip


@dataclass
class ProfileReport:
    """One profile's outcome: the artifact written, or ``error`` (then ``artifact`` is empty)."""

    profile: str
    artifact: str
    artifact_id: str
    chosen: str
    reason: str
    variants: list[dict[str, Any]] = field(default_factory=list)
    runtime: str = ""
    error: str = ""
    warnings: list[str] = field(default_factory=list)
