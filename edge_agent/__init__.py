"""edgefed edge agent and SDK: ``from edge_agent import EdgeClient``; the errors it raises are importable
from here too (see ``edge_agent.errors`` for the tree)."""

from edge_agent.client import EdgeClient, InferResult, ModelInfo
from edge_agent.errors import (
    ArtifactRejected,
    CloudThrottled,
    CloudUnavailable,
    ConfigError,
    EdgefedError,
    InferenceFailed,
    InputMismatch,
    ModelNotDeployed,
    StoreError,
)
from edge_agent.examples import HardExamples
from edge_agent.protocol.manifest import Interface, TensorSpec

__version__ = "0.1.0"
__all__ = [
    "ArtifactRejected",
    "CloudThrottled",
    "CloudUnavailable",
    "ConfigError",
    "EdgeClient",
    "EdgefedError",
    "HardExamples",
    "InferResult",
    "InferenceFailed",
    "InputMismatch",
    "Interface",
    "ModelInfo",
    "ModelNotDeployed",
    "StoreError",
    "TensorSpec",
    "__version__",
]
