"""Prioritized experience replay on a sum tree.

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
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ._ext import _C

__all__ = [
    "SumTree",
    "NumpySumTree",
    "PrioritizedReplayBuffer",
    "ExperienceReplay",
    "has_native_sum_tree",
]


def has_native_sum_tree() -> bool:
    """True when the C++ SumTree of neuralmem_fast._C is available."""
    return _C is not None and hasattr(_C, "SumTree")


# ---------------------------------------------------------------------------
# input conversion shared by the numpy tree and the buffers


def _as_index_array(x, what: str, arg: str = "indices") -> np.ndarray:
    if isinstance(x, torch.Tensor):
        if x.dtype == torch.bool or x.is_floating_point() or x.is_complex():
            raise TypeError(f"{what}: `{arg}` must hold integers, got dtype {x.dtype}")
        return x.detach().reshape(-1).to("cpu", torch.int64).numpy()
    a = np.asarray(x)
    if a.dtype.kind not in "iu":
        if a.size == 0:
            return np.zeros(0, dtype=np.int64)
        raise TypeError(f"{what}: `{arg}` must hold integers, got numpy dtype {a.dtype}")
    return np.ascontiguousarray(a.reshape(-1), dtype=np.int64)


def _as_float_array(x, what: str, arg: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        if x.is_complex():
            raise TypeError(f"{what}: `{arg}` must be real, got dtype {x.dtype}")
        return x.detach().reshape(-1).to("cpu", torch.float64).numpy()
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what}: `{arg}` must be numbers, got {type(x).__name__}") from exc
    return np.ascontiguousarray(a.reshape(-1))


def _check_values(v: np.ndarray, what: str, arg: str, nonneg: bool = True) -> None:
    ok = np.isfinite(v) & (v >= 0) if nonneg else np.isfinite(v)
    if not ok.all():
        j = int(np.argmin(ok))
        cond = "finite and >= 0" if nonneg else "finite"
        raise ValueError(f"{what}: `{arg}` must be {cond}, got {v[j]!r} at position {j}")


def _check_range(idx: np.ndarray, high: int, what: str, bound: str) -> None:
    if idx.size and (idx.min() < 0 or idx.max() >= high):
        bad = (idx < 0) | (idx >= high)
        j = int(np.argmax(bad))
        raise IndexError(f"{what}: index {int(idx[j])} at position {j} is out of range for {bound} {high}")


def _shape_of(x) -> Optional[tuple]:
    s = getattr(x, "shape", None)
    if s is None:
        try:
            s = np.shape(x)
        except (TypeError, ValueError):  # ragged or not array-like: the conversion that follows says why
            return None
    return tuple(s)


def _check_pairing(indices, priorities, what: str) -> None:
    """indices and priorities pair up element by element: they must have the
    same shape, up to dimensions of size 1 ((B,) with (B,), (B, 1) or (1, B)).
    Anything else ((2, 2) with (1, 4), one priority for several indices) is a
    guess at which priority belongs to which index: raise, naming both."""
    si, sp = _shape_of(indices), _shape_of(priorities)
    if si is None or sp is None or si == sp or tuple(d for d in si if d != 1) == tuple(d for d in sp if d != 1):
        return
    raise ValueError(
        f"{what}: `indices` and `priorities` must have the same shape (up to dimensions of size 1, e.g. (B,) "
        f"with (B,) or (B, 1)), got indices of shape {si} and priorities of shape {sp}; nothing was updated"
    )


# The checks below are the cheapest spellings (exact type, is_cpu, dtype
# identity): `x.device.type` alone costs a quarter of a microsecond, a few
# percent of a whole update_priorities call.
def _fast_index(x):
    """CPU int64 tensors pass straight to the tree; anything else is converted and checked."""
    if type(x) is torch.Tensor and x.is_cpu and x.dtype is torch.int64:
        return x
    return _as_index_array(x, "update_priorities")


def _fast_float(x):
    """CPU float32/float64 tensors pass straight to the tree (which widens float32); anything else is converted."""
    if type(x) is torch.Tensor and x.is_cpu and (x.dtype is torch.float32 or x.dtype is torch.float64):
        return x
    return _as_float_array(x, "update_priorities", "priorities")


# ---------------------------------------------------------------------------
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


def SumTree(capacity: int, backend: str = "auto"):
    """A sum tree over `capacity` float64 leaves.

    backend: "auto" (C++ when built, else numpy), "cpu" (C++, raises when the
    extension is missing) or "numpy".
    """
    if backend not in ("auto", "cpu", "numpy"):
        raise ValueError(f"SumTree: backend must be 'auto', 'cpu' or 'numpy', got {backend!r}")
    if backend == "numpy" or (backend == "auto" and not has_native_sum_tree()):
        return NumpySumTree(capacity)
    if not has_native_sum_tree():
        raise RuntimeError("SumTree: backend='cpu' needs the native extension neuralmem_fast._C; build it first")
    return _C.SumTree(int(capacity))


# ---------------------------------------------------------------------------
# item structure: a tensor, a tuple of tensors or a dict of tensors


def _zeros(nbytes: int, device) -> torch.Tensor:
    """Zeroed bytes for random-access state: on huge pages on the CPU when the
    extension is built (a random row then rarely costs a TLB miss too)."""
    device = torch.device(device)
    if device.type == "cpu" and _C is not None and hasattr(_C, "zeros_hugepages"):
        return _C.zeros_hugepages(nbytes)
    return torch.zeros(nbytes, dtype=torch.uint8, device=device)


def _generation_counters(capacity: int):
    """Per-slot write counter and its value when the slot was last sampled (-1:
    never), as the two columns of one (capacity, 2) array: a sample writes, and
    an update reads, both counters of a random slot, one cache line instead of
    two."""
    pair = _zeros(capacity * 16, torch.device("cpu")).view(torch.int64).view(capacity, 2).numpy()
    pair[:, 1] = -1
    return pair[:, 0], pair[:, 1]


_REAL_PART = {torch.complex32: torch.float16, torch.complex64: torch.float32, torch.complex128: torch.float64}


def _holds_every_value(src: torch.dtype, dst: torch.dtype) -> bool:
    """Whether dtype `dst` represents every value of dtype `src` exactly (a
    widening: float32 -> float64, int32 -> int64, uint8 -> float32, bool ->
    anything), so that storing a `src` tensor in `dst` storage changes nothing.
    torch.can_cast answers a different question (same kind or wider kind) and
    lets float64 -> float32 and int64 -> float32 through, which round."""
    if src == dst or src == torch.bool:
        return True
    if dst == torch.bool or (src.is_complex and not dst.is_complex):
        return False
    src, dst = _REAL_PART.get(src, src), _REAL_PART.get(dst, dst)
    if src == dst:
        return True
    try:
        if dst.is_floating_point:
            fd = torch.finfo(dst)
            digits = round(-math.log2(fd.eps)) + 1  # significand bits, the implicit one included
            if src.is_floating_point:
                fs = torch.finfo(src)
                return (round(-math.log2(fs.eps)) + 1 <= digits and fs.max <= fd.max
                        and fs.tiny * fs.eps >= fd.tiny * fd.eps)  # the smallest subnormals
            i = torch.iinfo(src)
            return max(i.max, -i.min).bit_length() <= digits
        if src.is_floating_point:
            return False
        i, j = torch.iinfo(src), torch.iinfo(dst)
        return j.min <= i.min and i.max <= j.max
    except TypeError:  # quantized and other dtypes without finfo/iinfo: only an exact match
        return False


def _python_number_as(x, dtype: torch.dtype, field: str, what: str) -> torch.Tensor:
    """A Python number (which has no dtype of its own) as a 0-d tensor of the
    stored dtype. A float rounds to the storage's precision, as torch stores
    any Python float; anything that would change the value otherwise (an
    int that does not fit exactly, a float into integer storage, a finite
    float that overflows, a number into bool storage) raises."""
    kind = type(x).__name__
    if dtype == torch.bool:
        ok = type(x) is bool
    elif dtype.is_complex:
        ok = True
    elif dtype.is_floating_point:
        ok = type(x) is not complex
    else:
        ok = type(x) in (bool, int)
        if ok:
            try:
                info = torch.iinfo(dtype)
            except TypeError:
                ok = False
            else:
                if not info.min <= x <= info.max:
                    raise ValueError(f"{what}: {field} is the Python int {x}, which does not fit the {dtype} the "
                                     f"buffer stores there (set by the first item); nothing was stored")
    if not ok:
        raise TypeError(f"{what}: {field} is a Python {kind}, but the buffer stores {dtype} there (set by the first "
                        f"item); nothing was stored")
    t = torch.tensor(x, dtype=dtype)
    if type(x) is int and not dtype.is_floating_point and not dtype.is_complex:
        return t
    v = t.item()
    if (type(x) is int and v != x) or (type(x) in (float, complex) and not _isfinite(v) and _isfinite(x)):
        raise ValueError(f"{what}: {field} is the Python {kind} {x!r}, which the {dtype} the buffer stores there "
                         f"(set by the first item) cannot hold (it would read {v!r}); nothing was stored")
    return t


def _isfinite(v) -> bool:
    return math.isfinite(v.real) and math.isfinite(v.imag) if isinstance(v, complex) else math.isfinite(v)


def _flatten(item, what: str, stored=None):
    """(kind, keys, leaves) of an item; leaves are tensors (numbers and arrays are converted).

    stored: (kind, keys, specs) of the buffer's storage, or None. When the item
    has that structure, a Python number in a field becomes a tensor of that
    field's stored dtype (see _python_number_as) rather than torch's default.
    """
    if isinstance(item, dict):
        keys = tuple(item.keys())
        if not keys:
            raise ValueError(f"{what}: an item must not be an empty dict")
        leaves = [item[k] for k in keys]
        kind = "dict"
    elif isinstance(item, (tuple, list)):
        if len(item) == 0:
            raise ValueError(f"{what}: an item must not be an empty tuple")
        keys, leaves, kind = len(item), list(item), "tuple"
    else:
        keys, leaves, kind = None, [item], "tensor"
    out = []
    for j, x in enumerate(leaves):
        if not isinstance(x, torch.Tensor):
            if isinstance(x, (dict, tuple, list)) and not isinstance(x, np.ndarray):
                raise TypeError(f"{what}: nested structures are not supported (field {j} is a {type(x).__name__})")
            if (type(x) in (bool, int, float, complex) and stored is not None and stored[2] is not None
                    and stored[0] == kind and stored[1] == keys and len(stored[2]) == len(leaves)):
                out.append(_python_number_as(x, stored[2][j][1], _field_name(kind, keys, j), what))
                continue
            try:
                x = torch.as_tensor(x)
            except (TypeError, ValueError, RuntimeError) as exc:
                raise TypeError(f"{what}: field {j} must be a tensor, got {type(x).__name__}") from exc
        out.append(x)
    return kind, keys, out


def _unflatten(kind: str, keys, leaves: List[torch.Tensor]):
    if kind == "dict":
        return dict(zip(keys, leaves))
    if kind == "tuple":
        return tuple(leaves)
    return leaves[0]


def _field_name(kind, keys, j) -> str:
    return repr(keys[j]) if kind == "dict" else (f"field {j}" if kind == "tuple" else "the item")


def _packed_storage(capacity: int, specs, device) -> List[torch.Tensor]:
    """One (capacity, row_bytes) byte tensor holding every field of an item side
    by side, returned as one strided (capacity, *shape) view per field.

    Sampling reads random rows; with the fields of a row in the same cache
    line(s), a row costs one miss instead of one per field. Each field starts
    at a multiple of its element size and the row length is a multiple of the
    largest, so every view is a plain strided tensor of its own dtype.
    """
    sizes = [max(1, torch.empty((), dtype=d).element_size()) for _, d in specs]
    offsets, off = [], 0
    for (shape, dtype), size in zip(specs, sizes):
        off = (off + size - 1) // size * size
        offsets.append(off)
        off += int(np.prod(shape, dtype=np.int64)) * size
    align = max(sizes)
    row = max(align, (off + align - 1) // align * align)
    packed = _zeros(capacity * row, device).view(capacity, row)
    views = []
    for (shape, dtype), size, start in zip(specs, sizes, offsets):
        nbytes = int(np.prod(shape, dtype=np.int64)) * size
        views.append(packed[:, start : start + nbytes].view(dtype).view((capacity,) + tuple(shape)))
    return views


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
        """Everything needed to restore the buffer exactly (storage is copied)."""
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
            }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        what = "PrioritizedReplayBuffer.load_state_dict"
        if int(state["capacity"]) != self.capacity:
            raise ValueError(f"{what}: capacity {state['capacity']} does not match this buffer's {self.capacity}")
        leaves = _as_float_array(state["priorities"], what, "priorities")
        if leaves.size != self.capacity:
            raise ValueError(f"{what}: `priorities` must have {self.capacity} values, got {leaves.size}")
        _check_values(leaves, what, "priorities")
        gen = _as_index_array(state["generation"], what, "generation")
        sgen = _as_index_array(state["sampled_generation"], what, "sampled_generation")
        if gen.size != self.capacity or sgen.size != self.capacity:
            raise ValueError(f"{what}: generation counters must have {self.capacity} values")
        size, pos = int(state["size"]), int(state["position"])
        if not (0 <= size <= self.capacity and 0 <= pos < self.capacity):
            raise ValueError(f"{what}: size {size} / position {pos} out of range for capacity {self.capacity}")
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
        with self._lock:
            self.alpha, self.beta, self.eps = float(state["alpha"]), float(state["beta"]), float(state["eps"])
            if fields is None:
                self._kind = self._keys = self._specs = self._storage = None
            else:
                self._kind, self._keys = kind, keys
                self._specs = [(f.shape[1:], f.dtype) for f in fields]
                self._storage = _packed_storage(self.capacity, self._specs, self.device)
                for store, f in zip(self._storage, fields):
                    store.copy_(f.detach())
            self._tree.assign(leaves)
            self._gen, self._sampled_gen = _generation_counters(self.capacity)
            self._gen[:] = gen
            self._sampled_gen[:] = sgen
            self._pos, self._size = pos, size
            self._max_seen[0] = float(state["max_priority"])


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
