"""The Triton backend: the kernels (kernels.py) and their registration as torch.ops.neuralmem_triton.

Nothing is imported or registered until `register()` is called, which the
backend choice does on the first op that runs with backend="triton"
(ops/dispatch.py: triton_library). `register()` may be called any number of
times: the library is defined once per process.
"""
import threading

import torch

_lock = threading.Lock()
_LIB = None


def register():
    """Defines the neuralmem_triton library (the native schemas) with its kernels, once.

    Raises RuntimeError when triton cannot be imported or the native
    extension (which declares the schemas) is not built.
    """
    global _LIB
    if _LIB is not None:
        return _LIB
    with _lock:
        if _LIB is not None:
            return _LIB
        from .. import registry
        from ..autograd import register_autograd
        from ..fake import register_fakes
        from ..inplace import inplace_autograd_kernel
        from . import kernels

        if not kernels.AVAILABLE:
            raise RuntimeError("backend='triton' needs the triton package, which could not be imported here")
        names = registry.public_ops() + registry.backward_ops()
        if not names:
            raise RuntimeError("backend='triton' registers the native op schemas, but the extension is not built")
        lib = torch.library.Library("neuralmem_triton", "DEF")
        for name in names:
            lib.define(registry.schema_string(name))
            lib.impl(name, kernels.cpu_kernel(name, kernels.IMPLS[name]), "CPU")
            lib.impl(name, kernels.cuda_kernel(kernels.IMPLS[name]), "CUDA")
        register_fakes("neuralmem_triton")
        register_autograd("neuralmem_triton")
        # The in-place ops: PyTorch's in-place rules and version bumps, as
        # csrc/inplace.cpp gives the native library.
        for name in registry.inplace_ops():
            lib.impl(name, inplace_autograd_kernel(name, getattr(torch.ops.neuralmem_triton, name)), "Autograd")
        _LIB = lib
        return lib
