"""The Iris network: task encoding from references and all-classes-in-one-pass query decoding."""
from .architecture import IrisArchitecture
from .loss import MaskedDiceBCELoss
from .memory import count_parameters, estimate_memory_bytes
from .network import IrisNetwork, build_network
from .task import TaskEmbedding, TaskMismatchError

__all__ = ["IrisArchitecture", "IrisNetwork", "TaskEmbedding", "TaskMismatchError", "build_network",
           "estimate_memory_bytes", "count_parameters", "MaskedDiceBCELoss"]
