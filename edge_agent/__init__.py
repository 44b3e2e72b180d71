"""edgefed edge agent and SDK: ``from edge_agent import EdgeClient``."""

from edge_agent.client import EdgeClient, InferResult, ModelInfo

__version__ = "0.1.0"
__all__ = ["EdgeClient", "InferResult", "ModelInfo", "__version__"]
