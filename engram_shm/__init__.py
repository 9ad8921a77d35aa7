"""engram_shm: a streaming memory engine on shared memory, Numba HNSW and ZeroMQ."""

from .config import EngineConfig
from .engine.attach import AttachedEngine, attach
from .engine.embedded import Ack, Engine
from .engine.reader import Memory
from .errors import CODES, EngramError
from .transport.client import Client

__version__ = "0.1.0"
__all__ = ["Engine", "EngineConfig", "Ack", "Memory", "attach", "AttachedEngine", "Client",
           "EngramError", "CODES", "__version__"]
