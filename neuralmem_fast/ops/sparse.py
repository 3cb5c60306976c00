"""Sparse access ops (Sparse Access Memory, Rae et al. 2016): top-K content read, exact cosine top-K and
least-recently-used bookkeeping, each O(K) or one pass.

Namespace `torch.ops.neuralmem_sparse`, declared in csrc/sparse/sparse_ops.cpp with CPU (C++) and CUDA
kernels; this module adds the fake kernels, the gradient formula of `sparse_read`, argument checks that
name the argument, and the references (`X_ref`) the tests compare with. Shapes, with B memories, N slots,
D slot width, H heads and K candidates per head:

  sparse_read(rows (B,H,K,D), keys (B,H,D), strengths (B,H), eps) -> (reads (B,H,D), weights (B,H,K))
      weights[b,h,:] = softmax_k(strengths[b,h] * cos(keys[b,h], rows[b,h,k])),
      reads[b,h] = sum_k weights[b,h,k] rows[b,h,k]: content addressing restricted to the K gathered
      candidate rows of each head. Gradients reach keys, strengths and those K rows only.
  cosine_topk(memory (B,N,D), keys (B,H,D), k, eps) -> (scores (B,H,k), indices (B,H,k) int64)
      the k slots of largest cosine per head, best first, equal scores in increasing slot order; one
      pass over the memory. Not differentiable (the read differentiates the rows it gathers). A NaN
      score (a NaN in a row or a key) ranks above every number, NaNs in slot order, as in
      torch.sort(descending=True): a NaN key gives NaN scores and slots 0..k-1.
  lru_touch_(links, indices) / lru_oldest(links, count, skip)
      the slots in order of their last access, as a doubly linked list: `links` (B, N+1, 2) int64,
      links[b, n] = (previous, next), node N the sentinel (its next is the least recently used slot,
      its previous the most recent). lru_touch_ moves each index (B,M) to the most recent end, in
      order, ignoring entries -1; lru_oldest returns the `count` least recently used slots (B,count),
      skipping slots where skip (B,N) bool is true, -1 past the end. O(M) and O(count + skipped).

cos(k, m) = k.m / (max(|k|, eps) * max(|m|, eps)), as the dense ops. The CUDA kernels take K <= 64
candidates in sparse_read and k <= 64 in cosine_topk (a larger one is refused with an error naming it). The erase-add write to K slots is
`memory_write` over the gathered rows (the dense op's kernels and backward, on a (B,K,D) memory);
`sparse_write_` here gathers, writes and scatters back in place.
"""
import functools

import torch

from ..config import DEFAULT_EPS
from .autograd import _reference_grads
from .reference import memory_write_ref
from .validation import _c, _check

NAMESPACE = "neuralmem_sparse"

__all__ = ["NAMESPACE", "has_sparse_kernels", "sparse_read", "sparse_read_ref", "cosine_topk", "cosine_topk_ref",
           "lru_init", "lru_touch_", "lru_oldest", "lru_order", "lru_touch_ref_", "lru_oldest_ref",
           "sparse_write_", "check_unique_rows"]


@functools.lru_cache(maxsize=None)
def has_sparse_kernels(device_type="cpu"):
    """True when the native sparse ops have kernels for `device_type` ("cpu" or "cuda")."""
    from .._ext import has_extension

    if not has_extension():
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return False
    names = torch._C._dispatch_get_all_op_names()
    return (f"{NAMESPACE}::sparse_read" in names
            and torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::sparse_read", key))


def _native(backend, device):
    """True to run the native kernel, False for the reference; raises for a backend that can't run."""
    if backend == "torch":
        return False
    if backend not in ("auto", "cpu", "cuda"):
        raise ValueError(f"backend must be 'auto', 'cpu', 'cuda' or 'torch', got {backend!r}")
    if backend != "auto" and backend != device.type:
        raise ValueError(f"backend={backend!r} needs tensors on {backend}, got tensors on {device}")
    ok = has_sparse_kernels(device.type)
    if backend != "auto" and not ok:
        raise RuntimeError(f"backend={backend!r}: the sparse ops have no {backend} kernels in this build")
    return ok


def _lib():
    return getattr(torch.ops, NAMESPACE)


# ------------------------------------------------------------------ checks
def _check_read(rows, keys, strengths, eps):
    _check("rows", rows, 4, "(B, H, K, D)")
    B, H, K, D = rows.shape
    if K < 1 or D < 1:
        raise ValueError(f"rows must have K >= 1 candidates and D >= 1, got shape {tuple(rows.shape)}")
    _check("keys", keys, 3, "(B, H, D)", rows.dtype, rows.device)
    if tuple(keys.shape) != (B, H, D):
        raise ValueError(f"keys must have shape (B, H, D) = {(B, H, D)}, got {tuple(keys.shape)}")
    _check("strengths", strengths, 2, "(B, H)", rows.dtype, rows.device)
    if tuple(strengths.shape) != (B, H):
        raise ValueError(f"strengths must have shape (B, H) = {(B, H)}, got {tuple(strengths.shape)}")
    if not (eps > 0):
        raise ValueError(f"eps must be positive, got {eps}")


def _check_topk(memory, keys, k, eps):
    _check("memory", memory, 3, "(B, N, D)")
    B, N, D = memory.shape
    _check("keys", keys, 3, "(B, H, D)", memory.dtype, memory.device)
    if keys.shape[0] != B or keys.shape[2] != D:
        raise ValueError(f"keys must have shape (B, H, D) = ({B}, H, {D}), got {tuple(keys.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or not (1 <= k <= N):
        raise ValueError(f"k must be an int in [1, N={N}], got {k!r}")
    if not (eps > 0):
        raise ValueError(f"eps must be positive, got {eps}")


def _check_links(links):
    if not isinstance(links, torch.Tensor) or links.dim() != 3 or links.shape[2] != 2 or links.shape[1] < 2:
        raise ValueError(f"links must be a (B, N+1, 2) int64 tensor from lru_init, got "
                         f"{tuple(getattr(links, 'shape', ())) or type(links).__name__}")
    if links.dtype != torch.int64:
        raise TypeError(f"links must be int64, got {links.dtype}")
    if not links.is_contiguous():
        raise ValueError("links must be contiguous")
    return links.shape[0], links.shape[1] - 1


def _check_indices(name, indices, B, N, device, allow_missing=True):
    if not isinstance(indices, torch.Tensor) or indices.dim() != 2 or indices.shape[0] != B:
        raise ValueError(f"{name} must be a (B={B}, M) int64 tensor, got "
                         f"{tuple(getattr(indices, 'shape', ())) or type(indices).__name__}")
    if indices.dtype != torch.int64:
        raise TypeError(f"{name} must be int64, got {indices.dtype}")
    if indices.device != device:
        raise ValueError(f"{name} must be on {device}, got {indices.device}")
    if indices.numel():
        lo = -1 if allow_missing else 0
        mn, mx = int(indices.min()), int(indices.max())
        if mn < lo or mx >= N:
            raise ValueError(f"{name} must lie in [{lo}, N={N}), got values in [{mn}, {mx}]")


# ------------------------------------------------------------------ references
def _up(t):
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def sparse_read_ref(rows, keys, strengths, eps=DEFAULT_EPS):
    """The restricted softmax read in plain PyTorch: (reads (B,H,D), weights (B,H,K))."""
    r, k = _up(rows), _up(keys)
    kn = torch.nn.functional.normalize(k, dim=-1, eps=eps)
    rn = torch.nn.functional.normalize(r, dim=-1, eps=eps)
    logits = _up(strengths).unsqueeze(-1) * torch.einsum("bhd,bhkd->bhk", kn, rn)
    w = torch.softmax(logits, dim=-1)
    reads = torch.einsum("bhk,bhkd->bhd", w, r)
    return reads.to(rows.dtype), w.to(rows.dtype)


def cosine_topk_ref(memory, keys, k, eps=DEFAULT_EPS):
    """Cosine of every key with every slot, then a stable descending sort: equal scores keep slot order."""
    kn = torch.nn.functional.normalize(_up(keys), dim=-1, eps=eps)
    mn = torch.nn.functional.normalize(_up(memory), dim=-1, eps=eps)
    cos = torch.matmul(kn, mn.transpose(-1, -2))
    vals, idx = torch.sort(cos, dim=-1, descending=True, stable=True)
    return vals[..., :k].to(memory.dtype), idx[..., :k]


def lru_init(batch_size, n, device=None):
    """Links (B, N+1, 2) of a list holding slots 0..N-1 in that order (slot 0 the least recently used)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    ar = torch.arange(n + 1, dtype=torch.int64, device=device)
    links = torch.empty(batch_size, n + 1, 2, dtype=torch.int64, device=device)
    links[:, :, 0] = torch.remainder(ar - 1, n + 1)
    links[:, :, 1] = torch.remainder(ar + 1, n + 1)
    return links


def lru_order(links, b=0):
    """The slots of memory b from least to most recently used (a Python list; for tests, O(N))."""
    N = links.shape[1] - 1
    nxt = links[b, :, 1].tolist()
    out, cur = [], nxt[N]
    while cur != N:
        out.append(cur)
        cur = nxt[cur]
        if len(out) > N:
            raise RuntimeError("links: the list does not close (corrupted)")
    return out


def lru_touch_ref_(links, indices):
    """lru_touch_ in Python loops (for tests)."""
    N = links.shape[1] - 1
    for b in range(links.shape[0]):
        L = links[b]
        for s in indices[b].tolist():
            if s < 0:
                continue
            p, q = int(L[s, 0]), int(L[s, 1])
            L[p, 1], L[q, 0] = q, p
            tail = int(L[N, 0])
            L[s, 0], L[s, 1] = tail, N
            L[tail, 1], L[N, 0] = s, s
    return links


def lru_oldest_ref(links, count, skip=None):
    B = links.shape[0]
    out = torch.full((B, count), -1, dtype=torch.int64, device=links.device)
    for b in range(B):
        order = [s for s in lru_order(links, b) if skip is None or not bool(skip[b, s])]
        for i, s in enumerate(order[:count]):
            out[b, i] = s
    return out


# ------------------------------------------------------------------ public ops
def sparse_read(rows, keys, strengths, eps=DEFAULT_EPS, backend="auto"):
    """Softmax read over each head's K candidate rows: (reads (B,H,D), weights (B,H,K)); see the module doc."""
    _check_read(rows, keys, strengths, eps)
    if not _native(backend, rows.device):
        return sparse_read_ref(rows, keys, strengths, eps)
    return _lib().sparse_read(_c(rows), _c(keys), _c(strengths), float(eps))


def cosine_topk(memory, keys, k, eps=DEFAULT_EPS, backend="auto"):
    """The k slots of largest cosine per key, best first: (scores (B,H,k), indices (B,H,k) int64)."""
    _check_topk(memory, keys, k, eps)
    with torch.no_grad():
        if not _native(backend, memory.device):
            return cosine_topk_ref(memory, keys, k, eps)
        return _lib().cosine_topk(_c(memory), _c(keys), int(k), float(eps))


def lru_touch_(links, indices, backend="auto"):
    """Moves each slot of indices (B,M) (entries -1 ignored) to the most recently used end, in order."""
    B, N = _check_links(links)
    _check_indices("indices", indices, B, N, links.device)
    if not _native(backend, links.device):
        return lru_touch_ref_(links, indices)
    _lib().lru_touch_(links, _c(indices))
    return links


def lru_oldest(links, count, skip=None, backend="auto"):
    """The `count` least recently used slots (B,count), skipping slots where skip[b,n]; -1 past the end."""
    B, N = _check_links(links)
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be a non-negative int, got {count!r}")
    if skip is not None:
        if not isinstance(skip, torch.Tensor) or skip.dtype != torch.bool or tuple(skip.shape) != (B, N):
            raise ValueError(f"skip must be None or a ({B}, {N}) bool tensor, got "
                             f"{getattr(skip, 'dtype', type(skip).__name__)} {tuple(getattr(skip, 'shape', ()))}")
        if skip.device != links.device:
            raise ValueError(f"skip must be on {links.device}, got {skip.device}")
    if not _native(backend, links.device):
        return lru_oldest_ref(links, count, skip)
    return _lib().lru_oldest(links, int(count), None if skip is None else _c(skip))


def check_unique_rows(indices, name="indices"):
    """Raises when a row of indices (B,M) repeats a slot (entries -1 excepted)."""
    s, _ = torch.sort(indices, dim=1)
    dup = (s[:, 1:] == s[:, :-1]) & (s[:, 1:] >= 0)
    if bool(dup.any()):
        b = int(dup.any(dim=1).nonzero()[0])
        raise ValueError(f"{name}: row {b} names a slot twice; a sparse write needs distinct slots per memory")


def sparse_write_(memory, indices, weights, erase, add, backend="auto"):
    """Erase-add write to the K slots indices (B,K) of memory (B,N,D), in place, O(K*D).

    weights (B,W,K) are the write weights of those slots, erase/add (B,W,D). Equal to the dense
    `memory_write` with weights scattered to their slots (zero elsewhere). Slots must be distinct per
    memory. Returns the rows before the write (B,K,D). Follows PyTorch's in-place rules (a leaf that
    requires grad is refused; the version counter is bumped).
    """
    from .functional import memory_write

    _check("memory", memory, 3, "(B, N, D)")
    B, N, D = memory.shape
    _check_indices("indices", indices, B, N, memory.device, allow_missing=False)
    K = indices.shape[1]
    _check("weights", weights, 3, "(B, W, K)", memory.dtype, memory.device)
    if weights.shape[0] != B or weights.shape[2] != K:
        raise ValueError(f"weights must have shape (B, W, K) = ({B}, W, {K}), got {tuple(weights.shape)}")
    W = weights.shape[1]
    for name, t in (("erase", erase), ("add", add)):
        _check(name, t, 3, "(B, W, D)", memory.dtype, memory.device)
        if tuple(t.shape) != (B, W, D):
            raise ValueError(f"{name} must have shape (B, W, D) = {(B, W, D)}, got {tuple(t.shape)}")
    if memory.requires_grad and memory.is_leaf and torch.is_grad_enabled():
        raise RuntimeError("memory: a leaf Variable that requires grad is being used in an in-place operation")
    check_unique_rows(indices)
    gidx = indices.unsqueeze(-1).expand(B, K, D)
    with torch.no_grad():
        old = memory.gather(1, gidx)
        be = "torch" if backend == "torch" else "auto"
        new = memory_write(old, weights.detach(), erase.detach(), add.detach(), backend=be) if be != "torch" \
            else memory_write_ref(old, weights.detach(), erase.detach(), add.detach())
        memory.scatter_(1, gidx, new)
    return old


# ------------------------------------------------------------------ registration
def _register():
    """Fake kernels and the gradient formula of sparse_read, once, when the native ops exist."""
    names = torch._C._dispatch_get_all_op_names()
    if f"{NAMESPACE}::sparse_read" not in names:
        return False
    lib = f"{NAMESPACE}::"

    @torch.library.register_fake(lib + "sparse_read")
    def _(rows, keys, strengths, eps):
        B, H, K, D = rows.shape
        return rows.new_empty((B, H, D)), rows.new_empty((B, H, K))

    @torch.library.register_fake(lib + "sparse_read_backward")
    def _(grad_reads, grad_weights, weights, rows, keys, strengths, eps):
        return torch.empty_like(rows), torch.empty_like(keys), torch.empty_like(strengths)

    @torch.library.register_fake(lib + "cosine_topk")
    def _(memory, keys, k, eps):
        B, H = keys.shape[0], keys.shape[1]
        return memory.new_empty((B, H, k)), memory.new_empty((B, H, k), dtype=torch.int64)

    @torch.library.register_fake(lib + "lru_touch_")
    def _(links, indices):
        return None

    @torch.library.register_fake(lib + "lru_oldest")
    def _(links, count, skip):
        return links.new_empty((links.shape[0], count))

    def setup(ctx, inputs, output):
        rows, keys, strengths, eps = inputs
        ctx.save_for_backward(output[1], rows, keys, strengths)
        ctx.eps = eps

    def backward(ctx, grad_reads, grad_weights):
        weights, rows, keys, strengths = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: differentiate the reference, every term kept
            return (*_reference_grads(ctx, lambda r, k, s: sparse_read_ref(r, k, s, ctx.eps), (rows, keys, strengths),
                                      (grad_reads, grad_weights)), None)
        if grad_reads is None:
            grad_reads = torch.zeros_like(keys)
        if grad_weights is None:
            grad_weights = torch.zeros_like(weights)
        gr, gk, gs = _lib().sparse_read_backward(_c(grad_reads), _c(grad_weights), weights, rows, keys, strengths,
                                                 ctx.eps)
        return gr, gk, gs, None

    torch.library.register_autograd(lib + "sparse_read", backward, setup_context=setup)
    return True


_REGISTERED = _register()
