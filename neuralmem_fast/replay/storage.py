"""Preallocated ring storage for replay items: a tensor, a tuple or a dict of tensors, one tensor per field."""
from __future__ import annotations

import math
from typing import List

import numpy as np
import torch

from .._ext import _C


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
