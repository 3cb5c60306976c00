"""nn.Modules over the ops: the drop-in NeuralMemoryBank, the sharded memory, and the DNC's access and core."""
from .access import AccessInterface, AccessState, MemoryAccess
from .memory_bank import NeuralMemoryBank
from .memory_core import CoreState, MemoryCore
from .sharded import ShardedMemory, shard_bounds

__all__ = ["NeuralMemoryBank", "ShardedMemory", "shard_bounds", "MemoryAccess", "AccessInterface", "AccessState",
           "MemoryCore", "CoreState"]
