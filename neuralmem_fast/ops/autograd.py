"""Autograd formulas registered on the ops themselves (torch.library.register_autograd).

`torch.ops.neuralmem.content_read(...)` called directly is differentiable, as
are the public functions, which call it. Each backward calls our backward
kernel (`X_backward`, one pass over memory), except under create_graph=True
(second-order MAML): our backward kernels are not themselves differentiable,
so the gradient is then built by autograd over the reference, and higher
derivatives keep every term.

The in-place ops are forward-only; their Autograd kernels (PyTorch's
in-place rules) are csrc/inplace.cpp for the native library and
ops/inplace.py for the Triton one.
"""
import torch

from .reference import (content_addressing_ref, content_read_ref, content_read_write_ref, content_write_ref,
                        memory_read_ref, memory_write_ref)
from .validation import _c

__all__ = ["register_autograd", "DIFFERENTIABLE_OPS", "function"]


def _reference_grads(ctx, ref, inputs, grad_out):
    """Backward by autograd over the reference, for create_graph=True. A reference with several outputs
    returns a tuple; grad_out is then the matching tuple, None for an output that got no gradient."""
    need = [i for i, t in enumerate(inputs) if ctx.needs_input_grad[i] and t.requires_grad]
    out = [None] * len(inputs)
    if not need:
        return out
    with torch.enable_grad():
        y = ref(*inputs)
        if isinstance(y, tuple):
            pairs = [(o, g) for o, g in zip(y, grad_out) if g is not None]
            y, grad_out = [o for o, _ in pairs], [g for _, g in pairs]
        grads = torch.autograd.grad(y, [inputs[i] for i in need], grad_out, create_graph=True, allow_unused=True)
    for i, g in zip(need, grads):
        out[i] = g
    return out


def _formulas(lib):
    """(setup_context, backward) per differentiable op of the library `lib`."""
    native = lib is not None and getattr(lib, "__name__", None) == getattr(torch.ops.neuralmem, "__name__", 0)

    def _memory_grad(g):
        # A memory-sized incoming gradient, often expanded (the gradient of
        # new_memory.sum()): the native CPU kernels copy it into a pooled
        # buffer themselves; .contiguous() here would fault in a fresh one.
        return g if native and g.device.type == "cpu" else _c(g)

    def addressing_setup(ctx, inputs, output):
        memory, keys, strengths, eps = inputs
        ctx.save_for_backward(output, memory, keys, strengths)
        ctx.eps = eps

    def addressing_backward(ctx, grad_weights):
        weights, memory, keys, strengths = ctx.saved_tensors
        if torch.is_grad_enabled():
            return (*_reference_grads(ctx, lambda m, k, s: content_addressing_ref(m, k, s, ctx.eps),
                                      (memory, keys, strengths), grad_weights), None)
        gm, gk, gs = lib.content_addressing_backward(_c(grad_weights), weights, memory, keys, strengths, ctx.eps)
        return gm, gk, gs, None

    def read_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def read_backward(ctx, grad_reads):
        memory, weights = ctx.saved_tensors
        if torch.is_grad_enabled():
            return tuple(_reference_grads(ctx, memory_read_ref, (memory, weights), grad_reads))
        return tuple(lib.memory_read_backward(_c(grad_reads), memory, weights))

    def content_read_setup(ctx, inputs, output):
        memory, keys, strengths, eps = inputs
        reads, lse = output
        ctx.save_for_backward(reads, lse, memory, keys, strengths)
        ctx.mark_non_differentiable(lse)
        ctx.eps = eps

    def content_read_backward(ctx, grad_reads, _grad_lse):
        reads, lse, memory, keys, strengths = ctx.saved_tensors
        if torch.is_grad_enabled():
            return (*_reference_grads(ctx, lambda m, k, s: content_read_ref(m, k, s, ctx.eps),
                                      (memory, keys, strengths), grad_reads), None)
        if grad_reads is None:
            return None, None, None, None
        need_m, need_k, need_s = ctx.needs_input_grad[:3]
        if not (need_m or need_k or need_s):
            return None, None, None, None
        # A memory that needs no gradient (a constant memory, the read heads
        # learning): the kernel skips the (B,N,D) buffer and its writes.
        gm, gk, gs = lib.content_read_backward(_c(grad_reads), reads, lse, memory, keys, strengths, ctx.eps,
                                               need_m)
        return (gm if need_m else None), (gk if need_k else None), (gs if need_s else None), None

    def write_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def write_backward(ctx, grad_out):
        memory, weights, erase, add = ctx.saved_tensors
        if torch.is_grad_enabled():
            return tuple(_reference_grads(ctx, memory_write_ref, (memory, weights, erase, add), grad_out))
        return tuple(lib.memory_write_backward(_memory_grad(grad_out), memory, weights, erase, add))

    def content_write_setup(ctx, inputs, output):
        memory, keys, strengths, erase, add, eps = inputs
        _, lse = output
        ctx.save_for_backward(lse, memory, keys, strengths, erase, add)
        ctx.mark_non_differentiable(lse)
        ctx.eps = eps

    def content_write_backward(ctx, grad_out, _grad_lse):
        lse, memory, keys, strengths, erase, add = ctx.saved_tensors
        if torch.is_grad_enabled():
            return (*_reference_grads(ctx, lambda m, k, s, e, a: content_write_ref(m, k, s, e, a, ctx.eps),
                                      (memory, keys, strengths, erase, add), grad_out), None)
        if grad_out is None:
            return None, None, None, None, None, None
        return (*lib.content_write_backward(_memory_grad(grad_out), lse, memory, keys, strengths, erase, add,
                                            ctx.eps), None)

    def read_write_setup(ctx, inputs, output):
        memory, rk, rs, wk, ws, erase, add, eps = inputs
        reads, _, rlse, wlse = output
        ctx.save_for_backward(reads, rlse, wlse, memory, rk, rs, wk, ws, erase, add)
        ctx.mark_non_differentiable(rlse, wlse)
        ctx.eps = eps

    def read_write_backward(ctx, grad_reads, grad_out, _grad_rlse, _grad_wlse):
        reads, rlse, wlse, memory, rk, rs, wk, ws, erase, add = ctx.saved_tensors
        inputs = (memory, rk, rs, wk, ws, erase, add)
        if torch.is_grad_enabled():
            return (*_reference_grads(ctx, lambda *a: content_read_write_ref(*a, ctx.eps), inputs,
                                      (grad_reads, grad_out)), None)
        if grad_reads is None and grad_out is None:
            return (None,) * 8
        if grad_out is None:  # only the reads are used: the read's backward alone
            gm, gk, gs = lib.content_read_backward(_c(grad_reads), reads, rlse, memory, rk, rs, ctx.eps, True)
            return gm, gk, gs, None, None, None, None, None
        if grad_reads is None:  # only the new memory: the write's backward alone
            gm, gk, gs, ge, ga = lib.content_write_backward(_memory_grad(grad_out), wlse, memory, wk, ws, erase, add,
                                                            ctx.eps)
            return gm, None, None, gk, gs, ge, ga, None
        return (*lib.content_read_write_backward(_c(grad_reads), _memory_grad(grad_out), reads, rlse, wlse, memory,
                                                 rk, rs, wk, ws, erase, add, ctx.eps), None)

    def usage_setup(ctx, inputs, output):
        usage, weights, decay = inputs
        ctx.decay, ctx.W = decay, weights.shape[1]

    def usage_backward(ctx, grad):
        # d/d usage = decay, d/d weights[:, w] = 1: a scale and a broadcast (linear: exact at every order).
        B, N = grad.shape
        return grad * ctx.decay, grad.unsqueeze(1).expand(B, ctx.W, N), None

    return {
        "content_addressing": (addressing_setup, addressing_backward),
        "memory_read": (read_setup, read_backward),
        "content_read": (content_read_setup, content_read_backward),
        "memory_write": (write_setup, write_backward),
        "content_write": (content_write_setup, content_write_backward),
        "content_read_write": (read_write_setup, read_write_backward),
        "usage_update": (usage_setup, usage_backward),
    }


# The ops with a gradient formula; the registry's test checks that every
# differentiable op of a library has one.
DIFFERENTIABLE_OPS = tuple(_formulas(None))

_registered = set()


def register_autograd(ns):
    """Registers the gradient formulas on the ops of namespace `ns` (once)."""
    if ns in _registered:
        return
    lib = getattr(torch.ops, ns)
    for name, (setup, backward) in _formulas(lib).items():
        torch.library.register_autograd(f"{ns}::{name}", backward, setup_context=setup)
    _registered.add(ns)


_functions = {}


def function(ns, name):
    """The same formula as an autograd.Function over the op called below autograd.

    The public functions use it in eager mode: the registered formula reaches
    the op through PyTorch's Python autograd wrapper (argument flattening on
    every call and a second wrapper on the way back), about 13 us per
    forward+backward at N=128, where the whole op takes 40; Function.apply
    costs what the formula itself does. Under torch.compile they call the op,
    whose registered formula is the traceable one.
    """
    key = (ns, name)
    fn = _functions.get(key)
    if fn is None:
        op = getattr(getattr(torch.ops, ns), name).default
        setup, backward_fn = _formulas(getattr(torch.ops, ns))[name]

        def forward(ctx, *args):
            with torch._C._AutoDispatchBelowAutograd():
                out = op(*args)
            setup(ctx, args, out)
            return out

        def backward(ctx, *grads):
            return backward_fn(ctx, *grads)

        fn = type(f"{name}_function", (torch.autograd.Function,),
                  {"forward": staticmethod(forward), "backward": staticmethod(backward)})
        _functions[key] = fn
    return fn
