"""Plain configuration shared by every layer: the memory's shape and defaults.

Nothing here imports torch; every other module may import this one.
"""
from dataclasses import dataclass

# cos(k, m) = k.m / (max(|k|, eps) * max(|m|, eps)): F.normalize's eps in the seed.
DEFAULT_EPS = 1e-12
# The sparse access's norm floor in the same cosine: DeepMind's DNC floor, sqrt(|m|^2 + 1e-6) ~ max(|m|, 1e-3)
# (nn/sparse_access.py, "Faint rows").
DEFAULT_SPARSE_EPS = 1e-3
# usage <- decay * usage + sum_w weights: the seed's decay.
DEFAULT_DECAY = 0.99


@dataclass
class MemoryConfig:
    """The seed's MemoryConfig: N slots of width D, read and write heads."""

    memory_size: int = 128
    memory_dim: int = 64
    num_read_heads: int = 4
    num_write_heads: int = 1
