"""The public functional ops.

Shapes (B memories, N slots, D slot width, H read heads, W write heads):
  memory (B,N,D)  keys (B,H,D)  strengths (B,H)  weights (B,H,N)
  erase/add (B,W,D)  write weights (B,W,N)  usage (B,N)

cos(k, m) = k.m / (max(|k|, eps) * max(|m|, eps)): exactly F.normalize.

Each op validates its arguments once (ops/validation.py), asks dispatch for
the backend, and calls either the reference (backend "torch") or the
registered op of the backend's library (torch.ops.neuralmem for "cpu" and
"cuda", torch.ops.neuralmem_triton for "triton"), whose gradient formula is
registered on the op itself (ops/autograd.py). When no gradient is needed
the op is called below autograd, which skips the formula's Python wrapper
(a small step is overhead-bound). Kernels receive contiguous tensors of one
dtype on one device, except the CPU read and write kernels, which take
strided small inputs themselves.
"""
import torch

from ..config import DEFAULT_DECAY, DEFAULT_EPS
from .autograd import function
from .dispatch import choose, library
from .inplace import check_inplace
from .reference import (content_addressing_ref, content_read_ref, content_read_write_ref, content_write_ref, logits_ref,
                        memory_read_ref, memory_write_ref, usage_update_ref)
from .validation import (_c, _check, _check_content_write, _check_dims, _check_keys, _check_usage,
                         _check_weights, _check_write, _keys_ok, _usage_ok, _write_vectors_ok)

__all__ = ["content_addressing", "memory_read", "content_read", "usage_update", "memory_write", "memory_write_",
           "content_write", "content_write_", "content_read_write", "content_read_write_"]

_NATIVE_LIB = torch.ops.neuralmem
_below_autograd = torch._C._AutoDispatchBelowAutograd


def _differentiable(be, name, *args):
    """The op with its gradient formula: an autograd.Function in eager mode
    (ops/autograd.function), the registered formula under torch.compile."""
    if torch.compiler.is_compiling():
        return getattr(library(be), name)(*args)
    ns = "neuralmem_triton" if be == "triton" else "neuralmem"
    if be == "triton":
        library(be)  # registers the Triton library on first use
    return function(ns, name).apply(*args)


def _no_grad_needed(*ts):
    """True when no input needs a gradient (and not tracing): the op may run below autograd."""
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in ts)) and not torch.compiler.is_compiling()


def content_addressing(memory, keys, strengths, eps=DEFAULT_EPS, backend="auto"):
    """Softmax content weights (B,H,N) of each head's key over the slots."""
    _, N, _, _ = _check_keys(memory, keys, strengths, eps)
    be = choose(backend, "content_addressing", memory.device, N)
    if be == "torch":
        return content_addressing_ref(memory, keys, strengths, eps)
    memory, keys, strengths = _c(memory), _c(keys), _c(strengths)
    if _no_grad_needed(memory, keys, strengths):
        with _below_autograd():
            return library(be).content_addressing(memory, keys, strengths, eps)
    return _differentiable(be, "content_addressing", memory, keys, strengths, eps)


def memory_read(memory, weights, backend="auto"):
    """Reads (B,H,D) = weights (B,H,N) @ memory (B,N,D)."""
    _, N, _, _ = _check_weights("weights", memory, weights, "H")
    be = choose(backend, "memory_read", memory.device, N)
    if be == "torch":
        return memory_read_ref(memory, weights)
    memory, weights = _c(memory), _c(weights)
    if _no_grad_needed(memory, weights):
        with _below_autograd():
            return library(be).memory_read(memory, weights)
    return _differentiable(be, "memory_read", memory, weights)


def content_read(memory, keys, strengths, eps=DEFAULT_EPS, backend="auto", return_lse=False):
    """Fused addressing + read: reads (B,H,D) without materialising (B,H,N).

    With return_lse=True also returns the per-(b,h) logsumexp of the logits.
    """
    if _keys_ok(memory, keys, strengths, eps):
        N = memory.shape[1]
    else:
        _, N, _, _ = _check_keys(memory, keys, strengths, eps)
    be = choose(backend, "content_read", memory.device, N)
    if be == "torch":
        if return_lse:
            # content_read_ref's arithmetic, with the logits computed once for both outputs.
            logits = logits_ref(memory, keys, strengths, eps)
            weights = torch.softmax(logits, dim=-1).to(memory.dtype)
            return memory_read_ref(memory, weights), torch.logsumexp(logits, dim=-1)
        return content_read_ref(memory, keys, strengths, eps)
    if be != "cpu":  # the CPU kernels take strided inputs themselves
        memory, keys, strengths = _c(memory), _c(keys), _c(strengths)
    if _no_grad_needed(memory, keys, strengths):
        with _below_autograd():
            reads, lse = library(be).content_read(memory, keys, strengths, eps)
    else:
        reads, lse = _differentiable(be, "content_read", memory, keys, strengths, eps)
    return (reads, lse) if return_lse else reads


def usage_update(usage, weights, decay=DEFAULT_DECAY, backend="auto"):
    """decay * usage (B,N) + sum over write heads of weights (B,W,N)."""
    _check("weights", weights, 3, "(B, W, N)")
    B, W, N = weights.shape
    _check("usage", usage, 2, "(B, N)", weights.dtype, weights.device)
    _check_dims("usage", usage, (B, N), "(B, N)")
    if not (0.0 <= decay <= 1.0):
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    be = choose(backend, "usage_update", usage.device, N)
    if be == "torch":
        return usage_update_ref(usage, weights, decay)
    usage, weights = _c(usage), _c(weights)
    if _no_grad_needed(usage, weights):
        with _below_autograd():
            return library(be).usage_update(usage, weights, decay)
    return _differentiable(be, "usage_update", usage, weights, decay)


def memory_write(memory, weights, erase, add, usage=None, decay=DEFAULT_DECAY, backend="auto"):
    """Erase-add write for W heads: m * prod_w(1 - w e) + sum_w w a.

    With `usage` given, returns (new_memory, new_usage) where new_usage =
    decay * usage + sum_w weights.
    """
    _, N, _, _ = _check_write(memory, weights, erase, add)
    if usage is not None:
        _check_usage(usage, memory, decay)
    be = choose(backend, "memory_write", memory.device, N)
    if be == "torch":
        out = memory_write_ref(memory, weights, erase, add)
    else:
        memory, weights, erase, add = _c(memory), _c(weights), _c(erase), _c(add)
        if _no_grad_needed(memory, weights, erase, add):
            with _below_autograd():
                out = library(be).memory_write(memory, weights, erase, add)
        else:
            out = _differentiable(be, "memory_write", memory, weights, erase, add)
    if usage is None:
        return out
    return out, usage_update(usage, weights, decay, backend=be)


def memory_write_(memory, weights, erase, add, usage=None, decay=DEFAULT_DECAY, backend="auto"):
    """In-place erase-add write. Updates `usage` in place too when given.

    Forward-only: with grad mode on, an input that requires grad is refused
    (use `memory_write`, out of place, to train through a write). The version
    counters of `memory` (and `usage`) move, so a pending backward that saved
    them raises instead of reading the new contents; inputs that share memory
    with `memory` or `usage` are refused.
    """
    _, N, _, _ = _check_write(memory, weights, erase, add)
    if usage is not None:
        _check_usage(usage, memory, decay)
    if not memory.is_contiguous():
        raise ValueError("memory must be contiguous for the in-place write (call .contiguous() first)")
    be = choose(backend, "memory_write_", memory.device, N)
    # Usage is written by a second op: check both before either is written.
    check_inplace("memory_write_", [("memory", memory), ("usage", usage)],
                  [("weights", weights), ("erase", erase), ("add", add)])
    if be == "cpu" or be == "cuda":  # csrc/inplace.cpp checks again, writes and bumps the version
        _NATIVE_LIB.memory_write_(memory, _c(weights), _c(erase), _c(add))
    else:
        with torch.no_grad():
            if be == "torch":
                memory.copy_(memory_write_ref(memory, weights, erase, add))
            else:
                library(be).memory_write_(memory, _c(weights), _c(erase), _c(add))
    if usage is not None:
        with torch.no_grad():
            usage.copy_(usage_update(usage, weights, decay, backend=be))
    return memory


def content_write(memory, keys, strengths, erase, add, eps=DEFAULT_EPS, backend="auto"):
    """Differentiable content-addressed erase-add write, out of place: returns the new memory (B,N,D).

    The same as ``memory_write(memory, content_addressing(memory, keys,
    strengths, eps), erase, add)``, in one op: the (B,W,N) weights never
    exist on the CPU, the forward streams the memory twice and the backward
    reads it twice and writes its gradient once (the two separate ops' backward
    reads it five times and sums two gradients of its size). Keys (B,W,D),
    strengths (B,W), erase and add (B,W,D).
    """
    if not (_keys_ok(memory, keys, strengths, eps) and _write_vectors_ok(memory, keys, erase, add)):
        _check_content_write(_c(memory), keys, strengths, erase, add, None, eps, 1.0)
    be = choose(backend, "content_write", memory.device, memory.shape[1])
    if be == "torch":
        return content_write_ref(memory, keys, strengths, erase, add, eps)
    args = (_c(memory), _c(keys), _c(strengths), _c(erase), _c(add), eps)
    if _no_grad_needed(*args[:5]):
        with _below_autograd():
            return library(be).content_write(*args)[0]
    return _differentiable(be, "content_write", *args)[0]


def content_write_(memory, keys, strengths, erase, add, usage=None, eps=DEFAULT_EPS, decay=DEFAULT_DECAY,
                   backend="auto"):
    """In place: address the memory by content with W write keys, then erase-add.

    The weights come from the memory before the write (as in the seed) and
    are never materialised by the native kernels. With `usage`, it is updated
    in place and the least-used slot after the update is returned, (B,) int64;
    otherwise returns None.

    Forward-only, with PyTorch's in-place rules (see `check_inplace`): the
    version counters of `memory` and `usage` move; with grad mode on, an input
    that requires grad is refused (use `content_addressing` + `memory_write`,
    out of place, to train through a write); inputs that share memory with
    `memory` or `usage` are refused.
    """
    if not (_keys_ok(memory, keys, strengths, eps) and _write_vectors_ok(memory, keys, erase, add)
            and (usage is None or _usage_ok(usage, memory, decay)) and memory.is_contiguous()):
        _check_content_write(memory, keys, strengths, erase, add, usage, eps, decay)
    N = memory.shape[1]
    be = choose(backend, "content_write_", memory.device, N)
    if be == "cpu":  # the CPU kernels take strided inputs themselves; csrc/inplace.cpp checks and bumps
        least = _NATIVE_LIB.content_write_(memory, usage, keys, strengths, erase, add, eps, decay)
        return least if usage is not None else None
    if be == "cuda":
        least = _NATIVE_LIB.content_write_(memory, usage, _c(keys), _c(strengths), _c(erase), _c(add), eps, decay)
        return least if usage is not None else None
    check_inplace("content_write_", [("memory", memory), ("usage", usage)],
                  [("keys", keys), ("strengths", strengths), ("erase", erase), ("add", add)])
    with torch.no_grad():
        if be == "torch":
            w = content_addressing_ref(memory, keys, strengths, eps)
            memory.copy_(memory_write_ref(memory, w, erase, add))
            if usage is None:
                return None
            usage.copy_(usage_update_ref(usage, w, decay))
            return torch.argmin(usage, dim=1)
        # triton: its Autograd kernel (inplace_autograd_kernel) has checked; it bumps the versions
        least = library(be).content_write_(memory, usage, _c(keys), _c(strengths), _c(erase), _c(add), eps, decay)
    return least if usage is not None else None


def content_read_write(memory, read_keys, read_strengths, write_keys, write_strengths, erase, add, eps=DEFAULT_EPS,
                       backend="auto"):
    """One read-then-write step, differentiable and out of place: returns (reads, new memory).

    The same as ``content_read(memory, read_keys, read_strengths)`` and
    ``content_write(memory, write_keys, write_strengths, erase, add)``: both
    address the memory before the write. On the CPU, in float32/float64, the
    forward streams the memory twice (the read's pass also gathers the write
    heads' softmax statistics) and the backward reads it twice and writes one
    memory gradient, the sum of the two ops' (the separate ops: 3 passes, and
    2 + 5 plus a sum of two gradients). Half inputs run the two backwards.
    The CUDA and Triton ops run the two ops. Read keys (B,H,D), strengths
    (B,H); write keys, erase and add (B,W,D), strengths (B,W).
    """
    if not (_keys_ok(memory, read_keys, read_strengths, eps) and _keys_ok(memory, write_keys, write_strengths, eps)
            and _write_vectors_ok(memory, write_keys, erase, add)):
        _check_keys(_c(memory), read_keys, read_strengths, eps, prefix="read_")
        _check_content_write(_c(memory), write_keys, write_strengths, erase, add, None, eps, 1.0, prefix="write_")
    be = choose(backend, "content_read_write", memory.device, memory.shape[1])
    if be == "torch":
        return content_read_write_ref(memory, read_keys, read_strengths, write_keys, write_strengths, erase, add, eps)
    args = tuple(_c(t) for t in (memory, read_keys, read_strengths, write_keys, write_strengths, erase, add)) + (eps,)
    if _no_grad_needed(*args[:7]):
        with _below_autograd():
            out = library(be).content_read_write(*args)
    else:
        out = _differentiable(be, "content_read_write", *args)
    return out[0], out[1]


def content_read_write_(memory, read_keys, read_strengths, write_keys, write_strengths, erase, add, usage=None,
                        eps=DEFAULT_EPS, decay=DEFAULT_DECAY, backend="auto"):
    """One read-then-write step, in place: returns (reads, least).

    The same as ``content_read(memory, read_keys, read_strengths)`` followed by
    ``content_write_(memory, write_keys, write_strengths, erase, add, usage)``:
    the reads and the write weights both address the memory as it was before
    the write. The CPU kernel streams the memory twice instead of three times
    (the read pass also gathers the write heads' softmax statistics); the
    CUDA and Triton ops run their read, then their write. Forward-only: the
    memory is overwritten, so nothing here is differentiable, and with grad
    mode on an input that requires grad is refused (use `content_read`, then
    `content_addressing` and `memory_write`, out of place, for training).
    `least` is the least-used slot after the write, (B,) int64, or None
    without `usage`.
    """
    if not (_keys_ok(memory, read_keys, read_strengths, eps)
            and _keys_ok(memory, write_keys, write_strengths, eps)
            and _write_vectors_ok(memory, write_keys, erase, add)
            and (usage is None or _usage_ok(usage, memory, decay)) and memory.is_contiguous()):
        _check_keys(memory, read_keys, read_strengths, eps, prefix="read_")
        _check_content_write(memory, write_keys, write_strengths, erase, add, usage, eps, decay, prefix="write_")
    be = choose(backend, "content_read_write_", memory.device, memory.shape[1])
    args = (read_keys, read_strengths, write_keys, write_strengths, erase, add)
    if be == "cpu" or be == "cuda":  # csrc/inplace.cpp checks and bumps
        if be != "cpu":  # the CPU kernels take strided inputs themselves
            args = tuple(_c(t) for t in args)
        reads, _, least = _NATIVE_LIB.content_read_write_(memory, usage, *args, eps, decay)
        return reads, (least if usage is not None else None)
    check_inplace("content_read_write_", [("memory", memory), ("usage", usage)],
                  list(zip(("read_keys", "read_strengths", "write_keys", "write_strengths", "erase", "add"), args)))
    with torch.no_grad():
        if be == "torch":
            reads = content_read_ref(memory, read_keys, read_strengths, eps)
            least = content_write_(memory, write_keys, write_strengths, erase, add, usage=usage, eps=eps,
                                   decay=decay, backend="torch")
            return reads, least
        reads, _, least = library(be).content_read_write_(memory, usage, *(_c(t) for t in args), eps, decay)
    return reads, (least if usage is not None else None)
