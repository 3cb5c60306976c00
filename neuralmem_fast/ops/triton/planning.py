"""Host-side planning of the Triton launches: block and split sizes, the launch itself, and the knobs tests turn."""
import contextlib
import functools
import struct

import torch

from ._triton import tl


# --------------------------------------------------------------------------
# knobs
# --------------------------------------------------------------------------
class _Config:
    """Block and split sizes; None means the heuristics below decide.

    block_n: slots per block (a power of two). split_slots: slots per split
    program (rounded up to a multiple of block_n); a small value makes a
    small N run several splits and the combine kernels, which is how the
    tests reach them on CPU.
    """

    block_n = None
    split_slots = None
    # SM count the split planner assumes; None: the device's (a CPU tensor
    # runs one split per memory). compile_only sets it to plan a card's real
    # launches without one.
    sms = None


CONFIG = _Config()


@contextlib.contextmanager
def override(block_n=None, split_slots=None):
    """Temporarily forces block_n and/or split_slots (see _Config)."""
    if block_n is not None and (block_n < 1 or block_n & (block_n - 1)):
        raise ValueError(f"block_n must be a power of two >= 1, got {block_n}")
    if split_slots is not None and split_slots < 1:
        raise ValueError(f"split_slots must be >= 1, got {split_slots}")
    old = (CONFIG.block_n, CONFIG.split_slots)
    CONFIG.block_n, CONFIG.split_slots = block_n, split_slots
    try:
        yield CONFIG
    finally:
        CONFIG.block_n, CONFIG.split_slots = old


# Warps per SM the split planner assumes resident at once: four programs of
# four warps or two of eight. Every launch caps the registers to match
# (MAX_REGS, ptxas' maxnreg), and tests/test_kernel_resources.py checks that
# no launched variant spills under that cap.
WARPS_PER_SM = 16
MAX_REGS = 65536 // (WARPS_PER_SM * 32)


def programs_per_sm(num_warps):
    """Programs of num_warps warps that the split planner assumes resident on one SM."""
    return max(1, WARPS_PER_SM // num_warps)

# Largest 3D broadcast tile (heads x slots x width) one program holds: 16
# elements a thread at four warps, which fits MAX_REGS without spilling (an
# 8192 tile took 255 registers and spilled). Halved for float64.
_TILE = 2048


# --------------------------------------------------------------------------
# host side: block sizes, splits, launches
# --------------------------------------------------------------------------
def _next_pow2(x):
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def _prev_pow2(x):
    return 1 if x <= 1 else 1 << (int(x).bit_length() - 1)


def _cdiv(a, b):
    return -(-a // b)


def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _acc_torch(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _hi_lo(x):
    """x as two float32 whose sum carries ~48 bits (kernels' scalar floats are float32)."""
    hi = struct.unpack("f", struct.pack("f", float(x)))[0]
    lo = struct.unpack("f", struct.pack("f", float(x) - hi))[0]
    return hi, lo


@functools.lru_cache(maxsize=None)
def _num_sms(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


class _Plan:
    __slots__ = ("BN", "BD", "BH", "use_dot", "S", "split", "num_warps")


def _plan(B, N, D, heads, dtype, device, dot_ok=False, tile=_TILE, warps_tile=None):
    """Block sizes for a (heads x slots x width) tile, and the slot splits.

    The 3D broadcast tile is bounded by `tile` elements (backward kernels,
    which hold several such products at once, ask for half); tl.dot serves when
    BH >= 16 (then BN and BD are padded to >= 16 too). Splits: as many
    programs as programs_per_sm(num_warps) on every SM (one split per memory
    under the interpreter, where programs run one after another), whole
    blocks per split.
    """
    p = _Plan()
    p.BD = _next_pow2(D)
    p.BH = _next_pow2(heads)
    p.use_dot = dot_ok and p.BH >= 16 and dtype != torch.float64
    tile = tile // 2 if dtype == torch.float64 else tile
    if p.use_dot:
        p.BD = max(p.BD, 16)
        bn = min(128, max(16, _prev_pow2(tile // p.BD)))
        bn = max(16, min(bn, _next_pow2(N)))
        if CONFIG.block_n is not None:
            bn = max(16, CONFIG.block_n)
    else:
        bn = min(128, max(1, _prev_pow2(tile // (p.BH * p.BD))))
        bn = min(bn, _next_pow2(N))
        if CONFIG.block_n is not None:
            bn = CONFIG.block_n
    p.BN = bn
    # Warps by the product tile's size against warps_tile (default: the tile
    # bound; kernels that hold more tiles at once pass less): four up to half
    # of it, eight up to twice, sixteen beyond (the tl.dot path's 16 heads).
    # Fewer spill under MAX_REGS.
    elems = p.BH * p.BN * p.BD
    wt = tile if warps_tile is None else warps_tile
    p.num_warps = 4 if 2 * elems <= wt else 8 if elems <= 2 * wt else 16
    nblocks = _cdiv(N, bn)
    if CONFIG.split_slots is not None:
        split = _cdiv(CONFIG.split_slots, bn) * bn
    else:
        if CONFIG.sms is not None:
            programs = programs_per_sm(p.num_warps) * CONFIG.sms
        elif device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            programs = programs_per_sm(p.num_warps) * _num_sms(index)
        else:
            programs = 1
        s = max(1, min(nblocks, _cdiv(programs, max(B, 1))))
        split = _cdiv(nblocks, s) * bn
    p.split = split
    p.S = _cdiv(N, split)
    return p


# A test hook: when set, launches are handed to it instead of running
# (compile_only uses it to build every launched kernel for a real GPU).
_LAUNCH_HOOK = None


def _launch(kernel, programs, *args, num_warps=4, num_stages=None, **meta):
    """num_stages: Triton's software pipelining depth of the kernel's loops (None: Triton's default)."""
    if programs <= 0:
        return
    if _LAUNCH_HOOK is not None:
        _LAUNCH_HOOK(kernel, args, meta, num_warps, num_stages)
        return
    if num_stages is not None:
        meta["num_stages"] = num_stages
    kernel[(programs,)](*args, num_warps=num_warps, maxnreg=MAX_REGS, **meta)
