"""ExperienceReplay: the tutorial's class on the sum tree.

The same constructor, ``push``, ``sample`` without replacement with weights
normalised by the batch maximum, and ``buffer``/``priorities`` of deque-like
length, plus ``update_priorities``.
"""
from __future__ import annotations

import math
import numbers
import threading
from typing import Any, Dict, List, Sequence

import numpy as np
import torch

from .._ext import _C

from ._checks import (_as_float_array, _as_index_array, _check_pairing, _check_saved_capacity, _check_values,
                      _fast_float, _fast_index, _saved_cursor)
from ._rng import restored_rng, rng_state
from .sum_tree import SumTree
from .storage import _generation_counters


# ---------------------------------------------------------------------------
# the tutorial's ExperienceReplay, on the sum tree


class _BufferView(Sequence):
    """Read-only, oldest-first view of the stored experiences (like the seed's deque)."""

    def __init__(self, owner: "ExperienceReplay"):
        self._o = owner

    def __len__(self) -> int:
        return self._o._size

    def _slots(self) -> np.ndarray:
        o = self._o
        return (o._pos - o._size + np.arange(o._size)) % o.capacity

    def __getitem__(self, i):
        o = self._o
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = o._size
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"buffer index {i} out of range for length {n}")
        return self._get((o._pos - n + i) % o.capacity)

    def _get(self, slot):
        return self._o._items[slot]

    def __iter__(self):
        for s in self._slots():
            yield self._get(int(s))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(len={len(self)})"


class _PriorityView(_BufferView):
    """Oldest-first view of the stored priorities (already raised to alpha, as in the seed)."""

    def _get(self, slot):
        return float(self._o._tree.get(np.array([slot], dtype=np.int64))[0])

    def __iter__(self):
        return iter(self.__array__().tolist())

    def __array__(self, dtype=None, copy=None):
        a = self._o._tree.get(self._slots()) if self._o._size else np.zeros(0)
        return a if dtype is None else a.astype(dtype)


class ExperienceReplay:
    """Drop-in for the tutorial's ExperienceReplay, backed by the sum tree.

    push(experience, priority) stores priority ** alpha; sample(batch_size,
    beta) draws min(batch_size, len) distinct experiences with probability
    proportional to that value (successive draws without replacement, like
    numpy's choice(replace=False, p=...)) using numpy's global RNG as the
    tutorial does, and returns (experiences, weights) with weights
    (N P(i))^-beta divided by the batch maximum, as a FloatTensor. An empty
    buffer returns ([], []) as in the tutorial. With return_indices=True the
    ring slots come third; pass them to update_priorities.

    generator: None (the tutorial's numpy global RNG), a numpy Generator or
    RandomState, or an int seed for a Generator of the buffer's own.
    state_dict() saves its state (numpy's global one when None, which
    load_state_dict() then sets): a restored buffer draws what the saved one
    would have drawn next.
    """

    def __init__(self, capacity: int = 10000, alpha: float = 0.6, backend: str = "auto", generator=None):
        if isinstance(capacity, bool) or not isinstance(capacity, numbers.Integral) or capacity < 1:
            raise ValueError(f"ExperienceReplay: capacity must be an integer >= 1, got {capacity!r}")
        if not (isinstance(alpha, numbers.Real) and math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"ExperienceReplay: alpha must be a finite number >= 0, got {alpha!r}")
        self.capacity = int(capacity)
        self.alpha = alpha
        if isinstance(generator, numbers.Integral) and not isinstance(generator, bool):
            generator = np.random.default_rng(int(generator))
        elif generator is not None and not isinstance(generator, (np.random.Generator, np.random.RandomState)):
            raise TypeError(f"ExperienceReplay: generator must be None, an int seed or a numpy Generator/RandomState, "
                            f"got {type(generator).__name__}")
        self.generator = generator
        self._tree = SumTree(self.capacity, backend)
        self._items: List[Any] = [None] * self.capacity
        self._pos = 0
        self._size = 0
        self._gen, self._sampled_gen = _generation_counters(self.capacity)
        self._lock = threading.RLock()
        self.buffer = _BufferView(self)
        self.priorities = _PriorityView(self)
        self.last_indices = np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        return self._size

    def _random(self, n: int) -> np.ndarray:
        g = self.generator
        if g is None:
            return np.random.random_sample(n)
        return g.random(n) if isinstance(g, np.random.Generator) else g.random_sample(n)

    def _leaf(self, priority, what: str) -> float:
        try:
            p = float(priority)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{what}: priority must be a number, got {type(priority).__name__}") from exc
        if not (math.isfinite(p) and p >= 0):
            raise ValueError(f"{what}: priority must be finite and >= 0, got {p!r}")
        return p ** self.alpha

    def push(self, experience, priority: float = 1.0) -> int:
        """Stores one experience (any object); returns its slot."""
        v = self._leaf(priority, "ExperienceReplay.push")
        with self._lock:
            slot = self._pos
            self._tree.update(np.array([slot], dtype=np.int64), np.array([v]))
            self._items[slot] = experience
            self._gen[slot] += 1
            self._pos = (slot + 1) % self.capacity
            self._size = min(self._size + 1, self.capacity)
            return slot

    def sample(self, batch_size: int, beta: float = 0.4, return_indices: bool = False):
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise ValueError(f"ExperienceReplay.sample: batch_size must be an integer >= 1, got {batch_size!r}")
        with self._lock:
            if self._size == 0:
                return ([], [], np.zeros(0, dtype=np.int64)) if return_indices else ([], [])
            k = min(int(batch_size), self._size)
            # Draw k with replacement in one batched pass and keep the first
            # occurrence of each leaf, in order; a repeat is a rejected draw,
            # so the distinct leaves so far follow successive sampling exactly
            # (numpy's choice(replace=False) does the same). The few still
            # missing are drawn one by one from the rest of the tree.
            # When every draw was distinct (the usual case) the tree also
            # returns the weights and marks the slots as sampled.
            idx, vals, w = self._tree.sample_distinct(self._random(k), beta, self._gen,
                                                      self._sampled_gen)
            if w is None:
                more, more_vals = self._tree.sample_without_replacement(
                    self._random(k - idx.size), exclude=idx
                )
                idx, vals = np.concatenate([idx, more]), np.concatenate([vals, more_vals])
                self._sampled_gen[idx] = self._gen[idx]
                # (N p_i / T)^-beta over its batch maximum (the smallest p) is (p_i / p_min)^-beta.
                w = ((vals / vals.min()) ** (-beta)).astype(np.float32)
            if _C is not None and hasattr(_C, "take"):
                samples = _C.take(self._items, idx)
            else:
                items = self._items
                samples = [items[i] for i in idx.tolist()]
        weights = torch.from_numpy(w)
        self.last_indices = idx
        if return_indices:
            return samples, weights, idx
        return samples, weights

    def update_priorities(self, indices, priorities) -> int:
        """New priorities (before alpha) for sampled slots; stale slots are skipped. Returns how many were applied.

        Shapes as for ``PrioritizedReplayBuffer.update_priorities``: indices
        and priorities of the same shape up to dimensions of size 1, else
        ValueError, and nothing is updated.
        """
        if not (type(indices) is torch.Tensor and type(priorities) is torch.Tensor
                and indices.dim() == 1 == priorities.dim()):
            _check_pairing(indices, priorities, "ExperienceReplay.update_priorities")
        with self._lock:
            return self._tree.update_priorities(
                _fast_index(indices), _fast_float(priorities), self.alpha, 0.0, self._size,
                self._gen, self._sampled_gen,
            )

    # -- state -------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to restore the buffer exactly: the experiences (by
        reference), the leaves, the ring, the counters and the generator's
        state (numpy's global one when the buffer draws from it)."""
        with self._lock:
            return {
                "capacity": self.capacity,
                "alpha": self.alpha,
                "position": self._pos,
                "size": self._size,
                "items": list(self._items),
                "priorities": torch.from_numpy(self._tree.leaves()),
                "generation": torch.from_numpy(self._gen.copy()),
                "sampled_generation": torch.from_numpy(self._sampled_gen.copy()),
                "rng": rng_state(self.generator),
            }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restores a ``state_dict()``; everything is checked first (a dict of
        another capacity raises ValueError) and on any error the buffer keeps
        what it had. When the saved buffer drew from numpy's global RNG, this
        sets numpy's global RNG to the saved state, as its next draws need."""
        what = "ExperienceReplay.load_state_dict"
        _check_saved_capacity(state["capacity"], self.capacity, what)
        leaves = _as_float_array(state["priorities"], what, "priorities")
        gen = _as_index_array(state["generation"], what, "generation")
        sgen = _as_index_array(state["sampled_generation"], what, "sampled_generation")
        items = list(state["items"])
        if not (leaves.size == gen.size == sgen.size == len(items) == self.capacity):
            raise ValueError(f"{what}: items, priorities and counters must have {self.capacity} entries each")
        _check_values(leaves, what, "priorities")
        size, pos = _saved_cursor(state, self.capacity, what)
        alpha = float(state["alpha"])
        if not (math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"{what}: `alpha` must be finite and >= 0, got {alpha!r}")
        generator, install = (self.generator, None) if state.get("rng") is None else restored_rng(state["rng"], what)
        with self._lock:
            self.alpha = alpha
            self._items = items
            self._tree.assign(leaves)
            self._gen, self._sampled_gen = _generation_counters(self.capacity)
            self._gen[:] = gen
            self._sampled_gen[:] = sgen
            self._pos, self._size = pos, size
            self.generator = generator
            if install is not None:
                install()
