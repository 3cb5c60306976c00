"""ExperienceReplay: the tutorial's class on the sum tree.

The same constructor, ``push``, ``sample`` without replacement with weights
normalised by the batch maximum, and ``buffer``/``priorities`` of deque-like
length, plus ``update_priorities``.
"""
from __future__ import annotations

import math
import numbers
import threading
from typing import Any, List, Sequence

import numpy as np
import torch

from .._ext import _C

from ._checks import _check_pairing, _fast_float, _fast_index
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
        o = self._o
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
    """

    def __init__(self, capacity: int = 10000, alpha: float = 0.6, backend: str = "auto"):
        if isinstance(capacity, bool) or not isinstance(capacity, numbers.Integral) or capacity < 1:
            raise ValueError(f"ExperienceReplay: capacity must be an integer >= 1, got {capacity!r}")
        if not (isinstance(alpha, numbers.Real) and math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"ExperienceReplay: alpha must be a finite number >= 0, got {alpha!r}")
        self.capacity = int(capacity)
        self.alpha = alpha
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
            idx, vals, w = self._tree.sample_distinct(np.random.random_sample(k), beta, self._gen,
                                                      self._sampled_gen)
            if w is None:
                more, more_vals = self._tree.sample_without_replacement(
                    np.random.random_sample(k - idx.size), exclude=idx
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
