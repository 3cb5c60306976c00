"""Builds every launched kernel for a real GPU without one (Triton's bundled ptxas).

So that code which only the interpreter accepts is caught in CI.
"""
import contextlib

import torch

from ._triton import triton

from . import planning
from .jit_common import INTERPRETED


# --------------------------------------------------------------------------
# compile check: build the launched kernels for a real GPU without one
# --------------------------------------------------------------------------
_SIG = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float64: "*fp64",
        torch.int32: "*i32", torch.int64: "*i64"}


@contextlib.contextmanager
def compile_only(arch=90):
    """Within this context the ops compile every kernel they launch for CUDA sm_<arch>
    (to a cubin, with Triton's bundled ptxas) instead of running it; no GPU needed.

    Must run without the interpreter (TRITON_INTERPRET unset). Yields the list of
    (kernel name, constexprs) compiled. Call the IMPLS functions directly with CPU
    tensors (outputs stay uninitialised).
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if INTERPRETED:
        raise RuntimeError("compile_only needs TRITON_INTERPRET unset before triton is imported")
    target = GPUTarget("cuda", arch, 32)
    done, seen = [], set()

    def hook(kernel, args, meta, num_warps):
        names = kernel.arg_names
        sig, consts = {}, {}
        for name, val in zip(names, args):
            if isinstance(val, torch.Tensor):
                sig[name] = _SIG[val.dtype]
            elif isinstance(val, bool):
                sig[name] = "i1"
            elif isinstance(val, int):
                sig[name] = "i32" if -2**31 <= val < 2**31 else "i64"
            elif isinstance(val, float):
                sig[name] = "fp32"
            else:
                raise TypeError(f"compile_only: unsupported argument {name}={val!r}")
        for name, val in meta.items():
            sig[name] = "constexpr"
            consts[name] = val
        key = (kernel.__name__, tuple(sorted(sig.items())), tuple(sorted((k, str(v)) for k, v in consts.items())),
               num_warps)
        if key in seen:
            return
        seen.add(key)
        triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts), target=target,
                       options={"num_warps": num_warps})
        done.append((kernel.__name__, {k: str(v) for k, v in consts.items()}))

    planning._LAUNCH_HOOK = hook
    try:
        yield done
    finally:
        planning._LAUNCH_HOOK = None
