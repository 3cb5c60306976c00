"""Loads the native extension once and says so once when it is missing."""
import warnings

import torch  # noqa: F401  (the extension needs torch's symbols loaded first)

try:
    from . import _C  # registers the neuralmem:: ops as a side effect

    _IMPORT_ERROR = None
except ImportError as exc:  # pragma: no cover - exercised only without a build
    _C = None
    _IMPORT_ERROR = exc
    warnings.warn(
        "neuralmem_fast: the native extension neuralmem_fast._C is not built "
        f"({exc}); using the pure-PyTorch paths. Build it with "
        "`pip install --no-build-isolation -e .` or `make build`.",
        RuntimeWarning,
        stacklevel=2,
    )


def has_extension() -> bool:
    """True when the C++ extension (CPU kernels, sum tree) is importable."""
    return _C is not None


def has_cuda_kernels() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    return _C is not None and bool(_C.built_with_cuda())
