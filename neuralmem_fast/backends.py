"""The one place that decides which backend runs an op.

Backends:
  "torch"  - the pure-PyTorch reference (autograd over primitive ops)
  "cpu"    - the C++ CPU kernels of neuralmem_fast._C (CPU tensors)
  "cuda"   - the CUDA C++ kernels of neuralmem_fast._C (CUDA tensors)
  "triton" - the Triton kernels (CUDA tensors, or CPU tensors under
             TRITON_INTERPRET=1)
  "auto"   - the fastest available one for the device and size, read from
             the measured table in autotune_table.json when it has an entry,
             else the native kernel for the device, else "torch".

An explicitly requested backend that is unavailable raises; "auto" falls back.
"""
import functools
import json
import os

import torch

from ._ext import has_cuda_kernels, has_extension

BACKENDS = ("auto", "torch", "cpu", "cuda", "triton")
_TABLE_PATH = os.path.join(os.path.dirname(__file__), "autotune_table.json")


@functools.lru_cache(maxsize=None)
def has_triton() -> bool:
    """True when the Triton backend can run here (a GPU, or the interpreter)."""
    try:
        from . import triton_ops  # noqa: F401
    except Exception:
        return False
    return triton_ops.AVAILABLE


def _triton_runs_on(device_type: str) -> bool:
    if not has_triton():
        return False
    if device_type == "cuda":
        return True
    return device_type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"


def available_backends(device="cpu"):
    """Backends that can run ops on tensors of `device` here, fastest first."""
    dev = torch.device(device).type
    out = []
    if dev == "cuda" and has_cuda_kernels():
        out.append("cuda")
    if dev == "cpu" and has_extension():
        out.append("cpu")
    if _triton_runs_on(dev):
        out.append("triton")
    out.append("torch")
    return out


@functools.lru_cache(maxsize=None)
def _table():
    try:
        with open(_TABLE_PATH) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _from_table(op: str, device_type: str, n: int):
    """Measured choice: entries {op: [[max_n, backend], ...]} per device type."""
    rows = _table().get(device_type, {}).get(op)
    if not rows:
        return None
    for max_n, backend in rows:
        if max_n is None or n <= max_n:
            return backend
    return None


def resolve(backend: str, op: str, device: torch.device, n: int = 0) -> str:
    """Turns a requested backend into the one that will run, or raises."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    dev = device.type
    avail = available_backends(device)
    if backend == "auto":
        choice = _from_table(op, dev, n)
        if choice in avail and choice != "triton":
            return choice
        # Triton under the interpreter is for testing, never a fast path.
        if choice == "triton" and dev == "cuda" and "triton" in avail:
            return choice
        for cand in ("cuda", "cpu"):
            if cand in avail:
                return cand
        if dev == "cuda" and "triton" in avail:
            return "triton"
        return "torch"
    if backend in avail:
        return backend
    if backend == "cpu" and dev != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device}")
    if backend == "cuda" and dev != "cuda":
        raise ValueError(f"backend='cuda' needs CUDA tensors, got tensors on {device}")
    if backend == "triton" and dev == "cpu":
        raise RuntimeError(
            "backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before "
            "neuralmem_fast is imported, and triton installed"
        )
    raise RuntimeError(
        f"backend={backend!r} is not available here (available for {dev}: {avail}); "
        "build the extension with `pip install --no-build-isolation -e .`"
    )
