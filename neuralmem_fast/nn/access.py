"""MemoryAccess: the DNC's memory access (Graves et al. 2016) on the fused ops.

Design
------
One step, in the order of DeepMind's `dnc/access.py` (temporal links left out):

  1. usage:       u = (u + w - u*w) * psi,  w = 1 - prod_w(1 - w^w_{t-1}) (the
                  previous write weights, detached as in DeepMind's code),
                  retention psi = prod_r(1 - f_r * w^r_{t-1});
  2. write:       w^w = g_w * (g_a * a + (1 - g_a) * c), c the content weights
                  of the write keys over the memory before the write
                  (`content_addressing`), a the allocation weighting;
  3. erase-add:   M = M * prod_w(1 - w^w e) + sum_w w^w v (`memory_write`);
  4. read:        w^r = content weights of the read keys over the new memory
                  (`content_addressing`), reads = w^r M (`memory_read`).
                  3 and 4 run as one op, `ops.dnc.write_read`, native on the CPU.
                  With the DNC's own rules (no ablation option, exact sort, usage_grad
                  False) on the CPU, 2-4 are one autograd node, `ops.dnc.access_step`,
                  whose backward adds the write addressing's memory gradient to the
                  write's in one pass.

Gradients flow through every step (nothing in place), except where the
previous write weights enter the usage: DeepMind detaches them there, and
so does this module unless `usage_grad=True`.

Allocation. a_{phi_j} = (1 - u_{phi_j}) prod_{i<j} u_{phi_i} over the usage
sorted ascending (phi); the sort's permutation carries no gradient, the
sorted values do, as in the DNC. Usage enters as eps + (1 - eps) u with
eps = 1e-6 (DeepMind's `_EPSILON`). With several write heads the heads
allocate one after another, each raising the usage of what it took by
(1 - u) * g_w g_a a before the next one sorts (DeepMind's
`write_allocation_weights`), so two heads never take the same free slot.

Top-k allocation. An exact sort is O(N log N) per step. With
`alloc_topk=k`, only the k least-used slots are found (`torch.topk`) and the
formula is applied over them; the slots beyond receive nothing. What they
would receive sums to at most prod_{i<=k} u_{phi_i} (the mass left after the
k first), so the top-k result is used when that product is below
`alloc_tol` for every memory of the batch, and the exact sort otherwise.

Initial state. Memory, usage, read and write weights all start at zero. A
zero memory addresses every slot alike by content (the tutorial's slots stay
identical for that reason), but allocation does not: with equal usage the
sort puts one slot first and a = 1 there, about eps (1e-6) at the next and
less after, so the first write lands in one slot and each later one in the
next free slot. Allocation breaks the symmetry by itself; no random
initial memory is needed.

Ablations (docs/sparse.md). `read_topk`, `write_topk`, `write_rule=
"previous_reads"` and `allocation="lru"` make the dense access behave as the
sparse one in one respect at a time: reads or content writes restricted to
K slots, Sparse Access Memory's write to the previous reads, and the least
recently used slot in place of the usage allocation. With "lru" the usage
field holds each slot's last-access stamp: the slots of the restricted
reads and writes and the allocated slot are accessed (the sparse access's
rule, every candidate counts), and the slot with the oldest stamp (the
lowest index among equals) is allocated. Free gates are then unused.

Inputs. `forward(interface, state)` takes an `AccessInterface` of tensors (a
user may build one) and checks it: shapes, dtypes, devices, finite values,
gates and erase vectors in [0, 1], strengths >= 0; errors name the field.
Nothing is written in place, so a step that raises leaves the caller's state
as it was. `parse_interface(flat)` maps a (B, interface_size) tensor to an
interface with the DNC's nonlinearities (oneplus strengths, sigmoid gates and
erase vectors); what it returns is in range by construction, and
`forward(..., validate=False)` skips the checks (and their host syncs).
"""
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..config import DEFAULT_SPARSE_EPS
from ..ops.dnc import ALLOC_EPS, allocation, write_allocation_weights, write_weights_ref
from ..ops.dnc import access_step, has_access_step_kernels, write_read
from ..ops.dnc import write_weights as fused_write_weights
from .sparse_access import _gated

# allocation, write_allocation_weights and ALLOC_EPS live in ops/dnc.py with the fused op; re-exported here.

__all__ = ["AccessInterface", "AccessState", "MemoryAccess", "allocation", "write_allocation_weights"]


class AccessState(NamedTuple):
    """The access's recurrent state: memory (B,N,D), usage (B,N),
    read weights (B,R,N), write weights (B,W,N)."""

    memory: torch.Tensor
    usage: torch.Tensor
    read_weights: torch.Tensor
    write_weights: torch.Tensor


class AccessInterface(NamedTuple):
    """One step's interface: keys (B,H,D), strengths (B,H), erase and write
    vectors (B,W,D), free gates (B,R), allocation and write gates (B,W)."""

    read_keys: torch.Tensor
    read_strengths: torch.Tensor
    write_keys: torch.Tensor
    write_strengths: torch.Tensor
    erase_vectors: torch.Tensor
    write_vectors: torch.Tensor
    free_gates: torch.Tensor
    allocation_gates: torch.Tensor
    write_gates: torch.Tensor


def _restrict_topk(weights, k):
    """(weights, indices): softmax weights (..., N) restricted to their k largest entries (indices
    (..., k)) and renormalised, the softmax over those k logits; the gradient reaches those k only."""
    vals, idx = torch.topk(weights, k, dim=-1)
    return torch.zeros_like(weights).scatter(-1, idx, vals / vals.sum(-1, keepdim=True)), idx


@torch.no_grad()
def _lru_stamps(stamp, oldest, write_idx, read_idx):
    """allocation="lru": the access stamps (B,N) after a step that allocated `oldest` (B,1), wrote with
    restricted content weights on write_idx (B,W,K) (None for the previous-reads write: those slots were
    read at the previous step, already the most recent) and read read_idx (B,R,K), after the write."""
    B = stamp.shape[0]
    written = torch.zeros_like(stamp, dtype=torch.bool).scatter_(1, oldest, True)
    if write_idx is not None:
        written.scatter_(1, write_idx.reshape(B, -1), True)
    read = torch.zeros_like(written).scatter_(1, read_idx.reshape(B, -1), True)
    base = stamp.amax(-1, keepdim=True) + 1
    return torch.where(read, base + 1, torch.where(written, base, stamp))


def _fail(name, msg):
    raise ValueError(f"{name}: {msg}")


class MemoryAccess(nn.Module):
    """The DNC's memory access for B memories of N slots of width D, with R
    read heads and W write heads (no temporal links; see the module doc).

    Args:
        memory_size: N, the number of slots (>= num_reads and >= num_writes).
        word_size: D, the slot width.
        num_reads: R read heads.
        num_writes: W write heads.
        alloc_topk: None for the exact sort; k for the top-k allocation.
        alloc_tol: the top-k result is used when the product of the k
            smallest usages is below this in every row (bounds its error).
        backend: backend of the memory ops ("auto", "cpu", "cuda", "triton", "torch").
        usage_grad: False (DeepMind's choice) detaches the previous write
            weights where they enter the usage; True keeps that path, so the
            step is differentiable in every input exactly (gradcheck).
        sparse_k: None for the dense access; K for sparse access (nn/sparse_access.py):
            each read head reads K candidate slots, writes go to the previous
            reads (or, with write_rule="content", to the write keys' K
            candidates) and the least recently used slot, a step costs O(K D) and the
            backward stores O(K D) per step whatever N. The state is then a
            SparseAccessState.
        index: with sparse_k, how the K candidates are found: "exact" (one
            pass over the memory), "rows" or "auto" (exact over the rows
            written), "faiss" (an approximate index that follows the writes)
            or an index object.
        sparse_eps: with sparse_k, the floor of the row and key norms in the
            sparse cosine, k.m / (max(|k|, eps) max(|m|, eps)). The default
            1e-3 is the floor of DeepMind's DNC (sqrt(|m|^2 + 1e-6)); it keeps
            rows that writes barely touched from scoring like the rows they
            are faint copies of (nn/sparse_access.py, "Faint rows").
        read_topk: None (the DNC's read) or K: each dense read head's weights
            restricted to its K best slots by content, the softmax over those
            K logits (top-K of the weights, renormalised; the gradient reaches
            those K entries only), as a sparse read's. An ablation: the dense
            write (content and allocation) with the sparse access's read, to
            tell the two apart (docs/sparse.md). Not with sparse_k.
        write_rule: "content" (the DNC's: the write key's content weights,
            interpolated with the allocation) or "previous_reads" (Sparse
            Access Memory's rule: the previous step's read weights, averaged
            over the read heads, in place of the content weights; the write
            keys and strengths are then unused). None (the default) is
            "content" for the dense access and "previous_reads" with
            sparse_k. On the dense access "previous_reads" is an ablation, as
            read_topk; with sparse_k, "content" writes to the write keys' own
            K candidates, found as the reads' are (docs/sparse.md).
        write_topk: None (the DNC's write) or K: each dense write head's
            content weights restricted to its K best slots and renormalised,
            as read_topk does for the reads, before the interpolation with the
            allocation. An ablation: the sparse access's content-keyed write
            (write_rule="content" with sparse_k) on the dense access. Only
            with the dense access's content rule.
        allocation: "usage" (the DNC's allocation by usage and free gates)
            or "lru": the least recently used slot, as the sparse access
            allocates (see the module doc); an ablation that needs read_topk
            and a restricted write (write_topk or write_rule="previous_reads"),
            since a dense read or write accesses every slot. Dense only.

    `forward(interface, state)` returns (reads (B,R,D), new AccessState).
    The module has no parameters: the controller produces the interface.
    """

    def __init__(self, memory_size, word_size, num_reads, num_writes=1, alloc_topk=None, alloc_tol=1e-6,
                 backend="auto", usage_grad=False, sparse_k=None, index="auto",
                 sparse_eps=DEFAULT_SPARSE_EPS, read_topk=None, write_rule=None, write_topk=None, allocation="usage"):
        super().__init__()
        for name, v in (("memory_size", memory_size), ("word_size", word_size), ("num_reads", num_reads),
                        ("num_writes", num_writes)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if memory_size < max(num_reads, num_writes):
            raise ValueError(f"memory_size ({memory_size}) must be at least the number of heads "
                             f"(num_reads={num_reads}, num_writes={num_writes})")
        if alloc_topk is not None and (not isinstance(alloc_topk, int) or alloc_topk < 1):
            raise ValueError(f"alloc_topk must be None or a positive int, got {alloc_topk!r}")
        if not (0.0 < alloc_tol < 1.0):
            raise ValueError(f"alloc_tol must be in (0, 1), got {alloc_tol!r}")
        self.memory_size, self.word_size = memory_size, word_size
        self.num_reads, self.num_writes = num_reads, num_writes
        self.alloc_topk, self.alloc_tol, self.backend = alloc_topk, alloc_tol, backend
        self.usage_grad = bool(usage_grad)
        R, W, D = num_reads, num_writes, word_size
        # Flat layout: identity | oneplus | sigmoid blocks, each contiguous,
        # so that parse_interface applies one nonlinearity per block.
        self._linear_sizes = [R * D, W * D, W * D]          # read keys, write keys, write vectors
        self._oneplus_sizes = [R, W]                        # read, write strengths
        self._sigmoid_sizes = [W * D, R, W, W]              # erase, free, allocation, write gates
        self.interface_size = sum(self._linear_sizes) + sum(self._oneplus_sizes) + sum(self._sigmoid_sizes)
        for name, k in (("read_topk", read_topk), ("write_topk", write_topk)):
            if k is not None and (not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= memory_size):
                raise ValueError(f"{name} must be None or an int in [1, memory_size={memory_size}], got {k!r}")
        if read_topk is not None:
            if sparse_k is not None:
                raise ValueError("read_topk is for the dense access; sparse_k already reads K slots per head")
        if write_rule is None:
            write_rule = "content" if sparse_k is None else "previous_reads"
        if write_rule not in ("content", "previous_reads"):
            raise ValueError(f"write_rule must be None, 'content' or 'previous_reads', got {write_rule!r}")
        if write_topk is not None and (sparse_k is not None or write_rule != "content"):
            raise ValueError("write_topk is for the dense access's content write (write_rule='content', "
                             "no sparse_k)")
        if allocation not in ("usage", "lru"):
            raise ValueError(f"allocation must be 'usage' or 'lru', got {allocation!r}")
        if allocation == "lru" and (sparse_k is not None or read_topk is None
                                    or (write_topk is None and write_rule != "previous_reads")):
            raise ValueError("allocation='lru' is an ablation of the dense access: it needs read_topk and a "
                             "restricted write (write_topk or write_rule='previous_reads'), no sparse_k")
        self.read_topk, self.write_rule, self.write_topk = read_topk, write_rule, write_topk
        self.allocation = allocation
        self.sparse_k = sparse_k
        self.sparse = None
        if sparse_k is not None:
            from .sparse_access import SparseAccess

            self.sparse = SparseAccess(self, sparse_k, index, eps=sparse_eps, write_rule=write_rule)

    def extra_repr(self):
        extra = f", sparse_k={self.sparse_k}" if self.sparse is not None else ""
        extra += f", read_topk={self.read_topk}" if self.read_topk is not None else ""
        extra += f", write_topk={self.write_topk}" if self.write_topk is not None else ""
        extra += f", allocation={self.allocation!r}" if self.allocation != "usage" else ""
        default_rule = "content" if self.sparse is None else "previous_reads"
        extra += f", write_rule={self.write_rule!r}" if self.write_rule != default_rule else ""
        return (f"memory_size={self.memory_size}, word_size={self.word_size}, num_reads={self.num_reads}, "
                f"num_writes={self.num_writes}, alloc_topk={self.alloc_topk}, alloc_tol={self.alloc_tol}{extra}")

    def initial_state(self, batch_size, dtype=torch.float32, device=None):
        """All zeros (see the module doc for why that is enough)."""
        if self.sparse is not None:
            return self.sparse.initial_state(batch_size, dtype, device)
        B, N, D, R, W = batch_size, self.memory_size, self.word_size, self.num_reads, self.num_writes
        z = lambda *s: torch.zeros(*s, dtype=dtype, device=device)  # noqa: E731
        return AccessState(z(B, N, D), z(B, N), z(B, R, N), z(B, W, N))

    def parse_interface(self, flat):
        """(B, interface_size) -> AccessInterface, with oneplus strengths and sigmoid gates."""
        if flat.dim() != 2 or flat.shape[1] != self.interface_size:
            raise ValueError(f"interface must be (B, {self.interface_size}), got {tuple(flat.shape)}")
        B, R, W, D = flat.shape[0], self.num_reads, self.num_writes, self.word_size
        n_lin, n_one = sum(self._linear_sizes), sum(self._oneplus_sizes)
        lin = flat[:, :n_lin]
        one = 1 + F.softplus(flat[:, n_lin:n_lin + n_one])
        sig = torch.sigmoid(flat[:, n_lin + n_one:])
        rk, wk, wv = lin.split(self._linear_sizes, dim=1)
        rs, ws = one.split(self._oneplus_sizes, dim=1)
        er, fg, ag, wg = sig.split(self._sigmoid_sizes, dim=1)
        return AccessInterface(rk.reshape(B, R, D), rs, wk.reshape(B, W, D), ws, er.reshape(B, W, D),
                               wv.reshape(B, W, D), fg, ag, wg)

    # ------------------------------------------------------------------ checks
    def check_state(self, state, batch_size=None):
        """Shapes, dtype and device of an AccessState; returns its batch size."""
        if self.sparse is not None:
            return self.sparse.check_state(state, batch_size)
        if not isinstance(state, tuple) or len(state) != 4:
            raise TypeError(f"state must be an AccessState (memory, usage, read_weights, write_weights), "
                            f"got {type(state).__name__}")
        memory = state[0]
        if not isinstance(memory, torch.Tensor) or memory.dim() != 3:
            _fail("state.memory", f"expected a (B, N, D) tensor, got {getattr(memory, 'shape', type(memory))}")
        B = memory.shape[0] if batch_size is None else batch_size
        N, D, R, W = self.memory_size, self.word_size, self.num_reads, self.num_writes
        want = {"memory": (B, N, D), "usage": (B, N), "read_weights": (B, R, N), "write_weights": (B, W, N)}
        for name, t in zip(AccessState._fields, state):
            if not isinstance(t, torch.Tensor):
                _fail(f"state.{name}", f"expected a tensor, got {type(t).__name__}")
            if tuple(t.shape) != want[name]:
                _fail(f"state.{name}", f"expected shape {want[name]}, got {tuple(t.shape)}")
            if not t.is_floating_point() or t.dtype != memory.dtype or t.device != memory.device:
                _fail(f"state.{name}", f"expected {memory.dtype} on {memory.device}, got {t.dtype} on {t.device}")
        return B

    def check_interface(self, interface, state):
        """Shapes, finiteness and ranges of a user-built interface; errors name the field."""
        if not isinstance(interface, AccessInterface):
            if isinstance(interface, dict):
                interface = AccessInterface(**interface)
            else:
                raise TypeError(f"interface must be an AccessInterface, got {type(interface).__name__}")
        B = self.check_state(state)
        memory = state.memory
        R, W, D = self.num_reads, self.num_writes, self.word_size
        want = {"read_keys": (B, R, D), "read_strengths": (B, R), "write_keys": (B, W, D),
                "write_strengths": (B, W), "erase_vectors": (B, W, D), "write_vectors": (B, W, D),
                "free_gates": (B, R), "allocation_gates": (B, W), "write_gates": (B, W)}
        unit = ("erase_vectors", "free_gates", "allocation_gates", "write_gates")
        for name, t in zip(AccessInterface._fields, interface):
            if not isinstance(t, torch.Tensor):
                _fail(name, f"expected a tensor, got {type(t).__name__}")
            if tuple(t.shape) != want[name]:
                _fail(name, f"expected shape {want[name]}, got {tuple(t.shape)}")
            if t.dtype != memory.dtype or t.device != memory.device:
                _fail(name, f"expected {memory.dtype} on {memory.device} (the memory's), got {t.dtype} on {t.device}")
            d = t.detach()
            if not bool(torch.isfinite(d).all()):
                _fail(name, "contains NaN or inf")
            if name in unit and not bool(((d >= 0) & (d <= 1)).all()):
                _fail(name, f"must lie in [0, 1], got values in [{d.min().item():.4g}, {d.max().item():.4g}]")
            if name.endswith("strengths") and not bool((d >= 0).all()):
                _fail(name, f"must be >= 0, got a minimum of {d.min().item():.4g}")
        return interface

    # ------------------------------------------------------------------ step
    def _one_node(self, memory):
        """Whether this step runs as `access_step`: the DNC's own rules (content write, usage allocation by
        the exact sort, no ablation, previous write weights detached) on float32/float64 CPU tensors with
        the native ops built; anything else runs the ops one by one below."""
        return (self.write_rule == "content" and self.write_topk is None and self.read_topk is None
                and self.allocation == "usage" and not self.usage_grad and self.alloc_topk is None
                and self.backend in ("auto", "cpu") and memory.device.type == "cpu"
                and memory.dtype in (torch.float32, torch.float64) and has_access_step_kernels())

    def forward(self, interface, state, validate=True):
        """One access step: returns (reads (B,R,D), new AccessState)."""
        if validate:
            interface = self.check_interface(interface, state)
        if self.sparse is not None:
            return self.sparse.step(interface, state)
        memory, usage, prev_rw, prev_ww = state
        be = self.backend
        if self._one_node(memory):  # the whole step as one autograd node (ops/dnc.py, access_step)
            i = interface
            memory, usage, write_weights, read_weights, reads = access_step(
                memory, usage, prev_rw, prev_ww, i.write_keys, i.write_strengths, i.free_gates, i.write_gates,
                i.allocation_gates, i.erase_vectors, i.write_vectors, i.read_keys, i.read_strengths)
            return reads, AccessState(memory, usage, read_weights, write_weights)
        # 1.-2. usage after the previous write (weights detached unless usage_grad, as in DeepMind's code)
        # and the frees; write weights from the content of the memory before the write and the allocation.
        write_idx = None
        if self.write_rule == "content":
            content = ops.content_addressing(memory, interface.write_keys, interface.write_strengths, backend=be)
            if self.write_topk is not None:
                content, write_idx = _restrict_topk(content, self.write_topk)
        else:
            content = prev_rw.mean(dim=1, keepdim=True).expand(-1, self.num_writes, -1).contiguous()
        gates = (interface.write_gates, interface.allocation_gates)
        if self.allocation == "lru":  # the least recently used slot; the usage field holds access stamps
            oldest = usage.argmin(-1, keepdim=True)                                    # (B,1), first of equals
            write_weights = _gated(content, torch.zeros_like(usage).scatter(1, oldest, 1.0), *gates)
        elif self.usage_grad or self.alloc_topk is not None or be not in ("auto", "cpu"):
            # The reference's PyTorch ops: the gradient through the previous write weights, top-k
            # allocation, and the devices and backends that the fused op has no kernel for.
            ww = prev_ww if self.usage_grad else prev_ww.detach()
            usage, write_weights = write_weights_ref(usage, ww, interface.free_gates, prev_rw, content, *gates,
                                                     topk=self.alloc_topk, tol=self.alloc_tol)
        else:  # one op (float32/64 on the CPU; the reference elsewhere), prev_ww without a gradient
            usage, write_weights = fused_write_weights(usage, prev_ww, interface.free_gates, prev_rw, content,
                                                       *gates)
        # 3. erase-add; 4. read the new memory.
        if self.read_topk is None:  # one op on the CPU (ops/dnc.py), the three ops elsewhere
            memory, read_weights, reads = write_read(memory, write_weights, interface.erase_vectors,
                                                     interface.write_vectors, interface.read_keys,
                                                     interface.read_strengths, backend=be)
        else:
            memory = ops.memory_write(memory, write_weights, interface.erase_vectors, interface.write_vectors,
                                      backend=be)
            read_weights = ops.content_addressing(memory, interface.read_keys, interface.read_strengths, backend=be)
            read_weights, read_idx = _restrict_topk(read_weights, self.read_topk)
            reads = ops.memory_read(memory, read_weights, backend=be)
        if self.allocation == "lru":
            usage = _lru_stamps(usage, oldest, write_idx, read_idx)
        return reads, AccessState(memory, usage, read_weights, write_weights)
