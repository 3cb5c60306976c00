"""PyTorch's in-place rules for the forward-only in-place ops.

The Python twin of csrc/inplace.cpp and csrc/inplace_checks.h, for the
torch and triton backends (and the Triton library's Autograd kernel).
"""
import torch

# --------------------------------------------------------------------------
FORWARD_ONLY_ALTERNATIVE = {
    "memory_write_": "memory_write (out of place)",
    "content_write_": ("content_addressing followed by memory_write (out of place), "
                       "or NeuralMemoryBank(differentiable=True)"),
    "content_read_write_": "content_read, then content_addressing and memory_write (out of place)",
}


def _extent(t):
    """Byte range [lo, hi) spanned by a tensor's elements in its storage."""
    es = t.element_size()
    last = sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    lo = t.storage_offset() * es
    return lo, lo + (last + 1) * es


def _overlaps(a, b):
    if a is None or b is None or a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    try:
        if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
            return False
    except RuntimeError:  # fake or functional tensors (tracing) have no data: nothing to alias
        return False
    (a0, a1), (b0, b1) = _extent(a), _extent(b)
    return a0 < b1 and b0 < a1


def check_inplace(op, mutated, inputs):
    """PyTorch's in-place rules for a forward-only op that overwrites `mutated`.

    mutated, inputs: sequences of (name, tensor or None). With grad mode on,
    a mutated leaf that requires grad is refused (PyTorch's message), and so
    is any input that requires grad (the op has no gradient: it would be
    dropped). An input sharing memory with a mutated tensor is refused in
    every mode. Raises RuntimeError naming the argument.
    """
    if torch.is_grad_enabled():
        for name, t in mutated:
            if t is not None and t.requires_grad and t.is_leaf:
                raise RuntimeError(f"neuralmem::{op}: {name} is a leaf Variable that requires grad: a leaf Variable "
                                   "that requires grad is being used in an in-place operation.")
        for name, t in (*mutated, *inputs):
            if t is not None and t.requires_grad:
                raise RuntimeError(
                    f"neuralmem::{op} is forward-only (it overwrites the memory in place and has no gradient), "
                    f"but {name} requires grad. For a differentiable write use {FORWARD_ONLY_ALTERNATIVE[op]}; "
                    "to write without gradients, detach the inputs or run under torch.no_grad().")
    if torch.compiler.is_compiling():
        return  # a traced write is functionalised (it writes a copy): no aliasing there
    others = list(inputs)
    for i, (mname, m) in enumerate(mutated):
        for name, t in (*others, *mutated[i + 1:]):
            if _overlaps(m, t):
                raise RuntimeError(
                    f"neuralmem::{op}: {name} shares memory with {mname}, which the op overwrites in place "
                    f"(unsupported, as in PyTorch's in-place ops): pass {name}.clone() instead")


def _bump(*ts):
    for t in ts:
        if t is not None and not t.is_inference():
            torch.autograd.graph.increment_version(t)


def inplace_autograd_kernel(op, fn):
    """An Autograd-key kernel for the in-place op `op` whose device kernel is
    reached through `fn`: the checks of check_inplace, the call below
    autograd, and a version bump of every mutated tensor (for op libraries
    registered from Python, as csrc/inplace.cpp does for the native ones)."""
    fn = getattr(fn, "default", fn)  # an OpOverloadPacket's one overload
    schema = fn._schema
    names = [a.name for a in schema.arguments]
    written = [a.alias_info is not None and a.alias_info.is_write for a in schema.arguments]

    def kernel(*args):
        mutated = [(n, a) for n, a, w in zip(names, args, written) if w]
        inputs = [(n, a) for n, a, w in zip(names, args, written) if not w and isinstance(a, torch.Tensor)]
        check_inplace(op, mutated, inputs)
        with torch._C._AutoDispatchBelowAutograd():
            out = fn(*args)
        _bump(*(a for _, a in mutated))
        return out

    return kernel

