"""The fused DNC usage and write-weights op (ops/dnc.py, csrc/dnc/dnc_ops.cpp) against its reference,
and the dense access's ablation options (read_topk, write_topk, write_rule)."""
import pytest
import torch

from neuralmem_fast import ops
from neuralmem_fast.nn import MemoryAccess, MemoryCore
from neuralmem_fast.ops import dnc

F64 = torch.float64

pytestmark = pytest.mark.skipif(not dnc.has_dnc_kernels(), reason="the native extension is not built")


def _inputs(B, N, W, R, dtype=F64, usage="rand", seed=0):
    g = torch.Generator().manual_seed(seed)
    u = {"rand": lambda: torch.rand(B, N, generator=g, dtype=dtype),
         "zero": lambda: torch.zeros(B, N, dtype=dtype),
         "ties": lambda: torch.randint(0, 3, (B, N), generator=g).to(dtype) / 2}[usage]()
    sm = lambda *s: torch.softmax(torch.randn(*s, generator=g, dtype=dtype) * 3, -1)  # noqa: E731
    return [u, sm(B, W, N), torch.rand(B, R, generator=g, dtype=dtype), sm(B, R, N), sm(B, W, N),
            torch.rand(B, W, generator=g, dtype=dtype), torch.rand(B, W, generator=g, dtype=dtype)]


SHAPES = [(2, 7, 1, 1), (3, 5, 2, 3), (1, 1, 1, 2), (2, 9, 3, 1), (2, 300, 1, 4)]


@pytest.mark.parametrize("usage", ["rand", "zero", "ties"])
@pytest.mark.parametrize("B,N,W,R", SHAPES)
def test_forward_equals_the_reference(B, N, W, R, usage):
    x = _inputs(B, N, W, R, usage=usage)
    got = dnc.write_weights(*x)
    want = dnc.write_weights_ref(*x)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("usage", ["rand", "zero", "ties"])
@pytest.mark.parametrize("B,N,W,R", SHAPES[:4])
def test_gradients_equal_the_reference_and_gradcheck(B, N, W, R, usage):
    x = _inputs(B, N, W, R, usage=usage, seed=1)
    diff = [0, 2, 3, 4, 5, 6]  # every input but the previous write weights (no gradient, as in DeepMind's code)
    xs = [t.clone().requires_grad_(i in diff) for i, t in enumerate(x)]
    g = [torch.randn(B, N, dtype=F64), torch.randn(B, W, N, dtype=F64)]
    got = torch.autograd.grad(dnc.write_weights(*xs), [xs[i] for i in diff], g)
    want = torch.autograd.grad(dnc.write_weights_ref(*xs), [xs[i] for i in diff], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(dnc.write_weights, xs)
    # create_graph: the backward differentiates the reference, so second derivatives are right too
    assert torch.autograd.gradgradcheck(dnc.write_weights, xs)


def test_only_one_output_needs_a_gradient():
    x = _inputs(2, 6, 2, 2)
    xs = [t.clone().requires_grad_(i != 1) for i, t in enumerate(x)]
    for k in (0, 1):
        got = torch.autograd.grad(dnc.write_weights(*xs)[k].sum(), xs[4])
        want = torch.autograd.grad(dnc.write_weights_ref(*xs)[k].sum(), xs[4], allow_unused=True)
        torch.testing.assert_close(got[0], torch.zeros_like(xs[4]) if want[0] is None else want[0])


def test_float32_matches_the_reference():
    x = _inputs(4, 128, 1, 4, dtype=torch.float32)
    for a, b in zip(dnc.write_weights(*x), dnc.write_weights_ref(*x)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_full_memory_allocation_flushes_products_below_the_smallest_normal(dtype):
    # Every slot used (s near 1 after a run of small ones): the allocation's product falls below the
    # smallest normal number part-way through the sorted slots. The op takes it as 0 from there (a
    # subnormal product would stick at the smallest subnormal and make every later multiply slow), so
    # no weight is subnormal, and every weight equals the float64 reference to within that floor.
    B, N, W, R = 3, 400, 2, 2
    x = _inputs(B, N, W, R, dtype=dtype, seed=5)
    g = torch.Generator().manual_seed(5)
    small = 40 if dtype == torch.float32 else 340  # enough for the product to pass below the smallest normal
    x[0] = torch.cat([torch.rand(B, small, generator=g) * 0.2, 0.6 + 0.4 * torch.rand(B, N - small, generator=g)],
                     1).to(dtype)
    x[5], x[6] = torch.ones(B, W, dtype=dtype), torch.ones(B, W, dtype=dtype)  # write weights = allocation
    tiny = torch.finfo(dtype).tiny
    _, w, _, _ = torch.ops.neuralmem_dnc.write_weights(*x, dnc.ALLOC_EPS)
    want = dnc.write_weights_ref(*[t.double() for t in x])[1]
    assert bool(((want > 0) & (want < tiny)).any())  # the regime is reached: the exact weights pass below tiny
    assert not bool(((w != 0) & (w.abs() < tiny)).any())       # and no subnormal comes out
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(w.double(), want, **tol)
    # gradients too (the backward reuses the flushed products)
    x[5], x[6] = 0.9 * x[5], 0.75 * x[6]  # gates inside (0, 1) for the gradients
    xs = [t.clone().requires_grad_(i in (0, 2, 3, 4, 5, 6)) for i, t in enumerate(x)]
    xr = [t.detach().double().requires_grad_(t.requires_grad) for t in xs]
    gw = torch.randn(B, W, N, generator=g).to(dtype)
    got = torch.autograd.grad(dnc.write_weights(*xs)[1], [xs[i] for i in (0, 2, 3, 4, 5, 6)], gw)
    ref = torch.autograd.grad(dnc.write_weights_ref(*xr)[1], [xr[i] for i in (0, 2, 3, 4, 5, 6)], gw.double())
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.double(), b, **(dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else tol))


def test_nan_usage_still_gives_nan_weights_past_the_flush():
    x = _inputs(1, 8, 1, 1)
    x[0] = torch.tensor([[0.9, float("nan"), 0.95, 0.8, 0.99, 0.97, 0.85, 0.9]], dtype=F64)
    x[2] = torch.zeros(1, 1, dtype=F64)
    _, w, _, _ = torch.ops.neuralmem_dnc.write_weights(*x, dnc.ALLOC_EPS)
    want = dnc.write_weights_ref(*x)[1]
    assert torch.equal(torch.isnan(w), torch.isnan(want))
    torch.testing.assert_close(w, want, equal_nan=True)


def test_order_is_torch_sorts_stable_order_with_nan_last():
    u = torch.tensor([[0.5, float("nan"), 0.0, -0.0, 0.5, 1.0, float("-inf"), 0.25]], dtype=F64)
    x = _inputs(1, 8, 1, 1)
    x[0] = u
    x[2] = torch.zeros(1, 1, dtype=F64)  # no frees: the usage sorted is u raised by the previous write
    x[1] = torch.zeros(1, 1, 8, dtype=F64)
    usage, _, _, order = torch.ops.neuralmem_dnc.write_weights(*x, dnc.ALLOC_EPS)
    ref_usage = dnc.write_weights_ref(*x)[0]
    assert torch.allclose(usage, ref_usage, equal_nan=True)
    assert int(torch.isnan(usage).sum()) == 2  # NaN, and -inf through u + w - u w with w = 0
    want = torch.sort(dnc.ALLOC_EPS + (1 - dnc.ALLOC_EPS) * ref_usage, dim=-1, stable=True).indices
    assert order[0, 0].tolist() == want[0].tolist()


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("N", [1, 7, 8, 9, 16, 17, 33, 64, 100, 128, 129, 300, 513, 1500])
def test_order_is_torch_sorts_stable_order_at_every_size(N, dtype):
    # Every sort of the kernel: for float32 up to 128 slots a bitonic network in AVX-512 registers where the
    # processor has them (1, 2, 4, 8 or 16 registers of 8 keys, padded), keys packed with their slot and
    # compared (N <= 512), and the radix sort (N > 512), on ties, signed zeros, infinities and NaN.
    g = torch.Generator().manual_seed(N)
    pool = torch.tensor([0.0, -0.0, 0.5, 0.25, 1.0, float("nan"), float("-inf"), float("inf"), 1e-30, 3e-5],
                        dtype=F64)
    u = torch.where(torch.rand(2, N, generator=g) < 0.5, pool[torch.randint(0, len(pool), (2, N), generator=g)],
                    torch.rand(2, N, generator=g, dtype=F64)).to(dtype)
    x = _inputs(2, N, 1, 1, dtype=dtype)
    x[0], x[1], x[2] = u, torch.zeros(2, 1, N, dtype=dtype), torch.zeros(2, 1, dtype=dtype)
    usage, _, _, order = torch.ops.neuralmem_dnc.write_weights(*x, dnc.ALLOC_EPS)
    want = torch.sort(dnc.ALLOC_EPS + (1 - dnc.ALLOC_EPS) * usage, dim=-1, stable=True).indices
    assert torch.equal(order[:, 0], want)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_gradients_past_the_flush_with_free_slots(dtype):
    # The usual state of a memory with free slots: most usages near 0, so the allocation's product falls
    # below the smallest normal number after a few sorted slots and the backward's loop over the sorted
    # slots stops there. Gradients equal the float64 reference's; a NaN gradient of a flushed slot's
    # weight still reaches every input the reference's reaches.
    B, N, W, R = 2, 1000, 1, 3
    g = torch.Generator().manual_seed(7)
    x = _inputs(B, N, W, R, dtype=dtype, seed=7)
    x[0] = (torch.rand(B, N, generator=g, dtype=F64) * 1e-3).to(dtype)
    x[0][:, :30] = 0.9
    diff = (0, 2, 3, 4, 5, 6)
    xs = [t.clone().requires_grad_(i in diff) for i, t in enumerate(x)]
    xr = [t.detach().double().requires_grad_(t.requires_grad) for t in xs]
    _, w, _, order = torch.ops.neuralmem_dnc.write_weights(*x, dnc.ALLOC_EPS)
    s = dnc.ALLOC_EPS + (1 - dnc.ALLOC_EPS) * x[0].double().gather(1, order[:, 0])
    assert bool((s.cumprod(1)[:, N // 2] < torch.finfo(dtype).tiny).all())  # the flush comes early
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    for nan in (False, True):
        gw = torch.randn(B, W, N, generator=g).to(dtype)
        if nan:
            gw[0, 0, order[0, 0, -1]] = float("nan")  # the last sorted slot: past the flush
        got = torch.autograd.grad(dnc.write_weights(*xs)[1], [xs[i] for i in diff], gw)
        ref = torch.autograd.grad(dnc.write_weights_ref(*xr)[1], [xr[i] for i in diff], gw.double())
        for a, b in zip(got, ref):
            assert torch.equal(torch.isnan(a), torch.isnan(b))
            torch.testing.assert_close(a.double(), b, equal_nan=True, **tol)


def test_opcheck():
    x = _inputs(2, 5, 2, 3)
    op = torch.ops.neuralmem_dnc
    torch.library.opcheck(op.write_weights, (*x, dnc.ALLOC_EPS))
    xs = [t.clone().requires_grad_(i != 1) for i, t in enumerate(x)]
    torch.library.opcheck(op.write_weights, (*xs, dnc.ALLOC_EPS))
    _, _, hu, order = op.write_weights(*x, dnc.ALLOC_EPS)
    torch.library.opcheck(op.write_weights_backward,
                          (torch.randn(2, 5, dtype=F64), torch.randn(2, 2, 5, dtype=F64), *x, hu, order,
                           dnc.ALLOC_EPS))


def test_bad_input_names_the_argument():
    op = torch.ops.neuralmem_dnc
    x = _inputs(2, 5, 1, 2)
    cases = [(1, torch.zeros(2, 1, 4, dtype=F64), "prev_write_weights"),
             (2, torch.zeros(2, 3, dtype=F64), "free_gates"),
             (4, torch.zeros(2, 1, 5, dtype=torch.float32), "content"),
             (6, torch.zeros(3, 1, dtype=F64), "allocation_gates")]
    for i, bad, name in cases:
        y = list(x)
        y[i] = bad
        with pytest.raises((ValueError, TypeError, RuntimeError), match=name):
            op.write_weights(*y, dnc.ALLOC_EPS)
    with pytest.raises((ValueError, TypeError, RuntimeError), match="usage"):
        op.write_weights(x[0].half(), *x[1:], dnc.ALLOC_EPS)
    _, _, hu, order = op.write_weights(*x, dnc.ALLOC_EPS)
    with pytest.raises((ValueError, RuntimeError), match="order"):
        op.write_weights_backward(x[0], x[4], *x, hu, order + 5, dnc.ALLOC_EPS)
    with pytest.raises((ValueError, RuntimeError), match="order"):
        op.write_weights_backward(x[0], x[4], *x, hu, order - 5, dnc.ALLOC_EPS)
    with pytest.raises(ValueError, match="backend"):
        dnc.write_weights(*x, backend="cuda")


def test_half_and_the_torch_backend_take_the_reference():
    x = _inputs(2, 6, 1, 2, dtype=torch.float32)
    for a, b in zip(dnc.write_weights(*[t.bfloat16() for t in x]),
                    dnc.write_weights_ref(*[t.bfloat16() for t in x])):
        assert torch.equal(a, b)
    for a, b in zip(dnc.write_weights(*x, backend="torch"), dnc.write_weights_ref(*x)):
        assert torch.equal(a, b)


def test_access_with_the_fused_op_equals_the_reference_path(monkeypatch):
    """Three steps of MemoryAccess through the fused op, and through the PyTorch ops: same outputs and
    gradients in float64."""
    import neuralmem_fast.nn.access as access_mod

    torch.manual_seed(0)
    B, N, D, R, W = 2, 9, 4, 2, 2
    # the step's ops one by one (not the one-node access_step), so that the patch below takes effect
    monkeypatch.setattr(access_mod, "has_access_step_kernels", lambda: False)

    def run():
        core = MemoryCore(3, 3, N, D, R, W, hidden_size=8).double()
        torch.manual_seed(1)
        x = torch.randn(B, 4, 3, dtype=F64)
        y, st = core(x)
        (y.square().sum() + st.usage.sum()).backward()
        return [y, st.usage, st.write_weights] + [p.grad for p in core.parameters()]

    torch.manual_seed(0)
    fused = run()
    monkeypatch.setattr(access_mod, "fused_write_weights",
                        lambda u, pww, *a: dnc.write_weights_ref(u, pww.detach(), *a))
    torch.manual_seed(0)
    ref = run()
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ ablation options of the dense access
def test_read_topk_reads_the_k_best_slots_renormalised():
    torch.manual_seed(0)
    acc = MemoryAccess(12, 4, 2, 1, read_topk=3)
    full = MemoryAccess(12, 4, 2, 1)
    state = acc.initial_state(2, F64)
    state = state._replace(memory=torch.randn(2, 12, 4, dtype=F64))
    iface = acc.parse_interface(torch.randn(2, acc.interface_size, dtype=F64))
    _, st = acc(iface, state)
    _, st_full = full(iface, state)
    w, wf = st.read_weights, st_full.read_weights
    assert ((w > 0).sum(-1) == 3).all()
    top = wf.topk(3, dim=-1)
    torch.testing.assert_close(w.gather(-1, top.indices), top.values / top.values.sum(-1, keepdim=True))
    with pytest.raises(ValueError, match="read_topk"):
        MemoryAccess(12, 4, 2, 1, read_topk=13)
    with pytest.raises(ValueError, match="read_topk"):
        MemoryAccess(100, 4, 1, 1, read_topk=2, sparse_k=2)


def test_write_topk_writes_to_the_write_keys_k_best_slots_renormalised():
    """With the allocation gate closed, the write weights are the write gate times the content weights
    restricted to the write key's 3 best slots and renormalised; elsewhere they are 0."""
    torch.manual_seed(0)
    acc = MemoryAccess(12, 4, 1, 2, write_topk=3)
    state = acc.initial_state(2, F64)
    state = state._replace(memory=torch.randn(2, 12, 4, dtype=F64))
    iface = acc.parse_interface(torch.randn(2, acc.interface_size, dtype=F64))
    iface = iface._replace(allocation_gates=torch.zeros(2, 2, dtype=F64))
    _, st = acc(iface, state)
    content = ops.content_addressing(state.memory, iface.write_keys, iface.write_strengths)
    top = content.topk(3, dim=-1)
    want = torch.zeros_like(content).scatter(-1, top.indices, top.values / top.values.sum(-1, keepdim=True))
    torch.testing.assert_close(st.write_weights, iface.write_gates.unsqueeze(-1) * want)
    assert ((st.write_weights > 0).sum(-1) <= 3).all()
    assert "write_topk=3" in repr(acc)
    with pytest.raises(ValueError, match="write_topk"):
        MemoryAccess(12, 4, 1, 1, write_topk=0)
    with pytest.raises(ValueError, match="write_topk"):
        MemoryAccess(12, 4, 1, 1, write_topk=2, write_rule="previous_reads")
    with pytest.raises(ValueError, match="write_topk"):
        MemoryAccess(100, 4, 1, 1, write_topk=2, sparse_k=2)


def test_lru_allocation_takes_the_least_recently_accessed_slot():
    """allocation="lru" with read_topk=2, write_topk=2 at N=8, one read and one write head: each step's
    allocated slot is the one whose last access (a read or write candidate, or an allocation) is oldest,
    the lowest index among never-accessed ones; checked against stamps kept here by hand."""
    torch.manual_seed(0)
    N = 8
    acc = MemoryAccess(N, 3, 1, 1, read_topk=2, write_topk=2, allocation="lru")
    assert "allocation='lru'" in repr(acc)
    state = acc.initial_state(1, F64)
    last = [-1.0] * N                                       # -1: never accessed
    for t in range(6):
        iface = acc.parse_interface(torch.randn(1, acc.interface_size, dtype=F64))
        iface = iface._replace(allocation_gates=torch.full((1, 1), 0.5, dtype=F64))
        content = ops.content_addressing(state.memory, iface.write_keys, iface.write_strengths)
        want_alloc = min(range(N), key=lambda j: (last[j], j))
        _, new = acc(iface, state)
        w = new.write_weights[0, 0]
        top = content[0, 0].topk(2).indices.tolist()
        assert w[want_alloc] >= 0.5 * float(iface.write_gates) - 1e-12
        assert set(torch.nonzero(w).reshape(-1).tolist()) <= set(top) | {want_alloc}
        for j in top + [want_alloc]:
            last[j] = 2 * t
        for j in torch.nonzero(new.read_weights[0, 0]).reshape(-1).tolist():
            last[j] = 2 * t + 1
        assert (new.read_weights[0, 0] > 0).sum() <= 2
        state = new
    with pytest.raises(ValueError, match="allocation='lru'"):
        MemoryAccess(N, 3, 1, 1, allocation="lru")              # a dense read touches every slot
    with pytest.raises(ValueError, match="allocation='lru'"):
        MemoryAccess(N, 3, 1, 1, read_topk=2, allocation="lru")  # so does a dense content write
    with pytest.raises(ValueError, match="allocation must be"):
        MemoryAccess(N, 3, 1, 1, allocation="lfu")
    MemoryAccess(N, 3, 1, 1, read_topk=2, write_rule="previous_reads", allocation="lru")


def test_write_rule_previous_reads_writes_where_the_last_step_read():
    torch.manual_seed(0)
    acc = MemoryAccess(10, 4, 2, 1, write_rule="previous_reads")
    state = acc.initial_state(1, F64)
    prev = torch.softmax(torch.randn(1, 2, 10, dtype=F64), -1)
    state = state._replace(read_weights=prev)
    iface = acc.parse_interface(torch.randn(1, acc.interface_size, dtype=F64))
    iface = iface._replace(allocation_gates=torch.zeros(1, 1, dtype=F64), write_gates=torch.ones(1, 1, dtype=F64))
    _, st = acc(iface, state)
    torch.testing.assert_close(st.write_weights[:, 0], prev.mean(1))
    with pytest.raises(ValueError, match="write_rule"):
        MemoryAccess(10, 4, 1, 1, write_rule="lru")


def test_train_cli_refuses_ablation_flags_without_the_core(tmp_path):
    from neuralmem_fast.apps.train import main

    with pytest.raises(SystemExit, match="core"):
        main(["recall", "--model", "lstm", "--read-topk", "4", "--out", str(tmp_path), "--no-progress"])
    with pytest.raises(SystemExit, match="core"):
        main(["recall", "--model", "sparse", "--write-topk", "4", "--out", str(tmp_path), "--no-progress"])
    with pytest.raises(SystemExit, match="core and sparse"):
        main(["recall", "--model", "lstm", "--write-rule", "content", "--out", str(tmp_path), "--no-progress"])
