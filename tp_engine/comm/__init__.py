"""Communicators: the collectives the parallel layers run on."""
from .base import Communicator, SingleProcessCommunicator
from .mpi import MPICommunicator, mpi_world_from_env
from .shm import ShmCommunicator, try_shm_communicator
from .torch_dist import TorchDistCommunicator

__all__ = [
    "Communicator",
    "MPICommunicator",
    "ShmCommunicator",
    "SingleProcessCommunicator",
    "TorchDistCommunicator",
    "mpi_world_from_env",
    "try_shm_communicator",
]
