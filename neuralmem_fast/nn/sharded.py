"""One logical memory whose slots are sharded across torch.distributed ranks.

Each rank holds a contiguous block of the N slots of every one of the B
memories (blocks differ by at most one slot when N is not divisible by the
world size). The ops give what the unsharded ops give on the full memory,
to rounding, with ties between slots resolved as they are there:

read (content_read)
    Every rank runs the fused local kernel over its slots and gets its local
    reads r_i and logsumexp lse_i, (B,H,D) and (B,H). One all_gather of the
    packed (B,H,D+1) partials lets every rank combine them the way the
    split-N kernels combine their splits:
        lse = logsumexp_i lse_i,   a_i = exp(lse_i - lse),   r = sum_i a_i r_i.
    Backward: the global weights of rank i's slots are exp(s_n - lse) =
    a_i * w_local, so the local backward kernel called with the *global* lse
    and read r gives exactly this rank's share of the global gradient
    (ds_n = W_n (g.m_n - g.r)); the kernel recomputes weights and g.r from
    its own slots only where the lse it is given is their own. Memory gradients stay local; the key and strength gradients are
    partial sums that one all-reduce completes. Communication per step is
    O(world * B * H * D) forward and O(B * H * D) backward, independent of N.

write (content-addressed erase-add, and usage)
    The softmax over all N slots needs the global normaliser before any row
    changes: one all_gather of the (B,W) local (max m_i, sum l_i of
    exp(s - m_i)) pairs; every rank combines them in rank order into the same
    global max M and normaliser L = sum_i l_i exp(m_i - M), then updates only
    its own rows with w_n = exp(s_n - M) * (1 / L), the unsharded kernels'
    formula. Every rank forms every weight from the same (M, L), so slots with
    equal logits get bitwise equal weights and usage wherever they live, and
    the least-used slot is the lowest index among tied ones, as torch.argmin
    on the unsharded usage (rescaling each rank's local softmax instead left
    tied slots an ulp apart, rank by rank).

Replicated inputs (keys, strengths, erase and add vectors, computed by a
controller that every rank runs identically) pass through `_replicated`,
which is the identity forward and sums the gradient across ranks backward, so
that every rank ends with the complete gradient; DistributedDataParallel's
averaging of identical gradients then leaves them unchanged.

Collectives go through a process group of the memory's own (by default a new
group over the same ranks), so they never interleave with DDP's buckets.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import ops as _ops
from ..config import DEFAULT_DECAY, DEFAULT_EPS
from ..ops.dispatch import library, resolve

__all__ = ["ShardedMemory", "shard_bounds", "CommCounter"]


def shard_bounds(num_slots: int, world_size: int):
    """[(start, stop)] per rank: contiguous blocks differing by at most one slot."""
    if num_slots < world_size:
        raise ValueError(f"num_slots ({num_slots}) must be at least the world size ({world_size})")
    base, extra = divmod(num_slots, world_size)
    bounds, start = [], 0
    for r in range(world_size):
        stop = start + base + (1 if r < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


class CommCounter:
    """Counts the bytes this rank sends through the memory's collectives."""

    def __init__(self):
        self.bytes = 0
        self.calls = 0

    def add(self, t: torch.Tensor):
        self.bytes += t.numel() * t.element_size()
        self.calls += 1

    def reset(self):
        self.bytes, self.calls = 0, 0


# --------------------------------------------------------------------------
# collectives with autograd
# --------------------------------------------------------------------------
def _all_gather(t, group, counter):
    counter.add(t)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t.contiguous(), group=group)
    return torch.stack(out, 0)


def _all_reduce_sum(t, group, counter):
    counter.add(t)
    t = t.contiguous().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


class _Replicated(torch.autograd.Function):
    """Identity forward; backward sums the partial gradients of all ranks."""

    @staticmethod
    def forward(ctx, x, group, counter):
        ctx.group, ctx.counter = group, counter
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return _all_reduce_sum(g, ctx.group, ctx.counter), None, None


def _replicated(x, group, counter):
    if torch.is_grad_enabled() and x.requires_grad:
        return _Replicated.apply(x, group, counter)
    return x


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather of per-rank values whose gradient flows back to each owner."""

    @staticmethod
    def forward(ctx, x, group, counter):
        ctx.group, ctx.counter = group, counter
        ctx.rank = dist.get_rank(group)
        return _all_gather(x, group, counter)

    @staticmethod
    def backward(ctx, g):
        # Every rank used every rank's value: sum the gradients, keep ours.
        g = _all_reduce_sum(g, ctx.group, ctx.counter)
        return g[ctx.rank], None, None


# --------------------------------------------------------------------------
# the sharded read
# --------------------------------------------------------------------------
def _local_read_backward(backend, g, reads, lse, memory, keys, strengths, eps):
    """This rank's share of the global read's gradient, from the global lse and reads."""
    if backend != "torch":
        return library(backend).content_read_backward(g.contiguous(), reads.contiguous(), lse.contiguous(),
                                                      memory, keys, strengths, eps)
    # Pure-PyTorch twin of the kernel: weights recomputed from lse, and the
    # -w_n (g.r) term of ds_n expressed as a second term of the loss.
    with torch.enable_grad():
        m = memory.detach().requires_grad_(True)
        k = keys.detach().requires_grad_(True)
        s = strengths.detach().requires_grad_(True)
        logits = _ops.logits_ref(m, k, s, eps).to(m.dtype)
        w = torch.exp(logits - lse.to(logits.dtype).unsqueeze(-1))
        loss = (g * torch.matmul(w, m)).sum() - ((g * reads).sum(-1) * w.sum(-1)).sum()
        return torch.autograd.grad(loss, (m, k, s))


class _ShardedRead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, memory, keys, strengths, eps, backend, group, counter):
        with torch.no_grad():
            r_loc, lse_loc = _ops.content_read(memory, keys, strengths, eps, backend=backend, return_lse=True)
            lse_loc = lse_loc.to(torch.float64 if memory.dtype == torch.float64 else torch.float32)
            packed = torch.cat([r_loc.to(lse_loc.dtype), lse_loc.unsqueeze(-1)], dim=-1)  # (B,H,D+1)
            parts = _all_gather(packed, group, counter)  # (world,B,H,D+1)
            lses = parts[..., -1]
            lse = torch.logsumexp(lses, dim=0)
            a = torch.exp(lses - lse)  # (world,B,H)
            reads = (a.unsqueeze(-1) * parts[..., :-1]).sum(0).to(memory.dtype)
        ctx.save_for_backward(memory, keys, strengths, reads, lse)
        ctx.eps, ctx.backend = eps, backend
        return reads

    @staticmethod
    def backward(ctx, g):
        memory, keys, strengths, reads, lse = ctx.saved_tensors
        gm, gk, gs = _local_read_backward(ctx.backend, g.contiguous(), reads, lse, memory, keys, strengths, ctx.eps)
        return gm, gk, gs, None, None, None, None


def _logits(memory, keys, strengths, eps):
    """strengths * cos(keys, slots), (B,W,n): logits_ref's value without its
    normalised copy of the memory (a local block may hold millions of slots):
    the dots with the raw rows, divided by the clamped row norms."""
    up = (lambda t: t.float()) if memory.dtype in (torch.float16, torch.bfloat16) else (lambda t: t)
    m = up(memory)
    q = F.normalize(up(keys), dim=-1, eps=eps) * up(strengths).unsqueeze(-1)  # (B,W,D): tiny
    inv = 1.0 / torch.linalg.vector_norm(m, dim=-1).clamp_min(eps)  # (B,n)
    return torch.matmul(q, m.transpose(-1, -2)) * inv.unsqueeze(1)


# --------------------------------------------------------------------------
# the memory
# --------------------------------------------------------------------------
class ShardedMemory:
    """B memories of N slots of width D, the slots split across the ranks of `group`.

    Attributes `memory` (B, n_local, D) and `usage` (B, n_local) hold this
    rank's block, slots [start, stop) of the logical memory. `backend` picks
    the local kernels ("auto", "cpu", "cuda", "triton", "torch").
    """

    def __init__(self, batch_size, num_slots, dim, group=None, dtype=torch.float32, device="cpu",
                 backend="auto", eps=DEFAULT_EPS, decay=DEFAULT_DECAY, new_group=True):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ShardedMemory needs an initialised torch.distributed process group")
        base = group if group is not None else dist.group.WORLD
        ranks = dist.get_process_group_ranks(base)
        # A group of our own keeps the memory's collectives apart from DDP's.
        self.group = dist.new_group(ranks) if new_group else base
        self.world_size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self.num_slots, self.dim, self.batch_size = int(num_slots), int(dim), int(batch_size)
        self.bounds = shard_bounds(self.num_slots, self.world_size)
        self.start, self.stop = self.bounds[self.rank]
        self.eps, self.decay = eps, decay
        self.device = torch.device(device)
        self.backend = resolve(backend, "content_read", self.device, self.stop - self.start)
        self.memory = torch.zeros(self.batch_size, self.stop - self.start, dim, dtype=dtype, device=self.device)
        self.usage = torch.zeros(self.batch_size, self.stop - self.start, dtype=dtype, device=self.device)
        self.comm = CommCounter()

    # -- construction helpers -------------------------------------------
    def load_full_(self, memory, usage=None):
        """Copies this rank's block out of a full (B,N,D) memory (and (B,N) usage)."""
        if tuple(memory.shape) != (self.batch_size, self.num_slots, self.dim):
            raise ValueError(f"memory must have shape (B, N, D) = {(self.batch_size, self.num_slots, self.dim)}, "
                             f"got {tuple(memory.shape)}")
        self.memory.copy_(memory[:, self.start:self.stop])
        if usage is not None:
            self.usage.copy_(usage[:, self.start:self.stop])
        return self

    def gather_full(self):
        """The whole logical memory and usage, (B,N,D) and (B,N), on every rank."""
        parts_m, parts_u = [], []
        n_max = max(b - a for a, b in self.bounds)
        pad = n_max - (self.stop - self.start)
        m = F.pad(self.memory, (0, 0, 0, pad))
        u = F.pad(self.usage, (0, pad))
        gm = _all_gather(m, self.group, self.comm)
        gu = _all_gather(u, self.group, self.comm)
        for r, (a, b) in enumerate(self.bounds):
            parts_m.append(gm[r, :, : b - a])
            parts_u.append(gu[r, :, : b - a])
        return torch.cat(parts_m, 1), torch.cat(parts_u, 1)

    # -- ops ----------------------------------------------------------------
    def _check_heads(self, keys, strengths, what):
        B, D = self.batch_size, self.dim
        if keys.dim() != 3 or keys.shape[0] != B or keys.shape[2] != D:
            raise ValueError(f"keys must have shape (B, {what}, D) = ({B}, ?, {D}), got {tuple(keys.shape)}")
        if tuple(strengths.shape) != tuple(keys.shape[:2]):
            raise ValueError(f"strengths must have shape (B, {what}) = {tuple(keys.shape[:2])}, "
                             f"got {tuple(strengths.shape)}")

    def read(self, keys, strengths, memory=None):
        """Content read over all N slots: (B,H,D), identical on every rank.

        Differentiable in keys, strengths and (when it requires grad) the local
        memory block; pass `memory` to read a block other than self.memory
        (e.g. the differentiable output of `write`).
        """
        self._check_heads(keys, strengths, "H")
        mem = self.memory if memory is None else memory
        keys = _replicated(keys, self.group, self.comm)
        strengths = _replicated(strengths, self.group, self.comm)
        return _ShardedRead.apply(mem.contiguous(), keys.contiguous(), strengths.contiguous(), self.eps,
                                  self.backend, self.group, self.comm)

    def _write_weights(self, mem, keys, strengths, gather):
        """Write weights (B,W,n_local) of the softmax over all N slots: exp(s - M) * (1/L).

        The logits s are computed in float32 for half memory (float64 for
        float64); M and L are the global max and normaliser, combined from
        the gathered per-rank (max, sum) in rank order, so that every rank
        holds the same (M, L). `gather` is the all_gather to use (with or
        without autograd).
        """
        logits = _logits(mem, keys, strengths, self.eps)  # (B,W,n)
        m_loc = logits.detach().amax(dim=-1)
        l_loc = torch.exp(logits - m_loc.unsqueeze(-1)).sum(dim=-1)
        parts = gather(torch.stack([m_loc, l_loc], dim=-1))  # (world,B,W,2)
        m_all = parts[..., 0].detach()
        M = m_all.amax(dim=0)
        L = (parts[..., 1] * torch.exp(m_all - M)).sum(dim=0)
        # The shift M is a constant of the softmax: no gradient flows through it.
        return (torch.exp(logits - M.unsqueeze(-1)) * (1.0 / L).unsqueeze(-1)).to(mem.dtype)

    @torch.no_grad()
    def write_(self, keys, strengths, erase, add, update_usage=True):
        """In-place content-addressed erase-add write over all N slots.

        In place: a read of this memory whose backward has not run yet would
        see its saved tensor modified (autograd raises); use `update` then.

        Returns the global index of the least-used slot per memory after the
        usage update, (B,) int64 on every rank (None with update_usage=False).
        """
        self._check_heads(keys, strengths, "W")
        w = self._write_weights(self.memory, keys, strengths,
                                lambda t: _all_gather(t, self.group, self.comm)).contiguous()
        _ops.memory_write_(self.memory, w, erase, add, usage=self.usage if update_usage else None,
                           decay=self.decay, backend=self.backend)
        if not update_usage:
            return None
        return self.least_used()

    @torch.no_grad()
    def least_used(self):
        """Global index of the least-used slot of each memory, (B,) int64."""
        val, idx = torch.min(self.usage, dim=1)
        packed = torch.stack([val.to(torch.float64), (idx + self.start).to(torch.float64)], -1)
        parts = _all_gather(packed, self.group, self.comm)  # (world,B,2)
        best = torch.argmin(parts[..., 0], dim=0)  # ties: the lowest rank, i.e. the lowest index
        return parts[best, torch.arange(self.batch_size, device=parts.device), 1].to(torch.int64)

    @torch.no_grad()
    def update(self, keys, strengths, erase, add):
        """The seed's write semantics: new (detached) memory and usage blocks.

        Unlike `write_`, the tensors that earlier reads saved for their
        backward are left untouched, so several read-then-write steps may run
        before one backward (as the seed's replay loop does). Returns the
        global least-used slot, as `write_` does.
        """
        self.memory, self.usage = self.write(keys, strengths, erase, add)
        return self.least_used()

    def write(self, keys, strengths, erase, add, memory=None, usage=None):
        """Differentiable content-addressed write: returns (new local memory block, new local usage).

        Gradients reach keys, strengths, erase, add (summed across ranks) and
        the local memory block, exactly as the unsharded write's would.
        """
        self._check_heads(keys, strengths, "W")
        mem = self.memory if memory is None else memory
        use = self.usage if usage is None else usage
        keys = _replicated(keys, self.group, self.comm)
        strengths = _replicated(strengths, self.group, self.comm)
        erase = _replicated(erase, self.group, self.comm)
        add = _replicated(add, self.group, self.comm)
        w = self._write_weights(mem, keys, strengths, lambda t: _AllGatherWithGrad.apply(t, self.group, self.comm))
        new_mem = _ops.memory_write(mem, w, erase, add, backend=self.backend)
        new_usage = _ops.usage_update(use, w, self.decay, backend=self.backend)
        return new_mem, new_usage
