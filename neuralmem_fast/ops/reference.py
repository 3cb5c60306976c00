"""The references: each op's formula in plain PyTorch (the seed's arithmetic, batched).

Each op `X` has `X_ref` of the same signature; the "torch" backend runs it,
the tests compare every kernel with it, and a backward with create_graph=True
differentiates it (ops/autograd.py). Half inputs are computed in float32 and
returned in the input dtype, as the kernels do.
"""
import torch
import torch.nn.functional as F

from ..config import DEFAULT_DECAY, DEFAULT_EPS

__all__ = ["logits_ref", "content_addressing_ref", "memory_read_ref", "content_read_ref", "memory_write_ref",
           "content_write_ref", "content_read_write_ref", "usage_update_ref"]


def _up(t):
    """Half inputs are computed in float32 by the reference too."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def logits_ref(memory, keys, strengths, eps=DEFAULT_EPS):
    """strengths * cos(keys, slots), (B,H,N), in float32 for half inputs: the seed's formula."""
    k = F.normalize(_up(keys), dim=-1, eps=eps)
    m = F.normalize(_up(memory), dim=-1, eps=eps)
    return _up(strengths).unsqueeze(-1) * torch.matmul(k, m.transpose(-1, -2))


def content_addressing_ref(memory, keys, strengths, eps=DEFAULT_EPS):
    return torch.softmax(logits_ref(memory, keys, strengths, eps), dim=-1).to(memory.dtype)


def memory_read_ref(memory, weights):
    return torch.matmul(_up(weights), _up(memory)).to(memory.dtype)


def content_read_ref(memory, keys, strengths, eps=DEFAULT_EPS):
    return memory_read_ref(memory, content_addressing_ref(memory, keys, strengths, eps))


def memory_write_ref(memory, weights, erase, add):
    m, w, e, a = _up(memory), _up(weights), _up(erase), _up(add)
    # (B,W,N,1) * (B,W,1,D): per-head erase/add matrices, as the seed's outer()
    keep = torch.prod(1 - w.unsqueeze(-1) * e.unsqueeze(-2), dim=1)
    added = torch.sum(w.unsqueeze(-1) * a.unsqueeze(-2), dim=1)
    return (m * keep + added).to(memory.dtype)


def content_write_ref(memory, keys, strengths, erase, add, eps=DEFAULT_EPS):
    """Erase-add write whose weights address the memory before the write, out of place."""
    return memory_write_ref(memory, content_addressing_ref(memory, keys, strengths, eps), erase, add)


def content_read_write_ref(memory, read_keys, read_strengths, write_keys, write_strengths, erase, add,
                           eps=DEFAULT_EPS):
    """content_read, then content_write, both addressing the memory before the write: (reads, new memory)."""
    return (content_read_ref(memory, read_keys, read_strengths, eps),
            content_write_ref(memory, write_keys, write_strengths, erase, add, eps))


def usage_update_ref(usage, weights, decay=DEFAULT_DECAY):
    return (decay * _up(usage) + _up(weights).sum(dim=1)).to(usage.dtype)

