"""The functional memory ops, their references, and what registers them.

    registry    the op list and schemas, read from the dispatcher
    reference   each op's formula in plain PyTorch (`X_ref`)
    dispatch    the backend choice (reads the measured table; imports no Triton)
    fake        fake kernels for torch.compile
    autograd    gradient formulas registered on the ops themselves
    inplace     PyTorch's in-place rules for the forward-only in-place ops
    validation  argument checks with errors that name the argument
    functional  the public functions
    triton/     the Triton kernels, registered on first Triton use

Importing this package loads the native extension (which declares the ops)
and registers their fake kernels and gradient formulas; nothing else.
"""
from .. import _ext
from ..config import DEFAULT_DECAY, DEFAULT_EPS
from . import autograd as _autograd
from . import fake as _fake
from .dispatch import available_backends, choose, has_triton
from .functional import (content_addressing, content_read, content_read_write, content_read_write_, content_write,
                         content_write_, memory_read, memory_write, memory_write_, usage_update)
from .inplace import check_inplace
from .reference import (content_addressing_ref, content_read_ref, content_read_write_ref, content_write_ref, logits_ref,
                        memory_read_ref, memory_write_ref, usage_update_ref)

if _ext.has_extension():
    _fake.register_fakes("neuralmem")
    _autograd.register_autograd("neuralmem")

__all__ = [
    "DEFAULT_EPS", "DEFAULT_DECAY", "available_backends", "has_triton", "choose", "check_inplace",
    "content_addressing", "memory_read", "content_read", "memory_write", "memory_write_", "usage_update",
    "content_write", "content_write_", "content_read_write", "content_read_write_",
    "logits_ref", "content_addressing_ref", "memory_read_ref", "content_read_ref", "memory_write_ref",
    "content_write_ref", "content_read_write_ref", "usage_update_ref",
]
