"""Triton helpers shared by the read and write kernels (cosine, online softmax, row loads and stores)."""
from ._triton import AVAILABLE, tl, triton


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
def _hd_offsets(row64, H, D, offs_h, offs_d):
    """Offsets of the (H,D) block at row64 * H * D, in int64."""
    return row64 * H * D + offs_h.to(tl.int64)[:, None] * D + offs_d[None, :]


@triton.jit
def _load_keys(key_ptr, b64, H, D, eps, BH: tl.constexpr, BD: tl.constexpr, ACC: tl.constexpr):
    """Keys of memory b64 and their F.normalize'd version q = k / max(|k|, eps)."""
    offs_h = tl.arange(0, BH)
    offs_d = tl.arange(0, BD)
    mask = (offs_h[:, None] < H) & (offs_d[None, :] < D)
    k = tl.load(key_ptr + _hd_offsets(b64, H, D, offs_h, offs_d), mask=mask, other=0.0).to(ACC)
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
    return tl.load(ptr + _hd_offsets(row64, H, D, offs_h, offs_d), mask=mask, other=0.0).to(ACC)


@triton.jit
def _store_hd(ptr, row64, val, H, D, BH: tl.constexpr, BD: tl.constexpr):
    offs_h = tl.arange(0, BH)
    offs_d = tl.arange(0, BD)
    mask = (offs_h[:, None] < H) & (offs_d[None, :] < D)
    tl.store(ptr + _hd_offsets(row64, H, D, offs_h, offs_d), val.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_heads(ptr, row64, val, H, BH: tl.constexpr):
    offs_h = tl.arange(0, BH)
    tl.store(ptr + row64 * H + offs_h, val.to(ptr.dtype.element_ty), mask=offs_h < H)


@triton.jit
def _hn_offsets(b64, H, N, offs_h, offs_n):
    """Offsets of the (heads x slots) block of memory b64 in a (B,H,N) tensor, in int64: (H-1)*N may pass 2^31."""
    return b64 * H * N + offs_h.to(tl.int64)[:, None] * N + offs_n[None, :]


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
            off = _hn_offsets(b64, H, N, offs_h, offs_n)
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
        off = _hn_offsets(b64, H, N, offs_h, offs_n)
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
        off = _hn_offsets(b64, H, N, offs_h, offs_n)
        w = tl.load(w_ptr + off, mask=mask, other=0.0).to(ACC)
        dw = tl.load(dw_ptr + off, mask=mask, other=0.0).to(ACC)
        delta += tl.sum(w * dw, axis=1)
    return delta


# True when the kernels run under the Triton interpreter (TRITON_INTERPRET=1 set before triton was imported).
INTERPRETED = AVAILABLE and type(_mul).__name__ == "InterpretedFunction"
