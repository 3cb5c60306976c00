"""Fake kernels: output shapes and dtypes of every op, for torch.compile and FakeTensor tracing.

One set of functions serves both libraries (the native `neuralmem` and the
Triton `neuralmem_triton`), which share their schemas.
"""
import torch

_registered = set()


def _lse_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def register_fakes(ns):
    """Registers fake kernels for the ops of namespace `ns` (same schemas), once."""
    if ns in _registered:
        return
    _registered.add(ns)
    lib = f"{ns}::"

    @torch.library.register_fake(lib + "content_addressing")
    def _(memory, keys, strengths, eps):
        return memory.new_empty((memory.shape[0], keys.shape[1], memory.shape[1]))

    @torch.library.register_fake(lib + "content_addressing_backward")
    def _(grad_weights, weights, memory, keys, strengths, eps):
        return torch.empty_like(memory), torch.empty_like(keys), torch.empty_like(strengths)

    @torch.library.register_fake(lib + "memory_read")
    def _(memory, weights):
        return memory.new_empty((memory.shape[0], weights.shape[1], memory.shape[2]))

    @torch.library.register_fake(lib + "memory_read_backward")
    def _(grad_reads, memory, weights):
        return torch.empty_like(memory), torch.empty_like(weights)

    @torch.library.register_fake(lib + "content_read")
    def _(memory, keys, strengths, eps):
        reads = memory.new_empty((memory.shape[0], keys.shape[1], memory.shape[2]))
        lse = memory.new_empty((memory.shape[0], keys.shape[1]), dtype=_lse_dtype(memory.dtype))
        return reads, lse

    @torch.library.register_fake(lib + "content_read_backward")
    def _(grad_reads, reads, lse, memory, keys, strengths, eps, grad_memory=True):
        dm = torch.empty_like(memory) if grad_memory else memory.new_empty((0,))
        return dm, torch.empty_like(keys), torch.empty_like(strengths)

    @torch.library.register_fake(lib + "memory_write")
    def _(memory, weights, erase, add):
        return torch.empty_like(memory)

    @torch.library.register_fake(lib + "memory_write_backward")
    def _(grad_out, memory, weights, erase, add):
        return (torch.empty_like(memory), torch.empty_like(weights), torch.empty_like(erase),
                torch.empty_like(add))

    @torch.library.register_fake(lib + "memory_write_")
    def _(memory, weights, erase, add):
        return None

    @torch.library.register_fake(lib + "usage_update")
    def _(usage, weights, decay):
        return torch.empty_like(usage)

    @torch.library.register_fake(lib + "content_write_")
    def _(memory, usage, keys, strengths, erase, add, eps, decay):
        if usage is None:
            return memory.new_empty((0,), dtype=torch.int64)
        return memory.new_empty((memory.shape[0],), dtype=torch.int64)

    @torch.library.register_fake(lib + "content_write")
    def _(memory, keys, strengths, erase, add, eps):
        lse = memory.new_empty((memory.shape[0], keys.shape[1]), dtype=_lse_dtype(memory.dtype))
        return torch.empty_like(memory), lse

    @torch.library.register_fake(lib + "content_write_backward")
    def _(grad_out, lse, memory, keys, strengths, erase, add, eps):
        return (torch.empty_like(memory), torch.empty_like(keys), torch.empty_like(strengths),
                torch.empty_like(erase), torch.empty_like(add))

    @torch.library.register_fake(lib + "content_read_write")
    def _(memory, read_keys, read_strengths, write_keys, write_strengths, erase, add, eps):
        B, H, W = memory.shape[0], read_keys.shape[1], write_keys.shape[1]
        lse_dtype = _lse_dtype(memory.dtype)
        return (memory.new_empty((B, H, memory.shape[2])), torch.empty_like(memory),
                memory.new_empty((B, H), dtype=lse_dtype), memory.new_empty((B, W), dtype=lse_dtype))

    @torch.library.register_fake(lib + "content_read_write_backward")
    def _(grad_reads, grad_out, reads, read_lse, write_lse, memory, read_keys, read_strengths, write_keys,
          write_strengths, erase, add, eps):
        return (torch.empty_like(memory), torch.empty_like(read_keys), torch.empty_like(read_strengths),
                torch.empty_like(write_keys), torch.empty_like(write_strengths), torch.empty_like(erase),
                torch.empty_like(add))

    @torch.library.register_fake(lib + "content_read_write_")
    def _(memory, usage, read_keys, read_strengths, write_keys, write_strengths, erase, add, eps, decay):
        B, H = read_keys.shape[0], read_keys.shape[1]
        reads = memory.new_empty((B, H, memory.shape[2]))
        lse = memory.new_empty((B, H), dtype=_lse_dtype(memory.dtype))
        least = memory.new_empty((0,) if usage is None else (B,), dtype=torch.int64)
        return reads, lse, least
