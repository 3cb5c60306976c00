"""The op implementations: contiguous tensors in, kernels planned and launched, outputs allocated."""
import torch

from .planning import CONFIG, _TILE, _acc, _acc_torch, _cdiv, _hi_lo, _launch, _next_pow2, _plan
from .read_kernels import (_address_delta_kernel, _address_fwd_kernel, _address_norm_kernel, _bwd_stats_kernel,
                           _content_bwd_kernel, _keys_grad_kernel, _read_bwd_kernel, _read_fused_combine_kernel,
                           _read_fused_fwd_kernel, _read_fwd_kernel)
from .write_kernels import (_argmin_kernel, _content_write_kernel, _sum_partials_kernel, _usage_kernel,
                            _write_bwd_kernel, _write_fwd_kernel)


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
    # The whole tile outside the tl.dot path (a half tile's smaller slot blocks
    # lose accuracy in the half strengths' gradient at large strengths), with
    # four times the warps of a forward to hold it; half a tile on that path.
    dot = _next_pow2(H) >= 16 and memory.dtype != torch.float64
    p = _plan(B, N, D, H, memory.dtype, memory.device, dot_ok=True, tile=_TILE // 2 if dot else _TILE,
              warps_tile=_TILE // 4)
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
    if p.use_dot and read:
        # Triton's pipelining of the memory tile that feeds tl.dot keeps more
        # live state: at sixteen heads under 128 registers the float32
        # content_read backward spilled 3 stores with it and none without
        # (content_addressing's backward is the other way round, 0 and 1;
        # tests/test_kernel_resources.py).
        meta["num_stages"] = 1
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


def _content_read_backward(grad_reads, reads, lse, memory, keys, strengths, eps, grad_memory=True):
    # grad_memory=False: the kernel still writes the memory's gradient; it is dropped, as the op's schema says.
    dm, dk, ds = _content_backward(True, grad_reads, reads, lse, memory, keys, strengths, eps)
    return (dm if grad_memory else memory.new_empty((0,))), dk, ds


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
