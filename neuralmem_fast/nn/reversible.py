"""Backpropagation through T read-then-write steps by reversing the erase-add write.

`reversible_read_write(memory, read_keys, read_strengths, write_keys,
write_strengths, erase, add)` runs T steps of

    reads_t = content_read(m_{t-1}, read_keys[t], read_strengths[t])
    w_t     = content_addressing(m_{t-1}, write_keys[t], write_strengths[t])
    m_t     = m_{t-1} * prod_w(1 - w_t e_t) + sum_w w_t a_t

and returns the stacked reads (T, B, H, D) and the last memory m_T, both
differentiable with respect to the memory and every per-step input.

Plain autograd keeps every m_t for the backward (T+1 copies of the memory);
`checkpointed_scan` keeps about 2 sqrt(T). Here the forward keeps none: it
keeps the write weights w_t (T*W*N values: one memory's worth at T = D = 64,
W = 1), and the backward rebuilds each step's memory from the next one,

    m_{t-1} = (m_t - sum_w w_t a_t) / prod_w(1 - w_t e_t),

then runs the step's backward on it (for a content write, one
content_read_write_backward, with the write weights recomputed from the write
heads' logsumexp, which the forward keeps: T*B*W values). A division by a small
1 - w e multiplies the rounding error already in that row, so the forward
bounds it row by row: it multiplies each row's worst-case growth
1 / prod_w(1 - w_n max|e|) step after step, and when a row's product would
pass `max_amplification` it saves that row of m_{t-1} exactly (and starts the
row's product again). A row erased to zero (w e = 1, as a one-hot allocation
with a full erase does) is always saved, since nothing can rebuild it. The
weights sum to at most 1 per head, so at most a few rows per step are large
enough to need saving; diffuse content weights over many slots need none.
Every row's rounding error is therefore grown by at most `max_amplification`
before the backward uses it (docs/training.md).

Memory held: the caller's memory, the last memory, the saved weights, the
memory being rebuilt and the gradient in flight, with one memory-sized
temporary of the backward kernels: about 6 copies at T = D = 64, whatever T
is as long as T*W <= D (the weights grow by one copy per D/W steps). Time:
the rebuild (two passes per step) in place of checkpointing's recomputed
forward. Float32 and float64 only: in half precision one rounding of the
memory is already 1e-3 of it, and the rebuilt memory would not be the one the
forward used (use `checkpointed_scan`).
"""
import torch

from ..config import DEFAULT_DECAY, DEFAULT_EPS
from ..ops import functional as F
from ..ops.dispatch import choose, library
from ..ops.reference import content_read_ref, content_read_write_ref, memory_write_ref

__all__ = ["reversible_read_write", "DEFAULT_MAX_AMPLIFICATION"]

# A row's rounding error may grow by at most this factor in the backward's
# divisions before the forward saves the row exactly (4 bits of 24 in float32).
DEFAULT_MAX_AMPLIFICATION = 16.0

# Rows per chunk of the in-place rebuild: (B, rows, D) temporaries of 1 MB in float32 (measured
# at N = 10^6: 4 MB chunks took 1.4x as long, 256 kB 1.2x).
_CHUNK_ELEMS = 1 << 18


def _stacked(name, t, T, shape_tail, like):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != like.dtype or t.device != like.device:
        raise TypeError(f"{name} must have the memory's dtype and device ({like.dtype}, {like.device}), "
                        f"got {t.dtype} on {t.device}")
    if tuple(t.shape) != (T, *shape_tail):
        want = "(" + ", ".join(str(s) for s in (T, *shape_tail)) + ")"
        raise ValueError(f"{name} must have shape {want} (T steps first), got {tuple(t.shape)}")


def _unwrite(m, w, e, a, n0, n1):
    """Rows n0:n1 of m_t into m_{t-1} = (m_t - sum_w w a) / prod_w(1 - w e), in place, one chunk at a
    time so that the erase factor's buffer stays in cache: an addcmul per head for each term. (A
    baddbmm over the whole memory, then a broadcast product and a .prod(1) over the heads, took about
    18 memory passes per step at N = 10^6; this takes 4 to 6.)"""
    one = torch.ones((), dtype=w.dtype, device=w.device)
    rows = m[:, n0:n1]
    wt = w[:, :, n0:n1].unsqueeze(-1)  # (B, W, rows, 1)
    f = torch.addcmul(one, wt[:, 0], e[:, 0:1], value=-1)
    rows.addcmul_(wt[:, 0], a[:, 0:1], value=-1)
    for k in range(1, w.shape[1]):
        f.mul_(torch.addcmul(one, wt[:, k], e[:, k:k + 1], value=-1))
        rows.addcmul_(wt[:, k], a[:, k:k + 1], value=-1)
    rows.div_(f)


class _Config:
    def __init__(self, eps, backend, max_amplification, weights_fn, usage, decay):
        self.eps, self.backend, self.max_amp = eps, backend, max_amplification
        self.weights_fn, self.usage, self.decay = weights_fn, usage, decay
        self.final_usage = None


class _ReversibleReadWrite(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cfg, memory, rk, rs, wk, ws, erase, add):
        T = rk.shape[0]
        B, N, D = memory.shape
        H, W = rk.shape[2], erase.shape[2]
        content = cfg.weights_fn is None
        m = memory.detach().clone(memory_format=torch.contiguous_format)
        weights = m.new_empty((T, B, W, N))
        reads = m.new_empty((T, B, H, D))
        lses = reads.new_empty((T, B, H), dtype=torch.float32 if m.dtype != torch.float64 else m.dtype)
        # The write heads' logsumexp, for the backward's content_read_write kernel (content writes only).
        wlses = lses.new_empty((T, B, W) if content else (0,))
        saved_rows = [None] * T
        use = cfg.usage
        # Each row's worst-case error growth since it was last saved, and
        # (B, W, N) / (B, N) scratch reused at every step: fresh buffers of
        # this size each step fragment the heap and stay resident.
        amp = m.new_ones((B, N))
        factor = m.new_empty((B, W, N))
        bound = m.new_empty((B, N))
        save = torch.empty((B, N), dtype=torch.bool, device=m.device)
        for t in range(T):
            r, lse = F.content_read(m, rk[t], rs[t], eps=cfg.eps, backend=cfg.backend, return_lse=True)
            reads[t] = r
            lses[t] = lse
            if content:
                w = F.content_addressing(m, wk[t], ws[t], eps=cfg.eps, backend=cfg.backend)
                wlses[t] = _write_lse(m, w, wk[t], ws[t], cfg.eps)
            else:
                w = cfg.weights_fn(use)
            weights[t] = w
            w = weights[t]
            # Worst-case growth of each row's error when the backward divides
            # by prod_w(1 - w e): 1 / prod_w(1 - w max|e|), inf where a row may be erased to zero.
            torch.mul(w, erase[t].abs().amax(-1, keepdim=True), out=factor)
            factor.neg_().add_(1).clamp_min_(0)
            torch.prod(factor, 1, out=bound)
            amp.div_(bound)
            torch.gt(amp, cfg.max_amp, out=save)
            if bool(save.any()):
                idx = save.view(-1).nonzero().squeeze(1)
                saved_rows[t] = (idx, m.view(B * N, D).index_select(0, idx))
                amp.masked_fill_(save, 1.0)
            F.memory_write_(m, w, erase[t], add[t], backend=cfg.backend)
            if use is not None:
                use = F.usage_update(use, w, cfg.decay, backend=cfg.backend)
        cfg.final_usage = use
        ctx.cfg, ctx.content, ctx.saved_rows = cfg, content, saved_rows
        ctx.save_for_backward(m, weights, reads, lses, wlses, rk, rs, wk, ws, erase, add)
        return reads, m

    @staticmethod
    def backward(ctx, g_reads, g_memory):
        if torch.is_grad_enabled():
            raise RuntimeError("reversible_read_write has no second derivative: its backward rebuilds the memories "
                               "outside autograd, so create_graph=True would silently drop the second-order terms; "
                               "use nn.checkpointed_scan (or the bank's backprop='checkpoint') for higher orders")
        with torch.no_grad():
            return _ReversibleReadWrite._backward(ctx, g_reads, g_memory)

    @staticmethod
    def _backward(ctx, g_reads, g_memory):
        m_last, weights, reads, lses, wlses, rk, rs, wk, ws, erase, add = ctx.saved_tensors
        cfg, content = ctx.cfg, ctx.content
        T, B, W, N = weights.shape
        D = m_last.shape[2]
        m = m_last.clone()  # rebuilt in place, step by step, into m_{t-1}
        dev = m.device
        be_w = choose(cfg.backend, "memory_write", dev, N)
        be_r = choose(cfg.backend, "content_read", dev, N)
        be_rw = choose(cfg.backend, "content_read_write", dev, N)
        if g_memory is None:
            g = torch.zeros_like(m)
        elif (be_rw if content else be_w) == "cpu":
            # Often expanded (the gradient of last.sum()): the CPU kernel copies
            # it into its buffer pool, where the next steps' gradients reuse the block.
            g = g_memory
        else:
            g = g_memory.contiguous()
        if g_reads is None:
            g_reads = reads.new_zeros(reads.shape)
        g_reads = g_reads.contiguous()
        grads = {k: torch.zeros_like(v) for k, v in (("rk", rk), ("rs", rs), ("wk", wk), ("ws", ws),
                                                       ("erase", erase), ("add", add))}
        chunk = max(1, _CHUNK_ELEMS // max(1, B * D))
        flat = m.view(B * N, D)
        for t in range(T - 1, -1, -1):
            w, e, a = weights[t], erase[t], add[t]
            # m_{t-1} = (m_t - sum_w w a) / prod_w(1 - w e), in place.
            for n0 in range(0, N, chunk):
                _unwrite(m, w, e, a, n0, min(N, n0 + chunk))
            if ctx.saved_rows[t] is not None:
                idx, rows = ctx.saved_rows[t]
                flat.index_copy_(0, idx, rows)
            # The step's backward at m_{t-1}. A content write: the read and the
            # write in one kernel (content_read_write_backward), which writes one
            # memory gradient. Weights from weights_fn: the write, then the read.
            if content:
                gm, *gs_ = _read_write_backward(be_rw, g_reads[t], g, reads[t], lses[t], wlses[t], m, rk[t], rs[t],
                                                wk[t], ws[t], e, a, cfg.eps)
                del g
                for k, v in zip(("rk", "rs", "wk", "ws", "erase", "add"), gs_):
                    grads[k][t] = v
            else:
                gm, _, ge, ga = _write_backward(be_w, g, m, w, e, a)
                del g
                grads["erase"][t], grads["add"][t] = ge, ga
                gm3, gk, gs = _read_backward(be_r, g_reads[t], reads[t], lses[t], m, rk[t], rs[t], cfg.eps)
                gm.add_(gm3)
                del gm3
                grads["rk"][t], grads["rs"][t] = gk, gs
            g = gm
        need = ctx.needs_input_grad
        return (None, g if need[1] else None,
                *[grads[k] if need[i] else None for i, k in enumerate(("rk", "rs", "wk", "ws", "erase", "add"), 2)])


def _ref_grads(fn, inputs, grad):
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_(True) for x in inputs]
        out = fn(*leaves)
        return torch.autograd.grad(out, leaves, grad, allow_unused=True)


def _write_backward(be, g, m, w, e, a):
    if be == "torch":
        return _ref_grads(memory_write_ref, (m, w, e, a), g)
    return library(be).memory_write_backward(g, m, w.contiguous(), e.contiguous(), a.contiguous())


def _write_lse(m, w, k, s, eps):
    """The logsumexp (B, W) of the logits that gave the content weights w of m: at each head's
    heaviest slot n, logit_n - log w_n (w_n >= 1/N, so the log is well conditioned); one row per head
    instead of a pass over the memory."""
    acc = torch.float64 if m.dtype == torch.float64 else torch.float32
    wmax, idx = w.max(-1)
    rows = m.gather(1, idx.unsqueeze(-1).expand(-1, -1, m.shape[2])).to(acc)
    cos = (torch.nn.functional.normalize(k.to(acc), dim=-1, eps=eps)
           * torch.nn.functional.normalize(rows, dim=-1, eps=eps)).sum(-1)
    return s.to(acc) * cos - wmax.to(acc).log()


def _read_write_backward(be, g_reads, g, reads, lse, wlse, m, rk, rs, wk, ws, e, a, eps):
    if be == "torch":
        return _ref_grads(lambda *x: content_read_write_ref(*x, eps), (m, rk, rs, wk, ws, e, a), (g_reads, g))
    return library(be).content_read_write_backward(g_reads.contiguous(), g, reads.contiguous(), lse.contiguous(),
                                                   wlse.contiguous(), m, rk.contiguous(), rs.contiguous(),
                                                   wk.contiguous(), ws.contiguous(), e.contiguous(),
                                                   a.contiguous(), eps)


def _read_backward(be, g, reads, lse, m, k, s, eps):
    if be == "torch":
        return _ref_grads(lambda m_, k_, s_: content_read_ref(m_, k_, s_, eps), (m, k, s), g)
    return library(be).content_read_backward(g.contiguous(), reads.contiguous(), lse.contiguous(), m,
                                             k.contiguous(), s.contiguous(), eps, True)


def reversible_read_write(memory, read_keys, read_strengths, write_keys=None, write_strengths=None, erase=None,
                          add=None, eps=DEFAULT_EPS, backend="auto", max_amplification=DEFAULT_MAX_AMPLIFICATION,
                          weights_fn=None, usage=None, decay=DEFAULT_DECAY, check_finite=True):
    """T read-then-write steps, trained through by rebuilding each memory in the backward.

    Args:
        memory: (B, N, D), float32 or float64; never modified.
        read_keys (T, B, H, D), read_strengths (T, B, H): the read heads of every step.
        write_keys (T, B, W, D), write_strengths (T, B, W): content write addressing
            (the weights address the memory before the step's write, as content_write does).
        erase, add: (T, B, W, D) erase and add vectors.
        eps, backend: as the ops take them.
        max_amplification: the most by which the backward's divisions may
            grow a row's rounding error before the forward saves that row
            exactly instead (> 1; see the module docstring).
        weights_fn: instead of content addressing, ``weights_fn(usage) -> (B, W, N)``
            gives each step's write weights, no gradient through them (the
            bank's allocation mode); write_keys and write_strengths are then unused.
        usage: (B, N) usage, updated out of place with the step's weights
            (decay * usage + sum_w w), no gradient; its final value is
            returned as a third output when given.
        check_finite: refuse a memory holding inf or NaN (one read of it).

    Returns (reads (T, B, H, D), last memory (B, N, D)) [, last usage].
    """
    if not isinstance(memory, torch.Tensor) or memory.dim() != 3:
        raise ValueError(f"memory must be a (B, N, D) tensor, got "
                         f"{tuple(memory.shape) if isinstance(memory, torch.Tensor) else type(memory).__name__}")
    if memory.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"memory must be float32 or float64 for the reversible backward, got {memory.dtype}: in "
                        "half precision the rebuilt memory would differ from the forward's by its rounding; "
                        "use nn.checkpointed_scan")
    if not (isinstance(max_amplification, (int, float)) and not isinstance(max_amplification, bool)
            and max_amplification > 1.0):
        raise ValueError(f"max_amplification must be a number > 1, got {max_amplification!r}")
    if not isinstance(read_keys, torch.Tensor) or read_keys.dim() != 4:
        raise ValueError("read_keys must be a (T, B, H, D) tensor, got "
                         + (str(tuple(read_keys.shape)) if isinstance(read_keys, torch.Tensor)
                            else type(read_keys).__name__))
    B, N, D = memory.shape
    T, H = read_keys.shape[0], read_keys.shape[2]
    if T == 0:
        raise ValueError("sequence length T must be at least 1, got read_keys with 0 steps")
    _stacked("read_keys", read_keys, T, (B, H, D), memory)
    _stacked("read_strengths", read_strengths, T, (B, H), memory)
    if not isinstance(erase, torch.Tensor) or erase.dim() != 4:
        raise ValueError("erase must be a (T, B, W, D) tensor")
    W = erase.shape[2]
    _stacked("erase", erase, T, (B, W, D), memory)
    _stacked("add", add, T, (B, W, D), memory)
    if weights_fn is None:
        _stacked("write_keys", write_keys, T, (B, W, D), memory)
        _stacked("write_strengths", write_strengths, T, (B, W), memory)
    else:
        if not callable(weights_fn):
            raise TypeError(f"weights_fn must be callable, got {type(weights_fn).__name__}")
        write_keys = memory.new_zeros((T, B, W, D))
        write_strengths = memory.new_zeros((T, B, W))
    if usage is not None and (not isinstance(usage, torch.Tensor) or tuple(usage.shape) != (B, N)):
        raise ValueError(f"usage must be a (B={B}, N={N}) tensor")
    if check_finite and not bool(torch.isfinite(memory.detach()).all()):
        raise ValueError("memory holds inf or NaN: the rebuilt memories and every gradient would be NaN")
    cfg = _Config(eps, backend, float(max_amplification), weights_fn,
                  None if usage is None else usage.detach(), decay)
    reads, last = _ReversibleReadWrite.apply(cfg, memory, read_keys, read_strengths, write_keys, write_strengths,
                                             erase, add)
    if usage is None:
        return reads, last
    return reads, last, cfg.final_usage
