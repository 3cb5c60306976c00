"""Argument checks shared by the tree and the buffers: nothing is changed before the whole input is checked."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch


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


def _check_saved_capacity(saved, capacity: int, what: str) -> None:
    """A state dict's capacity against the loading buffer's (checked before anything else)."""
    if int(saved) != capacity:
        raise ValueError(
            f"{what}: the state dict is of a buffer of capacity {saved}, this buffer's is "
            f"{capacity}; build a buffer of that capacity to load it. Nothing was loaded"
        )


def _saved_cursor(state, capacity: int, what: str) -> tuple:
    """A state dict's (size, position), checked against the capacity."""
    size, pos = int(state["size"]), int(state["position"])
    if not (0 <= size <= capacity and 0 <= pos < capacity):
        raise ValueError(f"{what}: size {size} / position {pos} out of range for capacity {capacity}")
    return size, pos


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
