"""nn.Modules over the ops: the drop-in NeuralMemoryBank, the sharded memory, and the
bounded-memory scan for backpropagation through T steps."""
from .memory_bank import NeuralMemoryBank
from .scan import checkpointed_scan, default_segment
from .sharded import ShardedMemory, shard_bounds

__all__ = ["NeuralMemoryBank", "ShardedMemory", "shard_bounds", "checkpointed_scan", "default_segment"]
