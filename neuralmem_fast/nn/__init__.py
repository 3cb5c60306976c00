"""nn.Modules over the ops: the drop-in NeuralMemoryBank, the sharded memory, the DNC's access
and core, and the bounded-memory scan for backpropagation through T steps."""
from .access import AccessInterface, AccessState, MemoryAccess
from .memory_bank import NeuralMemoryBank
from .memory_core import CoreState, MemoryCore
from .scan import checkpointed_scan, default_segment
from .sharded import ShardedMemory, shard_bounds

__all__ = ["NeuralMemoryBank", "ShardedMemory", "shard_bounds", "MemoryAccess", "AccessInterface", "AccessState",
           "MemoryCore", "CoreState", "checkpointed_scan", "default_segment"]
