"""neuralmem_fast: fast differentiable memory and prioritized replay for PyTorch.

Public ops (see neuralmem_fast.ops for shapes and semantics):
    content_addressing, memory_read, content_read, memory_write,
    memory_write_, usage_update, content_write_, content_read_write_
each with backend="auto" | "cpu" | "cuda" | "triton" | "torch".
"""
from ._ext import has_cuda_kernels, has_extension
from .backends import available_backends, has_triton
from .replay import ExperienceReplay, PrioritizedReplayBuffer, SumTree
from .ops import (
    content_addressing,
    content_addressing_ref,
    content_read,
    content_read_ref,
    content_read_write_,
    content_write_,
    memory_read,
    memory_read_ref,
    memory_write,
    memory_write_,
    memory_write_ref,
    usage_update,
    usage_update_ref,
)

__version__ = "0.1.0"

__all__ = [
    "SumTree",
    "PrioritizedReplayBuffer",
    "ExperienceReplay",
    "has_extension",
    "has_cuda_kernels",
    "has_triton",
    "available_backends",
    "content_addressing",
    "content_addressing_ref",
    "memory_read",
    "memory_read_ref",
    "content_read",
    "content_read_ref",
    "memory_write",
    "memory_write_ref",
    "memory_write_",
    "usage_update",
    "usage_update_ref",
    "content_write_",
    "content_read_write_",
]

from .memory import NeuralMemoryBank  # noqa: E402

__all__ += ["NeuralMemoryBank"]
