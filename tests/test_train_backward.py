"""The training path's backward: content_read's output mask (no memory
gradient, no (N, D) buffer), and the CPU buffer pool's reuse of the memory's
gradient between steps."""
import pytest
import torch

import neuralmem_fast as nm
from neuralmem_fast import ops
from neuralmem_fast.ops.reference import content_read_ref

pytestmark = pytest.mark.skipif(not nm.has_extension(), reason="the native extension is not built")
OPS = torch.ops.neuralmem


def _inputs(B, N, D, H, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(B, N, D, dtype=torch.float64, generator=g).to(dtype)
    k = torch.randn(B, H, D, dtype=torch.float64, generator=g).to(dtype)
    s = (1 + 4 * torch.rand(B, H, dtype=torch.float64, generator=g)).to(dtype)
    return m, k, s


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 7, 3, 2), (1, 1000, 64, 4), (3, 517, 13, 1)])
def test_masked_backward_gives_the_same_key_gradients_and_no_memory_buffer(dtype, shape):
    B, N, D, H = shape
    m, k, s = _inputs(B, N, D, H, dtype)
    reads, lse = OPS.content_read(m, k, s, 1e-12)
    gr = torch.randn_like(reads)
    dm, dk, ds = OPS.content_read_backward(gr, reads, lse, m, k, s, 1e-12)
    dm0, dk0, ds0 = OPS.content_read_backward(gr, reads, lse, m, k, s, 1e-12, False)
    assert dm0.numel() == 0 and dm.shape == m.shape
    # Same chunks and sums with or without the memory's gradient: bitwise equal.
    assert torch.equal(dk, dk0) and torch.equal(ds, ds0)


def test_autograd_skips_the_memory_gradient_when_memory_needs_none():
    m, k, s = _inputs(2, 9, 4, 3)
    k.requires_grad_(True)
    s.requires_grad_(True)
    reads = ops.content_read(m, k, s, backend="cpu")
    reads.backward(torch.ones_like(reads))
    assert m.grad is None
    k2, s2 = k.detach().clone().requires_grad_(True), s.detach().clone().requires_grad_(True)
    content_read_ref(m, k2, s2).backward(torch.ones_like(reads))
    torch.testing.assert_close(k.grad, k2.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(s.grad, s2.grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("need", ["keys", "strengths", "memory", "all"])
def test_gradcheck_with_each_output_mask(need):
    m, k, s = _inputs(2, 7, 3, 2)
    args = [m, k, s]
    for i, name in enumerate(("memory", "keys", "strengths")):
        if need in (name, "all"):
            args[i] = args[i].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda m, k, s: ops.content_read(m, k, s, backend="cpu"), args)


def test_opcheck_masked_backward():
    m, k, s = _inputs(2, 7, 3, 2, torch.float32)
    reads, lse = OPS.content_read(m, k, s, 1e-12)
    torch.library.opcheck(OPS.content_read_backward.default,
                          (torch.randn_like(reads), reads, lse, m, k, s, 1e-12, False))


def test_memory_gradient_buffers_are_reused_between_steps():
    # 8 MiB and above come from the pool: the second step's gradient reuses the first's block.
    N, D = 1 << 15, 64
    m, k, s = _inputs(1, N, D, 4, torch.float32)
    m.requires_grad_(True)
    ptrs = []
    for _ in range(3):
        m.grad = None
        ops.content_read(m, k, s, backend="cpu").sum().backward()
        assert torch.isfinite(m.grad).all()
        ptrs.append(m.grad.data_ptr())
    assert len(set(ptrs)) == 1, ptrs
    # And the values are those of a fresh computation.
    m2 = m.detach().clone().requires_grad_(True)
    content_read_ref(m2, k, s).sum().backward()
    torch.testing.assert_close(m.grad, m2.grad, rtol=1e-4, atol=1e-6)


def test_mid_sized_gradient_buffers_are_reused_too():
    # 1 MiB to 8 MiB (a B=16, N=1,024, D=64 memory is 4 MiB): the pool's class of smaller blocks, which
    # holds the T outputs a recurrent forward keeps for its backward. Three sequences of 6 writes, each
    # kept until the sequence ends: the third gets the second's blocks back and faults no page in.
    import resource

    B, N, D, T = 16, 1024, 64, 6
    m0 = torch.randn(B, N, D)
    w = torch.softmax(torch.randn(B, 1, N), -1)
    e, a = torch.rand(B, 1, D), torch.randn(B, 1, D)
    seen = []
    for _ in range(3):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        outs = [m0]
        for _ in range(T):
            outs.append(ops.memory_write(outs[-1], w, e, a, backend="cpu"))
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
        seen.append({o.data_ptr() for o in outs[1:]})
        last = outs[-1].clone()
        del outs
    assert seen[2] == seen[1], (seen[1], seen[2])
    assert faults < T * 1024 // 8, faults   # fresh 4 MiB blocks would fault 1,024 pages each
    ref = m0
    for _ in range(T):
        ref = ops.memory_write_ref(ref, w, e, a)
    torch.testing.assert_close(last, ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ content_write
def _write_inputs(B, N, D, W, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(B, N, D, dtype=torch.float64, generator=g)
    k = torch.randn(B, W, D, dtype=torch.float64, generator=g)
    s = 1 + 4 * torch.rand(B, W, dtype=torch.float64, generator=g)
    e = torch.rand(B, W, D, dtype=torch.float64, generator=g)
    a = torch.randn(B, W, D, dtype=torch.float64, generator=g)
    return [t.to(dtype) for t in (m, k, s, e, a)]


# (1, 9, 16, 1): one write head and whole vectors, the CPU backward's register path
@pytest.mark.parametrize("shape", [(2, 7, 3, 1), (1, 9, 4, 3), (2, 300, 5, 2), (1, 9, 16, 1)])
def test_content_write_gradcheck(shape):
    args = [t.requires_grad_(True) for t in _write_inputs(*shape)]
    assert torch.autograd.gradcheck(lambda *a: ops.content_write(*a, backend="cpu"), args)


@pytest.mark.parametrize("shape", [(1, 1000, 64, 1), (3, 517, 13, 2), (1, 70000, 8, 1)])
def test_content_write_equals_the_separate_ops(shape):
    from neuralmem_fast.ops.reference import content_write_ref

    args = _write_inputs(*shape)
    g = torch.randn_like(args[0])
    x = [t.clone().requires_grad_(True) for t in args]
    new = ops.content_write(*x, backend="cpu")
    got = torch.autograd.grad(new, x, g)
    y = [t.clone().requires_grad_(True) for t in args]
    ref = content_write_ref(*y)
    want = torch.autograd.grad(ref, y, g)
    torch.testing.assert_close(new, ref, rtol=0, atol=1e-12)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_content_write_low_precision_forward_and_backward(dtype):
    args = _write_inputs(2, 300, 16, 1, dtype)
    x = [t.clone().requires_grad_(True) for t in args]
    new = ops.content_write(*x, backend="cpu")
    new.float().square().sum().backward()
    y = [t.detach().double().requires_grad_(True) for t in args]
    ref = ops.content_write(*y, backend="torch")
    ref.square().sum().backward()
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(new.double(), ref, **tol)
    for a, b in zip(x, y):
        scale = b.grad.abs().max().clamp_min(1)
        torch.testing.assert_close(a.grad.double() / scale, b.grad / scale, **tol)


def test_content_write_opcheck_and_bad_input():
    m, k, s, e, a = _write_inputs(2, 7, 3, 2, torch.float32)
    new, lse = OPS.content_write(m, k, s, e, a, 1e-12)
    torch.library.opcheck(OPS.content_write.default, (m, k, s, e, a, 1e-12))
    torch.library.opcheck(OPS.content_write_backward.default, (torch.randn_like(m), lse, m, k, s, e, a, 1e-12))
    x = [t.clone().requires_grad_(True) for t in (m, k, s, e, a)]
    torch.library.opcheck(OPS.content_write.default, (*x, 1e-12))
    with pytest.raises(ValueError, match="erase"):
        ops.content_write(m, k, s, e[:, :1], a, backend="cpu")
    with pytest.raises(ValueError, match="strengths"):
        ops.content_write(m, k, s[:, :1], e, a, backend="cpu")
    before = m.clone()
    ops.content_write(m, k, s, e, a, backend="cpu")
    assert torch.equal(m, before), "content_write is out of place"


# ------------------------------------------------------------------ content_read_write
def _rw_inputs(B, N, D, H, W, dtype=torch.float64, seed=0):
    """memory, read keys, read strengths, write keys, write strengths, erase, add."""
    g = torch.Generator().manual_seed(seed + 1)
    rk = torch.randn(B, H, D, dtype=torch.float64, generator=g)
    rs = 1 + 4 * torch.rand(B, H, dtype=torch.float64, generator=g)
    m, wk, ws, e, a = _write_inputs(B, N, D, W, torch.float64, seed)
    return [t.to(dtype) for t in (m, rk, rs, wk, ws, e, a)]


def _rw_grads(fn, args, gr, gn, create_graph=False):
    x = [t.clone().requires_grad_(True) for t in args]
    reads, new = fn(*x)
    return (reads, new), torch.autograd.grad((reads, new), x, (gr, gn), create_graph=create_graph)


# (B, N, D, H, W); (1, 9, 16, 4, 1): one write head and whole vectors (the
# CPU write backward's register path); (2, 300, 5, 3, 2): several blocks.
@pytest.mark.parametrize("shape", [(2, 7, 3, 1, 1), (1, 9, 4, 2, 3), (2, 300, 5, 3, 2), (1, 9, 16, 4, 1)])
def test_content_read_write_gradcheck(shape):
    args = [t.requires_grad_(True) for t in _rw_inputs(*shape)]
    assert torch.autograd.gradcheck(lambda *a: ops.content_read_write(*a, backend="cpu"), args)


@pytest.mark.parametrize("shape", [(1, 1000, 64, 4, 1), (3, 517, 13, 2, 2), (1, 70000, 8, 3, 1)])
def test_content_read_write_equals_the_two_ops(shape):
    from neuralmem_fast.ops.reference import content_read_write_ref

    args = _rw_inputs(*shape)
    B, N, D, H, W = shape
    gr, gn = torch.randn(B, H, D, dtype=torch.float64), torch.randn(B, N, D, dtype=torch.float64)
    (reads, new), got = _rw_grads(lambda *a: ops.content_read_write(*a, backend="cpu"), args, gr, gn)
    (r_ref, n_ref), want = _rw_grads(content_read_write_ref, args, gr, gn)
    torch.testing.assert_close(reads, r_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(new, n_ref, rtol=0, atol=1e-12)
    names = ("memory", "read_keys", "read_strengths", "write_keys", "write_strengths", "erase", "add")
    for n, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m, n=n: f"grad {n}: {m}")
    # The same as the two public ops, each with its own backward kernel.
    _, sep = _rw_grads(lambda m, rk, rs, wk, ws, e, a: (ops.content_read(m, rk, rs, backend="cpu"),
                                                         ops.content_write(m, wk, ws, e, a, backend="cpu")),
                       args, gr, gn)
    for n, a, b in zip(names, got, sep):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m, n=n: f"grad {n}: {m}")


@pytest.mark.parametrize("used", ["reads", "memory"])
def test_content_read_write_with_one_output_unused(used):
    from neuralmem_fast.ops.reference import content_read_write_ref

    args = _rw_inputs(2, 300, 5, 3, 2)
    res = []
    for fn in (lambda *a: ops.content_read_write(*a, backend="cpu"), content_read_write_ref):
        x = [t.clone().requires_grad_(True) for t in args]
        reads, new = fn(*x)
        out = reads if used == "reads" else new
        (out * torch.arange(out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        res.append([t.grad for t in x])
    for a, b in zip(*res):
        if b is None:
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_content_read_write_create_graph_matches_the_reference():
    from neuralmem_fast.ops.reference import content_read_write_ref

    args = _rw_inputs(1, 9, 4, 2, 1)
    gr, gn = torch.randn(1, 2, 4, dtype=torch.float64), torch.randn(1, 9, 4, dtype=torch.float64)
    second = []
    for fn in (lambda *a: ops.content_read_write(*a, backend="cpu"), content_read_write_ref):
        x = [t.clone().requires_grad_(True) for t in args]
        reads, new = fn(*x)
        g = torch.autograd.grad((reads, new), x, (gr, gn), create_graph=True)
        second.append(torch.autograd.grad(sum(t.square().sum() for t in g), x))
    for a, b in zip(*second):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_content_read_write_low_precision(dtype):
    args = _rw_inputs(2, 300, 16, 4, 1, dtype)
    x = [t.clone().requires_grad_(True) for t in args]
    reads, new = ops.content_read_write(*x, backend="cpu")
    (reads.float().square().sum() + new.float().square().sum()).backward()
    y = [t.detach().double().requires_grad_(True) for t in args]
    r_ref, n_ref = ops.content_read_write(*y, backend="torch")
    (r_ref.square().sum() + n_ref.square().sum()).backward()
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(reads.double(), r_ref, **tol)
    torch.testing.assert_close(new.double(), n_ref, **tol)
    for a, b in zip(x, y):
        scale = b.grad.abs().max().clamp_min(1)
        torch.testing.assert_close(a.grad.double() / scale, b.grad / scale, **tol)


def test_content_read_write_non_finite_read_key_poisons_its_memory_only():
    from neuralmem_fast.ops.reference import content_read_write_ref

    args = _rw_inputs(2, 40, 5, 2, 1)
    args[1][1, 0, 2] = float("inf")
    gr, gn = torch.randn(2, 2, 5, dtype=torch.float64), torch.randn(2, 40, 5, dtype=torch.float64)
    (reads, new), got = _rw_grads(lambda *a: ops.content_read_write(*a, backend="cpu"), args, gr, gn)
    (r_ref, n_ref), want = _rw_grads(content_read_write_ref, args, gr, gn)
    torch.testing.assert_close(reads, r_ref, equal_nan=True)
    assert torch.isnan(got[0][1]).all() and torch.isfinite(got[0][0]).all()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, equal_nan=True)


def test_content_read_write_opcheck_and_bad_input():
    m, rk, rs, wk, ws, e, a = _rw_inputs(2, 7, 3, 2, 2, torch.float32)
    reads, new, rlse, wlse = OPS.content_read_write(m, rk, rs, wk, ws, e, a, 1e-12)
    torch.library.opcheck(OPS.content_read_write.default, (m, rk, rs, wk, ws, e, a, 1e-12))
    torch.library.opcheck(OPS.content_read_write_backward.default,
                          (torch.randn_like(reads), torch.randn_like(m), reads, rlse, wlse, m, rk, rs, wk, ws, e, a,
                           1e-12))
    x = [t.clone().requires_grad_(True) for t in (m, rk, rs, wk, ws, e, a)]
    torch.library.opcheck(OPS.content_read_write.default, (*x, 1e-12))
    with pytest.raises(ValueError, match="read_strengths"):
        ops.content_read_write(m, rk, rs[:, :1], wk, ws, e, a, backend="cpu")
    with pytest.raises(ValueError, match="write_keys"):
        ops.content_read_write(m, rk, rs, wk[..., :2], ws, e, a, backend="cpu")
    with pytest.raises(ValueError, match="erase"):
        ops.content_read_write(m, rk, rs, wk, ws, e[:, :1], a, backend="cpu")
    with pytest.raises(ValueError, match="write_lse"):
        OPS.content_read_write_backward(torch.randn_like(reads), torch.randn_like(m), reads, rlse, wlse[:, :1], m, rk,
                                        rs, wk, ws, e, a, 1e-12)
    before = m.clone()
    ops.content_read_write(m, rk, rs, wk, ws, e, a, backend="cpu")
    assert torch.equal(m, before), "content_read_write is out of place"


@pytest.mark.parametrize("strength", [100.0, 1e4])
def test_content_read_write_one_block_large_strength_is_as_exact_as_content_read(strength):
    """A memory of one block: the read heads' weights and delta come from the recomputed softmax, as
    content_read_backward's do, not from delta = g . reads, which cancels in a peaked softmax
    (float32, strength 1e4: 6e-4 of error in the read keys' gradient, whose true value is ~1e-175)."""
    args = _rw_inputs(2, 7, 16, 3, 1)
    args[2].fill_(strength)
    args[4].fill_(strength)
    gr, gn = torch.randn(2, 3, 16, dtype=torch.float64), torch.randn(2, 7, 16, dtype=torch.float64)
    f32 = [t.float() for t in args]
    _, fused = _rw_grads(lambda *a: ops.content_read_write(*a, backend="cpu"), f32, gr.float(), gn.float())
    _, sep = _rw_grads(lambda m, rk, rs, wk, ws, e, a: (ops.content_read(m, rk, rs, backend="cpu"),
                                                         ops.content_write(m, wk, ws, e, a, backend="cpu")),
                       f32, gr.float(), gn.float())
    _, want = _rw_grads(lambda *a: ops.content_read_write(*a, backend="torch"), args, gr, gn)
    names = ("memory", "read_keys", "read_strengths", "write_keys", "write_strengths", "erase", "add")
    for n, a, b, c in zip(names, fused, sep, want):
        err_fused = (a.double() - c).abs().max().item()
        err_sep = (b.double() - c).abs().max().item()
        assert err_fused <= 2 * err_sep + 1e-6 * c.abs().max().item() + 1e-30, (n, err_fused, err_sep)


def test_content_read_write_aliased_heads_and_strided_memory_gradcheck():
    """The same tensor as read and write keys (and strengths), and a transposed (strided) memory."""
    g = torch.Generator().manual_seed(3)
    B, N, D = 2, 50, 8
    m = torch.randn(B, D, N, dtype=torch.float64, generator=g).transpose(1, 2)
    k = torch.randn(B, 1, D, dtype=torch.float64, generator=g)
    s = 1 + torch.rand(B, 1, dtype=torch.float64, generator=g)
    e = torch.rand(B, 1, D, dtype=torch.float64, generator=g)
    a = torch.randn(B, 1, D, dtype=torch.float64, generator=g)
    ins = [t.requires_grad_(True) for t in (m, k, s, e, a)]
    assert torch.autograd.gradcheck(lambda m_, k_, s_, e_, a_: ops.content_read_write(m_, k_, s_, k_, s_, e_, a_,
                                                                                      backend="cpu"), ins)


def test_content_read_write_single_slot_read_gradient_is_zero():
    """N = 1: every read weight is 1 whatever the key, so the read keys and strengths get exactly 0."""
    m, rk, rs, wk, ws, e, a = _rw_inputs(2, 1, 8, 2, 1, torch.float32)
    x = [t.clone().requires_grad_(True) for t in (rk, rs)]
    reads, _ = ops.content_read_write(m, *x, wk, ws, e, a, backend="cpu")
    grads = torch.autograd.grad(reads, x, torch.randn_like(reads))
    assert all(not g.any() for g in grads)
