"""Triton kernels of content addressing, the fused content read and the memory read, forward and backward."""
from ._triton import tl, triton
from .jit_common import (_combine_stats, _cosine, _delta_range, _finish_keys, _hn_offsets, _load_hd, _load_heads,
                         _load_keys, _load_query, _mix, _normalize_range, _online, _rows, _rows_dot, _spread,
                         _stats_range, _store_hd, _store_heads, _store_rows)


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
    # The next tile's loads are issued before this tile is used (two tiles in
    # flight, as two tiles of registers would be, without doubling the
    # product tiles); the arithmetic is that of one tile at a time.
    m_next = _rows(base, start + tl.arange(0, BN), start + tl.arange(0, BN) < end, D, BD, ACC)
    for n0 in range(start, end, BN):
        offs_n = n0 + tl.arange(0, BN)
        nmask = offs_n < end
        m = m_next
        m_next = _rows(base, offs_n + BN, offs_n + BN < end, D, BD, ACC)
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
            off = _hn_offsets(b64, H, N, offs_h, offs_n)
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
            off = _hn_offsets(b64, H, N, offs_h, offs_n)
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
        off = _hn_offsets(b64, H, N, offs_h, offs_n)
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
    off = _hn_offsets(b64, H, N, offs_h, offs_n)
    w = tl.load(w_ptr + off, mask=hn, other=0.0).to(ACC)
    _store_rows(dm_ptr + b64 * N * D, offs_n, nmask, _spread(w, g, USE_DOT), D, BD)
    tl.store(dw_ptr + off, _rows_dot(g, m, USE_DOT).to(dw_ptr.dtype.element_ty), mask=hn)
