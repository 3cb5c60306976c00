"""Sparse access (Sparse Access Memory, Rae et al. 2016): reads and writes that touch K slots, whatever N.

Design
------
`MemoryAccess(..., sparse_k=K)` runs this module's `SparseAccess` instead of the dense step. Per step:

  1. write. The write set is the slots the read heads read at the previous step (their weights averaged
     over the R heads, a slot read by several heads counted once with the summed weight) and the least
     recently used slot. Each write head h writes with
        w[h] = g_w[h] * ((1 - g_a[h]) * w_read_prev + g_a[h] * 1_lru)
     (the paper's w^W = alpha (gamma w^R_{t-1} + (1 - gamma) I^U), alpha the write gate and 1 - gamma the
     allocation gate of the DNC interface), then erase-add: M[s] <- M[s] * prod_h (1 - w[h,s] e_h)
     + sum_h w[h,s] a_h on those slots only (`memory_write` over the gathered rows, scattered back).
     With write_rule="content" (MemoryAccess's option) the write set is instead each write head's own
     K candidates, found for its write key by the index as a read head's are, over the memory before
     the write, and the LRU slot: C = W K + 1 distinct slots (spares from the oldest end of the LRU
     list when heads share candidates or the LRU slot is one), and
        w[h] = g_w[h] * ((1 - g_a[h]) * softmax_K(beta_h cos(k_h, M[cand_h])) + g_a[h] * 1_lru),
     the DNC's write with its content weights restricted to K slots. The gradient reaches the write
     keys and strengths, and the candidate rows as they were before the write.
  2. read. Each read head's K candidates come from the index: the exact top-K by cosine (`cosine_topk`,
     one pass over the memory) or an approximate nearest-neighbour index that follows the writes
     (`FaissIndex`); the read is the softmax over the K candidates (`sparse_read`).
  3. bookkeeping. Every slot read or written moves to the recent end of the LRU list (`lru_touch_`), in
     O(K); the least recently used slot is the list's head (`lru_oldest`). The paper counts a slot as
     accessed only when its weight exceeds a threshold delta; here every candidate counts (delta = 0),
     which keeps the write set's slots distinct by construction: the previous step's candidates are
     the most recent, the write's spare slots come from the oldest end, and N >= 4 (R K + 1) keeps
     those apart. The interface's free gates are not used, nor, with the previous-reads rule, its write
     keys and strengths.

Memory in place, gradients by a tape. The memory (B,N,D) is one buffer updated in place: a step costs
O(K D) however large N is, and nothing memory-sized is copied. Each step records what its backward needs:
the K rows it read (as they were), the rows it overwrote (as they were), the slots and the write
parameters: O(T (R K + C) D) for T steps, C = R K + 1 write slots (W K + 1 with the content rule, whose
candidate rows are among them), not O(T N D). The gradient with respect to the memory's rows is kept in a
table of the slots the sequence touched. Each step is one
autograd Function whose outputs include a token that the next step takes as input, so the backward
visits the steps in reverse order of time, which the table needs: step t adds the gradient of its reads
to the rows it read, then takes the gradient of the rows it wrote and passes it through the erase-add to
the write parameters and to the rows as they were before the write.

Faint rows. The write set includes every slot the previous step read, so a slot that a read head only
brushed (weight 1e-5, say: the zero rows that fill a short candidate list, the runners-up of a sharp
softmax) receives a faint copy of the write vector. A plain cosine cannot tell that row from the row
written in full: the two point the same way, score the same and split the read's weight between them,
and the cosine's gradient with respect to a row grows as 1 / |row|. The read and the index therefore
floor the norms at `eps` (SparseAccess's, MemoryAccess's `sparse_eps`, default 1e-3, the floor of
DeepMind's DNC, whose norms are sqrt(|m|^2 + 1e-6)): a row of norm n < eps scores at most n / eps.
The exact indexes rank by the same floored score, and FaissIndex stores each row as row / max(|row|, eps),
so that its inner product is that score too. With the dense ops' default (1e-12) the sparse core's copy
training collapsed after reaching 3 bits wrong; with 1e-3 it learns (docs/sparse.md).

Consequences, documented where they bite:
  - the memory passed in (a state's memory) receives no gradient: the sequence starts from it as from
    a constant (truncated backpropagation at the state); `state.detach()` starts a new sequence;
  - the steps are differentiated in reverse order of time, once per backward pass (retain_graph and
    repeated passes work); create_graph=True raises (no higher derivatives through the memory);
  - a state is a view of buffers that later steps change: after a step, an older state's memory is the
    newer one. `SparseAccess.reset(state)` zeroes what the sequence wrote, O(rows written).
"""
import torch

from .. import ops
from ..config import DEFAULT_SPARSE_EPS
from ..ops import sparse as sops
from .row_index import ExactIndex, RowIndex, _sorted_firsts, make_index

__all__ = ["SparseAccessState", "SparseAccess", "ExactIndex", "RowIndex", "make_index", "DEFAULT_SPARSE_EPS"]


class _Tape:
    """What the steps of one sequence recorded, and the memory-row gradient table of its backward."""

    def __init__(self, n_slots):
        self.N = n_slots
        self.steps = 0
        self.slots = []          # per step: (write slots (B,C), read slots (B,R,K))
        self.next_backward = None
        self.table = None        # (U, D) gradient of the rows' current values
        self.n_rows = 0
        self.ids = None          # per step: (write ids (B*C,), read ids (B*R*K,)) into the table

    def record(self, *slots):
        self.slots.append(slots)
        self.steps += 1
        return self.steps - 1

    def begin_backward(self, t, like):
        """Called by step t's backward. A pass runs from its latest step down to the first, one step at a
        time (the token chain orders them); a step later than the one expected starts a new pass (a
        backward with retain_graph, or gradcheck's), which starts from a zero table."""
        if self.ids is None or len(self.ids) != self.steps:
            B = self.slots[0][0].shape[0]
            base = torch.arange(B, device=like.device).unsqueeze(1) * self.N
            parts = [[(x.reshape(B, -1) + base).reshape(-1) for x in step] for step in self.slots]
            uniq, inv = torch.unique(torch.cat([p for step in parts for p in step]), return_inverse=True)
            self.n_rows = uniq.numel()
            self.ids, at = [], 0
            for step in parts:    # per step, the table rows of each of its slot tensors
                ids = []
                for p in step:
                    ids.append(inv[at:at + p.numel()])
                    at += p.numel()
                self.ids.append(tuple(ids))
        if self.next_backward is None or t > self.next_backward:
            self.table = torch.zeros(self.n_rows, like.shape[-1], dtype=like.dtype, device=like.device)
        elif t != self.next_backward:
            raise RuntimeError(
                "sparse access: the backward reached step %d where step %d was expected; the steps of a "
                "sparse memory are differentiated in reverse order, each once per pass" % (t, self.next_backward))
        self.next_backward = t - 1
        if t == 0:
            self.next_backward = -1


def _read_backward(grad_reads, grad_weights, weights, rows, keys, strengths, eps):
    if sops.has_sparse_kernels(rows.device.type):
        return sops._lib().sparse_read_backward(grad_reads.contiguous(), grad_weights.contiguous(), weights, rows,
                                                keys, strengths, eps)
    ins = [t.detach().requires_grad_(True) for t in (rows, keys, strengths)]
    with torch.enable_grad():
        reads, w = sops.sparse_read_ref(*ins, eps)
        return torch.autograd.grad((reads, w), ins, (grad_reads, grad_weights))


def _write_backward(grad_new, old, w, e, a):
    if old.device.type in ops.available_backends(old.device.type):
        return torch.ops.neuralmem.memory_write_backward(grad_new.contiguous(), old.contiguous(), w.contiguous(),
                                                         e.contiguous(), a.contiguous())
    ins = [t.detach().requires_grad_(True) for t in (old, w, e, a)]
    with torch.enable_grad():
        return torch.autograd.grad(ops.memory_write_ref(*ins), ins, grad_new)


class _Dirty:
    """The slots written since the last reset (O(rows written) to undo), or `everything` past N rows."""

    def __init__(self):
        self.slots, self.count, self.everything = [], 0, False

    def add(self, slots):
        if self.everything:
            return
        self.slots.append(slots)
        self.count += slots.shape[1]

    def clear(self):
        self.slots, self.count, self.everything = [], 0, False


def _gated(base, lru, write_gates, alloc_gates):
    """Write weights (B,W,C) of either rule: g_w * ((1 - g_a) * base + g_a * lru), base (B,W,C) or (B,1,C)
    over the write set's positions, lru (B,C) one 1 at the least recently used slot's. The dense access's
    allocation="lru" ablation calls it with C = N."""
    g_w, g_a = write_gates.unsqueeze(-1), alloc_gates.unsqueeze(-1)
    return g_w * ((1 - g_a) * base + g_a * lru.unsqueeze(1))


def _mix_write(content_w, pos, lru, write_gates, alloc_gates):
    """The content rule's write weights (B,W,C): each head's softmax over its K candidates (B,W,K) placed
    at their positions in the write set (pos (B,W,K); a head's candidates are distinct), interpolated
    with the LRU slot."""
    B, W = pos.shape[0], pos.shape[1]
    base = content_w.new_zeros(B, W, lru.shape[1]).scatter(2, pos, content_w)
    return _gated(base, lru, write_gates, alloc_gates)


def _rows_at(rows, pos):
    """rows (B,C,D) at positions pos (B,W,K): (B,W,K,D)."""
    B, W, K = pos.shape
    D = rows.shape[-1]
    return rows.gather(1, pos.reshape(B, W * K, 1).expand(B, W * K, D)).reshape(B, W, K, D)


class _SparseStep(torch.autograd.Function):
    """One sparse step: write, then read. Inputs from write_w on are differentiable.

    `content` is None for the previous-reads rule (write_w (B,W,C) given, the last four inputs None), or
    (candidates' positions in the write set (B,W,K), lru (B,C)) for the content rule: write_w is None
    and the step computes it from the write keys' softmax over their candidate rows as they are before
    the write (rows of `old`, the write set's rows before the write, which the backward keeps anyway)."""

    @staticmethod
    def forward(ctx, access, state, record, write_slots, content, token, write_w, erase, add, read_keys,
                read_strengths, write_keys, write_strengths, write_gates, alloc_gates):
        memory, B = state.memory, state.memory.shape[0]
        tape = state.tape
        D = memory.shape[2]
        saved = ()
        with torch.no_grad():
            gw = write_slots.unsqueeze(-1).expand(B, write_slots.shape[1], D)
            old = memory.gather(1, gw)
            if content is not None:
                pos, lru = content
                _, cw = sops.sparse_read(_rows_at(old, pos), write_keys, write_strengths, access.eps)
                write_w = _mix_write(cw, pos, lru, write_gates, alloc_gates)
                saved = (write_keys, write_strengths, cw, pos, lru, write_gates, alloc_gates)
            new = ops.memory_write(old, write_w, erase, add, backend=access.backend)
            memory.scatter_(1, gw, new)
            state.index.update(write_slots)
            read_slots = access._candidates(state, read_keys)
            R, K = read_slots.shape[1], read_slots.shape[2]
            rows = memory.gather(1, read_slots.reshape(B, R * K, 1).expand(B, R * K, D)).reshape(B, R, K, D)
            reads, weights = sops.sparse_read(rows, read_keys, read_strengths, access.eps)
            sops.lru_touch_(state.links, write_slots)
            sops.lru_touch_(state.links, read_slots.reshape(B, R * K))
        state.written.add(write_slots)
        if state.written.count > memory.shape[1]:
            state.written.everything = True
        ctx.mark_non_differentiable(read_slots)
        if record:  # inference records nothing
            ctx.t = tape.record(write_slots, read_slots)
            ctx.tape, ctx.eps, ctx.content = tape, access.eps, content is not None
            ctx.save_for_backward(old, write_w, erase, add, rows, read_keys, read_strengths, weights, *saved)
        return reads, weights, token.detach().clone(), read_slots

    @staticmethod
    def backward(ctx, grad_reads, grad_weights, _grad_token, _grad_slots):
        if torch.is_grad_enabled():
            raise RuntimeError("sparse access: create_graph=True is not supported (no higher derivatives "
                               "through a sparse memory)")
        old, w, e, a, rows, keys, strengths, weights, *cs = ctx.saved_tensors
        tape = ctx.tape
        tape.begin_backward(ctx.t, old)
        B, R, K, D = rows.shape
        g_rows, g_keys, g_str = _read_backward(grad_reads, grad_weights, weights, rows, keys, strengths, ctx.eps)
        wid, rid = tape.ids[ctx.t][:2]
        table = tape.table
        table.index_add_(0, rid, g_rows.reshape(-1, D).to(table.dtype))
        g_new = table.index_select(0, wid).reshape(old.shape).to(old.dtype)
        g_old, g_w, g_e, g_a = _write_backward(g_new, old, w, e, a)
        g_content = (None,) * 4
        if ctx.content:
            # The write weights came from the write keys' softmax over rows as they were before the
            # write, rows of `old`: their gradient joins the one the erase-add gives those rows.
            wk, ws, cw, pos, lru, wg, ag = cs
            leaves = [t.detach().requires_grad_(True) for t in (cw, wg, ag)]
            with torch.enable_grad():
                g_cw, g_wg, g_ag = torch.autograd.grad(_mix_write(leaves[0], pos, lru, *leaves[1:]), leaves, g_w)
            g_crow, g_wk, g_ws = _read_backward(torch.zeros_like(wk), g_cw, cw, _rows_at(old, pos), wk, ws, ctx.eps)
            W, K = pos.shape[1], pos.shape[2]
            g_old = g_old.scatter_add(1, pos.reshape(B, W * K, 1).expand(B, W * K, D),
                                      g_crow.reshape(B, W * K, D).to(g_old.dtype))
            g_content, g_w = (g_wk, g_ws, g_wg, g_ag), None
        table.index_copy_(0, wid, g_old.reshape(-1, D).to(table.dtype))
        return (None, None, None, None, None, None, g_w, g_e, g_a, g_keys, g_str) + g_content


class SparseAccessState:
    """The sparse access's state. memory (B,N,D) and links (the LRU list) are buffers the steps update
    in place; read_indices (B,R,K) and read_weights (B,R,K) are the last step's candidates and weights;
    index follows the memory; tape records the sequence for the backward."""

    __slots__ = ("memory", "links", "read_indices", "read_weights", "index", "tape", "token", "written")

    def __init__(self, memory, links, read_indices, read_weights, index, tape, token, written):
        self.memory, self.links, self.index, self.tape = memory, links, index, tape
        self.read_indices, self.read_weights, self.token = read_indices, read_weights, token
        self.written = written  # the write slots (B,C) of every step since the last reset, shared

    def _next(self, read_indices, read_weights, token):
        return SparseAccessState(self.memory, self.links, read_indices, read_weights, self.index, self.tape,
                                 token, self.written)

    def detach(self):
        """The same memory as the start of a new sequence (no gradient to earlier steps)."""
        return SparseAccessState(self.memory, self.links, self.read_indices, self.read_weights.detach(),
                                 self.index, _Tape(self.memory.shape[1]), self.token.detach(), self.written)

    def __repr__(self):
        B, N, D = self.memory.shape
        return (f"SparseAccessState(B={B}, N={N}, D={D}, K={self.read_indices.shape[-1]}, "
                f"index={getattr(self.index, 'name', type(self.index).__name__)}, steps={self.tape.steps})")


class SparseAccess:
    """The sparse step of a MemoryAccess built with sparse_k=K (see the module doc)."""

    def __init__(self, access, k, index="auto", eps=DEFAULT_SPARSE_EPS, write_rule="previous_reads"):
        R, W, N = access.num_reads, access.num_writes, access.memory_size
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 < eps < float("inf")):
            raise ValueError(f"sparse_eps must be a positive finite number, got {eps!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"sparse_k must be a positive int, got {k!r}")
        if k > N:
            raise ValueError(f"sparse_k ({k}) must be at most memory_size ({N})")
        need = 4 * (R * k + 1)
        if N < need:
            raise ValueError(f"sparse_k={k} with num_reads={R} needs memory_size >= 4*(num_reads*sparse_k+1) = "
                             f"{need}, got {N}; use the dense access (sparse_k=None) for small memories")
        if write_rule not in ("previous_reads", "content"):
            raise ValueError(f"write_rule must be 'previous_reads' or 'content', got {write_rule!r}")
        if write_rule == "content" and N < 2 * W * k + 1:
            raise ValueError(f"write_rule='content' with sparse_k={k} and num_writes={W} needs memory_size >= "
                             f"2*num_writes*sparse_k+1 = {2 * W * k + 1}, got {N}")
        self.write_rule = write_rule
        self.access, self.k, self.eps = access, k, float(eps)
        self.index_spec = index
        make_index(index) if not isinstance(index, str) else None  # type check now
        if isinstance(index, str) and index not in ("exact", "rows", "faiss", "auto"):
            raise ValueError(f"index must be 'exact', 'rows', 'faiss', 'auto' or an index object, got {index!r}")
        self.backend = access.backend

    # -------------------------------------------------------------- state
    def initial_state(self, batch_size, dtype=torch.float32, device=None, memory=None):
        """A zero memory with a fresh LRU list and index (O(N) once; `reset` reuses one in O(rows written)).
        With `memory` (B,N,D) given, the state is built around it (it is then updated in place)."""
        a = self.access
        B, N, D, R, K = batch_size, a.memory_size, a.word_size, a.num_reads, self.k
        if memory is None:
            memory = torch.zeros(B, N, D, dtype=dtype, device=device)
        elif tuple(memory.shape) != (B, N, D) or memory.requires_grad:
            raise ValueError(f"memory must be a ({B}, {N}, {D}) tensor that does not require grad, got "
                             f"{tuple(memory.shape)}" + (" requiring grad" if memory.requires_grad else ""))
        dtype, device = memory.dtype, memory.device
        links = sops.lru_init(B, N, device)
        index = make_index(self.index_spec, self.eps)
        own = getattr(index, "eps", None)
        if own is not None and own != self.eps:
            raise ValueError(f"index: its eps ({own}) differs from sparse_eps ({self.eps}), so its top K would not "
                             "be the read's; build the index with eps=sparse_eps")
        index.attach(memory)
        return SparseAccessState(memory, links, torch.full((B, R, K), -1, dtype=torch.int64, device=device),
                                 torch.zeros(B, R, K, dtype=dtype, device=device), index, _Tape(N),
                                 torch.zeros((), dtype=dtype, device=device), _Dirty())

    def reset(self, state):
        """Zeroes every row the state's sequences wrote since the last reset, in O(rows written); returns a
        state at the start of a new sequence on the same buffers (the LRU order is kept)."""
        memory = state.memory
        B, N, D = memory.shape
        written = state.written
        with torch.no_grad():
            if written.everything:
                memory.zero_()          # as cheap as the rows by now
                state.index.rebuild()
            else:
                for w in written.slots:
                    memory.scatter_(1, w.unsqueeze(-1).expand(B, w.shape[1], D), 0.0)
                    state.index.update(w)
                if callable(getattr(state.index, "compact", None)):
                    state.index.compact()
        written.clear()
        return SparseAccessState(memory, state.links, torch.full_like(state.read_indices, -1),
                                 torch.zeros_like(state.read_weights.detach()), state.index, _Tape(N),
                                 torch.zeros_like(state.token.detach()), written)

    def check_state(self, state, batch_size=None):
        if not isinstance(state, SparseAccessState):
            raise TypeError(f"state must be a SparseAccessState (from initial_state), got {type(state).__name__}")
        a = self.access
        memory = state.memory
        B = memory.shape[0] if batch_size is None else batch_size
        if tuple(memory.shape) != (B, a.memory_size, a.word_size):
            raise ValueError(f"state.memory: expected shape {(B, a.memory_size, a.word_size)}, "
                             f"got {tuple(memory.shape)}")
        if memory.requires_grad:
            raise ValueError("state.memory: a sparse memory is updated in place and cannot require grad")
        want = (B, a.num_reads, self.k)
        for name in ("read_indices", "read_weights"):
            t = getattr(state, name)
            if tuple(t.shape) != want:
                raise ValueError(f"state.{name}: expected shape {want}, got {tuple(t.shape)}")
        return B

    # -------------------------------------------------------------- step
    def _write_set(self, state, iface):
        """(slots (B,C), weights (B,W,C)): the previous read slots, distinct, then spares and the LRU slot."""
        prev_idx, prev_w = state.read_indices, state.read_weights
        B, R, K = prev_idx.shape
        RK = R * K
        flat_idx = prev_idx.reshape(B, RK)
        flat_w = prev_w.reshape(B, RK) / R
        s_idx, first, order = _sorted_firsts(flat_idx)
        s_w = flat_w.gather(1, order)
        valid = s_idx >= 0
        seg = (torch.cumsum(first, dim=1) - 1).clamp(min=0)
        nseg = first.sum(dim=1, keepdim=True)
        cw = torch.zeros_like(s_w).scatter_add(1, seg, s_w * valid)
        u_idx = torch.full_like(s_idx, -1).scatter_reduce(1, seg, s_idx, "amax", include_self=True)
        oldest = sops.lru_oldest(state.links, RK + 1)
        pad = torch.arange(RK, device=s_idx.device).unsqueeze(0) >= nseg
        u_idx = torch.where(pad, oldest[:, 1:], u_idx)
        cw = torch.where(pad, torch.zeros_like(cw), cw)
        slots = torch.cat([u_idx, oldest[:, :1]], dim=1)
        base = torch.cat([cw, torch.zeros_like(cw[:, :1])], dim=1)                    # (B, C)
        lru = torch.zeros_like(base)
        lru[:, -1] = 1
        return slots, _gated(base.unsqueeze(1), lru, iface.write_gates, iface.allocation_gates)

    def _content_write_set(self, state, cand, dtype):
        """The content rule's write set: (slots (B,C), pos (B,W,K), lru (B,C)), C = W K + 1. The slots
        are the write heads' candidates, distinct, then the least recently used slot (which may be one
        of them) and as many of the next oldest slots as fill C; pos is each candidate's position in
        slots and lru marks the least recently used slot's."""
        B, W, K = cand.shape
        WK = W * K
        flat = cand.reshape(B, WK)
        s_idx, first, _ = _sorted_firsts(flat)
        distinct = torch.where(first, s_idx, torch.full_like(s_idx, -1))
        oldest = sops.lru_oldest(state.links, 2 * WK + 1)        # W K of these at most are candidates
        spare = torch.where((oldest.unsqueeze(-1) == flat.unsqueeze(1)).any(-1), torch.full_like(oldest, -1),
                            oldest)
        pool = torch.cat([distinct, spare], dim=1)
        pick = torch.sort((pool < 0).to(torch.uint8), dim=1, stable=True).indices[:, :WK + 1]
        slots = pool.gather(1, pick)
        pos = (cand.unsqueeze(-1) == slots[:, None, None, :]).to(torch.uint8).argmax(-1)
        lru = (slots == oldest[:, :1]).to(dtype)
        return slots, pos, lru

    def _candidates(self, state, keys):
        """(B,R,K) candidate slots of the read keys over the current memory."""
        k = self.k
        scores, idx = state.index.search(keys.detach(), k)
        if getattr(state.index, "nonzero", None) is None:
            return idx  # an index over every row (ExactIndex): zero rows are among its candidates
        # An index with a `nonzero` mask holds only those rows; all-zero rows score 0 and fill in where
        # they beat its results.
        B, R = keys.shape[0], keys.shape[1]
        fill = sops.lru_oldest(state.links, k, skip=state.index.nonzero)                # (B, k)
        f_scores = torch.where(fill >= 0, 0.0, float("-inf")).to(scores.dtype)
        all_s = torch.cat([scores, f_scores.unsqueeze(1).expand(B, R, k)], dim=2)
        all_i = torch.cat([idx, fill.unsqueeze(1).expand(B, R, k)], dim=2)
        best = torch.topk(all_s, k, dim=2).indices
        out = all_i.gather(2, best)
        if bool((out < 0).any()):
            raise RuntimeError("sparse access: the index and the zero rows gave fewer than K candidates; "
                               "the index is out of step with the memory")
        return out

    def step(self, iface, state):
        """(reads (B,R,D), new SparseAccessState)."""
        # A NaN key has no nearest neighbours and a NaN write would spread through the index: refuse
        # before anything is written (one host sync per step; the field is named on failure only).
        names = ("read_keys", "read_strengths", "erase_vectors", "write_vectors")
        if self.write_rule == "content":
            names += ("write_keys", "write_strengths")
        if not bool(torch.stack([torch.isfinite(getattr(iface, n)).all() for n in names]).all()):
            name = next(n for n in names if not bool(torch.isfinite(getattr(iface, n)).all()))
            raise ValueError(f"{name}: contains NaN or inf (the controller's output diverged?); the memory "
                             "is unchanged")
        if self.write_rule == "content":
            cand = self._candidates(state, iface.write_keys)     # over the memory before the write
            slots, pos, lru = self._content_write_set(state, cand, state.memory.dtype)
            content, weights = (pos, lru), None
            extra = (iface.write_keys, iface.write_strengths, iface.write_gates, iface.allocation_gates)
        else:
            (slots, weights), content, extra = self._write_set(state, iface), None, (None,) * 4
        diff = (weights, iface.erase_vectors, iface.write_vectors, iface.read_keys, iface.read_strengths) + extra
        record = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in diff)
        reads, read_weights, token, read_slots = _SparseStep.apply(self, state, record, slots, content, state.token,
                                                                   *diff)
        return reads, state._next(read_slots, read_weights, token)
