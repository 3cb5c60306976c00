"""Argument checks of the public ops, with errors that name the argument.

Each op validates once, on the Python side, before any kernel runs; the
`*_ok` predicates are the valid case in a handful of attribute reads (a small
step is overhead-bound), and anything else goes through the full checks,
which raise.
"""
import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

def _check(name, t, ndim, shape_hint, dtype=None, device=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_hint}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have shape {shape_hint} ({ndim} dims), got shape {tuple(t.shape)}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must have the dtype of memory ({dtype}), got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on the device of memory ({device}), got {t.device}")


def _check_dims(name, t, expected, shape_hint):
    got = tuple(t.shape)
    for i, (g, e) in enumerate(zip(got, expected)):
        if e is not None and g != e:
            raise ValueError(f"{name} must have shape {shape_hint} = {_fmt(expected)}, got {got} (dim {i})")


def _fmt(expected):
    return "(" + ", ".join("?" if e is None else str(e) for e in expected) + ")"


def _check_memory(memory):
    _check("memory", memory, 3, "(B, N, D)")
    B, N, D = memory.shape
    if N < 1 or D < 1:
        raise ValueError(f"memory must have at least one slot and one dimension, got shape {tuple(memory.shape)}")
    return B, N, D


_FLOAT_SET = frozenset(_FLOAT_DTYPES)


def _keys_ok(memory, keys, strengths, eps):
    """The valid case in a handful of attribute reads (a small step is
    overhead-bound); anything else goes through the full checks, which raise."""
    try:
        B, N, D = memory.shape
        Bk, H, Dk = keys.shape
        Bs, Hs = strengths.shape
        dt, dev = memory.dtype, memory.device
        return (B == Bk == Bs and D == Dk and H == Hs and N >= 1 and D >= 1 and eps > 0
                and keys.dtype is dt and strengths.dtype is dt and dt in _FLOAT_SET
                and keys.device == dev and strengths.device == dev)
    except (AttributeError, ValueError, TypeError):
        return False


def _check_keys(memory, keys, strengths, eps, prefix=""):
    B, N, D = _check_memory(memory)
    kn, sn = prefix + "keys", prefix + "strengths"
    _check(kn, keys, 3, "(B, H, D)", memory.dtype, memory.device)
    _check_dims(kn, keys, (B, None, D), "(B, H, D)")
    H = keys.shape[1]
    _check(sn, strengths, 2, "(B, H)", memory.dtype, memory.device)
    _check_dims(sn, strengths, (B, H), "(B, H)")
    if not (eps > 0):
        raise ValueError(f"eps must be positive, got {eps}")
    return B, N, D, H


def _check_weights(name, memory, weights, heads_name):
    B, N, D = _check_memory(memory)
    _check(name, weights, 3, f"(B, {heads_name}, N)", memory.dtype, memory.device)
    _check_dims(name, weights, (B, None, N), f"(B, {heads_name}, N)")
    return B, N, D, weights.shape[1]


def _check_write(memory, weights, erase, add):
    B, N, D, W = _check_weights("weights", memory, weights, "W")
    for name, t in (("erase", erase), ("add", add)):
        _check(name, t, 3, "(B, W, D)", memory.dtype, memory.device)
        _check_dims(name, t, (B, W, D), "(B, W, D)")
    return B, N, D, W


def _check_usage(usage, memory, decay):
    B, N, _ = memory.shape
    _check("usage", usage, 2, "(B, N)", memory.dtype, memory.device)
    _check_dims("usage", usage, (B, N), "(B, N)")
    if not (0.0 <= decay <= 1.0):
        raise ValueError(f"decay must be in [0, 1], got {decay}")


def _c(t):
    return t if t.is_contiguous() else t.contiguous()


def _write_vectors_ok(memory, keys, erase, add):
    try:
        shape, dt, dev = keys.shape, memory.dtype, memory.device
        return (erase.shape == shape and add.shape == shape and erase.dtype is dt and add.dtype is dt
                and erase.device == dev and add.device == dev)
    except AttributeError:
        return False


def _usage_ok(usage, memory, decay):
    try:
        B, N, _ = memory.shape
        return (usage.shape == (B, N) and usage.dtype is memory.dtype and usage.device == memory.device
                and 0.0 <= decay <= 1.0 and usage.is_contiguous())
    except AttributeError:
        return False


def _check_content_write(memory, keys, strengths, erase, add, usage, eps, decay, prefix=""):
    B, N, D = _check_memory(memory)
    kn, sn = prefix + "keys", prefix + "strengths"
    _check(kn, keys, 3, "(B, W, D)", memory.dtype, memory.device)
    _check_dims(kn, keys, (B, None, D), "(B, W, D)")
    W = keys.shape[1]
    _check(sn, strengths, 2, "(B, W)", memory.dtype, memory.device)
    _check_dims(sn, strengths, (B, W), "(B, W)")
    for name, t in (("erase", erase), ("add", add)):
        _check(name, t, 3, "(B, W, D)", memory.dtype, memory.device)
        _check_dims(name, t, (B, W, D), "(B, W, D)")
    if usage is not None:
        _check_usage(usage, memory, decay)
        if not usage.is_contiguous():
            raise ValueError("usage must be contiguous for the in-place write")
    if not memory.is_contiguous():
        raise ValueError("memory must be contiguous for the in-place write (call .contiguous() first)")
    if not (eps > 0):
        raise ValueError(f"eps must be positive, got {eps}")

