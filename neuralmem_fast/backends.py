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

The table ({device_type: {op: [[max_n, backend], ...]}, "_meta": {...}}) is
written by neuralmem_fast.autotune from a GPU benchmark run and records the
card it was measured on. A table from another card is still followed (a
choice between two kernels of ours is rarely worse than the fixed default),
but auto_choice() and auto_report() say that it came from another card.
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
            table = json.load(f)
    except (OSError, ValueError):
        return {}
    return table if isinstance(table, dict) else {}


def reload_table():
    """Forgets the cached table, so that the next lookup reads the file again."""
    _table.cache_clear()


def table_meta() -> dict:
    """The "_meta" record of the table (card, versions, dates, decisions), or {}."""
    meta = _table().get("_meta")
    return meta if isinstance(meta, dict) else {}


def _from_table(op: str, device_type: str, n: int):
    """Measured choice: entries {op: [[max_n, backend], ...]} per device type."""
    rows = _table().get(device_type, {}).get(op)
    if not rows:
        return None
    for max_n, backend in rows:
        if max_n is None or n <= max_n:
            return backend
    return None


def table_thresholds(op: str, device_type: str) -> tuple:
    """The sizes at which the table's choice for `op` may change, ascending:
    resolve() gives one answer for every N between two of them."""
    rows = _table().get(device_type, {}).get(op) or []
    return tuple(sorted({int(max_n) for max_n, _ in rows if max_n is not None}))


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


def _device_name(device: torch.device):
    """The card's name for a CUDA device here, else None."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(device)


def auto_choice(op: str, device="cuda", n: int = 0) -> dict:
    """What backend="auto" runs for `op` on `device` at N=n, and where that choice comes from.

    Returns a dict: backend, source ("table" or "default"), table_backend
    (the table's entry, or None), table_card, device_card, same_card (None
    when either name is unknown), and reason, a readable sentence.
    """
    dev = torch.device(device)
    backend = resolve("auto", op, dev, n)
    entry = _from_table(op, dev.type, n)
    card = table_meta().get("card")
    here = _device_name(dev)
    same = None if (card is None or here is None) else card == here
    out = dict(op=op, device=str(dev), n=n, backend=backend, table_backend=entry, table_card=card,
               device_card=here, same_card=same)
    if entry is not None and entry == backend:
        out["source"] = "table"
        if same:
            out["reason"] = f"table measured on {card} (this card)"
        elif same is False:
            out["reason"] = f"table measured on another card, {card} (this one is {here}); followed all the same"
        else:
            out["reason"] = (f"table measured on {card or 'an unrecorded card'}"
                             + ("" if here else " (no CUDA device visible here to compare with)"))
        return out
    out["source"] = "default"
    if entry is not None:
        out["reason"] = f"default: the table's choice {entry!r} cannot run here"
    elif not any(not k.startswith("_") for k in _table()):
        out["reason"] = f"default: no table ({os.path.basename(_TABLE_PATH)} absent or empty)"
    else:
        out["reason"] = f"default: the table has no entry for {op} on {dev.type}"
    return out


def auto_report(device="cuda", sizes=(128, 4096, 65536, 1_000_000, 10_000_000)):
    """Lines saying what auto picks per op and N on `device`, and why."""
    from .autotune import RESOLVE_OPS

    lines = [f"backend='auto' on {device}:"]
    for op in RESOLVE_OPS:
        for n in sizes:
            c = auto_choice(op, device, n)
            lines.append(f"  {op:19s} N={n:<9d} {c['backend']:7s} {c['reason']}")
    return lines
