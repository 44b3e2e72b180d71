"""Errors an app or operator can act on.

EdgefedError
├── ConfigError           bad or missing agent configuration / state directory (names the fix)
├── ModelNotDeployed      no local version of the model and no cloud route to answer
├── InputMismatch         inputs do not match the model's signature (names input, expected, got)
├── InferenceFailed       the runtime raised while computing
├── CloudUnavailable      the cloud route failed or timed out (``retryable``: never processed)
│   └── CloudThrottled    the device's cloud budget (calls per minute) is spent
└── StoreError            the model store cannot do what was asked (unknown version, ...)
ArtifactRejected          (from edge_agent.protocol.errors) an artifact failed verification
└── GoldenSamplesFailed   (edge_agent.golden) reason ``golden``: the version missed its golden samples
                          before activation; it stays installed, inactive, the previous one serving
"""

from __future__ import annotations

from edge_agent.protocol.errors import ArtifactRejected, MessageError


class EdgefedError(Exception):
    """Base of the SDK's own errors."""


class ConfigError(EdgefedError):
    pass


class ModelNotDeployed(EdgefedError):
    pass


class InputMismatch(EdgefedError):
    def __init__(self, input_name: str, expected: str, received: str) -> None:
        self.input_name, self.expected, self.received = input_name, expected, received
        super().__init__(f"input {input_name!r}: expected {expected}, received {received}")


class InferenceFailed(EdgefedError):
    pass


class CloudUnavailable(EdgefedError):
    """``retryable``: the server did not process the call (unreachable, overloaded), so a retry is safe."""

    def __init__(self, message: str, retryable: bool = False) -> None:
        self.retryable = retryable
        super().__init__(message)


class CloudThrottled(CloudUnavailable):
    """The device's cloud budget (calls per minute) is spent; the call was not sent."""


class StoreError(EdgefedError):
    pass


__all__ = [
    "ArtifactRejected",
    "CloudThrottled",
    "CloudUnavailable",
    "ConfigError",
    "EdgefedError",
    "InferenceFailed",
    "InputMismatch",
    "MessageError",
    "ModelNotDeployed",
    "StoreError",
]
