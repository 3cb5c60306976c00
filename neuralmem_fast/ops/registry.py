"""The one list of ops: read from the dispatcher, where csrc/ops.cpp declared them.

Each op's name and schema is written once, in the TORCH_LIBRARY block of
csrc/ops.cpp. Everything else derives from what the dispatcher holds: the
Triton library's schemas, the backend choice's op list, the autotune table's
ops and the tests. The kinds:
  - public ops: what the functional API exposes (`content_read`, ...), each
    with a CPU kernel, a fake kernel and an entry in backend resolution;
  - differentiable ops: public ops that are not in place, each with a
    gradient formula (ops/autograd.py) and a `<name>_backward` kernel op
    (usage_update's gradient is a scale and a broadcast, and has none);
  - in-place ops: schemas that write an argument (`Tensor(a!)`), forward-only,
    with an Autograd kernel that applies PyTorch's in-place rules;
  - backward ops: `<name>_backward`, called by the gradient formulas;
  - utilities: ops without tensor arguments (`cpu_capability`).
"""
import functools

import torch

from .._ext import has_extension

NAMESPACE = "neuralmem"

__all__ = ["NAMESPACE", "op_names", "schema", "schema_string", "public_ops", "differentiable_ops", "inplace_ops",
           "backward_ops", "utility_ops"]


@functools.lru_cache(maxsize=None)
def op_names(ns=NAMESPACE):
    """Every op of namespace `ns` registered with the dispatcher, sorted (empty without the extension)."""
    if ns == NAMESPACE and not has_extension():
        return ()
    prefix = ns + "::"
    names = {n[len(prefix):].split(".")[0] for n in torch._C._dispatch_get_all_op_names() if n.startswith(prefix)}
    return tuple(sorted(names))


def schema(name, ns=NAMESPACE):
    """The torch FunctionSchema of op `name`."""
    return getattr(getattr(torch.ops, ns), name).default._schema


def schema_string(name, ns=NAMESPACE):
    """The schema without its namespace, "content_read(Tensor memory, ...) -> (Tensor, Tensor)"."""
    return str(schema(name, ns)).split("::", 1)[1]


def _has_tensor_args(s):
    return any("Tensor" in str(a.type) for a in s.arguments)


def _writes(s):
    return any(a.alias_info is not None and a.alias_info.is_write for a in s.arguments)


def utility_ops(ns=NAMESPACE):
    return tuple(n for n in op_names(ns) if not _has_tensor_args(schema(n, ns)))


def backward_ops(ns=NAMESPACE):
    return tuple(n for n in op_names(ns) if n.endswith("_backward"))


def public_ops(ns=NAMESPACE):
    """The ops of the functional API, in the dispatcher's (sorted) order."""
    skip = set(utility_ops(ns)) | set(backward_ops(ns))
    return tuple(n for n in op_names(ns) if n not in skip)


def inplace_ops(ns=NAMESPACE):
    return tuple(n for n in public_ops(ns) if _writes(schema(n, ns)))


def differentiable_ops(ns=NAMESPACE):
    return tuple(n for n in public_ops(ns) if not _writes(schema(n, ns)))
