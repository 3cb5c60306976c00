"""MemoryCore: a DNC-class recurrent core, an LSTM controller plus MemoryAccess.

Per step (DeepMind's `dnc/dnc.py`): the controller reads [x_t, reads_{t-1}];
a linear layer of its output gives the access interface (oneplus strengths,
sigmoid gates and erase vectors, `MemoryAccess.parse_interface`); the access
writes and reads; y_t = Linear([h_t, reads_t]).

`forward` runs `step` over the sequence, whose state is a flat NamedTuple of
tensors (`CoreState`). Where the access runs the DNC's own rules on float32/64
CPU tensors without checkpointing (`runs_as_one_node`), the whole sequence is
one autograd node with a hand-written backward instead (nn/core_sequence.py):
the same formulas, without autograd's cost per op. Training through T steps keeps every step's memory
for the backward (T copies of B*N*D values) unless the steps run through
`checkpointed_scan` (nn/scan.py), which keeps the state at the start of each
segment of ceil(sqrt(T)) steps and recomputes the segment in the backward:
about 2*sqrt(T) copies, for one more forward of every step. `checkpoint`
chooses: True, False, or "auto" (the default): checkpointed when autograd
records and the T copies would exceed `CHECKPOINT_AUTO_BYTES` (256 MiB).
Nothing is written in place: training runs through every write, and the
gradient of a loss at step t reaches the write heads of every earlier step.
Device-agnostic: the ops choose their kernels for the tensors' device.

Sparse access. `sparse_k=K` gives the access of nn/sparse_access.py: K candidate slots per read head,
writes to the previous reads and the least recently used slot, O(K D) per step and O(T K D) kept for
the backward whatever N, so no checkpointing. Its state (`SparseCoreState`) holds the memory as a
buffer updated in place. `forward(x)` without a state reuses the core's own buffer, zeroing the rows the
previous call wrote (O(rows written), not O(N)); pass `state=core.initial_state(B)` for a memory of
your own.
"""
from typing import NamedTuple

import torch
import torch.nn as nn

from ..config import DEFAULT_SPARSE_EPS
from .access import AccessState, MemoryAccess
from .core_sequence import applies as core_sequence_applies
from .core_sequence import core_sequence
from .scan import checkpointed_scan

# "auto" checkpoints when plain autograd would keep more than this many bytes of memory copies.
CHECKPOINT_AUTO_BYTES = 256 << 20

# forward(x) without a state keeps its zero initial state between calls up to this many bytes of memory.
_ZERO_STATE_BYTES = 4 << 20


def _check_finite(x):
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or inf")

__all__ = ["CoreState", "SparseCoreState", "MemoryCore"]


class CoreState(NamedTuple):
    """Controller state h, c (B,H); last reads (B,R,D); the access's state."""

    h: torch.Tensor
    c: torch.Tensor
    reads: torch.Tensor
    memory: torch.Tensor
    usage: torch.Tensor
    read_weights: torch.Tensor
    write_weights: torch.Tensor

    @property
    def access(self):
        return AccessState(self.memory, self.usage, self.read_weights, self.write_weights)


class SparseCoreState(NamedTuple):
    """Controller state h, c (B,H); last reads (B,R,D); the sparse access's state (SparseAccessState)."""

    h: torch.Tensor
    c: torch.Tensor
    reads: torch.Tensor
    access: object


class MemoryCore(nn.Module):
    """An LSTM controller with a DNC memory access, reads fed back.

    Args:
        input_size, output_size: per-step input and output widths.
        memory_size: N slots; word_size: D, the slot width.
        num_reads: R read heads; num_writes: W write heads.
        hidden_size: the LSTM's units.
        alloc_topk, alloc_tol: top-k allocation (see MemoryAccess); None: the exact sort.
        backend: backend of the memory ops.
        checkpoint: True, False or "auto" (see the module doc): backpropagation
            through the sequence in bounded memory by checkpointed segments.
        checkpoint_segment: steps per segment; None for ceil(sqrt(T)).
        sparse_k, index, sparse_eps: sparse access with K candidates per read
            head, the index that finds them and the norm floor of its cosine
            (see MemoryAccess and the module doc).
        read_topk: an ablation of the dense access: reads restricted to
            each head's K best slots (see MemoryAccess).
        write_rule: None (the DNC's content write on the dense access,
            Sparse Access Memory's previous-reads write with sparse_k),
            "content" or "previous_reads" (see MemoryAccess).
        write_topk, allocation: ablations of the dense access: the content
            write weights restricted to each write head's K best slots, and
            "lru" allocation, the least recently used slot (see MemoryAccess).

    `y, state = core(x, state=None)` on batch-first x (B, T, input_size);
    y is (B, T, output_size). `core.step(x_t, state)` is one step.
    """

    def __init__(self, input_size, output_size, memory_size, word_size, num_reads, num_writes=1, hidden_size=64,
                 alloc_topk=None, alloc_tol=1e-6, backend="auto", checkpoint="auto", checkpoint_segment=None,
                 sparse_k=None, index="auto", sparse_eps=DEFAULT_SPARSE_EPS, read_topk=None,
                 write_rule=None, write_topk=None, allocation="usage"):
        super().__init__()
        if checkpoint not in (True, False, "auto"):
            raise ValueError(f"checkpoint must be True, False or 'auto', got {checkpoint!r}")
        if checkpoint_segment is not None and (not isinstance(checkpoint_segment, int)
                                               or isinstance(checkpoint_segment, bool) or checkpoint_segment < 1):
            raise ValueError(f"checkpoint_segment must be None or a positive int, got {checkpoint_segment!r}")
        self.checkpoint, self.checkpoint_segment = checkpoint, checkpoint_segment
        for name, v in (("input_size", input_size), ("output_size", output_size), ("hidden_size", hidden_size)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.access = MemoryAccess(memory_size, word_size, num_reads, num_writes, alloc_topk, alloc_tol, backend,
                                   sparse_k=sparse_k, index=index, sparse_eps=sparse_eps, read_topk=read_topk,
                                   write_rule=write_rule, write_topk=write_topk,
                                   allocation=allocation)
        self._sparse_cache = None
        self._zero_cache = None  # (key, CoreState): see _zero_state
        self.input_size, self.output_size, self.hidden_size = input_size, output_size, hidden_size
        read_size = num_reads * word_size
        self.controller = nn.LSTMCell(input_size + read_size, hidden_size)
        self.interface = nn.Linear(hidden_size, self.access.interface_size)
        self.output = nn.Linear(hidden_size + read_size, output_size)

    def initial_state(self, batch_size, dtype=None, device=None):
        """Zeros throughout (MemoryAccess.initial_state says why that suffices)."""
        p = self.output.weight
        dtype = p.dtype if dtype is None else dtype
        device = p.device if device is None else device
        a = self.access
        h = torch.zeros(batch_size, self.hidden_size, dtype=dtype, device=device)
        reads = torch.zeros(batch_size, a.num_reads, a.word_size, dtype=dtype, device=device)
        if a.sparse is not None:
            return SparseCoreState(h, h.clone(), reads, a.initial_state(batch_size, dtype, device))
        return CoreState(h, h.clone(), reads, *a.initial_state(batch_size, dtype, device))

    def _zero_state(self, batch_size, dtype, device):
        """The dense initial state for `forward(x)` without one: `initial_state`'s zeros, kept between calls
        where the memory takes at most _ZERO_STATE_BYTES. Only the one-node path takes the kept tensors (it
        reads its inputs and never writes them; forward gives the other paths tensors of their own), and
        none of them reaches the caller: the final state is new tensors. Making them took 65 to 100 us of
        the caller's thread a training step at the dnc package's setting (seven tensors, a 512 KiB fill)."""
        key = (batch_size, dtype, device)
        bytes_ = batch_size * self.access.memory_size * self.access.word_size * torch.finfo(dtype).bits // 8
        if bytes_ > _ZERO_STATE_BYTES or torch.is_inference_mode_enabled():
            return self.initial_state(batch_size, dtype, device)
        cache = self.__dict__.get("_zero_cache")  # absent from cores pickled before it existed
        if cache is None or cache[0] != key:
            cache = self._zero_cache = (key, self.initial_state(batch_size, dtype, device))
        return cache[1]

    def __getstate__(self):
        """Pickling and deepcopy leave out the kept zero state (`_zero_state`), which is made again on use."""
        state = self.__dict__.copy()
        state["_zero_cache"] = None
        return state

    def _fresh_sparse_state(self, batch_size, dtype, device):
        """The core's own sparse buffer, reset in O(rows written), or a new one for another shape."""
        st = self._sparse_cache
        m = None if st is None else st.access.memory
        if m is None or m.shape[0] != batch_size or m.dtype != dtype or m.device != device:
            st = self.initial_state(batch_size, dtype, device)
        else:
            z = torch.zeros_like(st.h)
            st = SparseCoreState(z, z.clone(), torch.zeros_like(st.reads), self.access.sparse.reset(st.access))
        self._sparse_cache = st
        return st

    def check_state(self, state, batch_size):
        if self.access.sparse is not None:
            if not isinstance(state, SparseCoreState):
                raise TypeError(f"state must be a SparseCoreState or None, got {type(state).__name__}")
        elif not isinstance(state, CoreState):
            raise TypeError(f"state must be a CoreState or None, got {type(state).__name__}")
        B, H, R, D = batch_size, self.hidden_size, self.access.num_reads, self.access.word_size
        for name, t, shape in (("h", state.h, (B, H)), ("c", state.c, (B, H)), ("reads", state.reads, (B, R, D))):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
                raise ValueError(f"state.{name}: expected shape {shape}, got {tuple(getattr(t, 'shape', ()))}")
        self.access.check_state(state.access, B)

    def step(self, x_t, state):
        """One step: x_t (B, input_size) -> (y_t (B, output_size), new CoreState). No input checks."""
        B = x_t.shape[0]
        h, c = self.controller(torch.cat([x_t, state.reads.reshape(B, -1)], dim=1), (state.h, state.c))
        iface = self.access.parse_interface(self.interface(h))
        reads, acc = self.access(iface, state.access, validate=False)
        y = self.output(torch.cat([h, reads.reshape(B, -1)], dim=1))
        if self.access.sparse is not None:
            return y, SparseCoreState(h, c, reads, acc)
        return y, CoreState(h, c, reads, *acc)

    def forward(self, x, state=None):
        """x (B, T, input_size) -> (y (B, T, output_size), final CoreState)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[2] != self.input_size:
            raise ValueError(f"x must be (B, T, {self.input_size}) batch-first, got "
                             f"{tuple(getattr(x, 'shape', ())) or type(x).__name__}")
        if x.shape[0] < 1 or x.shape[1] < 1:
            raise ValueError(f"x must have B >= 1 and T >= 1, got {tuple(x.shape)}")
        p = self.output.weight
        if x.dtype != p.dtype or x.device != p.device:
            raise ValueError(f"x must be {p.dtype} on {p.device} (the parameters'), got {x.dtype} on {x.device}")
        fresh, sparse = state is None, self.access.sparse is not None
        if fresh and sparse:
            _check_finite(x)  # before the reset of the core's own buffer
            state = self._fresh_sparse_state(x.shape[0], x.dtype, x.device)
        elif fresh:
            state = self._zero_state(x.shape[0], x.dtype, x.device)
        else:
            self.check_state(state, x.shape[0])
        if self.runs_as_one_node(x, state):  # the whole sequence as one node (nn/core_sequence.py)
            # x's finiteness is checked by the node itself (csrc/dnc/core_sequence.cpp, check_finite)
            y, final = core_sequence(self, x, state)
            return y, CoreState(*final)
        if not (fresh and sparse):
            _check_finite(x)
        if fresh and not sparse:
            state = self.initial_state(x.shape[0])  # the other paths get tensors of their own
        if self.uses_checkpoint(x.shape[0], x.shape[1], x.dtype):
            ys, state = checkpointed_scan(self.step, state, x.transpose(0, 1), segment=self.checkpoint_segment)
            return ys.transpose(0, 1), state
        ys = []
        for t in range(x.shape[1]):
            y, state = self.step(x[:, t], state)
            ys.append(y)
        return torch.stack(ys, dim=1), state

    def runs_as_one_node(self, x, state):
        """Whether forward(x, state) runs the whole sequence as one autograd node (nn/core_sequence.py): the
        dense access with the DNC's own rules on float32/64 CPU tensors, no checkpointing, no hooks, and
        neither `step` nor the access's `forward` overridden."""
        return (type(self).step is MemoryCore.step and "step" not in self.__dict__
                and core_sequence_applies(self, x, state))

    def uses_checkpoint(self, batch_size, seq_len, dtype=torch.float32):
        """Whether forward() on (batch_size, seq_len) runs checkpointed segments now."""
        if self.access.sparse is not None:
            return False  # the sparse backward keeps O(T K D) already
        if self.checkpoint == "auto":
            a = self.access
            copies = seq_len * batch_size * a.memory_size * a.word_size * torch.finfo(dtype).bits // 8
            return torch.is_grad_enabled() and copies > CHECKPOINT_AUTO_BYTES
        return bool(self.checkpoint) and torch.is_grad_enabled()
