"""The one place that decides which backend runs an op.

Backends:
  "torch"  - the pure-PyTorch reference (autograd over primitive ops)
  "cpu"    - the C++ CPU kernels of neuralmem_fast._C (CPU tensors)
  "cuda"   - the CUDA C++ kernels of neuralmem_fast._C (CUDA tensors)
  "triton" - the Triton kernels (CUDA tensors, or CPU tensors under
             TRITON_INTERPRET=1); registered on first use, never at import
  "auto"   - the fastest available one for the device and size, read from
             the measured table when it has an entry, else the native kernel
             for the device, else "torch".

An explicitly requested backend that is unavailable raises; "auto" falls back.

The table ({device_type: {op: [[max_n, backend], ...]}, "_meta": {...}}) is
written by `python -m neuralmem_fast autotune` from a GPU benchmark run and
records the card it was measured on. It is read from the first of
table_paths() that exists: $NEURALMEM_AUTOTUNE_TABLE, the user's table
(~/.cache/neuralmem_fast/autotune_table.json, or under $XDG_CACHE_HOME), then
the one shipped in the package. A table from another card is still followed
(a choice between two kernels of ours is rarely worse than the fixed
default), but auto_choice() and auto_report() say that it came from another
card.
"""
import functools
import importlib.util
import json
import os

import torch

from .._ext import has_cuda_kernels, has_extension

BACKENDS = ("auto", "torch", "cpu", "cuda", "triton")
PACKAGE_TABLE_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  "autotune_table.json")


def user_table_path() -> str:
    """Where `autotune --install` writes the table by default, and the first place it is read from."""
    env = os.environ.get("NEURALMEM_AUTOTUNE_TABLE")
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "neuralmem_fast", "autotune_table.json")


def table_paths():
    """The places the table is read from, first found first."""
    return [user_table_path(), PACKAGE_TABLE_PATH]


@functools.lru_cache(maxsize=None)
def has_triton() -> bool:
    """True when the Triton backend can run here: triton is installed and the
    native op schemas it registers against are loaded. Imports nothing."""
    return has_extension() and importlib.util.find_spec("triton") is not None


def triton_library():
    """torch.ops.neuralmem_triton, registering the Triton kernels on first use."""
    from . import triton as _triton

    _triton.register()
    return torch.ops.neuralmem_triton


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
    for path in table_paths():
        try:
            with open(path) as f:
                table = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(table, dict):
            return table
    return {}


def table_path_in_use():
    """The file the table in use was read from, or None."""
    for path in table_paths():
        if os.path.exists(path):
            return path
    return None


def reload_table():
    """Forgets the cached table (and the choices made from it), so that the next lookup reads the file again."""
    _table.cache_clear()
    resolve_cached.cache_clear()


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
        out["reason"] = "default: no table (none of " + ", ".join(table_paths()) + " holds one)"
    else:
        out["reason"] = f"default: the table has no entry for {op} on {dev.type}"
    return out


def auto_report(device="cuda", sizes=(128, 4096, 65536, 1_000_000, 10_000_000)):
    """Lines saying what auto picks per op and N on `device`, and why."""
    from .registry import public_ops

    lines = [f"backend='auto' on {device}:"]
    for op in public_ops():
        for n in sizes:
            c = auto_choice(op, device, n)
            lines.append(f"  {op:19s} N={n:<9d} {c['backend']:7s} {c['reason']}")
    return lines


# The choice depends only on its arguments and on what is installed, and a
# small step calls it on every op: remember it.
resolve_cached = functools.lru_cache(maxsize=4096)(resolve)


@torch.compiler.assume_constant_result
def _thresholds(op, device_type):
    return table_thresholds(op, device_type)


@torch.compiler.assume_constant_result
def _resolve_constant(backend, op, device, n):
    return resolve_cached(backend, op, device, n)


def choose(backend, op, device, n=0):
    """resolve(), remembered per arguments, and traceable.

    Under torch.compile it runs at trace time, outside the graph (the table
    is a file, and the extension's introspection is not traceable), and
    gives what eager mode would: N may be symbolic (dynamic shapes), so it
    is compared with the table's size thresholds (each comparison a guard)
    and the choice made for a size of the same table row.
    """
    if not torch.compiler.is_compiling():
        return resolve_cached(backend, op, device, n)
    row_n = 0
    for t in _thresholds(op, device.type):
        if n > t:
            row_n = t + 1
    return _resolve_constant(backend, op, device, row_n)


def library(backend):
    """The torch.ops namespace whose kernels run `backend` ("cpu", "cuda" or "triton")."""
    if backend == "triton":
        return triton_library()
    return torch.ops.neuralmem
