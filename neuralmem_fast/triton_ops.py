"""Triton kernels for the memory ops, registered as the ``neuralmem_triton`` ops.

The ops have exactly the schemas of ``neuralmem::*`` (csrc/ops.cpp), in their
own namespace so that they never compete with the CUDA C++ kernels for the
CUDA dispatch key; ``ops.py`` calls them for ``backend="triton"`` behind the
same ``autograd.Function``s. They are registered with
``torch.library.Library("neuralmem_triton", "DEF")`` and plain Python kernels
for the CPU and CUDA keys rather than ``torch.library.triton_op``:
``triton_op`` infers its schema from type hints (the optional mutated
``usage`` of ``content_write_`` and the exact argument names would have to be
coaxed out of it), and it exists to let Inductor trace into the kernels,
which buys nothing for CPU tensors under the interpreter, the one place CI
can run them. Fake kernels come from ``ops.register_fakes``.

Devices: CUDA tensors on a GPU; CPU tensors only under the Triton
interpreter (``TRITON_INTERPRET=1`` set before this module is imported),
which is how CI runs the kernels. The same launches, shapes and block sizes
serve both; only the number of slot splits follows the device.

Design (B memories, N slots, D slot width, H read / W write heads):

* One program owns one memory ``b`` and a contiguous range of slots (a
  "split") and serves *all* heads of ``b``: every memory row is read from
  global memory once per pass, whatever H is. Heads, slots and the slot width
  are padded to powers of two (BH, BN, BD) and masked.
* Head x slot x width products are broadcast-multiply + ``tl.sum`` over a 3D
  tile bounded by ``_TILE`` elements; ``tl.dot`` (IEEE fp32, so results match
  the reference) only when BH >= 16 so that every dot dimension is >= 16, and
  never for float64.
* Accumulation is float32 for half inputs and float64 for float64 inputs
  (``ACC``); ``eps`` and ``decay`` travel as two float32 halves (hi + lo) so a
  float64 run sees them to ~48 bits instead of float32's 24.
* Softmax over slots (content_addressing, content_read, content_write_) is an
  online softmax over slot blocks; logits are masked to -inf past the end, the
  running max starts at -inf, and every split owns at least one slot, so the
  max is finite after the first block and nothing divides by zero for any
  finite strength (the largest logit contributes exp(0) = 1 to its sum).
  Weights that are written out are exp(s - max) / sum, as torch.softmax
  does, not exp(s - lse): a float32 lse near |s| ~ 1e4 is only good to
  ~5e-4. The float32 content_read backward over more than one block does
  recompute exp(s - lse) from the saved lse, so at such strengths its
  weights carry that error (float64 and moderate strengths are unaffected).
* Half-precision backwards do not take delta = sum_n w_n dw_n from the half
  reads or weights of the forward: it cancels wherever the softmax is
  peaked, and the strength multiplies what is left. They recompute the
  weights as exp(s - max) / sum and delta from float intermediates (a
  statistics pass first; in the program itself when one split covers the
  memory); content_read does so for the heads whose given lse is their own
  (a sharded memory passes its global lse and reads, which are then used
  as given). float/double content_read does the same when the memory is
  one block, where it is free and makes the one-slot gradient exactly 0.
* A head whose strength or key has an inf/NaN element gets NaN outputs and
  gradients, where the reference formula gives NaN (see _load_query).
* Large N: the slots are split across programs (Flash-Decoding). content_read
  writes per-split partial (max, sum, acc) and a second tiny kernel combines
  them; with one split the first kernel writes the result itself. The split
  count targets a few programs per SM on a GPU and is 1 under the interpreter
  unless forced with ``override(split_slots=...)``.
* Backward of the softmax ops recomputes the weights (content_read; also
  content_addressing for half inputs, see above) or reads the given
  weights, never materialises (B,H,N) in content_read, writes d(memory) per
  slot, and reduces per-split partial grads of keys/strengths in a fixed
  order in a second kernel: deterministic, no float atomics.
* memory_write backward uses exclusive prefix/suffix products over the write
  heads (``tl.cumprod`` over shifted factors), never a division by (1 - w e).

``compile_only(arch)`` builds every kernel the ops launch into a cubin for a
real GPU without one (Triton's bundled ptxas), so that code which only the
interpreter accepts is caught in CI.
"""
import contextlib
import functools
import struct

import torch

try:
    import triton
    import triton.language as tl

    AVAILABLE = True
except Exception:  # ImportError, or an install that cannot load its backend
    AVAILABLE = False

    class _Missing:
        """Lets the kernel definitions below parse when triton is absent; never run."""

        constexpr = None

        @staticmethod
        def jit(fn=None, **_):
            return fn

    triton = tl = _Missing()


# --------------------------------------------------------------------------
# knobs
# --------------------------------------------------------------------------
class _Config:
    """Block and split sizes; None means the heuristics below decide.

    block_n: slots per block (a power of two). split_slots: slots per split
    program (rounded up to a multiple of block_n); a small value makes a
    small N run several splits and the combine kernels, which is how the
    tests reach them on CPU.
    """

    block_n = None
    split_slots = None


CONFIG = _Config()


@contextlib.contextmanager
def override(block_n=None, split_slots=None):
    """Temporarily forces block_n and/or split_slots (see _Config)."""
    if block_n is not None and (block_n < 1 or block_n & (block_n - 1)):
        raise ValueError(f"block_n must be a power of two >= 1, got {block_n}")
    if split_slots is not None and split_slots < 1:
        raise ValueError(f"split_slots must be >= 1, got {split_slots}")
    old = (CONFIG.block_n, CONFIG.split_slots)
    CONFIG.block_n, CONFIG.split_slots = block_n, split_slots
    try:
        yield CONFIG
    finally:
        CONFIG.block_n, CONFIG.split_slots = old


# Largest 3D broadcast tile (heads x slots x width) one program holds; keeps
# register use bounded on a GPU. Halved for float64.
_TILE = 8192


# --------------------------------------------------------------------------
# jit helpers
# --------------------------------------------------------------------------
@triton.jit
def _mul(a, b):
    return a * b


@triton.jit
def _rows_dot(a, m, USE_DOT: tl.constexpr):
    """a (BH,BD), m (BN,BD) -> a @ m^T (BH,BN)."""
    if USE_DOT:
        out = tl.dot(a, tl.trans(m), input_precision="ieee")
    else:
        out = tl.sum(a[:, None, :] * m[None, :, :], axis=2)
    return out


@triton.jit
def _mix(p, m, USE_DOT: tl.constexpr):
    """p (BH,BN), m (BN,BD) -> p @ m (BH,BD)."""
    if USE_DOT:
        out = tl.dot(p, m, input_precision="ieee")
    else:
        out = tl.sum(p[:, :, None] * m[None, :, :], axis=1)
    return out


@triton.jit
def _spread(p, v, USE_DOT: tl.constexpr):
    """p (BH,BN), v (BH,BD) -> p^T @ v (BN,BD)."""
    if USE_DOT:
        out = tl.dot(tl.trans(p), v, input_precision="ieee")
    else:
        out = tl.sum(p[:, :, None] * v[:, None, :], axis=0)
    return out


@triton.jit
def _load_keys(key_ptr, b64, H, D, eps, BH: tl.constexpr, BD: tl.constexpr, ACC: tl.constexpr):
    """Keys of memory b64 and their F.normalize'd version q = k / max(|k|, eps)."""
    offs_h = tl.arange(0, BH)
    offs_d = tl.arange(0, BD)
    mask = (offs_h[:, None] < H) & (offs_d[None, :] < D)
    k = tl.load(key_ptr + b64 * H * D + offs_h[:, None] * D + offs_d[None, :], mask=mask, other=0.0).to(ACC)
    knorm = tl.sqrt(tl.sum(k * k, axis=1))
    q = k / tl.maximum(knorm, eps)[:, None]
    return k, q, knorm


@triton.jit
def _load_query(key_ptr, beta_ptr, b64, H, D, eps, BH: tl.constexpr, BD: tl.constexpr, ACC: tl.constexpr):
    """_load_keys plus the strengths, and ok: whether a head's strength and key are finite.

    A head whose strength is inf/NaN or whose key has an inf/NaN element has
    NaN weights in the reference formula, hence NaN outputs and gradients.
    Here it is computed as a zero key of strength 0 (q, beta sanitised, so
    that nothing non-finite enters the arithmetic of the heads that share its
    blocks), and the kernels make its outputs NaN. One check per head, none
    per slot.
    """
    k, q, knorm = _load_keys(key_ptr, b64, H, D, eps, BH, BD, ACC)
    beta = _load_heads(beta_ptr, b64, H, BH, ACC)
    # x * 0 is NaN exactly when x is inf or NaN.
    ok = (tl.sum(k * 0.0, axis=1) == 0.0) & (beta * 0.0 == 0.0)
    q = tl.where(ok[:, None], q, 0.0)
    beta = tl.where(ok, beta, 0.0)
    return k, q, knorm, beta, ok


@triton.jit
def _load_heads(ptr, b64, H, BH: tl.constexpr, ACC: tl.constexpr):
    offs_h = tl.arange(0, BH)
    return tl.load(ptr + b64 * H + offs_h, mask=offs_h < H, other=0.0).to(ACC)


@triton.jit
def _load_hd(ptr, row64, H, D, BH: tl.constexpr, BD: tl.constexpr, ACC: tl.constexpr):
    """The (H,D) block at row64 * H * D (a (B,H,D) tensor or a (B,S,H,D) partial)."""
    offs_h = tl.arange(0, BH)
    offs_d = tl.arange(0, BD)
    mask = (offs_h[:, None] < H) & (offs_d[None, :] < D)
    return tl.load(ptr + row64 * H * D + offs_h[:, None] * D + offs_d[None, :], mask=mask, other=0.0).to(ACC)


@triton.jit
def _store_hd(ptr, row64, val, H, D, BH: tl.constexpr, BD: tl.constexpr):
    offs_h = tl.arange(0, BH)
    offs_d = tl.arange(0, BD)
    mask = (offs_h[:, None] < H) & (offs_d[None, :] < D)
    tl.store(ptr + row64 * H * D + offs_h[:, None] * D + offs_d[None, :], val.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_heads(ptr, row64, val, H, BH: tl.constexpr):
    offs_h = tl.arange(0, BH)
    tl.store(ptr + row64 * H + offs_h, val.to(ptr.dtype.element_ty), mask=offs_h < H)


@triton.jit
def _rows(base, offs_n, nmask, D, BD: tl.constexpr, ACC: tl.constexpr):
    """Rows offs_n of a (N,D) matrix at base; int64 offsets, since N*D may pass 2^31."""
    offs_d = tl.arange(0, BD)
    ptrs = base + offs_n.to(tl.int64)[:, None] * D + offs_d[None, :]
    return tl.load(ptrs, mask=nmask[:, None] & (offs_d[None, :] < D), other=0.0).to(ACC)


@triton.jit
def _store_rows(base, offs_n, nmask, val, D, BD: tl.constexpr):
    offs_d = tl.arange(0, BD)
    ptrs = base + offs_n.to(tl.int64)[:, None] * D + offs_d[None, :]
    tl.store(ptrs, val.to(base.dtype.element_ty), mask=nmask[:, None] & (offs_d[None, :] < D))


@triton.jit
def _cosine(m, q, beta, eps, USE_DOT: tl.constexpr):
    """Cosine c (BH,BN) of normalised keys q with rows m, logits beta*c, 1/max(|m|,eps), |m|>eps."""
    nrm = tl.sqrt(tl.sum(m * m, axis=1))
    inv_n = 1.0 / tl.maximum(nrm, eps)
    c = _rows_dot(q, m, USE_DOT) * inv_n[None, :]
    return c, beta[:, None] * c, inv_n, nrm > eps


@triton.jit
def _online(m_i, l_i, sc):
    """One online-softmax step over a block of logits sc (BH,BN), -inf where masked."""
    m_new = tl.maximum(m_i, tl.max(sc, axis=1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(sc - m_new[:, None])
    return m_new, l_i * alpha + tl.sum(p, axis=1), alpha, p


@triton.jit
def _combine_stats(pm_ptr, pl_ptr, b64, S, H, BH: tl.constexpr, ACC: tl.constexpr):
    """Global (max, sum of exp(logit - max)) from S per-split partials of memory b64, in split order."""
    mx = tl.full((BH,), float("-inf"), ACC)
    for s in range(S):
        mx = tl.maximum(mx, _load_heads(pm_ptr, b64 * S + s, H, BH, ACC))
    tot = tl.zeros((BH,), ACC)
    for s in range(S):
        row = b64 * S + s
        tot += _load_heads(pl_ptr, row, H, BH, ACC) * tl.exp(_load_heads(pm_ptr, row, H, BH, ACC) - mx)
    # Padded heads have no partials; keep their lanes finite.
    return mx, tl.where(tl.arange(0, BH) < H, tot, 1.0)


@triton.jit
def _finish_keys(dq, dbeta, k, q, knorm, eps, dk_ptr, db_ptr, b64, H, D, BH: tl.constexpr, BD: tl.constexpr):
    """dk from the grad of q = k / max(|k|, eps): projected off q and scaled when |k| > eps."""
    proj = tl.where(knorm > eps, tl.sum(dq * q, axis=1), 0.0)
    dk = (dq - proj[:, None] * q) / tl.maximum(knorm, eps)[:, None]
    _store_hd(dk_ptr, b64, dk, H, D, BH, BD)
    _store_heads(db_ptr, b64, dbeta, H, BH)


@triton.jit
def _stats_range(base, q, beta, eps, s_ptr, b64, start, end, N, D, H,
                 STORE: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr,
                 USE_DOT: tl.constexpr, ACC: tl.constexpr):
    """Online (max, sum) of the logits of slots [start, end); STORE also writes them to s_ptr (B,H,N)."""
    offs_h = tl.arange(0, BH)
    m_i = tl.full((BH,), float("-inf"), ACC)
    l_i = tl.zeros((BH,), ACC)
    for n0 in range(start, end, BN):
        offs_n = n0 + tl.arange(0, BN)
        nmask = offs_n < end
        m = _rows(base, offs_n, nmask, D, BD, ACC)
        c, sc, inv_n, big = _cosine(m, q, beta, eps, USE_DOT)
        sc = tl.where(nmask[None, :], sc, float("-inf"))
        m_i, l_i, alpha, p = _online(m_i, l_i, sc)
        if STORE:
            off = b64 * H * N + offs_h[:, None] * N + offs_n[None, :]
            tl.store(s_ptr + off, sc.to(s_ptr.dtype.element_ty), mask=(offs_h[:, None] < H) & nmask[None, :])
    return m_i, l_i


@triton.jit
def _normalize_range(s_ptr, out_ptr, mx, tot, b64, start, end, N, H, BN: tl.constexpr, BH: tl.constexpr,
                     ACC: tl.constexpr):
    """weights = exp(logits - max) / sum for slots [start, end); s_ptr may be out_ptr.

    Not exp(logits - lse): at |logits| ~ 1e4 a float32 lse is only good to
    ~5e-4, and the weights would no longer sum to 1.
    """
    inv = 1.0 / tot
    offs_h = tl.arange(0, BH)
    for n0 in range(start, end, BN):
        offs_n = n0 + tl.arange(0, BN)
        mask = (offs_h[:, None] < H) & (offs_n[None, :] < end)
        off = b64 * H * N + offs_h[:, None] * N + offs_n[None, :]
        sc = tl.load(s_ptr + off, mask=mask, other=0.0).to(ACC)
        w = tl.exp(tl.where(mask, sc - mx[:, None], float("-inf"))) * inv[:, None]
        tl.store(out_ptr + off, w.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _delta_range(dw_ptr, w_ptr, b64, start, end, N, H, BN: tl.constexpr, BH: tl.constexpr, ACC: tl.constexpr):
    """sum_n w * dw over slots [start, end) of (B,H,N) tensors."""
    offs_h = tl.arange(0, BH)
    delta = tl.zeros((BH,), ACC)
    for n0 in range(start, end, BN):
        offs_n = n0 + tl.arange(0, BN)
        mask = (offs_h[:, None] < H) & (offs_n[None, :] < end)
        off = b64 * H * N + offs_h[:, None] * N + offs_n[None, :]
        w = tl.load(w_ptr + off, mask=mask, other=0.0).to(ACC)
        dw = tl.load(dw_ptr + off, mask=mask, other=0.0).to(ACC)
        delta += tl.sum(w * dw, axis=1)
    return delta


# --------------------------------------------------------------------------
# content addressing / content read: forward
# --------------------------------------------------------------------------
@triton.jit
def _address_fwd_kernel(mem_ptr, key_ptr, beta_ptr, s_ptr, out_ptr, pm_ptr, pl_ptr,
                        N, D, H, S, SPLIT, eps_hi, eps_lo,
                        BN: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr, USE_DOT: tl.constexpr,
                        SINGLE: tl.constexpr, STORE: tl.constexpr, ACC: tl.constexpr):
    """Logits of one split (stored in s_ptr when STORE) and their partial (max, sum).

    SINGLE (one split per memory): normalises in place right away. Otherwise
    the partials go to pm/pl (B,S,H) for _address_norm_kernel.
    """
    pid = tl.program_id(0)
    b64 = (pid // S).to(tl.int64)
    split = pid % S
    eps = tl.cast(eps_hi, ACC) + tl.cast(eps_lo, ACC)
    k, q, knorm, beta, ok = _load_query(key_ptr, beta_ptr, b64, H, D, eps, BH, BD, ACC)
    start = split * SPLIT
    end = tl.minimum(start + SPLIT, N)
    m_i, l_i = _stats_range(mem_ptr + b64 * N * D, q, beta, eps, s_ptr, b64, start, end, N, D, H,
                            STORE, BN, BD, BH, USE_DOT, ACC)
    # A non-finite head: a NaN sum makes its weights NaN, here or after the combine.
    l_i = tl.where(ok, l_i, float("nan"))
    if SINGLE:
        # The logits this program stored are read back by other threads of it.
        tl.debug_barrier()
        _normalize_range(s_ptr, out_ptr, m_i, l_i, b64, start, end, N, H, BN, BH, ACC)
    else:
        _store_heads(pm_ptr, b64 * S + split, m_i, H, BH)
        _store_heads(pl_ptr, b64 * S + split, l_i, H, BH)


@triton.jit
def _address_norm_kernel(s_ptr, out_ptr, pm_ptr, pl_ptr, N, H, S, SPLIT,
                         BN: tl.constexpr, BH: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0)
    b64 = (pid // S).to(tl.int64)
    split = pid % S
    mx, tot = _combine_stats(pm_ptr, pl_ptr, b64, S, H, BH, ACC)
    start = split * SPLIT
    _normalize_range(s_ptr, out_ptr, mx, tot, b64, start, tl.minimum(start + SPLIT, N), N, H, BN, BH, ACC)


@triton.jit
def _read_fused_fwd_kernel(mem_ptr, key_ptr, beta_ptr, out_ptr, m_out_ptr, l_out_ptr,
                           N, D, H, S, SPLIT, eps_hi, eps_lo,
                           BN: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr, USE_DOT: tl.constexpr,
                           SINGLE: tl.constexpr, ACC: tl.constexpr):
    """content_read of one split: online softmax and the weighted row sum in one pass.

    SINGLE: out_ptr = reads (B,H,D), m_out_ptr = lse (B,H). Otherwise
    out_ptr = partial acc (B,S,H,D), m_out/l_out = partial max/sum (B,S,H).
    """
    pid = tl.program_id(0)
    b64 = (pid // S).to(tl.int64)
    split = pid % S
    eps = tl.cast(eps_hi, ACC) + tl.cast(eps_lo, ACC)
    k, q, knorm, beta, ok = _load_query(key_ptr, beta_ptr, b64, H, D, eps, BH, BD, ACC)
    start = split * SPLIT
    end = tl.minimum(start + SPLIT, N)
    base = mem_ptr + b64 * N * D
    m_i = tl.full((BH,), float("-inf"), ACC)
    l_i = tl.zeros((BH,), ACC)
    acc = tl.zeros((BH, BD), ACC)
    for n0 in range(start, end, BN):
        offs_n = n0 + tl.arange(0, BN)
        nmask = offs_n < end
        m = _rows(base, offs_n, nmask, D, BD, ACC)
        c, sc, inv_n, big = _cosine(m, q, beta, eps, USE_DOT)
        sc = tl.where(nmask[None, :], sc, float("-inf"))
        m_i, l_i, alpha, p = _online(m_i, l_i, sc)
        acc = acc * alpha[:, None] + _mix(p, m, USE_DOT)
    # A non-finite head: a NaN sum makes its reads and lse NaN, here or after the combine.
    l_i = tl.where(ok, l_i, float("nan"))
    if SINGLE:
        _store_hd(out_ptr, b64, acc / l_i[:, None], H, D, BH, BD)
        _store_heads(m_out_ptr, b64, m_i + tl.log(l_i), H, BH)
    else:
        row = b64 * S + split
        _store_hd(out_ptr, row, acc, H, D, BH, BD)
        _store_heads(m_out_ptr, row, m_i, H, BH)
        _store_heads(l_out_ptr, row, l_i, H, BH)


@triton.jit
def _read_fused_combine_kernel(pacc_ptr, pm_ptr, pl_ptr, out_ptr, lse_ptr, H, D, S,
                               BD: tl.constexpr, BH: tl.constexpr, ACC: tl.constexpr):
    """Merges the S partial (max, sum, acc) of one memory, in split order."""
    b64 = tl.program_id(0).to(tl.int64)
    mx = tl.full((BH,), float("-inf"), ACC)
    for s in range(S):
        mx = tl.maximum(mx, _load_heads(pm_ptr, b64 * S + s, H, BH, ACC))
    tot = tl.zeros((BH,), ACC)
    acc = tl.zeros((BH, BD), ACC)
    for s in range(S):
        row = b64 * S + s
        scale = tl.exp(_load_heads(pm_ptr, row, H, BH, ACC) - mx)
        tot += _load_heads(pl_ptr, row, H, BH, ACC) * scale
        acc += _load_hd(pacc_ptr, row, H, D, BH, BD, ACC) * scale[:, None]
    tot = tl.where(tl.arange(0, BH) < H, tot, 1.0)
    _store_hd(out_ptr, b64, acc / tot[:, None], H, D, BH, BD)
    _store_heads(lse_ptr, b64, mx + tl.log(tot), H, BH)


# --------------------------------------------------------------------------
# content addressing / content read: backward
# --------------------------------------------------------------------------
@triton.jit
def _address_delta_kernel(dw_ptr, w_ptr, delta_ptr, N, H, S, SPLIT,
                          BN: tl.constexpr, BH: tl.constexpr, ACC: tl.constexpr):
    """Per-split partial of delta = sum_n w dw, (B,S,H)."""
    pid = tl.program_id(0)
    b64 = (pid // S).to(tl.int64)
    split = pid % S
    start = split * SPLIT
    delta = _delta_range(dw_ptr, w_ptr, b64, start, tl.minimum(start + SPLIT, N), N, H, BN, BH, ACC)
    _store_heads(delta_ptr, b64 * S + split, delta, H, BH)


@triton.jit
def _bwd_stats_range(base, q, beta, eps, g, gw_ptr, b64, start, end, N, D, H, READ: tl.constexpr,
                     BN: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr, USE_DOT: tl.constexpr,
                     ACC: tl.constexpr):
    """Online (max m, sum l of exp(s - m), sum t of exp(s - m) dw) over slots [start, end).

    dw = g . m_n (READ) or the given grad of the weights at gw_ptr (B,H,N).
    """
    offs_h = tl.arange(0, BH)
    m_i = tl.full((BH,), float("-inf"), ACC)
    l_i = tl.zeros((BH,), ACC)
    t_i = tl.zeros((BH,), ACC)
    for n0 in range(start, end, BN):
        offs_n = n0 + tl.arange(0, BN)
        nmask = offs_n < end
        m = _rows(base, offs_n, nmask, D, BD, ACC)
        c, sc, inv_n, big = _cosine(m, q, beta, eps, USE_DOT)
        sc = tl.where(nmask[None, :], sc, float("-inf"))
        if READ:
            dw = _rows_dot(g, m, USE_DOT)
        else:
            off = b64 * H * N + offs_h[:, None] * N + offs_n[None, :]
            dw = tl.load(gw_ptr + off, mask=(offs_h[:, None] < H) & nmask[None, :], other=0.0).to(ACC)
        m_i, l_i, alpha, p = _online(m_i, l_i, sc)
        t_i = t_i * alpha + tl.sum(p * dw, axis=1)
    return m_i, l_i, t_i


@triton.jit
def _bwd_stats_kernel(g_ptr, mem_ptr, key_ptr, beta_ptr, pm_ptr, pl_ptr, pt_ptr,
                      N, D, H, S, SPLIT, eps_hi, eps_lo,
                      BN: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr, USE_DOT: tl.constexpr,
                      READ: tl.constexpr, ACC: tl.constexpr):
    """Per-split partial (max, sum, sum * dw) of the logits, (B,S,H) each, for EXACT backwards."""
    pid = tl.program_id(0)
    b64 = (pid // S).to(tl.int64)
    split = pid % S
    eps = tl.cast(eps_hi, ACC) + tl.cast(eps_lo, ACC)
    k, q, knorm, beta, ok = _load_query(key_ptr, beta_ptr, b64, H, D, eps, BH, BD, ACC)
    g = q
    if READ:
        g = _load_hd(g_ptr, b64, H, D, BH, BD, ACC)
    start = split * SPLIT
    m_i, l_i, t_i = _bwd_stats_range(mem_ptr + b64 * N * D, q, beta, eps, g, g_ptr, b64, start,
                                     tl.minimum(start + SPLIT, N), N, D, H, READ, BN, BD, BH, USE_DOT, ACC)
    row = b64 * S + split
    _store_heads(pm_ptr, row, m_i, H, BH)
    _store_heads(pl_ptr, row, l_i, H, BH)
    _store_heads(pt_ptr, row, t_i, H, BH)


@triton.jit
def _content_bwd_kernel(g_ptr, w_ptr, lse_ptr, delta_ptr, mem_ptr, key_ptr, beta_ptr,
                        dm_ptr, dq_ptr, db_ptr, pm_ptr, pl_ptr, pt_ptr,
                        N, D, H, S, SPLIT, eps_hi, eps_lo,
                        BN: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr, USE_DOT: tl.constexpr,
                        SINGLE: tl.constexpr, READ: tl.constexpr, EXACT: tl.constexpr,
                        LSE_TOL: tl.constexpr, ACC: tl.constexpr):
    """Backward of one split of the softmax-over-cosine ops.

    READ (content_read): g_ptr = d reads (B,H,D), w_ptr = reads (B,H,D);
    dw_n = g . m_n, and for any reads and lse given, w_n = exp(s_n - lse) and
    delta = g . reads (a sharded memory passes the global ones). Otherwise
    (content_addressing): g_ptr = d weights (B,H,N), w_ptr = weights (B,H,N),
    delta = sum_n w_n dw_n.
    But delta is a difference of near-equal numbers wherever the softmax is
    peaked, and every gradient carries ds_n = w_n (dw_n - delta) times the
    strength: from half reads or weights, their rounding times the strength
    lands in every gradient. EXACT (half inputs, and content_read over one
    block): (M, L) and T = sum_n exp(s_n - M) dw_n are recomputed, over all
    slots in this program (SINGLE) or combined from the (B,S,H) partials of
    _bwd_stats_kernel, and w_n = exp(s_n - M) / L, delta = T / L, for
    content_addressing and for the content_read heads whose given lse is
    M + log L to within LSE_TOL (relative); other heads keep the given lse
    and reads.
    d memory is written per slot. SINGLE: dq_ptr/db_ptr are d keys /
    d strengths; otherwise they take the per-split partial d q (B,S,H,D) and
    d strengths (B,S,H) for _keys_grad_kernel.
    """
    pid = tl.program_id(0)
    b64 = (pid // S).to(tl.int64)
    split = pid % S
    eps = tl.cast(eps_hi, ACC) + tl.cast(eps_lo, ACC)
    offs_h = tl.arange(0, BH)
    hmask = offs_h < H
    k, q, knorm, beta, ok = _load_query(key_ptr, beta_ptr, b64, H, D, eps, BH, BD, ACC)
    start = split * SPLIT
    end = tl.minimum(start + SPLIT, N)
    base = mem_ptr + b64 * N * D
    g = q
    if READ:
        g = _load_hd(g_ptr, b64, H, D, BH, BD, ACC)
    if EXACT:
        if SINGLE:
            mx, tot, tt = _bwd_stats_range(base, q, beta, eps, g, g_ptr, b64, 0, N, N, D, H, READ,
                                           BN, BD, BH, USE_DOT, ACC)
        else:
            mx, tot = _combine_stats(pm_ptr, pl_ptr, b64, S, H, BH, ACC)
            tt = tl.zeros((BH,), ACC)
            for s in range(S):
                row = b64 * S + s
                tt += _load_heads(pt_ptr, row, H, BH, ACC) * tl.exp(_load_heads(pm_ptr, row, H, BH, ACC) - mx)
        inv_l = 1.0 / tot
        delta = tt * inv_l
        lse = mx
        if READ:
            lse_in = _load_heads(lse_ptr, b64, H, BH, ACC)
            mine = mx + tl.log(tot)
            own = tl.abs(lse_in - mine) <= LSE_TOL * (1.0 + tl.abs(mine))
            lse = tl.where(own, mx, lse_in)
            inv_l = tl.where(own, inv_l, 1.0)
            delta = tl.where(own, delta, tl.sum(g * _load_hd(w_ptr, b64, H, D, BH, BD, ACC), axis=1))
    else:
        inv_l = tl.full((BH,), 1.0, ACC)
        if READ:
            delta = tl.sum(g * _load_hd(w_ptr, b64, H, D, BH, BD, ACC), axis=1)
            lse = _load_heads(lse_ptr, b64, H, BH, ACC)
        else:
            lse = inv_l
            if SINGLE:
                delta = _delta_range(g_ptr, w_ptr, b64, 0, N, N, H, BN, BH, ACC)
            else:
                delta = tl.zeros((BH,), ACC)
                for s in range(S):
                    delta += _load_heads(delta_ptr, b64 * S + s, H, BH, ACC)
    # A non-finite head (see _load_query) reaches every slot of its memory.
    all_ok = tl.sum(tl.where(ok, 0, 1), axis=0) == 0
    dm_base = dm_ptr + b64 * N * D
    dq = tl.zeros((BH, BD), ACC)
    dbeta = tl.zeros((BH,), ACC)
    for n0 in range(start, end, BN):
        offs_n = n0 + tl.arange(0, BN)
        nmask = offs_n < end
        hn = hmask[:, None] & nmask[None, :]
        m = _rows(base, offs_n, nmask, D, BD, ACC)
        c, sc, inv_n, big = _cosine(m, q, beta, eps, USE_DOT)
        if READ:
            w = tl.exp(tl.where(hn, sc - lse[:, None], float("-inf"))) * inv_l[:, None]
            dw = _rows_dot(g, m, USE_DOT)
        else:
            off = b64 * H * N + offs_h[:, None] * N + offs_n[None, :]
            dw = tl.load(g_ptr + off, mask=hn, other=0.0).to(ACC)
            if EXACT:
                w = tl.exp(tl.where(hn, sc - lse[:, None], float("-inf"))) * inv_l[:, None]
            else:
                w = tl.load(w_ptr + off, mask=hn, other=0.0).to(ACC)
        ds = w * (dw - delta[:, None])
        dbeta += tl.sum(ds * c, axis=1)
        dc = beta[:, None] * ds
        t = dc * inv_n[None, :]
        if READ:
            dm = _spread(w, g, USE_DOT) + _spread(t, q, USE_DOT)
        else:
            dm = _spread(t, q, USE_DOT)
        # d of m/max(|m|,eps) is (I - y y^T)/|m| above eps and I/eps below.
        corr = tl.where(big, inv_n * inv_n, 0.0) * tl.sum(dc * c, axis=0)
        dm = tl.where(all_ok, dm - corr[:, None] * m, float("nan"))
        _store_rows(dm_base, offs_n, nmask, dm, D, BD)
        dq += _mix(t, m, USE_DOT)
    dq = tl.where(ok[:, None], dq, float("nan"))
    dbeta = tl.where(ok, dbeta, float("nan"))
    if SINGLE:
        _finish_keys(dq, dbeta, k, q, knorm, eps, dq_ptr, db_ptr, b64, H, D, BH, BD)
    else:
        _store_hd(dq_ptr, b64 * S + split, dq, H, D, BH, BD)
        _store_heads(db_ptr, b64 * S + split, dbeta, H, BH)


@triton.jit
def _keys_grad_kernel(pdq_ptr, pdb_ptr, key_ptr, dk_ptr, db_ptr, H, D, S, eps_hi, eps_lo,
                      BD: tl.constexpr, BH: tl.constexpr, ACC: tl.constexpr):
    """Sums the per-split partial d q and d strengths in split order, then d keys."""
    b64 = tl.program_id(0).to(tl.int64)
    eps = tl.cast(eps_hi, ACC) + tl.cast(eps_lo, ACC)
    k, q, knorm = _load_keys(key_ptr, b64, H, D, eps, BH, BD, ACC)
    dq = tl.zeros((BH, BD), ACC)
    dbeta = tl.zeros((BH,), ACC)
    for s in range(S):
        dq += _load_hd(pdq_ptr, b64 * S + s, H, D, BH, BD, ACC)
        dbeta += _load_heads(pdb_ptr, b64 * S + s, H, BH, ACC)
    _finish_keys(dq, dbeta, k, q, knorm, eps, dk_ptr, db_ptr, b64, H, D, BH, BD)


# --------------------------------------------------------------------------
# memory read
# --------------------------------------------------------------------------
@triton.jit
def _read_fwd_kernel(mem_ptr, w_ptr, out_ptr, N, D, H, S, SPLIT,
                     BN: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr, USE_DOT: tl.constexpr,
                     SINGLE: tl.constexpr, ACC: tl.constexpr):
    """reads (SINGLE) or the split's partial (B,S,H,D) of weights @ memory."""
    pid = tl.program_id(0)
    b64 = (pid // S).to(tl.int64)
    split = pid % S
    offs_h = tl.arange(0, BH)
    start = split * SPLIT
    end = tl.minimum(start + SPLIT, N)
    base = mem_ptr + b64 * N * D
    acc = tl.zeros((BH, BD), ACC)
    for n0 in range(start, end, BN):
        offs_n = n0 + tl.arange(0, BN)
        nmask = offs_n < end
        m = _rows(base, offs_n, nmask, D, BD, ACC)
        off = b64 * H * N + offs_h[:, None] * N + offs_n[None, :]
        w = tl.load(w_ptr + off, mask=(offs_h[:, None] < H) & nmask[None, :], other=0.0).to(ACC)
        acc += _mix(w, m, USE_DOT)
    if SINGLE:
        _store_hd(out_ptr, b64, acc, H, D, BH, BD)
    else:
        _store_hd(out_ptr, b64 * S + split, acc, H, D, BH, BD)


@triton.jit
def _read_bwd_kernel(g_ptr, mem_ptr, w_ptr, dm_ptr, dw_ptr, N, D, H, NB,
                     BN: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr, USE_DOT: tl.constexpr,
                     ACC: tl.constexpr):
    """Per slot block: d memory = w^T g, d weights = g m^T (no reduction over slots)."""
    pid = tl.program_id(0)
    b64 = (pid // NB).to(tl.int64)
    offs_n = (pid % NB) * BN + tl.arange(0, BN)
    nmask = offs_n < N
    offs_h = tl.arange(0, BH)
    hn = (offs_h[:, None] < H) & nmask[None, :]
    g = _load_hd(g_ptr, b64, H, D, BH, BD, ACC)
    m = _rows(mem_ptr + b64 * N * D, offs_n, nmask, D, BD, ACC)
    off = b64 * H * N + offs_h[:, None] * N + offs_n[None, :]
    w = tl.load(w_ptr + off, mask=hn, other=0.0).to(ACC)
    _store_rows(dm_ptr + b64 * N * D, offs_n, nmask, _spread(w, g, USE_DOT), D, BD)
    tl.store(dw_ptr + off, _rows_dot(g, m, USE_DOT).to(dw_ptr.dtype.element_ty), mask=hn)


# --------------------------------------------------------------------------
# memory write, usage
# --------------------------------------------------------------------------
@triton.jit
def _write_fwd_kernel(mem_ptr, w_ptr, e_ptr, a_ptr, out_ptr, N, D, W, NB,
                      BN: tl.constexpr, BD: tl.constexpr, ACC: tl.constexpr):
    """out = m * prod_w (1 - w e) + sum_w w a for one slot block; out_ptr may be mem_ptr."""
    pid = tl.program_id(0)
    b64 = (pid // NB).to(tl.int64)
    offs_n = (pid % NB) * BN + tl.arange(0, BN)
    nmask = offs_n < N
    offs_d = tl.arange(0, BD)
    dmask = offs_d < D
    m = _rows(mem_ptr + b64 * N * D, offs_n, nmask, D, BD, ACC)
    keep = tl.full((BN, BD), 1.0, ACC)
    add = tl.zeros((BN, BD), ACC)
    for j in range(W):
        row = b64 * W + j
        wv = tl.load(w_ptr + row * N + offs_n, mask=nmask, other=0.0).to(ACC)
        e = tl.load(e_ptr + row * D + offs_d, mask=dmask, other=0.0).to(ACC)
        a = tl.load(a_ptr + row * D + offs_d, mask=dmask, other=0.0).to(ACC)
        keep = keep * (1.0 - wv[:, None] * e[None, :])
        add = add + wv[:, None] * a[None, :]
    _store_rows(out_ptr + b64 * N * D, offs_n, nmask, m * keep + add, D, BD)


@triton.jit
def _write_bwd_kernel(g_ptr, mem_ptr, w_ptr, e_ptr, a_ptr, dm_ptr, dw_ptr, de_ptr, da_ptr,
                      N, D, W, S, SPLIT,
                      BN: tl.constexpr, BD: tl.constexpr, BW: tl.constexpr, SINGLE: tl.constexpr,
                      ACC: tl.constexpr):
    """Backward of the erase-add write for one split, all write heads in a (BW,BN,BD) tile.

    d/dw_j of prod_i f_i (f_i = 1 - w_i e_i) is -e_j times the product of
    the other factors, formed as exclusive prefix x exclusive suffix products
    (cumprod of the factors shifted by one head), so w e = 1 needs no care.
    SINGLE: de/da are the grads (B,W,D); else per-split partials (B,S,W,D).
    """
    pid = tl.program_id(0)
    b64 = (pid // S).to(tl.int64)
    split = pid % S
    offs_w = tl.arange(0, BW)
    offs_d = tl.arange(0, BD)
    dmask = offs_d < D
    wmask = offs_w < W
    wd = wmask[:, None] & dmask[None, :]
    wd_off = b64 * W * D + offs_w[:, None] * D + offs_d[None, :]
    e = tl.load(e_ptr + wd_off, mask=wd, other=0.0).to(ACC)
    a = tl.load(a_ptr + wd_off, mask=wd, other=0.0).to(ACC)
    prev_ok = (offs_w >= 1) & (offs_w - 1 < W)
    next_ok = offs_w + 1 < W
    e_prev = tl.load(e_ptr + wd_off - D, mask=prev_ok[:, None] & dmask[None, :], other=0.0).to(ACC)
    e_next = tl.load(e_ptr + wd_off + D, mask=next_ok[:, None] & dmask[None, :], other=0.0).to(ACC)
    start = split * SPLIT
    end = tl.minimum(start + SPLIT, N)
    base = b64 * N * D
    de = tl.zeros((BW, BD), ACC)
    da = tl.zeros((BW, BD), ACC)
    for n0 in range(start, end, BN):
        offs_n = n0 + tl.arange(0, BN)
        nmask = offs_n < end
        G = _rows(g_ptr + base, offs_n, nmask, D, BD, ACC)
        m = _rows(mem_ptr + base, offs_n, nmask, D, BD, ACC)
        wn_off = b64 * W * N + offs_w[:, None] * N + offs_n[None, :]
        wv = tl.load(w_ptr + wn_off, mask=wmask[:, None] & nmask[None, :], other=0.0).to(ACC)
        w_prev = tl.load(w_ptr + wn_off - N, mask=prev_ok[:, None] & nmask[None, :], other=0.0).to(ACC)
        w_next = tl.load(w_ptr + wn_off + N, mask=next_ok[:, None] & nmask[None, :], other=0.0).to(ACC)
        f = 1.0 - wv[:, :, None] * e[:, None, :]
        pre = tl.cumprod(1.0 - w_prev[:, :, None] * e_prev[:, None, :], axis=0)
        suf = tl.cumprod(1.0 - w_next[:, :, None] * e_next[:, None, :], axis=0, reverse=True)
        _store_rows(dm_ptr + base, offs_n, nmask, G * tl.reduce(f, 0, _mul), D, BD)
        T = (G * m)[None, :, :] * (pre * suf)
        dw = tl.sum(G[None, :, :] * a[:, None, :] - T * e[:, None, :], axis=2)
        tl.store(dw_ptr + wn_off, dw.to(dw_ptr.dtype.element_ty), mask=wmask[:, None] & nmask[None, :])
        de -= tl.sum(wv[:, :, None] * T, axis=1)
        da += tl.sum(wv[:, :, None] * G[None, :, :], axis=1)
    if SINGLE:
        _store_hd(de_ptr, b64, de, W, D, BW, BD)
        _store_hd(da_ptr, b64, da, W, D, BW, BD)
    else:
        _store_hd(de_ptr, b64 * S + split, de, W, D, BW, BD)
        _store_hd(da_ptr, b64 * S + split, da, W, D, BW, BD)


@triton.jit
def _sum_partials_kernel(part_ptr, out_ptr, X, S, NB, BX: tl.constexpr, ACC: tl.constexpr):
    """out (B,X) = sum over s of part (B,S,X), in split order."""
    pid = tl.program_id(0)
    b64 = (pid // NB).to(tl.int64)
    offs = (pid % NB) * BX + tl.arange(0, BX)
    mask = offs < X
    acc = tl.zeros((BX,), ACC)
    for s in range(S):
        acc += tl.load(part_ptr + (b64 * S + s) * X + offs, mask=mask, other=0.0).to(ACC)
    tl.store(out_ptr + b64 * X + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _usage_kernel(u_ptr, w_ptr, out_ptr, N, W, NB, dec_hi, dec_lo, BN: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0)
    b64 = (pid // NB).to(tl.int64)
    offs_n = (pid % NB) * BN + tl.arange(0, BN)
    nmask = offs_n < N
    decay = tl.cast(dec_hi, ACC) + tl.cast(dec_lo, ACC)
    sw = tl.zeros((BN,), ACC)
    for j in range(W):
        sw += tl.load(w_ptr + (b64 * W + j) * N + offs_n, mask=nmask, other=0.0).to(ACC)
    # decay * u + (sum of the weights), the reference's order, as the fused write.
    u = decay * tl.load(u_ptr + b64 * N + offs_n, mask=nmask, other=0.0).to(ACC) + sw
    tl.store(out_ptr + b64 * N + offs_n, u.to(out_ptr.dtype.element_ty), mask=nmask)


@triton.jit
def _content_write_kernel(mem_ptr, u_ptr, key_ptr, beta_ptr, e_ptr, a_ptr, pm_ptr, pl_ptr, bv_ptr, bi_ptr,
                          N, D, W, S, SPLIT, eps_hi, eps_lo, dec_hi, dec_lo,
                          BN: tl.constexpr, BD: tl.constexpr, BW: tl.constexpr, HAS_USAGE: tl.constexpr,
                          SINGLE: tl.constexpr, ACC: tl.constexpr):
    """In-place content-addressed erase-add write of one split, with usage and its argmin.

    The weights need the softmax normaliser of the memory *before* the write:
    SINGLE computes it in a first pass over its (= all) slots; otherwise it
    is combined from the partials of _address_fwd_kernel (STORE=False), which
    ran to completion before this launch. The second pass recomputes each
    weight, rewrites the rows and the usage, and tracks the least-used slot
    (first index on ties, as torch.argmin) on the stored usage values.
    SINGLE: bi_ptr gets the argmin (B,); else bv/bi get per-split (B,S) minima.
    """
    pid = tl.program_id(0)
    b64 = (pid // S).to(tl.int64)
    split = pid % S
    eps = tl.cast(eps_hi, ACC) + tl.cast(eps_lo, ACC)
    decay = tl.cast(dec_hi, ACC) + tl.cast(dec_lo, ACC)
    offs_w = tl.arange(0, BW)
    wmask = offs_w < W
    k, q, knorm, beta, ok = _load_query(key_ptr, beta_ptr, b64, W, D, eps, BW, BD, ACC)
    e = _load_hd(e_ptr, b64, W, D, BW, BD, ACC)
    a = _load_hd(a_ptr, b64, W, D, BW, BD, ACC)
    start = split * SPLIT
    end = tl.minimum(start + SPLIT, N)
    base = mem_ptr + b64 * N * D
    if SINGLE:
        mx, tot = _stats_range(base, q, beta, eps, pm_ptr, b64, start, end, N, D, W,
                               False, BN, BD, BW, False, ACC)
    else:
        mx, tot = _combine_stats(pm_ptr, pl_ptr, b64, S, W, BW, ACC)
    # A non-finite head's weights are NaN, and so every row it writes.
    inv = tl.where(ok, 1.0 / tot, float("nan"))
    best_v = tl.full((1,), float("inf"), ACC)
    best_i = tl.zeros((1,), tl.int32)
    for n0 in range(start, end, BN):
        offs_n = n0 + tl.arange(0, BN)
        nmask = offs_n < end
        m = _rows(base, offs_n, nmask, D, BD, ACC)
        c, sc, inv_n, big = _cosine(m, q, beta, eps, False)
        w = tl.exp(tl.where(wmask[:, None] & nmask[None, :], sc - mx[:, None], float("-inf"))) * inv[:, None]
        keep = tl.reduce(1.0 - w[:, :, None] * e[:, None, :], 0, _mul)
        add = tl.sum(w[:, :, None] * a[:, None, :], axis=0)
        _store_rows(base, offs_n, nmask, m * keep + add, D, BD)
        if HAS_USAGE:
            u = decay * tl.load(u_ptr + b64 * N + offs_n, mask=nmask, other=0.0).to(ACC) + tl.sum(w, axis=0)
            u_st = u.to(u_ptr.dtype.element_ty)
            tl.store(u_ptr + b64 * N + offs_n, u_st, mask=nmask)
            uv = u_st.to(ACC)
            # NaN counts as the least value, as in torch.argmin.
            uv = tl.where(nmask, tl.where(uv != uv, float("-inf"), uv), float("inf"))
            bv = tl.min(uv, axis=0)
            bi = tl.min(tl.where(uv == bv, offs_n, 2147483647), axis=0)
            better = bv < best_v
            best_i = tl.where(better, bi, best_i)
            best_v = tl.where(better, bv, best_v)
    if HAS_USAGE:
        one = tl.arange(0, 1)
        if SINGLE:
            tl.store(bi_ptr + b64 + one, best_i.to(tl.int64))
        else:
            tl.store(bv_ptr + b64 * S + split + one, best_v)
            tl.store(bi_ptr + b64 * S + split + one, best_i)


@triton.jit
def _argmin_kernel(bv_ptr, bi_ptr, out_ptr, S, ACC: tl.constexpr):
    """Least-used slot from the per-split minima; splits in order keep the first index on ties."""
    b64 = tl.program_id(0).to(tl.int64)
    one = tl.arange(0, 1)
    best_v = tl.full((1,), float("inf"), ACC)
    best_i = tl.zeros((1,), tl.int32)
    for s in range(S):
        v = tl.load(bv_ptr + b64 * S + s + one)
        i = tl.load(bi_ptr + b64 * S + s + one)
        better = v < best_v
        best_i = tl.where(better, i, best_i)
        best_v = tl.where(better, v, best_v)
    tl.store(out_ptr + b64 + one, best_i.to(tl.int64))


# --------------------------------------------------------------------------
# host side: block sizes, splits, launches
# --------------------------------------------------------------------------
def _next_pow2(x):
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def _prev_pow2(x):
    return 1 if x <= 1 else 1 << (int(x).bit_length() - 1)


def _cdiv(a, b):
    return -(-a // b)


def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _acc_torch(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _hi_lo(x):
    """x as two float32 whose sum carries ~48 bits (kernels' scalar floats are float32)."""
    hi = struct.unpack("f", struct.pack("f", float(x)))[0]
    lo = struct.unpack("f", struct.pack("f", float(x) - hi))[0]
    return hi, lo


@functools.lru_cache(maxsize=None)
def _num_sms(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


class _Plan:
    __slots__ = ("BN", "BD", "BH", "use_dot", "S", "split", "num_warps")


def _plan(B, N, D, heads, dtype, device, dot_ok=False, tile=_TILE):
    """Block sizes for a (heads x slots x width) tile, and the slot splits.

    The 3D broadcast tile is bounded by `tile` elements (backward kernels,
    which hold several such products at once, ask for half); tl.dot serves when
    BH >= 16 (then BN and BD are padded to >= 16 too). Splits: about four
    programs per SM in all (one split per memory under the interpreter,
    where programs run one after another), whole blocks per split.
    """
    p = _Plan()
    p.BD = _next_pow2(D)
    p.BH = _next_pow2(heads)
    p.use_dot = dot_ok and p.BH >= 16 and dtype != torch.float64
    tile = tile // 2 if dtype == torch.float64 else tile
    if p.use_dot:
        p.BD = max(p.BD, 16)
        bn = min(128, max(16, _prev_pow2(tile // p.BD)))
        bn = max(16, min(bn, _next_pow2(N)))
        if CONFIG.block_n is not None:
            bn = max(16, CONFIG.block_n)
    else:
        bn = min(128, max(1, _prev_pow2(tile // (p.BH * p.BD))))
        bn = min(bn, _next_pow2(N))
        if CONFIG.block_n is not None:
            bn = CONFIG.block_n
    p.BN = bn
    nblocks = _cdiv(N, bn)
    if CONFIG.split_slots is not None:
        split = _cdiv(CONFIG.split_slots, bn) * bn
    else:
        programs = 4 * _num_sms(device.index if device.index is not None else torch.cuda.current_device()) \
            if device.type == "cuda" else 1
        s = max(1, min(nblocks, _cdiv(programs, max(B, 1))))
        split = _cdiv(nblocks, s) * bn
    p.split = split
    p.S = _cdiv(N, split)
    p.num_warps = 8 if p.BH * p.BN * p.BD > tile else 4
    return p


# A test hook: when set, launches are handed to it instead of running
# (compile_only uses it to build every launched kernel for a real GPU).
_LAUNCH_HOOK = None


def _launch(kernel, programs, *args, num_warps=4, **meta):
    if programs <= 0:
        return
    if _LAUNCH_HOOK is not None:
        _LAUNCH_HOOK(kernel, args, meta, num_warps)
        return
    kernel[(programs,)](*args, num_warps=num_warps, **meta)


# --------------------------------------------------------------------------
# op implementations (contiguous tensors of one dtype on one device)
# --------------------------------------------------------------------------
def _content_addressing(memory, keys, strengths, eps):
    B, N, D = memory.shape
    H = keys.shape[1]
    out = memory.new_empty((B, H, N))
    if out.numel() == 0:
        return out
    memory, keys, strengths = memory.contiguous(), keys.contiguous(), strengths.contiguous()
    p = _plan(B, N, D, H, memory.dtype, memory.device, dot_ok=True)
    acc = _acc_torch(memory.dtype)
    # Logits go to the output itself when it has the accumulation dtype.
    logits = out if out.dtype == acc else torch.empty((B, H, N), dtype=acc, device=memory.device)
    eh, el = _hi_lo(eps)
    meta = dict(BN=p.BN, BD=p.BD, BH=p.BH, USE_DOT=p.use_dot, STORE=True, ACC=_acc(memory.dtype))
    if p.S == 1:
        _launch(_address_fwd_kernel, B, memory, keys, strengths, logits, out, logits, logits,
                N, D, H, 1, p.split, eh, el, SINGLE=True, num_warps=p.num_warps, **meta)
        return out
    pm = torch.empty((B, p.S, H), dtype=acc, device=memory.device)
    pl = torch.empty_like(pm)
    _launch(_address_fwd_kernel, B * p.S, memory, keys, strengths, logits, out, pm, pl,
            N, D, H, p.S, p.split, eh, el, SINGLE=False, num_warps=p.num_warps, **meta)
    _launch(_address_norm_kernel, B * p.S, logits, out, pm, pl, N, H, p.S, p.split,
            BN=p.BN, BH=p.BH, ACC=meta["ACC"])
    return out


def _content_backward(read, g, w, lse, memory, keys, strengths, eps):
    B, N, D = memory.shape
    H = keys.shape[1]
    dm, dk, db = torch.empty_like(memory), torch.empty_like(keys), torch.empty_like(strengths)
    if B == 0 or H == 0:
        return dm.zero_(), dk, db
    g, w, memory, keys, strengths = (t.contiguous() for t in (g, w, memory, keys, strengths))
    p = _plan(B, N, D, H, memory.dtype, memory.device, dot_ok=True, tile=_TILE // 2)
    acc = _acc_torch(memory.dtype)
    ACC = _acc(memory.dtype)
    eh, el = _hi_lo(eps)
    # Half inputs always recompute the weights and delta in float (see
    # _content_bwd_kernel); float/double content_read only when the memory is
    # one block, where it costs nothing (and the N = 1 gradient comes out
    # exactly 0).
    exact = memory.dtype in (torch.float16, torch.bfloat16) or (read and N <= p.BN)
    lse_tol = 2.0 ** -44 if memory.dtype == torch.float64 else 2.0 ** -19
    meta = dict(BN=p.BN, BD=p.BD, BH=p.BH, USE_DOT=p.use_dot, READ=read, EXACT=exact, LSE_TOL=lse_tol, ACC=ACC)
    lse = lse if lse is not None else strengths
    if p.S == 1:
        _launch(_content_bwd_kernel, B, g, w, lse, strengths, memory, keys, strengths, dm, dk, db,
                lse, lse, lse, N, D, H, 1, p.split, eh, el, SINGLE=True, num_warps=p.num_warps, **meta)
        return dm, dk, db
    delta = strengths
    pm = pl = pt = lse
    if exact:
        pm, pl, pt = (torch.empty((B, p.S, H), dtype=acc, device=memory.device) for _ in range(3))
        _launch(_bwd_stats_kernel, B * p.S, g, memory, keys, strengths, pm, pl, pt, N, D, H, p.S, p.split,
                eh, el, BN=p.BN, BD=p.BD, BH=p.BH, USE_DOT=p.use_dot, READ=read, ACC=ACC,
                num_warps=p.num_warps)
    elif not read:
        delta = torch.empty((B, p.S, H), dtype=acc, device=memory.device)
        _launch(_address_delta_kernel, B * p.S, g, w, delta, N, H, p.S, p.split, BN=p.BN, BH=p.BH, ACC=ACC)
    pdq = torch.empty((B, p.S, H, D), dtype=acc, device=memory.device)
    pdb = torch.empty((B, p.S, H), dtype=acc, device=memory.device)
    _launch(_content_bwd_kernel, B * p.S, g, w, lse, delta, memory, keys, strengths, dm, pdq, pdb,
            pm, pl, pt, N, D, H, p.S, p.split, eh, el, SINGLE=False, num_warps=p.num_warps, **meta)
    _launch(_keys_grad_kernel, B, pdq, pdb, keys, dk, db, H, D, p.S, eh, el, BD=p.BD, BH=p.BH, ACC=ACC)
    return dm, dk, db


def _content_addressing_backward(grad_weights, weights, memory, keys, strengths, eps):
    return _content_backward(False, grad_weights, weights, None, memory, keys, strengths, eps)


def _content_read(memory, keys, strengths, eps):
    B, N, D = memory.shape
    H = keys.shape[1]
    acc = _acc_torch(memory.dtype)
    reads = memory.new_empty((B, H, D))
    lse = memory.new_empty((B, H), dtype=acc)
    if B == 0 or H == 0:
        return reads, lse
    memory, keys, strengths = memory.contiguous(), keys.contiguous(), strengths.contiguous()
    p = _plan(B, N, D, H, memory.dtype, memory.device, dot_ok=True)
    eh, el = _hi_lo(eps)
    meta = dict(BN=p.BN, BD=p.BD, BH=p.BH, USE_DOT=p.use_dot, ACC=_acc(memory.dtype))
    if p.S == 1:
        _launch(_read_fused_fwd_kernel, B, memory, keys, strengths, reads, lse, lse,
                N, D, H, 1, p.split, eh, el, SINGLE=True, num_warps=p.num_warps, **meta)
        return reads, lse
    pacc = torch.empty((B, p.S, H, D), dtype=acc, device=memory.device)
    pm = torch.empty((B, p.S, H), dtype=acc, device=memory.device)
    pl = torch.empty_like(pm)
    _launch(_read_fused_fwd_kernel, B * p.S, memory, keys, strengths, pacc, pm, pl,
            N, D, H, p.S, p.split, eh, el, SINGLE=False, num_warps=p.num_warps, **meta)
    _launch(_read_fused_combine_kernel, B, pacc, pm, pl, reads, lse, H, D, p.S,
            BD=p.BD, BH=p.BH, ACC=meta["ACC"])
    return reads, lse


def _content_read_backward(grad_reads, reads, lse, memory, keys, strengths, eps):
    return _content_backward(True, grad_reads, reads, lse, memory, keys, strengths, eps)


def _memory_read(memory, weights):
    B, N, D = memory.shape
    H = weights.shape[1]
    out = memory.new_empty((B, H, D))
    if out.numel() == 0:
        return out
    memory, weights = memory.contiguous(), weights.contiguous()
    p = _plan(B, N, D, H, memory.dtype, memory.device, dot_ok=True)
    acc = _acc_torch(memory.dtype)
    meta = dict(BN=p.BN, BD=p.BD, BH=p.BH, USE_DOT=p.use_dot, ACC=_acc(memory.dtype))
    if p.S == 1:
        _launch(_read_fwd_kernel, B, memory, weights, out, N, D, H, 1, p.split, SINGLE=True,
                num_warps=p.num_warps, **meta)
        return out
    part = torch.empty((B, p.S, H, D), dtype=acc, device=memory.device)
    _launch(_read_fwd_kernel, B * p.S, memory, weights, part, N, D, H, p.S, p.split, SINGLE=False,
            num_warps=p.num_warps, **meta)
    _sum_partials(part, out)
    return out


def _sum_partials(part, out):
    """out (B,...) = part (B,S,...) summed over S, deterministically."""
    B, S = part.shape[:2]
    X = out[0].numel() if B else 0
    BX = min(1024, _next_pow2(X))
    nb = _cdiv(X, BX)
    _launch(_sum_partials_kernel, B * nb, part, out, X, S, nb, BX=BX, ACC=_acc(out.dtype))


def _memory_read_backward(grad_reads, memory, weights):
    B, N, D = memory.shape
    H = weights.shape[1]
    dm, dw = torch.empty_like(memory), torch.empty_like(weights)
    if B == 0 or H == 0:
        return dm.zero_(), dw
    grad_reads, memory, weights = grad_reads.contiguous(), memory.contiguous(), weights.contiguous()
    p = _plan(B, N, D, H, memory.dtype, memory.device, dot_ok=True)
    nb = _cdiv(N, p.BN)
    _launch(_read_bwd_kernel, B * nb, grad_reads, memory, weights, dm, dw, N, D, H, nb,
            BN=p.BN, BD=p.BD, BH=p.BH, USE_DOT=p.use_dot, ACC=_acc(memory.dtype), num_warps=p.num_warps)
    return dm, dw


def _write_into(out, memory, weights, erase, add):
    B, N, D = memory.shape
    W = weights.shape[1]
    p = _plan(B, N, D, 1, memory.dtype, memory.device)
    nb = _cdiv(N, p.BN)
    _launch(_write_fwd_kernel, B * nb, memory, weights, erase, add, out, N, D, W, nb,
            BN=p.BN, BD=p.BD, ACC=_acc(memory.dtype), num_warps=p.num_warps)


def _memory_write(memory, weights, erase, add):
    memory, weights, erase, add = (t.contiguous() for t in (memory, weights, erase, add))
    out = torch.empty_like(memory)
    _write_into(out, memory, weights, erase, add)
    return out


def _memory_write_(memory, weights, erase, add):
    if not memory.is_contiguous():
        raise ValueError("memory must be contiguous for the in-place write (call .contiguous() first)")
    _write_into(memory, memory, weights.contiguous(), erase.contiguous(), add.contiguous())


def _memory_write_backward(grad_out, memory, weights, erase, add):
    B, N, D = memory.shape
    W = weights.shape[1]
    grad_out, memory, weights, erase, add = (t.contiguous() for t in (grad_out, memory, weights, erase, add))
    dm, dw = torch.empty_like(memory), torch.empty_like(weights)
    de, da = torch.empty_like(erase), torch.empty_like(add)
    if B == 0:
        return dm, dw, de, da
    if W == 0:
        return dm.copy_(grad_out), dw, de, da
    p = _plan(B, N, D, W, memory.dtype, memory.device, tile=_TILE // 2)
    ACC = _acc(memory.dtype)
    meta = dict(BN=p.BN, BD=p.BD, BW=p.BH, ACC=ACC)
    if p.S == 1:
        _launch(_write_bwd_kernel, B, grad_out, memory, weights, erase, add, dm, dw, de, da,
                N, D, W, 1, p.split, SINGLE=True, num_warps=p.num_warps, **meta)
        return dm, dw, de, da
    acc = _acc_torch(memory.dtype)
    pde = torch.empty((B, p.S, W, D), dtype=acc, device=memory.device)
    pda = torch.empty_like(pde)
    _launch(_write_bwd_kernel, B * p.S, grad_out, memory, weights, erase, add, dm, dw, pde, pda,
            N, D, W, p.S, p.split, SINGLE=False, num_warps=p.num_warps, **meta)
    _sum_partials(pde, de)
    _sum_partials(pda, da)
    return dm, dw, de, da


def _usage_update(usage, weights, decay):
    B, N = usage.shape
    W = weights.shape[1]
    usage, weights = usage.contiguous(), weights.contiguous()
    out = torch.empty_like(usage)
    BN = CONFIG.block_n or min(1024, _next_pow2(N))
    nb = _cdiv(N, BN)
    dh, dl = _hi_lo(decay)
    _launch(_usage_kernel, B * nb, usage, weights, out, N, W, nb, dh, dl, BN=BN, ACC=_acc(usage.dtype))
    return out


def _content_write_(memory, usage, keys, strengths, erase, add, eps, decay):
    B, N, D = memory.shape
    W = keys.shape[1]
    if not memory.is_contiguous():
        raise ValueError("memory must be contiguous for the in-place write (call .contiguous() first)")
    if usage is not None and not usage.is_contiguous():
        raise ValueError("usage must be contiguous for the in-place write")
    keys, strengths, erase, add = (t.contiguous() for t in (keys, strengths, erase, add))
    has_usage = usage is not None
    least = memory.new_empty((B,) if has_usage else (0,), dtype=torch.int64)
    if B == 0:
        return least
    if W == 0:
        if has_usage:
            usage.mul_(decay)
            least.copy_(torch.argmin(usage, dim=1))
        return least
    p = _plan(B, N, D, W, memory.dtype, memory.device)
    acc = _acc_torch(memory.dtype)
    ACC = _acc(memory.dtype)
    eh, el = _hi_lo(eps)
    dh, dl = _hi_lo(decay)
    u = usage if has_usage else memory
    meta = dict(BN=p.BN, BD=p.BD, BW=p.BH, HAS_USAGE=has_usage, ACC=ACC)
    if p.S == 1:
        _launch(_content_write_kernel, B, memory, u, keys, strengths, erase, add, memory, memory, memory, least,
                N, D, W, 1, p.split, eh, el, dh, dl, SINGLE=True, num_warps=p.num_warps, **meta)
        return least
    pm = torch.empty((B, p.S, W), dtype=acc, device=memory.device)
    pl = torch.empty_like(pm)
    _launch(_address_fwd_kernel, B * p.S, memory, keys, strengths, pm, pm, pm, pl,
            N, D, W, p.S, p.split, eh, el, BN=p.BN, BD=p.BD, BH=p.BH, USE_DOT=False, SINGLE=False,
            STORE=False, ACC=ACC, num_warps=p.num_warps)
    bv = torch.empty((B, p.S), dtype=acc, device=memory.device)
    bi = torch.empty((B, p.S), dtype=torch.int32, device=memory.device)
    _launch(_content_write_kernel, B * p.S, memory, u, keys, strengths, erase, add, pm, pl, bv, bi,
            N, D, W, p.S, p.split, eh, el, dh, dl, SINGLE=False, num_warps=p.num_warps, **meta)
    if has_usage:
        _launch(_argmin_kernel, B, bv, bi, least, p.S, ACC=ACC)
    return least


def _content_read_write_(memory, usage, read_keys, read_strengths, write_keys, write_strengths, erase, add, eps,
                         decay):
    # No fused kernel here: the read, then the in-place write (the fused CPU
    # kernel saves a pass over memory that a GPU streams in microseconds).
    reads, lse = _content_read(memory, read_keys, read_strengths, eps)
    least = _content_write_(memory, usage, write_keys, write_strengths, erase, add, eps, decay)
    return reads, lse, least


# --------------------------------------------------------------------------
# registration: the neuralmem_triton namespace, schemas as in csrc/ops.cpp
# --------------------------------------------------------------------------
SCHEMAS = {
    "content_addressing": "(Tensor memory, Tensor keys, Tensor strengths, float eps) -> Tensor",
    "content_addressing_backward": "(Tensor grad_weights, Tensor weights, Tensor memory, Tensor keys, "
                                   "Tensor strengths, float eps) -> (Tensor, Tensor, Tensor)",
    "memory_read": "(Tensor memory, Tensor weights) -> Tensor",
    "memory_read_backward": "(Tensor grad_reads, Tensor memory, Tensor weights) -> (Tensor, Tensor)",
    "content_read": "(Tensor memory, Tensor keys, Tensor strengths, float eps) -> (Tensor, Tensor)",
    "content_read_backward": "(Tensor grad_reads, Tensor reads, Tensor lse, Tensor memory, Tensor keys, "
                             "Tensor strengths, float eps) -> (Tensor, Tensor, Tensor)",
    "memory_write": "(Tensor memory, Tensor weights, Tensor erase, Tensor add) -> Tensor",
    "memory_write_backward": "(Tensor grad_out, Tensor memory, Tensor weights, Tensor erase, Tensor add) "
                             "-> (Tensor, Tensor, Tensor, Tensor)",
    "memory_write_": "(Tensor(a!) memory, Tensor weights, Tensor erase, Tensor add) -> ()",
    "usage_update": "(Tensor usage, Tensor weights, float decay) -> Tensor",
    "content_write_": "(Tensor(a!) memory, Tensor(b!)? usage, Tensor keys, Tensor strengths, Tensor erase, "
                      "Tensor add, float eps, float decay) -> Tensor",
    "content_read_write_": "(Tensor(a!) memory, Tensor(b!)? usage, Tensor read_keys, Tensor read_strengths, "
                           "Tensor write_keys, Tensor write_strengths, Tensor erase, Tensor add, float eps, "
                           "float decay) -> (Tensor, Tensor, Tensor)",
}

IMPLS = {
    "content_addressing": _content_addressing,
    "content_addressing_backward": _content_addressing_backward,
    "memory_read": _memory_read,
    "memory_read_backward": _memory_read_backward,
    "content_read": _content_read,
    "content_read_backward": _content_read_backward,
    "memory_write": _memory_write,
    "memory_write_backward": _memory_write_backward,
    "memory_write_": _memory_write_,
    "usage_update": _usage_update,
    "content_write_": _content_write_,
    "content_read_write_": _content_read_write_,
}

INTERPRETED = AVAILABLE and type(_mul).__name__ == "InterpretedFunction"


def _cpu_kernel(name, fn):
    def impl(*args):
        if not INTERPRETED:
            raise RuntimeError(
                f"neuralmem_triton::{name} got CPU tensors; the Triton kernels run on CPU only under the "
                "interpreter: set TRITON_INTERPRET=1 before neuralmem_fast is imported, or use CUDA tensors"
            )
        return fn(*args)

    return impl


def _cuda_kernel(fn):
    def impl(*args):
        # Triton launches on the current device; make it the tensors' one.
        with torch.cuda.device(args[0].device):
            return fn(*args)

    return impl


_LIB = None
if AVAILABLE:
    _LIB = torch.library.Library("neuralmem_triton", "DEF")
    for _name, _schema in SCHEMAS.items():
        _LIB.define(_name + _schema)
        _LIB.impl(_name, _cpu_kernel(_name, IMPLS[_name]), "CPU")
        _LIB.impl(_name, _cuda_kernel(IMPLS[_name]), "CUDA")

    from .ops import register_fakes

    register_fakes("neuralmem_triton")


# --------------------------------------------------------------------------
# compile check: build the launched kernels for a real GPU without one
# --------------------------------------------------------------------------
_SIG = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float64: "*fp64",
        torch.int32: "*i32", torch.int64: "*i64"}


@contextlib.contextmanager
def compile_only(arch=90):
    """Within this context the ops compile every kernel they launch for CUDA sm_<arch>
    (to a cubin, with Triton's bundled ptxas) instead of running it; no GPU needed.

    Must run without the interpreter (TRITON_INTERPRET unset). Yields the list of
    (kernel name, constexprs) compiled. Call the IMPLS functions directly with CPU
    tensors (outputs stay uninitialised).
    """
    global _LAUNCH_HOOK
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if INTERPRETED:
        raise RuntimeError("compile_only needs TRITON_INTERPRET unset before triton is imported")
    target = GPUTarget("cuda", arch, 32)
    done, seen = [], set()

    def hook(kernel, args, meta, num_warps):
        names = kernel.arg_names
        sig, consts = {}, {}
        for name, val in zip(names, args):
            if isinstance(val, torch.Tensor):
                sig[name] = _SIG[val.dtype]
            elif isinstance(val, bool):
                sig[name] = "i1"
            elif isinstance(val, int):
                sig[name] = "i32" if -2**31 <= val < 2**31 else "i64"
            elif isinstance(val, float):
                sig[name] = "fp32"
            else:
                raise TypeError(f"compile_only: unsupported argument {name}={val!r}")
        for name, val in meta.items():
            sig[name] = "constexpr"
            consts[name] = val
        key = (kernel.__name__, tuple(sorted(sig.items())), tuple(sorted((k, str(v)) for k, v in consts.items())),
               num_warps)
        if key in seen:
            return
        seen.add(key)
        triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts), target=target,
                       options={"num_warps": num_warps})
        done.append((kernel.__name__, {k: str(v) for k, v in consts.items()}))

    _LAUNCH_HOOK = hook
    try:
        yield done
    finally:
        _LAUNCH_HOOK = None
