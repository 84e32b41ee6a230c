"""Communicators: the collectives the parallel layers run on."""
from .base import Communicator, SingleProcessCommunicator
from .groups import p2p_of, partition, subgroup
from .hierarchical import HierarchicalCommunicator
from .host_identity import HostLayout, detect_hosts
from .mpi import MPICommunicator, mpi_world_from_env
from .shm import ShmCommunicator, try_shm_communicator
from .tcp import TcpCommunicator
from .torch_dist import TorchDistCommunicator

__all__ = [
    "Communicator",
    "HierarchicalCommunicator",
    "HostLayout",
    "MPICommunicator",
    "ShmCommunicator",
    "SingleProcessCommunicator",
    "TcpCommunicator",
    "TorchDistCommunicator",
    "detect_hosts",
    "mpi_world_from_env",
    "p2p_of",
    "partition",
    "subgroup",
    "try_shm_communicator",
]
