"""neuralmem_fast: fast differentiable memory and prioritized replay for PyTorch.

Public ops (see neuralmem_fast.ops for shapes and semantics):
    content_addressing, memory_read, content_read, memory_write,
    memory_write_, usage_update, content_write, content_write_, content_read_write,
    content_read_write_
each with backend="auto" | "cpu" | "cuda" | "triton" | "torch".

Layers, whose imports run one way only (docs/architecture.md):
    _ext, config -> ops -> replay, nn -> models -> apps
"""
from ._ext import has_cuda_kernels, has_extension
from .config import MemoryConfig
from .ops import (
    available_backends,
    content_addressing,
    content_addressing_ref,
    content_read,
    content_read_ref,
    content_read_write,
    content_read_write_,
    content_write,
    content_write_,
    has_triton,
    memory_read,
    memory_read_ref,
    memory_write,
    memory_write_,
    memory_write_ref,
    usage_update,
    usage_update_ref,
)
from .replay import ExperienceReplay, PrioritizedReplayBuffer, SumTree
from .nn import NeuralMemoryBank

__version__ = "0.1.0"

__all__ = [
    "MemoryConfig",
    "NeuralMemoryBank",
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
    "content_write",
    "content_write_",
    "content_read_write",
    "content_read_write_",
    "make_agent",
]


def make_agent(*args, **kwargs):
    """The fast continual-learning agent (neuralmem_fast.models.make_agent)."""
    from .models import make_agent as _make_agent

    return _make_agent(*args, **kwargs)
