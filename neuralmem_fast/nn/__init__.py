"""nn.Modules over the ops: the drop-in NeuralMemoryBank and the sharded memory."""
from .memory_bank import NeuralMemoryBank
from .sharded import ShardedMemory, shard_bounds

__all__ = ["NeuralMemoryBank", "ShardedMemory", "shard_bounds"]
