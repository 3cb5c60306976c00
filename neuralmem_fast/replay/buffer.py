"""PrioritizedReplayBuffer: prioritized experience replay on the sum tree.

Three layers:

* ``SumTree(capacity)``: the C++ tree of ``neuralmem_fast._C`` when the
  extension is built, else ``NumpySumTree``, a numpy twin with the same API
  and the same float64 arithmetic in the same order (so both return the same
  indices bit for bit). Leaves are priorities already raised to alpha; a
  parent (fan-out 8: one cache line of children) is always recomputed from its
  children, so sums never drift; a min
  tree of the positive leaves gives the largest possible importance weight.
  Batch calls release the GIL and hold the tree's own lock.

* ``PrioritizedReplayBuffer``: preallocated ring storage (one tensor per
  field, on any device) for items that are a tensor, a tuple or a dict of
  tensors. ``sample`` draws with replacement (optionally stratified) and
  returns ``(batch, indices, weights)`` with weights ``(N P(i))^-beta``
  divided by the largest possible one, ``(N min P)^-beta``, taken from the
  min tree. Each slot carries a write counter; ``update_priorities`` for a
  slot that has been overwritten since it was last sampled is dropped, so a
  late TD-error never lands on the item that replaced its own.

* ``ExperienceReplay``: the tutorial's class (same constructor, ``push``,
  ``sample`` without replacement with weights normalised by the batch
  maximum, ``buffer``/``priorities`` of deque-like length) on the sum tree,
  plus ``update_priorities``.

Every public method checks its whole input before it changes anything: a
NaN/inf/negative priority, an index out of range, indices and priorities of
different shapes, an item whose structure differs from the first one, or a
field whose dtype the storage cannot hold without changing values (float64
into float32 storage) raise, and the buffer keeps what it had.
"""

from __future__ import annotations

import math
import numbers
import threading
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from .._ext import _C

from ._checks import (_as_float_array, _as_index_array, _check_pairing, _check_saved_capacity, _check_values,
                      _fast_float, _fast_index, _saved_cursor)
from ._rng import restored_rng, rng_state
from .sum_tree import SumTree
from .storage import _field_name, _flatten, _generation_counters, _holds_every_value, _packed_storage, _unflatten


class PrioritizedReplayBuffer:
    """Prioritized replay with preallocated ring storage and a C++ sum tree.

    Args:
        capacity: number of slots (>= 1); the oldest item is overwritten first.
        alpha: priority exponent, applied once when a priority is stored:
            leaf = (priority + eps) ** alpha.
        beta: default importance-sampling exponent of ``sample``.
        eps: added to every priority so that no item becomes unreachable.
        device: where the item storage lives (and where batches and weights
            are returned). Indices are CPU int64 tensors.
        stratified: default for ``sample``: one draw per equal-mass stratum
            instead of independent draws.
        generator: numpy Generator (or an int seed) for the draws; by default
            one seeded from torch's global RNG when the buffer is built.
        backend: sum tree backend, "auto" | "cpu" | "numpy".
    """

    def __init__(
        self,
        capacity: int,
        alpha: float = 0.6,
        beta: float = 0.4,
        eps: float = 1e-6,
        device="cpu",
        stratified: bool = False,
        generator=None,
        backend: str = "auto",
    ):
        if isinstance(capacity, bool) or not isinstance(capacity, numbers.Integral) or capacity < 1:
            raise ValueError(f"PrioritizedReplayBuffer: capacity must be an integer >= 1, got {capacity!r}")
        for name, v in (("alpha", alpha), ("beta", beta), ("eps", eps)):
            if not (isinstance(v, numbers.Real) and math.isfinite(v) and v >= 0):
                raise ValueError(f"PrioritizedReplayBuffer: {name} must be a finite number >= 0, got {v!r}")
        self.capacity = int(capacity)
        self.alpha, self.beta, self.eps = float(alpha), float(beta), float(eps)
        self.device = torch.device(device)
        self.stratified = bool(stratified)
        if generator is None:
            # Seeded from torch's RNG, so torch.manual_seed makes runs repeatable.
            generator = np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))
        elif isinstance(generator, numbers.Integral):
            generator = np.random.default_rng(int(generator))
        self.generator = generator
        self._tree = SumTree(self.capacity, backend)
        self._native_gather = _C is not None and hasattr(_C, "gather_rows") and self.device.type == "cpu"
        # The C++ tree draws and gathers in one call; the numpy twin cannot.
        self._native_sample = self._native_gather and hasattr(self._tree, "sample_rows")
        self._kind: Optional[str] = None
        self._keys = None
        self._specs: Optional[List[Tuple[torch.Size, torch.dtype]]] = None
        self._storage: Optional[List[torch.Tensor]] = None
        self._pos = 0
        self._size = 0
        # The largest priority seen, in an array that the tree's
        # update_priorities raises in place (no result tuple to build).
        self._max_seen = np.ones(1)
        # Per-slot write counter, and its value when the slot was last sampled
        # (-1: never sampled). An update is stale when they differ.
        self._gen, self._sampled_gen = _generation_counters(self.capacity)
        self._lock = threading.RLock()

    # -- size and repr -----------------------------------------------------
    def __len__(self) -> int:
        return self._size

    def __repr__(self) -> str:
        return (
            f"PrioritizedReplayBuffer(capacity={self.capacity}, size={self._size}, alpha={self.alpha}, "
            f"beta={self.beta}, eps={self.eps}, device={self.device}, tree={type(self._tree).__name__})"
        )

    @property
    def tree(self):
        """The underlying sum tree (leaves are (priority + eps) ** alpha)."""
        return self._tree

    @property
    def max_priority(self) -> float:
        """The largest priority seen so far (before alpha); the default for new items."""
        return float(self._max_seen[0])

    # -- writing -----------------------------------------------------------
    def _check_batch(self, kind, keys, leaves, what: str) -> int:
        """Validates a batch against the stored structure; returns its length."""
        if self._kind is not None:
            if kind != self._kind or keys != self._keys:
                raise ValueError(
                    f"{what}: the item structure differs from the first item: expected "
                    f"{self._describe(self._kind, self._keys)}, got {self._describe(kind, keys)}"
                )
        n = None
        for j, x in enumerate(leaves):
            if x.dim() == 0:
                raise ValueError(f"{what}: {_field_name(kind, keys, j)} needs a leading batch dimension")
            if n is None:
                n = x.shape[0]
            elif x.shape[0] != n:
                raise ValueError(
                    f"{what}: every field needs the same batch size, {_field_name(kind, keys, 0)} has {n} "
                    f"and {_field_name(kind, keys, j)} has {x.shape[0]}"
                )
            if self._specs is not None:
                shape, dtype = self._specs[j]
                if x.shape[1:] != shape:
                    raise ValueError(
                        f"{what}: {_field_name(kind, keys, j)} must have shape (n, {', '.join(map(str, shape))}) "
                        f"like the first item, got {tuple(x.shape)}"
                    )
                if x.dtype != dtype and not _holds_every_value(x.dtype, dtype):
                    # A silent cast (float64 into float32, int64 into float32) would
                    # store other values than the ones given.
                    raise TypeError(
                        f"{what}: {_field_name(kind, keys, j)} has dtype {x.dtype}, but the buffer stores {dtype} "
                        f"there (set by the first item), which cannot hold every {x.dtype} value; nothing was "
                        f"stored. Convert it first (.to({dtype})) if the rounding is intended"
                    )
        return int(n)

    @staticmethod
    def _describe(kind, keys) -> str:
        if kind == "dict":
            return f"a dict with keys {list(keys)}"
        if kind == "tuple":
            return f"a tuple of {keys} tensors"
        return "a tensor"

    def _priorities_for(self, priorities, n: int, what: str) -> np.ndarray:
        if priorities is None:
            return np.full(n, self._max_seen[0], dtype=np.float64)
        p = _as_float_array(priorities, what, "priorities")
        if p.size == 1 and n != 1 and np.ndim(priorities) == 0:
            p = np.full(n, p[0])
        if p.size != n:
            raise ValueError(f"{what}: `priorities` must have one value per item ({n}), got {p.size}")
        _check_values(p, what, "priorities")
        return p

    def add(self, item, priority: Optional[float] = None) -> int:
        """Stores one item (tensor, tuple or dict of tensors); returns its slot.

        The first item fixes the structure, shapes and dtypes. A later field
        of another dtype is stored only when that dtype's every value is one
        of the stored dtype (float32 into float64 storage, int32 into int64,
        bool into anything); otherwise (float64 into float32, int64 into
        float32) it raises TypeError naming the field and both dtypes, and
        nothing is stored. Python numbers take the field's stored dtype, and
        raise where that would change them (an int that does not fit
        exactly, a float into integer storage).
        """
        kind, keys, leaves = _flatten(item, "PrioritizedReplayBuffer.add", (self._kind, self._keys, self._specs))
        slot = self._add_one(kind, keys, leaves, priority)
        if slot is not None:
            return slot
        leaves = [x.unsqueeze(0) for x in leaves]
        if priority is not None:
            priority = [priority] if np.ndim(priority) == 0 else priority
        return int(self._extend(kind, keys, leaves, priority, "PrioritizedReplayBuffer.add")[-1])

    def _add_one(self, kind, keys, leaves, priority) -> Optional[int]:
        """The common case of add() without the batch machinery: an item of the
        stored structure, shapes and dtypes, and a plain priority. Returns its
        slot, or None for anything else (add() then takes the general path,
        which checks and raises)."""
        specs = self._specs
        if specs is None or kind != self._kind or keys != self._keys or len(leaves) != len(specs):
            return None
        for x, (shape, dtype) in zip(leaves, specs):
            if x.shape != shape or x.dtype != dtype:
                return None
        if priority is None:
            p = float(self._max_seen[0])
        elif type(priority) is float or type(priority) is int:
            p = float(priority)
            if not (0.0 <= p < math.inf):
                return None
        else:
            return None
        with self._lock:
            slot = self._pos
            for store, x in zip(self._storage, leaves):
                store[slot].copy_(x)
            self._record(np.array([slot], dtype=np.int64), np.array([p]), 1)
        return slot

    def extend(self, batch, priorities=None) -> torch.Tensor:
        """Stores a batch (fields with a leading dimension n); returns the slots written.

        Dtypes as for ``add``. The whole batch is checked before anything is
        written: on any error the buffer is left exactly as it was.
        """
        kind, keys, leaves = _flatten(batch, "PrioritizedReplayBuffer.extend")
        return torch.from_numpy(self._extend(kind, keys, leaves, priorities, "PrioritizedReplayBuffer.extend"))

    def _extend(self, kind, keys, leaves, priorities, what) -> np.ndarray:
        with self._lock:
            n = self._check_batch(kind, keys, leaves, what)
            p = self._priorities_for(priorities, n, what)
            if n == 0:
                return np.zeros(0, dtype=np.int64)
            if self._storage is None:
                self._kind, self._keys = kind, keys
                self._specs = [(x.shape[1:], x.dtype) for x in leaves]
                self._storage = _packed_storage(self.capacity, self._specs, self.device)
            # With more items than slots only the last `capacity` survive; item
            # j of the batch lands in slot (pos + j) % capacity either way.
            first = max(0, n - self.capacity)
            slots = (self._pos + np.arange(first, n)) % self.capacity
            slots_t = torch.from_numpy(slots).to(self.device)
            for store, x in zip(self._storage, leaves):
                store.index_copy_(0, slots_t, x[first:].to(device=self.device, dtype=store.dtype))
            self._record(slots, p[first:], n)
            return slots

    def _record(self, slots: np.ndarray, p: np.ndarray, n: int) -> None:
        """After n items were written to `slots` (the last of them, when n >
        capacity) with priorities p: their leaves, counters, the largest
        priority, and the ring position. Under the lock."""
        self._tree.update(slots, (p + self.eps) ** self.alpha)
        self._gen[slots] += 1
        if p.size:
            self._max_seen[0] = max(self._max_seen[0], p.max())
        self._pos = (self._pos + n) % self.capacity
        self._size = min(self._size + n, self.capacity)

    # -- sampling ----------------------------------------------------------
    def sample(self, batch_size: int, beta: Optional[float] = None, stratified: Optional[bool] = None):
        """Draws `batch_size` items with replacement, with probability leaf / total.

        Returns (batch, indices, weights): the batch in the items' structure
        on `device`, the slots as a CPU int64 tensor, and float32 importance
        weights (N P(i))^-beta / max_j (N P(j))^-beta on `device`, the maximum
        taken over every stored item (from the min tree), so they are <= 1.
        """
        # Exact-type checks first: the abstract-class checks cost a
        # microsecond a call, a few percent of a sample.
        if not (type(batch_size) is int and batch_size >= 1) and (
                isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1):
            raise ValueError(f"PrioritizedReplayBuffer.sample: batch_size must be an integer >= 1, got {batch_size!r}")
        beta = self.beta if beta is None else beta
        if not (type(beta) is float and 0 <= beta < math.inf) and not (
                isinstance(beta, numbers.Real) and math.isfinite(beta) and beta >= 0):
            raise ValueError(f"PrioritizedReplayBuffer.sample: beta must be a finite number >= 0, got {beta!r}")
        stratified = self.stratified if stratified is None else stratified
        with self._lock:
            if self._size == 0:
                raise RuntimeError("PrioritizedReplayBuffer.sample: the buffer is empty; add items first")
            u = self.generator.random(batch_size)
            if self._native_sample:
                # One call: draw, weights, counters and the rows.
                idx_t, weights, fields = self._tree.sample_rows(u, beta, stratified, self._gen, self._sampled_gen,
                                                                self._storage)
                return _unflatten(self._kind, self._keys, fields), idx_t, weights
            idx, w = self._tree.sample_weighted(u, beta, stratified, self._gen, self._sampled_gen)
            idx_t = torch.from_numpy(idx)
            weights = torch.from_numpy(w)
            if self._native_gather:
                fields = _C.gather_rows(self._storage, idx)
            else:
                dev_idx = idx_t.to(self.device, non_blocking=True)
                fields = [store.index_select(0, dev_idx) for store in self._storage]
                weights = weights.to(self.device, non_blocking=True)
            return _unflatten(self._kind, self._keys, fields), idx_t, weights

    def update_priorities(self, indices, priorities) -> int:
        """Sets new priorities (before alpha) for sampled slots; returns how many were applied.

        indices: integer slots (as ``sample`` returned them), a tensor, array
        or sequence. priorities: finite numbers >= 0, paired with the indices
        element by element, so both must have the same shape up to dimensions
        of size 1: (B,) with (B,), (B, 1) or (1, B) (a TD-error column), (2, 2)
        with (2, 2), a scalar with a scalar. Other shapes, e.g. (2, 2) with
        (1, 4) or one priority for B > 1 indices (no broadcasting), raise
        ValueError naming both shapes; so do NaN, inf and negative priorities
        and out-of-range indices. On any error nothing is updated.

        A slot that was overwritten after it was last sampled keeps the
        priority of its new item: the update is dropped. Repeated indices: the
        last one wins.
        """
        # Two 1-D tensors (the common case) pair up by position; their lengths
        # are the tree's to check. dim() is the cheapest test: building and
        # comparing shapes costs a fifth of the whole call.
        if not (type(indices) is torch.Tensor and type(priorities) is torch.Tensor
                and indices.dim() == 1 == priorities.dim()):
            _check_pairing(indices, priorities, "PrioritizedReplayBuffer.update_priorities")
        with self._lock:
            return self._tree.update_priorities(
                _fast_index(indices), _fast_float(priorities), self.alpha, self.eps, self._size,
                self._gen, self._sampled_gen, self._max_seen,
            )

    # -- state -------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to restore the buffer exactly (storage is copied).

        ``"rng"`` holds the generator's state: a buffer restored from this
        dict, in this process or another, draws exactly the samples this one
        draws next. (None when `generator` was an object of another kind than
        a numpy Generator or RandomState; its draws are then not restored.)
        """
        with self._lock:
            storage = None
            if self._storage is not None:
                storage = _unflatten(self._kind, self._keys, [s.clone() for s in self._storage])
            return {
                "capacity": self.capacity,
                "alpha": self.alpha,
                "beta": self.beta,
                "eps": self.eps,
                "position": self._pos,
                "size": self._size,
                "max_priority": float(self._max_seen[0]),
                "priorities": torch.from_numpy(self._tree.leaves()),
                "generation": torch.from_numpy(self._gen.copy()),
                "sampled_generation": torch.from_numpy(self._sampled_gen.copy()),
                "storage": storage,
                "rng": rng_state(self.generator),
            }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restores a ``state_dict()``. Everything is checked first: a dict of
        another capacity, bad priorities or counters, or a bad generator state
        raise ValueError, and the buffer keeps what it had."""
        what = "PrioritizedReplayBuffer.load_state_dict"
        _check_saved_capacity(state["capacity"], self.capacity, what)
        leaves = _as_float_array(state["priorities"], what, "priorities")
        if leaves.size != self.capacity:
            raise ValueError(f"{what}: `priorities` must have {self.capacity} values, got {leaves.size}")
        _check_values(leaves, what, "priorities")
        gen = _as_index_array(state["generation"], what, "generation")
        sgen = _as_index_array(state["sampled_generation"], what, "sampled_generation")
        if gen.size != self.capacity or sgen.size != self.capacity:
            raise ValueError(f"{what}: generation counters must have {self.capacity} values")
        size, pos = _saved_cursor(state, self.capacity, what)
        hyper = {k: float(state[k]) for k in ("alpha", "beta", "eps", "max_priority")}
        for k, v in hyper.items():
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{what}: `{k}` must be finite and >= 0, got {v!r}")
        storage = state["storage"]
        if storage is None:
            if size:
                raise ValueError(f"{what}: size is {size} but there is no storage")
            kind = keys = fields = None
        else:
            kind, keys, fields = _flatten(storage, what)
            for f in fields:
                if f.dim() == 0 or f.shape[0] != self.capacity:
                    raise ValueError(f"{what}: every storage field needs a leading dimension of {self.capacity}")
        # A dict saved before the generator was part of it keeps the current generator.
        generator, install = (self.generator, None) if state.get("rng") is None else restored_rng(state["rng"], what)
        if install is not None:
            raise ValueError(f"{what}: the buffer draws from its own generator, not numpy's global one")
        with self._lock:
            if fields is None:
                new_storage = None
            else:
                specs = [(f.shape[1:], f.dtype) for f in fields]
                new_storage = _packed_storage(self.capacity, specs, self.device)
                for store, f in zip(new_storage, fields):
                    store.copy_(f.detach())
            # Nothing below can fail: the buffer changes only from here on.
            self.alpha, self.beta, self.eps = hyper["alpha"], hyper["beta"], hyper["eps"]
            if fields is None:
                self._kind = self._keys = self._specs = self._storage = None
            else:
                self._kind, self._keys, self._specs, self._storage = kind, keys, specs, new_storage
            self._tree.assign(leaves)
            self._gen, self._sampled_gen = _generation_counters(self.capacity)
            self._gen[:] = gen
            self._sampled_gen[:] = sgen
            self._pos, self._size = pos, size
            self._max_seen[0] = hyper["max_priority"]
            self.generator = generator
