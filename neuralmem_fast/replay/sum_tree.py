"""The sum tree: the C++ tree of neuralmem_fast._C, or its numpy twin with the same API and bits.

Leaves are priorities already raised to alpha; a parent (fan-out 8: one cache
line of children) is always recomputed from its children, so sums never
drift; a min tree of the positive leaves gives the largest possible
importance weight. Batch calls release the GIL and hold the tree's own lock.
"""
from __future__ import annotations

import abc
import math
import threading

import numpy as np

from .._ext import _C

from ._checks import _as_float_array, _as_index_array, _check_range, _check_values

__all__ = ["SumTree", "NumpySumTree", "has_native_sum_tree"]


def has_native_sum_tree() -> bool:
    """True when the C++ SumTree of neuralmem_fast._C is available."""
    return _C is not None and hasattr(_C, "SumTree")


# the numpy twin of the C++ tree


class NumpySumTree:
    """Pure numpy sum tree with the API and arithmetic of the C++ SumTree.

    Same layout (fan-out 8, one array per level, leaves last), same descent
    rule, same order of float64 operations, so the two agree exactly; the one
    exception is update_priorities' (p + eps)^alpha, which the C++ tree
    computes with a vectorised pow (within 1 ulp of numpy's).
    """

    K = 8

    def __init__(self, capacity: int):
        capacity = int(capacity)
        if capacity < 1:
            raise ValueError(f"SumTree: capacity must be >= 1, got {capacity}")
        depth, width = 0, 1
        while width < capacity:
            width *= self.K
            depth += 1
        self._capacity, self._depth = capacity, depth
        self._sums = [np.zeros(self.K**d, dtype=np.float64) for d in range(depth + 1)]
        self._mins = [np.full(self.K**d, np.inf, dtype=np.float64) for d in range(depth + 1)]
        self._lock = threading.Lock()

    @property
    def capacity(self) -> int:
        return self._capacity

    def __len__(self) -> int:
        return self._capacity

    def _recompute(self, d: int, parents: np.ndarray) -> None:
        cs = self._sums[d + 1].reshape(-1, self.K)[parents]
        cm = self._mins[d + 1].reshape(-1, self.K)[parents]
        # Pairwise, in the C++ tree's order: ((c0+c1)+(c2+c3))+((c4+c5)+(c6+c7)).
        self._sums[d][parents] = (((cs[:, 0] + cs[:, 1]) + (cs[:, 2] + cs[:, 3]))
                                  + ((cs[:, 4] + cs[:, 5]) + (cs[:, 6] + cs[:, 7])))
        self._mins[d][parents] = cm.min(axis=1)

    def _write_leaves(self, idx: np.ndarray, val: np.ndarray) -> None:
        self._sums[self._depth][idx] = val
        self._mins[self._depth][idx] = np.where(val > 0, val, np.inf)

    def update(self, indices, values) -> None:
        idx = _as_index_array(indices, "SumTree.update")
        val = _as_float_array(values, "SumTree.update", "values")
        if idx.size != val.size:
            raise ValueError(
                f"SumTree.update: `indices` and `values` must have the same length, got {idx.size} and {val.size}"
            )
        _check_range(idx, self._capacity, "SumTree.update", "capacity")
        _check_values(val, "SumTree.update", "values")
        if idx.size == 0:
            return
        # Last write wins: keep the last occurrence of every repeated index.
        rev_unique, rev_first = np.unique(idx[::-1], return_index=True)
        val = val[::-1][rev_first]
        idx = rev_unique
        with self._lock:
            self._write_leaves(idx, val)
            nodes = idx
            for d in range(self._depth - 1, -1, -1):
                nodes = np.unique(nodes // self.K)
                self._recompute(d, nodes)

    def _descend(self, m: np.ndarray) -> np.ndarray:
        m = np.where(m < 0, 0.0, m)
        node = np.zeros(m.shape, dtype=np.int64)
        rows = np.arange(m.size)
        for d in range(self._depth):
            c = self._sums[d + 1].reshape(-1, self.K)[node]
            pre = np.zeros_like(c)
            acc = np.zeros(m.shape)
            k = np.zeros(m.shape, dtype=np.int64)
            for j in range(self.K):
                pre[:, j] = acc
                acc = acc + c[:, j]
                if j < self.K - 1:
                    k += acc <= m
            positive = c > 0
            last = self.K - 1 - np.argmax(positive[:, ::-1], axis=1)
            k = np.minimum(k, last)
            m = m - pre[rows, k]
            node = node * self.K + k
        return node

    def _find(self, masses, fractions: bool, what: str, arg: str):
        m = _as_float_array(masses, what, arg).copy()
        _check_values(m, what, arg, nonneg=False)
        with self._lock:
            total = float(self._sums[0][0])
            if not total > 0:
                raise ValueError("SumTree.find: the tree is empty (total is 0); nothing can be sampled")
            if fractions:
                m *= total
            idx = self._descend(m)
            return idx, self._sums[self._depth][idx].copy(), total, float(self._mins[0][0])

    def find(self, masses) -> np.ndarray:
        return self._find(masses, False, "SumTree.find", "masses")[0]

    def sample(self, fractions):
        return self._find(fractions, True, "SumTree.sample", "fractions")

    def _draw(self, fractions, beta, what, stratified=False):
        """Checked draws for a replay buffer: (leaves, their values, min()), read under one lock."""
        fr = _as_float_array(fractions, what, "fractions").copy()
        _check_values(fr, what, "fractions", nonneg=False)
        if not (math.isfinite(beta) and beta >= 0):
            raise ValueError(f"{what}: `beta` must be finite and >= 0")
        with self._lock:
            total = float(self._sums[0][0])
            if not total > 0:
                raise ValueError(f"{what}: the tree is empty (total is 0); nothing can be sampled")
            if stratified:
                fr = (np.arange(fr.size, dtype=np.float64) + fr) / fr.size
            idx = self._descend(fr * total)
            return idx, self._sums[self._depth][idx], float(self._mins[0][0])

    def sample_weighted(self, fractions, beta, stratified=False, generation=None, sampled_generation=None):
        idx, vals, mn = self._draw(fractions, beta, "SumTree.sample_weighted", stratified)
        weights = ((vals / mn) ** (-beta)).astype(np.float32)
        if sampled_generation is not None:
            sampled_generation[idx] = generation[idx]
        return idx, weights

    def update_priorities(self, indices, priorities, alpha, eps, limit, generation=None, sampled_generation=None,
                          max_priority=None):
        what = "update_priorities"
        idx = _as_index_array(indices, what)
        p = _as_float_array(priorities, what, "priorities")
        if idx.size != p.size:
            raise ValueError(f"{what}: `indices` and `priorities` must have the same length, got {idx.size} and {p.size}")
        if limit < 0 or limit > self._capacity:
            limit = self._capacity
        _check_range(idx, limit, what, "buffer length")
        _check_values(p, what, "priorities")
        if sampled_generation is not None:
            sg = sampled_generation[idx]
            fresh = (sg < 0) | (sg == generation[idx])
            idx, p = idx[fresh], p[fresh]
        if idx.size == 0:
            return 0
        self.update(idx, (p + eps) ** alpha)
        if max_priority is not None:
            max_priority[0] = max(max_priority[0], p.max())
        return int(idx.size)

    def _set_leaf(self, i: int, v: float) -> None:
        self._write_leaves(np.array([i]), np.array([v], dtype=np.float64))
        for d in range(self._depth - 1, -1, -1):
            i //= self.K
            self._recompute(d, np.array([i]))

    def sample_distinct(self, fractions, beta, generation=None, sampled_generation=None):
        drawn, vals, _ = self._draw(fractions, beta, "SumTree.sample_distinct")
        _, first = np.unique(drawn, return_index=True)
        first.sort()
        idx, vals = drawn[first], vals[first]
        if idx.size < drawn.size or idx.size == 0:
            return idx, vals, None
        # float32 arithmetic, as the C++ tree (the weights are float32 anyway)
        weights = ((vals / vals.min()).astype(np.float32) ** np.float32(-beta)).astype(np.float32)
        if sampled_generation is not None:
            sampled_generation[idx] = generation[idx]
        return idx, vals, weights

    def sample_without_replacement(self, fractions, exclude=None):
        what = "SumTree.sample_without_replacement"
        fr = _as_float_array(fractions, what, "fractions")
        _check_values(fr, what, "fractions", nonneg=False)
        ex = np.zeros(0, dtype=np.int64) if exclude is None else _as_index_array(exclude, what, "exclude")
        _check_range(ex, self._capacity, what, "capacity")
        out = np.zeros(fr.size, dtype=np.int64)
        vals = np.zeros(fr.size, dtype=np.float64)
        with self._lock:
            saved = []
            for i in ex.tolist():
                saved.append(float(self._sums[self._depth][i]))
                self._set_leaf(i, 0.0)
            k = 0
            while k < fr.size:
                total = self._sums[0][0]
                if not total > 0:
                    break
                i = int(self._descend(np.array([fr[k] * total]))[0])
                out[k], vals[k] = i, self._sums[self._depth][i]
                self._set_leaf(i, 0.0)
                k += 1
            for j in range(k - 1, -1, -1):
                self._set_leaf(int(out[j]), float(vals[j]))
            for i, v in reversed(list(zip(ex.tolist(), saved))):
                self._set_leaf(i, v)
        if k < fr.size:
            raise ValueError(
                f"{what}: asked for {fr.size} distinct leaves but only {k} (not excluded) have a positive value"
            )
        return out, vals

    def get(self, indices) -> np.ndarray:
        idx = _as_index_array(indices, "SumTree.get")
        _check_range(idx, self._capacity, "SumTree.get", "capacity")
        with self._lock:
            return self._sums[self._depth][idx].copy()

    def leaves(self) -> np.ndarray:
        with self._lock:
            return self._sums[self._depth][: self._capacity].copy()

    def assign(self, values) -> None:
        val = _as_float_array(values, "SumTree.assign", "values")
        if val.size != self._capacity:
            raise ValueError(f"SumTree.assign: `values` must have length capacity={self._capacity}, got {val.size}")
        _check_values(val, "SumTree.assign", "values")
        with self._lock:
            self._write_leaves(np.arange(self._capacity), val)
            for d in range(self._depth - 1, -1, -1):
                self._recompute(d, np.arange(self.K**d))

    def total(self) -> float:
        with self._lock:
            return float(self._sums[0][0])

    def min(self) -> float:
        with self._lock:
            return float(self._mins[0][0])


class SumTree(abc.ABC):
    """A sum tree over `capacity` float64 leaves: `SumTree(capacity, backend="auto")`.

    backend: "auto" (C++ when built, else numpy), "cpu" (C++, raises when the
    extension is missing) or "numpy". Constructing it returns the C++ tree
    (neuralmem_fast._C.SumTree) or a NumpySumTree, both of which are
    instances of SumTree: the class is the one name and type of a tree, with
    no Python layer between a call and the C++ code.
    """

    def __new__(cls, capacity: int, backend: str = "auto"):
        if backend not in ("auto", "cpu", "numpy"):
            raise ValueError(f"SumTree: backend must be 'auto', 'cpu' or 'numpy', got {backend!r}")
        if backend == "numpy" or (backend == "auto" and not has_native_sum_tree()):
            return NumpySumTree(capacity)
        if not has_native_sum_tree():
            raise RuntimeError("SumTree: backend='cpu' needs the native extension neuralmem_fast._C; build it first")
        return _C.SumTree(int(capacity))


SumTree.register(NumpySumTree)
if has_native_sum_tree():
    SumTree.register(_C.SumTree)
