"""Triton kernels for the memory ops, run as the ``neuralmem_triton`` ops.

The ops have exactly the schemas of ``neuralmem::*`` (csrc/ops.cpp, read
from the dispatcher by ops/registry.py), in their own namespace so that they
never compete with the CUDA C++ kernels for the CUDA dispatch key; the public
functions call them for ``backend="triton"`` and the gradient formulas of
ops/autograd.py are registered on them too. ops/triton/__init__.py registers
them, on first Triton use, with ``torch.library.Library("neuralmem_triton",
"DEF")`` and plain Python kernels for the CPU and CUDA keys rather than
``torch.library.triton_op``: ``triton_op`` infers its schema from type hints
(the optional mutated ``usage`` of ``content_write_`` and the exact argument
names would have to be coaxed out of it), and it exists to let Inductor
trace into the kernels, which buys nothing for CPU tensors under the
interpreter, the one place CI can run them.

Devices: CUDA tensors on a GPU; CPU tensors only under the Triton
interpreter (``TRITON_INTERPRET=1`` set before this module is imported),
which is how CI runs the kernels. The same launches, shapes and block sizes
serve both; only the number of slot splits follows the device.

Design (B memories, N slots, D slot width, H read / W write heads):

* One program owns one memory ``b`` and a contiguous range of slots (a
  "split") and serves *all* heads of ``b``: every memory row is read from
  global memory once per pass, whatever H is. Heads, slots and the slot width
  are padded to powers of two (BH, BN, BD) and masked.
* Head x slot x width products are broadcast-multiply + ``tl.sum`` over a 3D
  tile bounded by ``_TILE`` elements; ``tl.dot`` (IEEE fp32, so results match
  the reference) only when BH >= 16 so that every dot dimension is >= 16, and
  never for float64.
* Accumulation is float32 for half inputs and float64 for float64 inputs
  (``ACC``); ``eps`` and ``decay`` travel as two float32 halves (hi + lo) so a
  float64 run sees them to ~48 bits instead of float32's 24.
* Softmax over slots (content_addressing, content_read, content_write_) is an
  online softmax over slot blocks; logits are masked to -inf past the end, the
  running max starts at -inf, and every split owns at least one slot, so the
  max is finite after the first block and nothing divides by zero for any
  finite strength (the largest logit contributes exp(0) = 1 to its sum).
  Weights that are written out are exp(s - max) / sum, as torch.softmax
  does, not exp(s - lse): a float32 lse near |s| ~ 1e4 is only good to
  ~5e-4. The float32 content_read backward over more than one block does
  recompute exp(s - lse) from the saved lse, so at such strengths its
  weights carry that error (float64 and moderate strengths are unaffected).
* Half-precision backwards do not take delta = sum_n w_n dw_n from the half
  reads or weights of the forward: it cancels wherever the softmax is
  peaked, and the strength multiplies what is left. They recompute the
  weights as exp(s - max) / sum and delta from float intermediates (a
  statistics pass first; in the program itself when one split covers the
  memory); content_read does so for the heads whose given lse is their own
  (a sharded memory passes its global lse and reads, which are then used
  as given). float/double content_read does the same when the memory is
  one block, where it is free and makes the one-slot gradient exactly 0.
* A head whose strength or key has an inf/NaN element gets NaN outputs and
  gradients, where the reference formula gives NaN (see _load_query).
* Large N: the slots are split across programs (Flash-Decoding). content_read
  writes per-split partial (max, sum, acc) and a second tiny kernel combines
  them; with one split the first kernel writes the result itself. The split
  count targets a few programs per SM on a GPU and is 1 under the interpreter
  unless forced with ``override(split_slots=...)``.
* Backward of the softmax ops recomputes the weights (content_read; also
  content_addressing for half inputs, see above) or reads the given
  weights, never materialises (B,H,N) in content_read, writes d(memory) per
  slot, and reduces per-split partial grads of keys/strengths in a fixed
  order in a second kernel: deterministic, no float atomics.
* memory_write backward uses exclusive prefix/suffix products over the write
  heads (``tl.cumprod`` over shifted factors), never a division by (1 - w e).

``compile_only(arch)`` builds every kernel the ops launch into a cubin for a
real GPU without one (Triton's bundled ptxas), so that code which only the
interpreter accepts is caught in CI.
"""
import torch

from .launch import (_content_addressing, _content_addressing_backward, _content_read, _content_read_backward,
                     _content_read_write_, _content_write_, _memory_read, _memory_read_backward, _memory_write,
                     _memory_write_, _memory_write_backward, _usage_update)

# Re-exported for the tests and tools that turn the knobs or compile the kernels.
from ._triton import AVAILABLE
from .compile_check import compile_only
from .jit_common import INTERPRETED
from .planning import CONFIG, _plan, override

__all__ = ["AVAILABLE", "INTERPRETED", "IMPLS", "CONFIG", "override", "compile_only", "cpu_kernel", "cuda_kernel",
           "_plan"]


# --------------------------------------------------------------------------
# the kernels of each op of the neuralmem_triton library (ops/triton/__init__.py
# registers them under the native library's schemas)
# --------------------------------------------------------------------------
def _logits(memory, keys, strengths, eps):
    acc = torch.float64 if memory.dtype == torch.float64 else torch.float32
    m, k = memory.to(acc), keys.to(acc)
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(eps)
    k = k / k.norm(dim=-1, keepdim=True).clamp_min(eps)
    return strengths.to(acc).unsqueeze(-1) * torch.matmul(k, m.transpose(-1, -2))


def _content_write(memory, keys, strengths, erase, add, eps):
    """Composed of the Triton addressing and write kernels (no fused Triton kernel yet)."""
    w = _content_addressing(memory, keys, strengths, eps)
    return _memory_write(memory, w, erase, add), torch.logsumexp(_logits(memory, keys, strengths, eps), dim=-1)


def _content_write_backward(grad_out, lse, memory, keys, strengths, erase, add, eps):
    w = _content_addressing(memory, keys, strengths, eps)
    dm, dw, de, da = _memory_write_backward(grad_out, memory, w, erase, add)
    dm2, dk, ds = _content_addressing_backward(dw, w, memory, keys, strengths, eps)
    return dm + dm2, dk, ds, de, da


def _content_read_write(memory, read_keys, read_strengths, write_keys, write_strengths, erase, add, eps):
    """The Triton content_read, then the composed content_write above."""
    reads, rlse = _content_read(memory, read_keys, read_strengths, eps)
    new, wlse = _content_write(memory, write_keys, write_strengths, erase, add, eps)
    return reads, new, rlse, wlse


def _content_read_write_backward(grad_reads, grad_out, reads, read_lse, write_lse, memory, read_keys,
                                 read_strengths, write_keys, write_strengths, erase, add, eps):
    dm, drk, drs = _content_read_backward(grad_reads, reads, read_lse, memory, read_keys, read_strengths, eps)
    dm2, dwk, dws, de, da = _content_write_backward(grad_out, write_lse, memory, write_keys, write_strengths, erase,
                                                    add, eps)
    return dm + dm2, drk, drs, dwk, dws, de, da


IMPLS = {
    "content_addressing": _content_addressing,
    "content_addressing_backward": _content_addressing_backward,
    "memory_read": _memory_read,
    "memory_read_backward": _memory_read_backward,
    "content_read": _content_read,
    "content_read_backward": _content_read_backward,
    "memory_write": _memory_write,
    "memory_write_backward": _memory_write_backward,
    "memory_write_": _memory_write_,
    "usage_update": _usage_update,
    "content_write_": _content_write_,
    "content_write": _content_write,
    "content_write_backward": _content_write_backward,
    "content_read_write_": _content_read_write_,
    "content_read_write": _content_read_write,
    "content_read_write_backward": _content_read_write_backward,
}



def cpu_kernel(name, fn):
    def impl(*args):
        if not INTERPRETED:
            raise RuntimeError(
                f"neuralmem_triton::{name} got CPU tensors; the Triton kernels run on CPU only under the "
                "interpreter: set TRITON_INTERPRET=1 before neuralmem_fast is imported, or use CUDA tensors"
            )
        return fn(*args)

    return impl


def cuda_kernel(fn):
    def impl(*args):
        # Triton launches on the current device; make it the tensors' one.
        with torch.cuda.device(args[0].device):
            return fn(*args)

    return impl
