"""NeuralMemoryBank: the seed's memory bank as a drop-in, on the fused ops.

Design
------
The seed's bank loops over read heads, normalises the whole memory once per
head and once more per write, and allocates a fresh memory tensor on every
write. Here a read of all H heads is one `content_read` call and a write is
one `content_write_` call (addressing, erase-add and usage in one op, in
place), so the bank's cost is that of two kernels.

Gradient semantics (the default, `differentiable=False`) are the seed's: the
memory is a constant to autograd. Reads are differentiable in their keys and
strengths (that is how the read heads learn); writes are not, so the write
heads (write key, vector, erase, strength) never receive a gradient at all.

In-place writes and autograd. A read that needs a gradient saves the memory
tensor for its backward, and the backward runs only after the whole training
step, by which time the step has written the memory up to nine times (the
seed's current sample plus eight replays). Writing in place into a tensor
that a pending backward has saved would corrupt that backward (autograd's
version counter catches it and raises). Two ping-pong buffers do not help
either: the third write would land on the first read's buffer. So the bank
remembers whether the current memory tensor has been handed to autograd since
the last write; if it has, the write first moves to a fresh copy (one memcpy
of N*D values, and the old tensor lives on only inside the graph, exactly as
in the seed); if it has not (evaluation, no_grad, consecutive writes), it
writes in place with no copy at all.

`differentiable=True` keeps the graph through writes: each write is the
out-of-place, differentiable `memory_write` of content weights computed from
the (differentiable) memory, so a loss at step t reaches the write heads of
steps < t. That is truncated backpropagation through time: call
`detach_memory()` at the truncation points and `reset()` to clear the memory.
Usage is bookkeeping only and stays detached in both modes.

Without the native kernels (backend resolving to "torch") the bank uses its
own pure-PyTorch path rather than the generic op references: the normalised
memory is computed once per memory state and shared by the read and the write
that follow it (the seed normalises the whole memory H+1 times per step), the
read is one autograd.Function with a hand-written backward (memory constant,
as in the seed), and a single-head write is two in-place updates with exactly
the seed's arithmetic. It gives the op references' results.

Shapes. Unbatched (the seed's): memory (N, D), usage (N,); `read` takes
(H, D) keys and (H,) strengths and returns (H*D,). Two extensions that the
fast agent uses to batch its replay: keys (M, H, D) with strengths (M, H) are
M independent queries against the same memory and return (M, H*D); a write
with keys (M, D) is M write heads applied at once, all addressed against the
memory as it is before the write (the DNC's multi-head erase-add,
`m * prod_w(1 - w_w e_w) + sum_w w_w a_w`; usage gains the sum of the M
weightings after one decay). With `batch_size=B` there are B independent
memories, (B, N, D) and (B, N): keys (B, H, D) and strengths (B, H) give
(B, H*D), and a write takes (B, D) keys, vectors and erases and (B,) or
(B, 1) strengths.

Write addressing (`write_mode`). "content" (the default, the tutorial's):
each write head is addressed by its key's cosine similarity to the slots.
The bank starts all zero, where every slot is equally similar to any key, so
the first write is spread uniformly, every slot receives the same write, and
from then on the slots stay identical (content addressing cannot tell them
apart): a read returns the same vector whatever its key. "allocation": the
DNC's allocation weighting (`nn.access.allocation`): each write goes to the
least-used slot, a_j = (1 - u_j) prod_{i<j} u_i over usage sorted ascending
(usage clamped to [0, 1] there; the bank's usage keeps the tutorial's
update, decay then add), several heads taking distinct slots one after
another (`write_allocation_weights`, every gate 1), weights below
`alloc_floor` (1e-3) dropped (the eps-tail on free slots). The write key and
strength are then unused; erase and write vectors act as in the tutorial's
erase-add. Allocation is what breaks the symmetry of the zero memory: the
first write fills one slot, the next write the next free one. "none": writes
are ignored (checked, not applied), so the memory stays zero and every read
is exactly zero: the reads-replaced-by-zeros ablation.
"""
import torch
import torch.nn as nn

from .. import ops
from ..ops.dispatch import resolve
from .access import write_allocation_weights

__all__ = ["NeuralMemoryBank"]


# --------------------------------------------------------------------------
# pure-PyTorch fast path (used when the ops resolve to the "torch" backend)
# --------------------------------------------------------------------------
def _normalize(t, eps):
    """F.normalize(t, dim=-1) and the clamped norms (for the backward)."""
    norm = t.norm(dim=-1, keepdim=True).clamp_min(eps)
    return t / norm, norm


def _const_memory_read(memory, mem_n, keys, strengths, eps):
    """The read's formula over primitives (memory a constant), for create_graph."""
    k_n = keys / keys.norm(dim=-1, keepdim=True).clamp_min(eps)
    w = torch.softmax(strengths.unsqueeze(-1) * torch.matmul(k_n, mem_n.transpose(-1, -2)), dim=-1)
    return torch.matmul(w, memory)


class _ConstMemoryRead(torch.autograd.Function):
    """Addressing + read of (B,K) keys over a memory that autograd treats as a constant.

    The backward is written out (5 small matmul/elementwise steps) instead of
    replaying autograd over the ~10 primitives of the seed's formula. Under
    create_graph (second-order MAML) the backward is instead autograd over the
    formula itself, so that higher derivatives keep every term.
    """

    @staticmethod
    def forward(ctx, memory, mem_n, keys, strengths, eps):
        k_n, k_norm = _normalize(keys, eps)
        sim = torch.matmul(k_n, mem_n.transpose(-1, -2))
        w = torch.softmax(strengths.unsqueeze(-1) * sim, dim=-1)
        ctx.save_for_backward(memory, mem_n, k_n, k_norm, sim, w, keys, strengths)
        ctx.eps = eps
        # Keys shorter than eps (clamped norm) need the other branch of d normalize.
        ctx.any_clamped = bool((k_norm <= eps).any())
        return torch.matmul(w, memory)

    @staticmethod
    def backward(ctx, grad_reads):
        memory, mem_n, k_n, k_norm, sim, w, keys, strengths = ctx.saved_tensors
        if torch.is_grad_enabled():
            need = [t for t, n in zip((keys, strengths), ctx.needs_input_grad[2:4]) if n]
            with torch.enable_grad():
                y = _const_memory_read(memory, mem_n, keys, strengths, ctx.eps)
                grads = iter(torch.autograd.grad(y, need, grad_reads, create_graph=True, allow_unused=True))
            return (None, None, next(grads) if ctx.needs_input_grad[2] else None,
                    next(grads) if ctx.needs_input_grad[3] else None, None)
        dw = torch.matmul(grad_reads, memory.transpose(-1, -2))
        dlogits = w * (dw - (dw * w).sum(-1, keepdim=True))
        dstrengths = (dlogits * sim).sum(-1)
        dk_n = torch.matmul(dlogits * strengths.unsqueeze(-1), mem_n)
        # d normalize: project out the key direction; a clamped norm is a plain scale.
        radial = (k_n * dk_n).sum(-1, keepdim=True)
        dkeys = (dk_n - k_n * radial) / k_norm
        if ctx.any_clamped:
            dkeys = torch.where(k_norm > ctx.eps, dkeys, dk_n / k_norm)
        return None, None, dkeys, dstrengths, None


def _unaliased(ts, memory):
    """The tensors `ts`, each copied when it shares storage with `memory`.

    Under torch.compile the traced write is functionalised (it writes a copy
    of the memory), so aliasing cannot corrupt it, and storages are not
    traceable: nothing to do there."""
    if torch.compiler.is_compiling():
        return ts
    lo = memory.data_ptr()  # memory is contiguous: its elements span [lo, hi)
    hi = lo + memory.nbytes
    out = []
    for t in ts:
        if t.is_contiguous():
            a = t.data_ptr()
            alias = a < hi and lo < a + t.nbytes
        else:
            alias = t.untyped_storage().data_ptr() == memory.untyped_storage().data_ptr()
        out.append(t.clone() if alias else t)
    return out


class NeuralMemoryBank(nn.Module):
    """Drop-in for the seed's NeuralMemoryBank (same constructor, buffers, methods).

    Args:
        config: a MemoryConfig (memory_size, memory_dim, num_read_heads, ...).
        backend: backend of the memory ops ("auto", "cpu", "cuda", "triton", "torch").
        batch_size: None for one memory of shape (N, D) as in the seed, or B for
            B independent memories of shape (B, N, D).
        differentiable: keep gradients through writes (truncated BPTT) instead of
            the seed's detach after every write.
        eps, decay: cosine-similarity epsilon and usage decay (the seed's 1e-12, 0.99).
        write_mode: "content" (the tutorial's content-addressed writes), "allocation"
            (the DNC's least-used-first allocation) or "none" (no writes: reads stay
            zero); see the module docstring.
        alloc_topk: with allocation, k of the top-k allocation (None: exact sort).
        alloc_floor: allocation weights below it are set to zero (the DNC's
            eps-tail on free slots would leave scaled ghost copies, see
            `_allocation_weights`).
    """

    WRITE_MODES = ("content", "allocation", "none")

    def __init__(self, config, backend="auto", batch_size=None, differentiable=False, eps=1e-12, decay=0.99,
                 write_mode="content", alloc_topk=None, alloc_floor=1e-3):
        super().__init__()
        if write_mode not in self.WRITE_MODES:
            raise ValueError(f"write_mode must be one of {self.WRITE_MODES}, got {write_mode!r}")
        self.write_mode = write_mode
        self.alloc_topk = alloc_topk
        self.alloc_floor = float(alloc_floor)
        self.memory_size = config.memory_size
        self.memory_dim = config.memory_dim
        self.num_read_heads = config.num_read_heads
        self.batch_size = batch_size
        self.backend = backend
        self.differentiable = differentiable
        self.eps = eps
        self.decay = decay
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be None or a positive int, got {batch_size!r}")
        lead = () if batch_size is None else (batch_size,)
        self.register_buffer("memory", torch.zeros(*lead, config.memory_size, config.memory_dim))
        self.register_buffer("usage", torch.zeros(*lead, config.memory_size))
        # True when the current memory tensor may be saved by a pending backward.
        self._memory_in_graph = False
        self._torch_path_for = {}  # device -> whether the ops resolve to "torch"

    # ------------------------------------------------------------------ shapes
    @property
    def batched(self):
        return self.batch_size is not None

    def _mem3(self):
        """Memory and usage as (B, N, D) and (B, N) views."""
        if self.batched:
            return self.memory, self.usage
        return self.memory.unsqueeze(0), self.usage.unsqueeze(0)

    def _check_tensor(self, name, t):
        """A tensor of the memory's dtype and device, or an error naming `name`."""
        mem = self._buffers["memory"]  # one dict lookup: a small step is overhead-bound
        if isinstance(t, torch.Tensor) and t.dtype is mem.dtype and t.device == mem.device:
            return t
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != mem.dtype:
            raise TypeError(f"{name} must have the dtype of the memory ({mem.dtype}), got {t.dtype}")
        raise ValueError(f"{name} must be on the device of the memory ({mem.device}), got {t.device}")

    def _as_keys(self, name, keys, heads_name, heads=None):
        """Keys as (B, K, D) for the ops, and the leading shape to restore.

        `heads`, when given, is the number of heads the keys must hold (the
        read heads of the config); a (D,) or (B, D) key is one head.
        """
        self._check_tensor(name, keys)
        D = self.memory_dim
        if keys.dim() == 0 or keys.shape[-1] != D:
            raise ValueError(f"{name} must end in memory_dim={D}, got shape {tuple(keys.shape)}")
        if self.batched:
            B = self.batch_size
            if keys.dim() == 2 and keys.shape[0] == B:
                out = keys.unsqueeze(1)
            elif keys.dim() == 3 and keys.shape[0] == B:
                out = keys
            else:
                raise ValueError(f"{name} must have shape (B={B}, {heads_name}, {D}) or (B={B}, {D}), "
                                 f"got {tuple(keys.shape)}")
            per_query = out.shape[1]
        elif keys.dim() == 1:
            out, per_query = keys.view(1, 1, D), 1
        elif keys.dim() in (2, 3):
            out, per_query = keys.reshape(1, -1, D), keys.shape[-2]
        else:
            raise ValueError(f"{name} must have shape ({heads_name}, {D}), ({D},) or (M, {heads_name}, {D}), "
                             f"got {tuple(keys.shape)}")
        if heads is not None and per_query != heads:
            raise ValueError(f"{name} must hold num_read_heads={heads} heads ({heads_name} = {heads} in "
                             f"({heads_name}, {D})), got shape {tuple(keys.shape)}")
        return out

    def _as_strengths(self, name, strengths, n_keys, scalar_ok=False):
        """One strength per key as (B, n_keys). With `scalar_ok`, a Python
        number or a one-element tensor is every key's strength."""
        B = self.batch_size or 1
        if scalar_ok and isinstance(strengths, (int, float)) and not isinstance(strengths, bool):
            strengths = torch.tensor(float(strengths), dtype=self.memory.dtype, device=self.memory.device)
        self._check_tensor(name, strengths)
        if scalar_ok and strengths.numel() == 1:
            return strengths.reshape(1, 1).expand(B, n_keys)
        if strengths.numel() != B * n_keys or (strengths.dim() == 0 and not scalar_ok):
            raise ValueError(f"{name} must hold one strength per key ({B * n_keys} values"
                             + (", or one for all" if scalar_ok else "") + f"), got shape {tuple(strengths.shape)}")
        return strengths.reshape(B, n_keys)

    def _use_torch_path(self):
        dev = self.memory.device
        use = self._torch_path_for.get(dev)
        if use is None:
            use = resolve(self.backend, "content_read", dev, self.memory_size) == "torch"
            self._torch_path_for[dev] = use
        return use

    def _normalized_memory(self, memory):
        """normalize(memory), computed afresh at every call.

        It was once cached per memory state, keyed on the tensor's version
        counter; but writes through `.data`, `.numpy()` or another library do
        not move that counter, and the read after them used a stale copy.
        """
        with torch.no_grad():
            return _normalize(memory, self.eps)[0]

    # ----------------------------------------------------------------- methods
    def content_addressing(self, key, beta):
        """Softmax of beta * cos(key, slot) over the slots.

        key (D,) or (K, D) -> (N,) or (K, N); batched: (B, D) or (B, K, D) -> (B, N) or (B, K, N).
        """
        memory, _ = self._mem3()
        keys = self._as_keys("key", key, "K")
        K = keys.shape[1]
        beta = torch.as_tensor(beta, dtype=memory.dtype, device=memory.device)
        if beta.numel() == 1:
            beta = beta.reshape(1, 1).expand(keys.shape[0], K)
        strengths = self._as_strengths("beta", beta, K)
        w = ops.content_addressing(memory, keys, strengths, eps=self.eps, backend=self.backend)
        if self.batched:
            return w if key.dim() == 3 else w.squeeze(1)
        return w.reshape(*key.shape[:-1], self.memory_size)

    def read(self, read_keys, read_strengths):
        """All heads in one fused read: (H, D), (H,) -> (H*D,), see the module docstring."""
        memory, _ = self._mem3()
        keys = self._as_keys("read_keys", read_keys, "H", heads=self.num_read_heads)
        strengths = self._as_strengths("read_strengths", read_strengths, keys.shape[1])
        if torch.is_grad_enabled() and (keys.requires_grad or strengths.requires_grad or memory.requires_grad):
            self._memory_in_graph = True
        if not memory.requires_grad and self._use_torch_path():
            reads = _ConstMemoryRead.apply(memory, self._normalized_memory(memory), keys, strengths, self.eps)
        else:
            reads = ops.content_read(memory, keys, strengths, eps=self.eps, backend=self.backend)
        if self.batched:
            return reads.reshape(self.batch_size, -1)
        if read_keys.dim() == 3:
            return reads.reshape(read_keys.shape[0], -1)
        return reads.reshape(-1)

    def write(self, write_key, write_vector, erase_vector, write_strength):
        """Erase-then-add write at the `write_mode` weights (content: one fused op), then usage."""
        _, usage = self._mem3()
        keys = self._as_keys("write_key", write_key, "W")
        W = keys.shape[1]
        strengths = self._as_strengths("write_strength", write_strength, W, scalar_ok=True)
        erase = self._as_keys("erase_vector", erase_vector, "W")
        add = self._as_keys("write_vector", write_vector, "W")
        if erase.shape != keys.shape or add.shape != keys.shape:
            raise ValueError(f"write_vector and erase_vector must have the shape of write_key "
                             f"{tuple(write_key.shape)}, got {tuple(write_vector.shape)} and "
                             f"{tuple(erase_vector.shape)}")
        if self.write_mode == "none":
            return
        alloc = self.write_mode == "allocation"
        if self.differentiable:
            memory, _ = self._mem3()
            if alloc:
                w = self._allocation_weights(usage, W)
            else:
                w = ops.content_addressing(memory, keys, strengths, eps=self.eps, backend=self.backend)
            new = ops.memory_write(memory, w, erase, add, backend=self.backend)
            with torch.no_grad():
                usage.copy_(ops.usage_update(usage, w.detach(), self.decay, backend=self.backend))
            self.memory = new if self.batched else new.squeeze(0)
            self._memory_in_graph = True
            return
        with torch.no_grad():
            if self._memory_in_graph:
                # A pending backward holds the current tensor: write into a fresh one.
                self.memory = self.memory.clone()
                self._memory_in_graph = False
            memory, usage = self._mem3()
            # The seed's write is out of place: a key or vector that is a view of
            # the memory (a stored row written back) is read as it was before the
            # write. The in-place op refuses such aliasing; snapshot it here.
            keys, strengths, erase, add = _unaliased([t.detach() for t in (keys, strengths, erase, add)], memory)
            if alloc:
                ops.memory_write_(memory, self._allocation_weights(usage, W), erase.contiguous(), add.contiguous(),
                                  usage=usage, decay=self.decay, backend=self.backend)
            elif self._use_torch_path():
                self._torch_write_(memory, usage, keys, strengths, erase, add)
            else:
                ops.content_write_(memory, keys, strengths, erase, add,
                                   usage=usage, eps=self.eps, decay=self.decay, backend=self.backend)

    BACKPROP = ("auto", "reverse", "checkpoint", "full")

    def sequence(self, read_keys, read_strengths, write_keys, write_vectors, erase_vectors, write_strengths,
                 segment=None, checkpoint=True, backprop="auto", max_amplification=None):
        """T steps of read-then-write, differentiable, in bounded memory; returns the T reads stacked.

        Each argument holds T steps along a first dimension, each step in the
        shape `read` and `write` take. Needs `differentiable=True`. How the
        backward gets each step's memory (`backprop`, docs/training.md):

        - "reverse": none is kept; the backward rebuilds each one from the
          next by undoing the erase-add write with the saved write weights
          (`reversible_read_write`, nn/reversible.py; rows that a write
          nearly erases are saved exactly, see `max_amplification`).
          About 6 copies of the memory at T = 64 (T*W*N weights kept), and
          no recomputed forward. Float32/float64, "content" and "allocation" writes.
        - "checkpoint": `checkpointed_scan` (nn/scan.py) keeps the memory at
          the start of every `segment` steps (default ceil(sqrt(T))) and
          recomputes the segment in the backward: about 2 sqrt(T) copies.
        - "full": plain autograd, every step's memory kept (T+1 copies).
        - "auto" (default): "reverse" where it applies, else "checkpoint";
          `checkpoint=False` means "full", as it did before `backprop` existed,
          and an explicit `segment` means "checkpoint" (a segment length is a
          checkpointing choice; "reverse" and "full" refuse one).

        Afterwards the bank's memory is the last step's, still in the graph,
        and usage is updated (detached), as T calls of `read` and `write`
        would leave them.
        """
        from .scan import checkpointed_scan

        if not self.differentiable:
            raise RuntimeError("sequence() trains through the writes: construct the bank with differentiable=True")
        if backprop not in self.BACKPROP:
            raise ValueError(f"backprop must be one of {self.BACKPROP}, got {backprop!r}")
        memory, usage = self._mem3()
        names = ("read_keys", "read_strengths", "write_keys", "write_vectors", "erase_vectors", "write_strengths")
        xs = (read_keys, read_strengths, write_keys, write_vectors, erase_vectors, write_strengths)
        for name, x in zip(names, xs):
            self._check_tensor(name, x)
        if backprop == "auto":
            if not checkpoint:
                backprop = "full"
            elif segment is not None:
                backprop = "checkpoint"
            elif self.write_mode != "none" and memory.dtype in (torch.float32, torch.float64):
                backprop = "reverse"
            else:
                backprop = "checkpoint"
        if segment is not None and backprop != "checkpoint":
            raise ValueError(f"segment={segment!r} applies to backprop='checkpoint' only; backprop is {backprop!r}"
                             + (" (checkpoint=False)" if not checkpoint else ""))
        if backprop == "reverse":
            return self._reverse_sequence(memory, usage, names, xs, max_amplification)
        if max_amplification is not None:
            raise ValueError("max_amplification applies to backprop='reverse' only")

        def step(x, state):
            mem, use = state
            keys, rstr, wkeys, wstr, erase, add = self._step_inputs(*x)
            reads = ops.content_read(mem, keys, rstr, eps=self.eps, backend=self.backend)
            if self.write_mode == "none":
                new = mem
            else:
                if self.write_mode == "allocation":
                    w = self._allocation_weights(use, wkeys.shape[1])
                else:
                    w = ops.content_addressing(mem, wkeys, wstr, eps=self.eps, backend=self.backend)
                new = ops.memory_write(mem, w, erase, add, backend=self.backend)
                with torch.no_grad():
                    use = ops.usage_update(use, w.detach(), self.decay, backend=self.backend)
            rk = x[0]
            return reads.reshape(rk.shape[0], -1) if (self.batched or rk.dim() == 3) else reads.reshape(-1), \
                (new, use)

        reads, (new, use) = checkpointed_scan(step, (memory, usage), xs, segment=segment,
                                              checkpoint_segments=backprop == "checkpoint")
        self._end_sequence(new, use)
        return reads

    def _end_sequence(self, new, use):
        """The last step's memory (still in the graph) and usage (detached) become the bank's."""
        self.memory = new if self.batched else new.squeeze(0)
        # A fresh tensor, not copy_: the checkpoints hold the old usage for the backward's recomputation.
        self.usage = (use if self.batched else use.squeeze(0)).detach()
        self._memory_in_graph = True

    def _step_inputs(self, rk, rs, wk, wv, ev, ws):
        """One step's inputs as `read` and `write` take them, in the ops' shapes: read keys (B,H,D) and
        strengths (B,H), write keys (B,W,D) and strengths (B,W), erase and add (B,W,D)."""
        keys = self._as_keys("read_keys", rk, "H", heads=self.num_read_heads)
        rstr = self._as_strengths("read_strengths", rs, keys.shape[1])
        wkeys = self._as_keys("write_keys", wk, "W")
        wstr = self._as_strengths("write_strengths", ws, wkeys.shape[1], scalar_ok=True)
        erase, add = self._as_keys("erase_vectors", ev, "W"), self._as_keys("write_vectors", wv, "W")
        if erase.shape != wkeys.shape or add.shape != wkeys.shape:
            raise ValueError(f"write_vectors and erase_vectors must have the shape of write_keys per step "
                             f"{tuple(wk.shape)}, got {tuple(wv.shape)} and {tuple(ev.shape)}")
        return keys, rstr, wkeys, wstr, erase, add

    def _reverse_sequence(self, memory, usage, names, xs, max_amplification):
        """sequence(backprop="reverse"): the per-step inputs in the ops' shapes, stacked, through
        reversible_read_write."""
        from .reversible import DEFAULT_MAX_AMPLIFICATION, reversible_read_write

        if self.write_mode == "none":
            raise ValueError("backprop='reverse' undoes the writes; write_mode='none' has none: use 'checkpoint'")
        read_keys = xs[0]
        T = read_keys.shape[0] if read_keys.dim() else 0
        for name, x in zip(names, xs):
            if x.dim() == 0 or x.shape[0] != T:
                raise ValueError(f"every input must hold T={T} steps in its first dimension; "
                                 f"{name} has shape {tuple(x.shape)}")
        if T == 0:
            raise ValueError("sequence length T must be at least 1, got inputs with 0 steps")
        per_step = [self._step_inputs(*(x[t] for x in xs)) for t in range(T)]
        rk, rs, wk, ws, er, ad = (torch.stack(steps) for steps in zip(*per_step))
        W = wk.shape[2]
        alloc = self.write_mode == "allocation"
        reads, new, use = reversible_read_write(
            memory, rk, rs, None if alloc else wk, None if alloc else ws, er, ad, eps=self.eps, backend=self.backend,
            max_amplification=DEFAULT_MAX_AMPLIFICATION if max_amplification is None else max_amplification,
            weights_fn=(lambda u: self._allocation_weights(u, W)) if alloc else None, usage=usage, decay=self.decay)
        self._end_sequence(new, use)
        rk0 = read_keys[0]
        if self.batched or rk0.dim() == 3:
            return reads.reshape(T, rk0.shape[0], -1)
        return reads.reshape(T, -1)

    def _allocation_weights(self, usage, n_heads):
        """(B, W, N) allocation weights of W heads, least-used slots first."""
        u = usage.detach().clamp(0.0, 1.0)
        gates = u.new_ones(u.shape[0], n_heads)
        w = write_allocation_weights(u, gates, topk=self.alloc_topk)
        # The DNC's tail: with free slots at usage ~0 the next free slots get
        # eps, eps^2, ... (eps = 1e-6). Cosine addressing is scale invariant, so
        # a slot holding 1e-6 v reads as v: a ghost copy that takes half the
        # read weight of a query for v. Weights below alloc_floor are dropped.
        return torch.where(w >= self.alloc_floor, w, torch.zeros_like(w))

    def _torch_write_(self, memory, usage, keys, strengths, erase, add):
        """In-place erase-add with the seed's arithmetic (W=1: bit-for-bit its write)."""
        k_n, _ = _normalize(keys, self.eps)
        sim = torch.matmul(k_n, self._normalized_memory(memory).transpose(-1, -2))
        w = torch.softmax(strengths.unsqueeze(-1) * sim, dim=-1)  # (B, W, N)
        if w.shape[1] == 1:
            wt = w.transpose(-1, -2)  # (B, N, 1): outer products by broadcasting
            memory.mul_(1 - wt * erase)
            memory.add_(wt * add)
        else:
            keep = torch.prod(1 - w.unsqueeze(-1) * erase.unsqueeze(-2), dim=1)
            memory.mul_(keep).add_(torch.matmul(w.transpose(-1, -2), add))
        usage.mul_(self.decay).add_(w[:, 0] if w.shape[1] == 1 else w.sum(dim=1))

    # ------------------------------------------------------------ bookkeeping
    @property
    def memory_in_graph(self):
        """True when a pending backward may hold the current memory tensor: the
        next write then goes to a fresh copy instead of writing in place."""
        return self._memory_in_graph

    def detach_memory(self):
        """Truncates backpropagation through time: later losses stop at this memory."""
        self.memory = self.memory.detach()
        self._memory_in_graph = False

    def reset(self):
        """Zeroes memory and usage (fresh tensors: a pending backward keeps the old ones)."""
        self.memory = torch.zeros_like(self.memory, requires_grad=False)
        self.usage = torch.zeros_like(self.usage)
        self._memory_in_graph = False

    def snapshot(self):
        """(memory, usage) copies, for `restore`."""
        return self.memory.detach().clone(), self.usage.detach().clone()

    def restore(self, state):
        memory, usage = state
        self.memory = memory.clone()
        self.usage = usage.clone()
        self._memory_in_graph = False

    def extra_repr(self):
        b = "" if self.batch_size is None else f"batch_size={self.batch_size}, "
        return (f"{b}memory_size={self.memory_size}, memory_dim={self.memory_dim}, "
                f"num_read_heads={self.num_read_heads}, backend={self.backend!r}, "
                f"differentiable={self.differentiable}"
                + ("" if self.write_mode == "content" else f", write_mode={self.write_mode!r}"))
