"""Public functional memory ops, their references, and the autograd glue.

Shapes (B memories, N slots, D slot width, H read heads, W write heads):
  memory (B,N,D)  keys (B,H,D)  strengths (B,H)  weights (B,H,N)
  erase/add (B,W,D)  write weights (B,W,N)  usage (B,N)

cos(k, m) = k.m / (max(|k|, eps) * max(|m|, eps)): exactly F.normalize.

Each op `X` has a reference `X_ref` of the same signature (pure PyTorch,
autograd over primitives); the `torch` backend runs it. The native backends
("cpu", "cuda": torch.ops.neuralmem.*; "triton": torch.ops.neuralmem_triton.*)
run behind one autograd.Function per op whose backward calls our backward
kernel. Inputs are validated once here, with errors that name the argument;
kernels receive contiguous tensors of one dtype on one device.
"""
import functools

import torch
import torch.nn.functional as F

from . import _ext  # noqa: F401  (loads and registers the native ops)
from .backends import resolve as _resolve_uncached
from .backends import table_thresholds as _table_thresholds

# The choice depends only on its arguments and on what is installed, and a
# small step calls it on every op: remember it. Under torch.compile the
# choice is made once at trace time, outside the graph (the table is a file,
# and the extension's introspection is not traceable), and baked in as a
# constant: the same choice as in eager mode.
_resolve_cached = functools.lru_cache(maxsize=4096)(_resolve_uncached)


@torch.compiler.assume_constant_result
def _thresholds(op, device_type):
    return _table_thresholds(op, device_type)


@torch.compiler.assume_constant_result
def _resolve_constant(backend, op, device, n):
    return _resolve_cached(backend, op, device, n)


def resolve(backend, op, device, n=0):
    """The backend that runs `op` (see backends.resolve), remembered per arguments.

    Under torch.compile it runs at trace time, outside the graph, and gives
    what eager mode would: N may be symbolic (dynamic shapes), so it is
    compared with the table's size thresholds (each comparison a guard) and
    the choice made for a size of the same table row.
    """
    if not torch.compiler.is_compiling():
        return _resolve_cached(backend, op, device, n)
    row_n = 0
    for t in _thresholds(op, device.type):
        if n > t:
            row_n = t + 1
    return _resolve_constant(backend, op, device, row_n)


DEFAULT_EPS = 1e-12
DEFAULT_DECAY = 0.99
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------
def _check(name, t, ndim, shape_hint, dtype=None, device=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_hint}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have shape {shape_hint} ({ndim} dims), got shape {tuple(t.shape)}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must have the dtype of memory ({dtype}), got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on the device of memory ({device}), got {t.device}")


def _check_dims(name, t, expected, shape_hint):
    got = tuple(t.shape)
    for i, (g, e) in enumerate(zip(got, expected)):
        if e is not None and g != e:
            raise ValueError(f"{name} must have shape {shape_hint} = {_fmt(expected)}, got {got} (dim {i})")


def _fmt(expected):
    return "(" + ", ".join("?" if e is None else str(e) for e in expected) + ")"


def _check_memory(memory):
    _check("memory", memory, 3, "(B, N, D)")
    B, N, D = memory.shape
    if N < 1 or D < 1:
        raise ValueError(f"memory must have at least one slot and one dimension, got shape {tuple(memory.shape)}")
    return B, N, D


_FLOAT_SET = frozenset(_FLOAT_DTYPES)


def _keys_ok(memory, keys, strengths, eps):
    """The valid case in a handful of attribute reads (a small step is
    overhead-bound); anything else goes through the full checks, which raise."""
    try:
        B, N, D = memory.shape
        Bk, H, Dk = keys.shape
        Bs, Hs = strengths.shape
        dt, dev = memory.dtype, memory.device
        return (B == Bk == Bs and D == Dk and H == Hs and N >= 1 and D >= 1 and eps > 0
                and keys.dtype is dt and strengths.dtype is dt and dt in _FLOAT_SET
                and keys.device == dev and strengths.device == dev)
    except (AttributeError, ValueError, TypeError):
        return False


def _check_keys(memory, keys, strengths, eps, prefix=""):
    B, N, D = _check_memory(memory)
    kn, sn = prefix + "keys", prefix + "strengths"
    _check(kn, keys, 3, "(B, H, D)", memory.dtype, memory.device)
    _check_dims(kn, keys, (B, None, D), "(B, H, D)")
    H = keys.shape[1]
    _check(sn, strengths, 2, "(B, H)", memory.dtype, memory.device)
    _check_dims(sn, strengths, (B, H), "(B, H)")
    if not (eps > 0):
        raise ValueError(f"eps must be positive, got {eps}")
    return B, N, D, H


def _check_weights(name, memory, weights, heads_name):
    B, N, D = _check_memory(memory)
    _check(name, weights, 3, f"(B, {heads_name}, N)", memory.dtype, memory.device)
    _check_dims(name, weights, (B, None, N), f"(B, {heads_name}, N)")
    return B, N, D, weights.shape[1]


def _check_write(memory, weights, erase, add):
    B, N, D, W = _check_weights("weights", memory, weights, "W")
    for name, t in (("erase", erase), ("add", add)):
        _check(name, t, 3, "(B, W, D)", memory.dtype, memory.device)
        _check_dims(name, t, (B, W, D), "(B, W, D)")
    return B, N, D, W


def _check_usage(usage, memory, decay):
    B, N, _ = memory.shape
    _check("usage", usage, 2, "(B, N)", memory.dtype, memory.device)
    _check_dims("usage", usage, (B, N), "(B, N)")
    if not (0.0 <= decay <= 1.0):
        raise ValueError(f"decay must be in [0, 1], got {decay}")


def _c(t):
    return t if t.is_contiguous() else t.contiguous()


def _needs_grad(*ts):
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


# --------------------------------------------------------------------------
# in-place ops and autograd (the Python twin of csrc/inplace.cpp and
# csrc/inplace_checks.h, for the torch and triton backends)
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


_NATIVE = torch.ops.neuralmem


def _lib(backend):
    if backend != "triton":
        return _NATIVE
    from . import triton_ops  # noqa: F401  (registers neuralmem_triton::*)

    return torch.ops.neuralmem_triton


# --------------------------------------------------------------------------
# references (pure PyTorch, the seed's formulas, batched)
# --------------------------------------------------------------------------
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


def usage_update_ref(usage, weights, decay=DEFAULT_DECAY):
    return (decay * _up(usage) + _up(weights).sum(dim=1)).to(usage.dtype)


# --------------------------------------------------------------------------
# autograd.Functions over the native ops
# --------------------------------------------------------------------------
def _reference_grads(ctx, ref, inputs, grad_out):
    """Backward by autograd over the reference, for create_graph=True.

    Our backward kernels are not themselves differentiable. When the backward
    runs with grad mode on (create_graph=True, e.g. second-order MAML), the
    gradient is built from the reference instead, so that higher derivatives
    are right rather than silently missing terms.
    """
    need = [i for i, t in enumerate(inputs) if ctx.needs_input_grad[i] and t.requires_grad]
    out = [None] * len(inputs)
    if not need:
        return out
    with torch.enable_grad():
        y = ref(*inputs)
        grads = torch.autograd.grad(y, [inputs[i] for i in need], grad_out, create_graph=True, allow_unused=True)
    for i, g in zip(need, grads):
        out[i] = g
    return out


class _ContentAddressing(torch.autograd.Function):
    @staticmethod
    def forward(ctx, memory, keys, strengths, eps, backend):
        weights = _lib(backend).content_addressing(memory, keys, strengths, eps)
        ctx.save_for_backward(weights, memory, keys, strengths)
        ctx.eps, ctx.backend = eps, backend
        return weights

    @staticmethod
    def backward(ctx, grad_weights):
        weights, memory, keys, strengths = ctx.saved_tensors
        if torch.is_grad_enabled():
            return (*_reference_grads(ctx, lambda m, k, s: content_addressing_ref(m, k, s, ctx.eps),
                                      (memory, keys, strengths), grad_weights), None, None)
        gm, gk, gs = _lib(ctx.backend).content_addressing_backward(
            _c(grad_weights), weights, memory, keys, strengths, ctx.eps
        )
        return gm, gk, gs, None, None


class _MemoryRead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, memory, weights, backend):
        ctx.save_for_backward(memory, weights)
        ctx.backend = backend
        return _lib(backend).memory_read(memory, weights)

    @staticmethod
    def backward(ctx, grad_reads):
        memory, weights = ctx.saved_tensors
        if torch.is_grad_enabled():
            return (*_reference_grads(ctx, memory_read_ref, (memory, weights), grad_reads), None)
        gm, gw = _lib(ctx.backend).memory_read_backward(_c(grad_reads), memory, weights)
        return gm, gw, None


class _ContentRead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, memory, keys, strengths, eps, backend):
        reads, lse = _lib(backend).content_read(memory, keys, strengths, eps)
        ctx.save_for_backward(reads, lse, memory, keys, strengths)
        ctx.eps, ctx.backend = eps, backend
        ctx.mark_non_differentiable(lse)
        return reads, lse

    @staticmethod
    def backward(ctx, grad_reads, _grad_lse):
        reads, lse, memory, keys, strengths = ctx.saved_tensors
        if torch.is_grad_enabled():
            return (*_reference_grads(ctx, lambda m, k, s: content_read_ref(m, k, s, ctx.eps),
                                      (memory, keys, strengths), grad_reads), None, None)
        gm, gk, gs = _lib(ctx.backend).content_read_backward(
            _c(grad_reads), reads, lse, memory, keys, strengths, ctx.eps
        )
        return gm, gk, gs, None, None


class _MemoryWrite(torch.autograd.Function):
    @staticmethod
    def forward(ctx, memory, weights, erase, add, backend):
        ctx.save_for_backward(memory, weights, erase, add)
        ctx.backend = backend
        return _lib(backend).memory_write(memory, weights, erase, add)

    @staticmethod
    def backward(ctx, grad_out):
        memory, weights, erase, add = ctx.saved_tensors
        if torch.is_grad_enabled():
            return (*_reference_grads(ctx, memory_write_ref, (memory, weights, erase, add), grad_out), None)
        gm, gw, ge, ga = _lib(ctx.backend).memory_write_backward(_c(grad_out), memory, weights, erase, add)
        return gm, gw, ge, ga, None


class _UsageUpdate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, usage, weights, decay, backend):
        ctx.decay, ctx.W = decay, weights.shape[1]
        return _lib(backend).usage_update(usage, weights, decay)

    @staticmethod
    def backward(ctx, grad):
        # d/d usage = decay, d/d weights[:, w] = 1: a scale and a broadcast.
        B, N = grad.shape
        return grad * ctx.decay, grad.unsqueeze(1).expand(B, ctx.W, N), None, None


# --------------------------------------------------------------------------
# public ops
# --------------------------------------------------------------------------
def content_addressing(memory, keys, strengths, eps=DEFAULT_EPS, backend="auto"):
    """Softmax content weights (B,H,N) of each head's key over the slots."""
    _, N, _, _ = _check_keys(memory, keys, strengths, eps)
    be = resolve(backend, "content_addressing", memory.device, N)
    if be == "torch":
        return content_addressing_ref(memory, keys, strengths, eps)
    memory, keys, strengths = _c(memory), _c(keys), _c(strengths)
    if not _needs_grad(memory, keys, strengths):
        return _lib(be).content_addressing(memory, keys, strengths, eps)
    return _ContentAddressing.apply(memory, keys, strengths, eps, be)


def memory_read(memory, weights, backend="auto"):
    """Reads (B,H,D) = weights (B,H,N) @ memory (B,N,D)."""
    _, N, _, _ = _check_weights("weights", memory, weights, "H")
    be = resolve(backend, "memory_read", memory.device, N)
    if be == "torch":
        return memory_read_ref(memory, weights)
    memory, weights = _c(memory), _c(weights)
    if not _needs_grad(memory, weights):
        return _lib(be).memory_read(memory, weights)
    return _MemoryRead.apply(memory, weights, be)


def content_read(memory, keys, strengths, eps=DEFAULT_EPS, backend="auto", return_lse=False):
    """Fused addressing + read: reads (B,H,D) without materialising (B,H,N).

    With return_lse=True also returns the per-(b,h) logsumexp of the logits.
    """
    if _keys_ok(memory, keys, strengths, eps):
        N = memory.shape[1]
    else:
        _, N, _, _ = _check_keys(memory, keys, strengths, eps)
    be = resolve(backend, "content_read", memory.device, N)
    if be == "torch":
        if return_lse:
            # content_read_ref's arithmetic, with the logits computed once for both outputs.
            logits = logits_ref(memory, keys, strengths, eps)
            weights = torch.softmax(logits, dim=-1).to(memory.dtype)
            return memory_read_ref(memory, weights), torch.logsumexp(logits, dim=-1)
        return content_read_ref(memory, keys, strengths, eps)
    if be != "cpu":  # the CPU kernels take strided inputs themselves
        memory, keys, strengths = _c(memory), _c(keys), _c(strengths)
    if not _needs_grad(memory, keys, strengths):
        reads, lse = _lib(be).content_read(memory, keys, strengths, eps)
    else:
        reads, lse = _ContentRead.apply(memory, keys, strengths, eps, be)
    return (reads, lse) if return_lse else reads


def usage_update(usage, weights, decay=DEFAULT_DECAY, backend="auto"):
    """decay * usage (B,N) + sum over write heads of weights (B,W,N)."""
    _check("weights", weights, 3, "(B, W, N)")
    B, W, N = weights.shape
    _check("usage", usage, 2, "(B, N)", weights.dtype, weights.device)
    _check_dims("usage", usage, (B, N), "(B, N)")
    if not (0.0 <= decay <= 1.0):
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    be = resolve(backend, "usage_update", usage.device, N)
    if be == "torch":
        return usage_update_ref(usage, weights, decay)
    usage, weights = _c(usage), _c(weights)
    if not _needs_grad(usage, weights):
        return _lib(be).usage_update(usage, weights, decay)
    return _UsageUpdate.apply(usage, weights, decay, be)


def memory_write(memory, weights, erase, add, usage=None, decay=DEFAULT_DECAY, backend="auto"):
    """Erase-add write for W heads: m * prod_w(1 - w e) + sum_w w a.

    With `usage` given, returns (new_memory, new_usage) where new_usage =
    decay * usage + sum_w weights.
    """
    _, N, _, _ = _check_write(memory, weights, erase, add)
    if usage is not None:
        _check_usage(usage, memory, decay)
    be = resolve(backend, "memory_write", memory.device, N)
    if be == "torch":
        out = memory_write_ref(memory, weights, erase, add)
    else:
        memory, weights, erase, add = _c(memory), _c(weights), _c(erase), _c(add)
        if not _needs_grad(memory, weights, erase, add):
            out = _lib(be).memory_write(memory, weights, erase, add)
        else:
            out = _MemoryWrite.apply(memory, weights, erase, add, be)
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
    be = resolve(backend, "memory_write_", memory.device, N)
    # Usage is written by a second op: check both before either is written.
    check_inplace("memory_write_", [("memory", memory), ("usage", usage)],
                  [("weights", weights), ("erase", erase), ("add", add)])
    if be == "cpu" or be == "cuda":  # csrc/inplace.cpp checks again, writes and bumps the version
        _NATIVE.memory_write_(memory, _c(weights), _c(erase), _c(add))
    else:
        with torch.no_grad():
            if be == "torch":
                memory.copy_(memory_write_ref(memory, weights, erase, add))
            else:
                _lib(be).memory_write_(memory, _c(weights), _c(erase), _c(add))
    if usage is not None:
        with torch.no_grad():
            usage.copy_(usage_update(usage, weights, decay, backend=be))
    return memory


def _write_vectors_ok(memory, keys, erase, add):
    try:
        shape, dt, dev = keys.shape, memory.dtype, memory.device
        return (erase.shape == shape and add.shape == shape and erase.dtype is dt and add.dtype is dt
                and erase.device == dev and add.device == dev)
    except AttributeError:
        return False


def _usage_ok(usage, memory, decay):
    try:
        B, N, _ = memory.shape
        return (usage.shape == (B, N) and usage.dtype is memory.dtype and usage.device == memory.device
                and 0.0 <= decay <= 1.0 and usage.is_contiguous())
    except AttributeError:
        return False


def _check_content_write(memory, keys, strengths, erase, add, usage, eps, decay, prefix=""):
    B, N, D = _check_memory(memory)
    kn, sn = prefix + "keys", prefix + "strengths"
    _check(kn, keys, 3, "(B, W, D)", memory.dtype, memory.device)
    _check_dims(kn, keys, (B, None, D), "(B, W, D)")
    W = keys.shape[1]
    _check(sn, strengths, 2, "(B, W)", memory.dtype, memory.device)
    _check_dims(sn, strengths, (B, W), "(B, W)")
    for name, t in (("erase", erase), ("add", add)):
        _check(name, t, 3, "(B, W, D)", memory.dtype, memory.device)
        _check_dims(name, t, (B, W, D), "(B, W, D)")
    if usage is not None:
        _check_usage(usage, memory, decay)
        if not usage.is_contiguous():
            raise ValueError("usage must be contiguous for the in-place write")
    if not memory.is_contiguous():
        raise ValueError("memory must be contiguous for the in-place write (call .contiguous() first)")
    if not (eps > 0):
        raise ValueError(f"eps must be positive, got {eps}")


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
    be = resolve(backend, "content_write_", memory.device, N)
    if be == "cpu":  # the CPU kernels take strided inputs themselves; csrc/inplace.cpp checks and bumps
        least = _NATIVE.content_write_(memory, usage, keys, strengths, erase, add, eps, decay)
        return least if usage is not None else None
    if be == "cuda":
        least = _NATIVE.content_write_(memory, usage, _c(keys), _c(strengths), _c(erase), _c(add), eps, decay)
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
        least = _lib(be).content_write_(memory, usage, _c(keys), _c(strengths), _c(erase), _c(add), eps, decay)
    return least if usage is not None else None


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
    be = resolve(backend, "content_read_write_", memory.device, memory.shape[1])
    args = (read_keys, read_strengths, write_keys, write_strengths, erase, add)
    if be == "cpu" or be == "cuda":  # csrc/inplace.cpp checks and bumps
        if be != "cpu":  # the CPU kernels take strided inputs themselves
            args = tuple(_c(t) for t in args)
        reads, _, least = _NATIVE.content_read_write_(memory, usage, *args, eps, decay)
        return reads, (least if usage is not None else None)
    check_inplace("content_read_write_", [("memory", memory), ("usage", usage)],
                  list(zip(("read_keys", "read_strengths", "write_keys", "write_strengths", "erase", "add"), args)))
    with torch.no_grad():
        if be == "torch":
            reads = content_read_ref(memory, read_keys, read_strengths, eps)
            least = content_write_(memory, write_keys, write_strengths, erase, add, usage=usage, eps=eps,
                                   decay=decay, backend="torch")
            return reads, least
        reads, _, least = _lib(be).content_read_write_(memory, usage, *(_c(t) for t in args), eps, decay)
    return reads, (least if usage is not None else None)


# --------------------------------------------------------------------------
# fake kernels: shapes and dtypes for torch.compile / FakeTensor tracing
# --------------------------------------------------------------------------
def _lse_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def register_fakes(ns):
    """Registers fake kernels for the ops of namespace `ns` (same schemas)."""
    lib = f"{ns}::"

    @torch.library.register_fake(lib + "content_addressing")
    def _(memory, keys, strengths, eps):
        return memory.new_empty((memory.shape[0], keys.shape[1], memory.shape[1]))

    @torch.library.register_fake(lib + "content_addressing_backward")
    def _(grad_weights, weights, memory, keys, strengths, eps):
        return torch.empty_like(memory), torch.empty_like(keys), torch.empty_like(strengths)

    @torch.library.register_fake(lib + "memory_read")
    def _(memory, weights):
        return memory.new_empty((memory.shape[0], weights.shape[1], memory.shape[2]))

    @torch.library.register_fake(lib + "memory_read_backward")
    def _(grad_reads, memory, weights):
        return torch.empty_like(memory), torch.empty_like(weights)

    @torch.library.register_fake(lib + "content_read")
    def _(memory, keys, strengths, eps):
        reads = memory.new_empty((memory.shape[0], keys.shape[1], memory.shape[2]))
        lse = memory.new_empty((memory.shape[0], keys.shape[1]), dtype=_lse_dtype(memory.dtype))
        return reads, lse

    @torch.library.register_fake(lib + "content_read_backward")
    def _(grad_reads, reads, lse, memory, keys, strengths, eps):
        return torch.empty_like(memory), torch.empty_like(keys), torch.empty_like(strengths)

    @torch.library.register_fake(lib + "memory_write")
    def _(memory, weights, erase, add):
        return torch.empty_like(memory)

    @torch.library.register_fake(lib + "memory_write_backward")
    def _(grad_out, memory, weights, erase, add):
        return (torch.empty_like(memory), torch.empty_like(weights), torch.empty_like(erase),
                torch.empty_like(add))

    @torch.library.register_fake(lib + "memory_write_")
    def _(memory, weights, erase, add):
        return None

    @torch.library.register_fake(lib + "usage_update")
    def _(usage, weights, decay):
        return torch.empty_like(usage)

    @torch.library.register_fake(lib + "content_write_")
    def _(memory, usage, keys, strengths, erase, add, eps, decay):
        if usage is None:
            return memory.new_empty((0,), dtype=torch.int64)
        return memory.new_empty((memory.shape[0],), dtype=torch.int64)

    @torch.library.register_fake(lib + "content_read_write_")
    def _(memory, usage, read_keys, read_strengths, write_keys, write_strengths, erase, add, eps, decay):
        B, H = read_keys.shape[0], read_keys.shape[1]
        reads = memory.new_empty((B, H, memory.shape[2]))
        lse = memory.new_empty((B, H), dtype=_lse_dtype(memory.dtype))
        least = memory.new_empty((0,) if usage is None else (B,), dtype=torch.int64)
        return reads, lse, least


if _ext.has_extension():
    register_fakes("neuralmem")
