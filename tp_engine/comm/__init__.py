"""Communicators: the collectives the parallel layers run on."""
from .base import Communicator, SingleProcessCommunicator
from .torch_dist import TorchDistCommunicator

__all__ = ["Communicator", "SingleProcessCommunicator", "TorchDistCommunicator"]
