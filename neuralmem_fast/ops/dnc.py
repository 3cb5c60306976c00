"""The DNC access step's native ops (namespace `torch.ops.neuralmem_dnc`): the usage and write weights as one
op, and the write then the read as another (`write_read`, at the end of this doc).

One step of `MemoryAccess` (nn/access.py) computes, before it writes, the usage and the write weights:

  written = 1 - prod_w (1 - prev_write_weights[w])          (no gradient, as in DeepMind's code)
  usage   = (usage + written - usage * written) * prod_r (1 - free_gates[r] * prev_read_weights[r])
  head i = 0 .. W-1: a_i = allocation(u_i), u_0 = usage, u_{i+1} = u_i + (1 - u_i) g_w[i] g_a[i] a_i
  write_weights[i] = g_w[i] (g_a[i] a_i + (1 - g_a[i]) content[i])

with allocation(u)[phi_j] = (1 - s_j) prod_{k<j} s_k over s = eps + (1 - eps) u sorted ascending
(DeepMind's `_EPSILON` = 1e-6; the sort's permutation carries no gradient, the sorted values do).
Written with PyTorch ops (`write_weights_ref`, the reference), that is a few dozen (B, N)-sized ops and as
many autograd nodes per step, which at the memory sizes of the classic tasks (N = 128, B = 16) cost more
than the memory ops themselves. `write_weights` runs it as one op: a C++ CPU kernel (csrc/dnc/dnc_ops.cpp)
and a hand-written backward (one more op), float32 and float64. Other devices and dtypes, and
`backend="torch"`, take the reference; under create_graph=True the backward differentiates the reference,
so higher derivatives keep every term.

Shapes: usage (B,N), prev_write_weights (B,W,N), free_gates (B,R), prev_read_weights (B,R,N),
content (B,W,N), write_gates (B,W), allocation_gates (B,W). Returns (usage (B,N), write_weights (B,W,N)).

`write_read(memory, write_weights, erase, add, read_keys, read_strengths)` is the rest of the step: the
erase-add write, the read heads' content weights over the new memory and the reads, (new_memory (B,N,D),
read_weights (B,R,N), reads (B,R,D)), as `memory_write`, `content_addressing` and `memory_read` give them
(`write_read_ref`). Those are three ops and three autograd nodes, and the new memory has three uses whose
gradients autograd adds up in (B,N,D) buffers; the native op (csrc/dnc/write_read.cpp, CPU, float32 and
float64) visits each slot once forward and once backward, taking the gradients of all three outputs at once.
Elsewhere it runs the three ops of the chosen backend.
"""
import functools

import torch

from ..config import DEFAULT_EPS
from .autograd import _reference_grads
from .reference import content_addressing_ref, memory_read_ref, memory_write_ref
from .validation import _c

NAMESPACE = "neuralmem_dnc"

# DeepMind's _EPSILON: usage enters the allocation as eps + (1 - eps) u.
ALLOC_EPS = 1e-6

__all__ = ["NAMESPACE", "ALLOC_EPS", "has_dnc_kernels", "allocation", "write_allocation_weights", "write_weights",
           "write_weights_ref", "write_read", "write_read_ref", "access_step", "access_step_ref",
           "has_access_step_kernels"]


@functools.lru_cache(maxsize=None)
def _has_cpu_kernel(op):
    from .._ext import has_extension

    if not has_extension():
        return False
    name = f"{NAMESPACE}::{op}"
    return (name in torch._C._dispatch_get_all_op_names()
            and torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"))


def has_dnc_kernels():
    """True when the native write_weights op (CPU kernel) is built."""
    return _has_cpu_kernel("write_weights")


def has_write_read_kernel():
    """True when the native write_read op (CPU kernel) is built."""
    return _has_cpu_kernel("write_read")


def has_access_step_kernels():
    """True when the native ops of `access_step` (write_weights, write_read, addressing_backward_add_) are built."""
    return has_dnc_kernels() and has_write_read_kernel() and _has_cpu_kernel("addressing_backward_add_")


def _sorted_allocation(sorted_usage):
    """(1 - u_j) prod_{i<j} u_i over usage already sorted ascending."""
    ones = torch.ones_like(sorted_usage[..., :1])
    excl = torch.cumprod(torch.cat([ones, sorted_usage[..., :-1]], dim=-1), dim=-1)
    return (1 - sorted_usage) * excl


def allocation(usage, topk=None, tol=1e-6):
    """The DNC's allocation weighting (B, N) of usage (B, N).

    With `topk=k` (< N), the formula over the k least-used slots when the
    product of their usages is below `tol` in every row, else the exact sort.
    """
    u = ALLOC_EPS + (1 - ALLOC_EPS) * usage
    N = u.shape[-1]
    if topk is not None and topk < N:
        vals, idx = torch.topk(u, topk, dim=-1, largest=False, sorted=True)
        if bool((vals.prod(dim=-1) < tol).all()):
            return torch.zeros_like(u).scatter(-1, idx, _sorted_allocation(vals))
    vals, idx = torch.sort(u, dim=-1, stable=True)
    return torch.zeros_like(u).scatter(-1, idx, _sorted_allocation(vals))


def write_allocation_weights(usage, gates, topk=None, tol=1e-6):
    """Allocation weights (B, W, N) for W write heads, allocated one after
    another: head i sorts the usage raised by heads < i, u += (1 - u) g_i a_i
    with g_i = write gate * allocation gate (B, W)."""
    out = []
    for i in range(gates.shape[1]):
        a = allocation(usage, topk, tol)
        out.append(a)
        if i + 1 < gates.shape[1]:
            usage = usage + (1 - usage) * gates[:, i:i + 1] * a
    return torch.stack(out, dim=1)


def write_weights_ref(usage, prev_write_weights, free_gates, prev_read_weights, content, write_gates,
                      allocation_gates, topk=None, tol=1e-6):
    """The reference: PyTorch ops, differentiable in every input (detach prev_write_weights to follow
    DeepMind's code). Returns (usage (B,N), write_weights (B,W,N))."""
    ww = prev_write_weights
    written = 1 - torch.prod(1 - ww, dim=1) if ww.shape[1] > 1 else ww[:, 0]
    usage = usage + written - usage * written
    psi = torch.prod(1 - free_gates.unsqueeze(-1) * prev_read_weights, dim=1)
    usage = usage * psi
    g_w = write_gates.unsqueeze(-1)
    g_a = allocation_gates.unsqueeze(-1)
    alloc = write_allocation_weights(usage, (g_w * g_a).squeeze(-1), topk, tol)
    return usage, g_w * (g_a * alloc + (1 - g_a) * content)


def _lib():
    return getattr(torch.ops, NAMESPACE)


def write_weights(usage, prev_write_weights, free_gates, prev_read_weights, content, write_gates,
                  allocation_gates, backend="auto"):
    """Usage and write weights of one DNC access step (module doc); prev_write_weights gets no gradient.

    The native op runs for CPU tensors of float32 or float64 (backend "auto" or "cpu"); "torch", other
    devices and dtypes run the reference. Shapes are checked by the kernel, with errors naming the argument.
    """
    if backend not in ("auto", "cpu", "torch"):
        raise ValueError(f"backend must be 'auto', 'cpu' or 'torch' for write_weights, got {backend!r}")
    native = (backend != "torch" and usage.device.type == "cpu" and usage.dtype in (torch.float32, torch.float64)
              and has_dnc_kernels())
    if backend == "cpu" and not native:
        raise RuntimeError("backend='cpu': write_weights needs float32/float64 CPU tensors and the native build")
    if not native:
        return write_weights_ref(usage, prev_write_weights.detach(), free_gates, prev_read_weights, content,
                                 write_gates, allocation_gates)
    u, w, _, _ = _lib().write_weights(usage, prev_write_weights.detach(), free_gates, prev_read_weights, content,
                                      write_gates, allocation_gates, ALLOC_EPS)
    return u, w


def write_read_ref(memory, write_weights, erase, add, read_keys, read_strengths, eps=DEFAULT_EPS):
    """The reference: (new_memory, read_weights, reads) by the PyTorch formulas of the three ops."""
    new = memory_write_ref(memory, write_weights, erase, add)
    weights = content_addressing_ref(new, read_keys, read_strengths, eps)
    return new, weights, memory_read_ref(new, weights)


def write_read(memory, write_weights, erase, add, read_keys, read_strengths, eps=DEFAULT_EPS, backend="auto"):
    """Erase-add write, then the read heads' content weights over the new memory and the reads (module doc).

    Returns (new_memory (B,N,D), read_weights (B,R,N), reads (B,R,D)), differentiable in every input. The
    native op runs for float32/float64 CPU tensors with backend "auto" or "cpu"; otherwise the three ops
    `memory_write`, `content_addressing` and `memory_read` run with `backend`, which checks the inputs
    (the native kernel checks them too, with errors naming the argument).
    """
    if (backend in ("auto", "cpu") and memory.device.type == "cpu"
            and memory.dtype in (torch.float32, torch.float64) and has_write_read_kernel()):
        return _lib().write_read(memory, write_weights, erase, add, read_keys, read_strengths, eps)
    return write_read_unfused(memory, write_weights, erase, add, read_keys, read_strengths, eps, backend)


def write_read_unfused(memory, write_weights, erase, add, read_keys, read_strengths, eps=DEFAULT_EPS,
                       backend="auto"):
    """What `write_read` computes, as the three ops `memory_write`, `content_addressing` and `memory_read` of
    `backend`: its path where the native op does not run, and the baseline it is measured against."""
    from . import functional as F

    new = F.memory_write(memory, write_weights, erase, add, backend=backend)
    weights = F.content_addressing(new, read_keys, read_strengths, eps, backend=backend)
    return new, weights, F.memory_read(new, weights, backend=backend)


def access_step_ref(memory, usage, prev_read_weights, prev_write_weights, write_keys, write_strengths, free_gates,
                    write_gates, allocation_gates, erase, add, read_keys, read_strengths, eps=DEFAULT_EPS):
    """The reference of `access_step`: the DNC access step by the PyTorch formulas (prev_write_weights detached)."""
    content = content_addressing_ref(memory, write_keys, write_strengths, eps)
    usage, ww = write_weights_ref(usage, prev_write_weights.detach(), free_gates, prev_read_weights, content,
                                  write_gates, allocation_gates)
    new, rw, reads = write_read_ref(memory, ww, erase, add, read_keys, read_strengths, eps)
    return new, usage, ww, rw, reads


def access_step(memory, usage, prev_read_weights, prev_write_weights, write_keys, write_strengths, free_gates,
                write_gates, allocation_gates, erase, add, read_keys, read_strengths, eps=DEFAULT_EPS):
    """One dense DNC access step (nn/access.py, the content write rule) as one autograd node.

    The write keys' content weights over `memory` (`content_addressing`), the usage and write weights
    (`write_weights`), then the write and the read (`write_read`): returns (new_memory (B,N,D), usage (B,N),
    write_weights (B,W,N), read_weights (B,R,N), reads (B,R,D)), differentiable in every input but
    prev_write_weights (detached, as in DeepMind's code). The three native ops run forward as they would one
    by one; backward, one node takes the gradients of all five outputs, and the write addressing's memory
    gradient is added to write_read's, in place, in the same pass that computes it (`addressing_backward_add_`),
    where three nodes and autograd's add of two (B,N,D) gradients took two passes more. Float32/float64 CPU tensors
    and the native build only (`has_access_step_kernels`); under create_graph=True the backward differentiates
    `access_step_ref`.
    """
    return _AccessStep.apply(memory, usage, prev_read_weights, prev_write_weights, write_keys, write_strengths,
                             free_gates, write_gates, allocation_gates, erase, add, read_keys, read_strengths, eps)


class _AccessStep(torch.autograd.Function):
    add_in_place = True  # the backward's last op: addressing_backward_add_ (True) or addressing_backward_add

    @staticmethod
    def forward(ctx, memory, usage, prw, pww, wk, ws, fg, gw, ga, erase, add, rk, rs, eps):
        lib = _lib()
        content = torch.ops.neuralmem.content_addressing(memory, wk, ws, eps)
        u, w, hu, order = lib.write_weights(usage, pww, fg, prw, content, gw, ga, ALLOC_EPS)
        new, rw, reads = lib.write_read(memory, w, erase, add, rk, rs, eps)
        ctx.save_for_backward(memory, usage, prw, pww, wk, ws, fg, gw, ga, erase, add, rk, rs, content, hu, order,
                              w, new, rw)
        ctx.eps = eps
        return new, u, w, rw, reads

    @staticmethod
    def backward(ctx, g_new, g_u, g_w, g_rw, g_reads):
        saved = ctx.saved_tensors
        ins = saved[:13]
        if torch.is_grad_enabled():  # create_graph: differentiate the reference, every term kept
            ref = lambda *t: access_step_ref(*t, ctx.eps)  # noqa: E731
            return (*_reference_grads(ctx, ref, ins, (g_new, g_u, g_w, g_rw, g_reads)), None)
        memory, usage, prw, pww, wk, ws, fg, gw, ga, erase, add, rk, rs, content, hu, order, w, new, rw = saved
        lib = _lib()
        dm, dww, de, da, drk, drs = lib.write_read_backward(g_new, g_rw, g_reads, memory, w, erase, add, rk, rs, new,
                                                            rw, ctx.eps)
        if g_w is not None:
            dww = dww + g_w
        if g_u is None:
            g_u = torch.zeros_like(usage)
        du, dfg, dprw, dc, dgw, dga = lib.write_weights_backward(_c(g_u), dww, usage, pww, fg, prw, content, gw, ga,
                                                                 hu, order, ALLOC_EPS)
        if _AccessStep.add_in_place:  # dm is write_read_backward's new tensor
            dwk, dws = lib.addressing_backward_add_(dm, dc, content, memory, wk, ws, ctx.eps)
        else:  # the same sum into a new tensor: what benchmarks/dnc_write_read.py measures the in-place op against
            dm, dwk, dws = lib.addressing_backward_add(dm, dc, content, memory, wk, ws, ctx.eps)
        return dm, du, dprw, None, dwk, dws, dfg, dgw, dga, de, da, drk, drs, None


def _register():
    if not has_dnc_kernels():
        return False
    lib = f"{NAMESPACE}::"

    @torch.library.register_fake(lib + "write_weights")
    def _(usage, prev_write_weights, free_gates, prev_read_weights, content, write_gates, allocation_gates, eps):
        B, W, N = content.shape
        return (usage.new_empty((B, N)), content.new_empty((B, W, N)), content.new_empty((B, W, N)),
                content.new_empty((B, W, N), dtype=torch.int64))

    @torch.library.register_fake(lib + "write_weights_backward")
    def _(grad_usage, grad_write_weights, usage, prev_write_weights, free_gates, prev_read_weights, content,
          write_gates, allocation_gates, head_usage, order, eps):
        return (torch.empty_like(usage), torch.empty_like(free_gates), torch.empty_like(prev_read_weights),
                torch.empty_like(content), torch.empty_like(write_gates), torch.empty_like(allocation_gates))

    def setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:7], output[2], output[3])
        ctx.eps = inputs[7]
        ctx.mark_non_differentiable(output[2], output[3])

    def backward(ctx, grad_usage, grad_ww, _grad_hu, _grad_order):
        usage, pww, fg, prw, content, gw, ga, hu, order = ctx.saved_tensors
        ins = (usage, pww, fg, prw, content, gw, ga)
        if torch.is_grad_enabled():  # create_graph: differentiate the reference, every term kept
            # (the previous write weights, detached, get None, as from the op's own backward)
            ref = lambda u, p, *rest: write_weights_ref(u, p.detach(), *rest)  # noqa: E731
            return (*_reference_grads(ctx, ref, ins, (grad_usage, grad_ww)), None)
        if grad_usage is None:
            grad_usage = torch.zeros_like(usage)
        if grad_ww is None:
            grad_ww = torch.zeros_like(content)
        du, dfg, drw, dc, dgw, dga = _lib().write_weights_backward(_c(grad_usage), _c(grad_ww), usage, pww, fg, prw,
                                                                  content, gw, ga, hu, order, ctx.eps)
        return du, None, dfg, drw, dc, dgw, dga, None

    torch.library.register_autograd(lib + "write_weights", backward, setup_context=setup)
    if has_write_read_kernel():
        _register_write_read(lib)
    return True


def _register_write_read(lib):
    @torch.library.register_fake(lib + "write_read")
    def _(memory, write_weights, erase, add, read_keys, read_strengths, eps):
        B, N, D = memory.shape
        R = read_keys.shape[1]
        return memory.new_empty((B, N, D)), memory.new_empty((B, R, N)), memory.new_empty((B, R, D))

    @torch.library.register_fake(lib + "write_read_backward")
    def _(grad_new_memory, grad_read_weights, grad_reads, memory, write_weights, erase, add, read_keys,
          read_strengths, new_memory, read_weights, eps):
        return (torch.empty_like(memory), torch.empty_like(write_weights), torch.empty_like(erase),
                torch.empty_like(add), torch.empty_like(read_keys), torch.empty_like(read_strengths))

    def setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:6], output[0], output[1])
        ctx.eps = inputs[6]

    def backward(ctx, grad_new, grad_weights, grad_reads):
        *ins, new, weights = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: differentiate the reference, every term kept
            ref = lambda *t: write_read_ref(*t, ctx.eps)  # noqa: E731
            return (*_reference_grads(ctx, ref, tuple(ins), (grad_new, grad_weights, grad_reads)), None)
        return (*_lib().write_read_backward(grad_new, grad_weights, grad_reads, *ins, new, weights, ctx.eps), None)

    torch.library.register_autograd(lib + "write_read", backward, setup_context=setup)

    if _has_cpu_kernel("addressing_backward_add"):
        @torch.library.register_fake(lib + "addressing_backward_add")
        def _(grad_memory, grad_weights, weights, memory, keys, strengths, eps):
            return memory.new_empty(memory.shape), keys.new_empty(keys.shape), strengths.new_empty(strengths.shape)

    if _has_cpu_kernel("addressing_backward_add_"):
        @torch.library.register_fake(lib + "addressing_backward_add_")
        def _(grad_memory, grad_weights, weights, memory, keys, strengths, eps):
            return keys.new_empty(keys.shape), strengths.new_empty(strengths.shape)


_REGISTERED = _register()
