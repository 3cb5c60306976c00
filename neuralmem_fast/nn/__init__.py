"""nn.Modules over the ops: the drop-in NeuralMemoryBank, the sharded memory, the DNC's access
and core, and backpropagation through T steps in bounded memory (checkpointed or reversed)."""
from .access import AccessInterface, AccessState, MemoryAccess
from .memory_bank import NeuralMemoryBank
from .memory_core import CoreState, MemoryCore
from .reversible import reversible_read_write
from .scan import checkpointed_scan, default_segment
from .sharded import ShardedMemory, shard_bounds

__all__ = ["NeuralMemoryBank", "ShardedMemory", "shard_bounds", "MemoryAccess", "AccessInterface", "AccessState",
           "MemoryCore", "CoreState", "checkpointed_scan", "default_segment",
           "reversible_read_write"]
