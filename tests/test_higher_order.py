"""Second derivatives through the native ops equal those of the reference.

The backward kernels are not differentiable themselves; with create_graph=True
the ops build their gradient from the reference, so double backward (e.g.
second-order MAML through a memory read) is right, not silently truncated.
"""
import pytest
import torch

import neuralmem_fast as nm

BACKENDS = [b for b in nm.available_backends("cpu") if b in ("cpu",)]


def _second_order(fn, inputs):
    """d/dinputs of |d f/d inputs|^2 with create_graph."""
    out = fn(*inputs)
    g = torch.randn_like(out, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad((out * g).sum(), inputs, create_graph=True)
    total = sum((x * x).sum() for x in grads)
    return torch.autograd.grad(total, inputs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["content_read", "content_addressing", "memory_read", "memory_write"])
def test_double_backward_matches_reference(op, backend):
    torch.manual_seed(0)
    B, N, D, H = 2, 7, 3, 2
    dt = torch.float64
    mem = torch.randn(B, N, D, dtype=dt, requires_grad=True)
    keys = torch.randn(B, H, D, dtype=dt, requires_grad=True)
    strengths = (torch.rand(B, H, dtype=dt) * 3).requires_grad_(True)
    weights = torch.softmax(torch.randn(B, H, N, dtype=dt), -1).requires_grad_(True)
    erase = torch.rand(B, H, D, dtype=dt, requires_grad=True)
    add = torch.randn(B, H, D, dtype=dt, requires_grad=True)
    args = {
        "content_read": (mem, keys, strengths),
        "content_addressing": (mem, keys, strengths),
        "memory_read": (mem, weights),
        "memory_write": (mem, weights, erase, add),
    }[op]
    fast = getattr(nm, op)
    ref = getattr(nm, op + "_ref")
    got = _second_order(lambda *a: fast(*a, backend=backend), args)
    want = _second_order(ref, args)
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8, msg=lambda m: f"{op} input {i}: {m}")
