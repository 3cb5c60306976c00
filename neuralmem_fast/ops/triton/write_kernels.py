"""Triton kernels of the erase-add write (forward, backward), usage, the fused content write and its argmin."""
from ._triton import tl, triton
from .jit_common import (_combine_stats, _cosine, _hn_offsets, _load_hd, _load_query, _mul, _rows, _stats_range,
                         _store_hd, _store_rows)


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
    wd_off = b64 * W * D + offs_w.to(tl.int64)[:, None] * D + offs_d[None, :]
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
        wn_off = _hn_offsets(b64, W, N, offs_w, offs_n)
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
    # The next tile's loads are issued before this tile is used and written
    # (two tiles in flight; they are other rows, so no write is read early).
    m_next = _rows(base, start + tl.arange(0, BN), start + tl.arange(0, BN) < end, D, BD, ACC)
    for n0 in range(start, end, BN):
        offs_n = n0 + tl.arange(0, BN)
        nmask = offs_n < end
        m = m_next
        m_next = _rows(base, offs_n + BN, offs_n + BN < end, D, BD, ACC)
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
