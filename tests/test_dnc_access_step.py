"""The dense DNC access step as one autograd node (ops/dnc.py `access_step`) and its new op
`addressing_backward_add` (csrc/dnc/write_read.cpp), against the references in float64; and MemoryCore
through the node against the ops one by one."""
import pytest
import torch

from neuralmem_fast.nn import MemoryAccess, MemoryCore
from neuralmem_fast.ops import dnc

F64 = torch.float64
EPS = 1e-12

pytestmark = pytest.mark.skipif(not dnc.has_access_step_kernels(), reason="the native extension is not built")


# ---------------------------------------------------------------- addressing_backward_add
def _addressing(B, N, D, H, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(B, N, D, generator=g, dtype=dtype)
    if N >= 2:
        m[:, 0] = 0  # a slot below the norm floor
    k = torch.randn(B, H, D, generator=g, dtype=dtype)
    s = 1 + 5 * torch.rand(B, H, generator=g, dtype=dtype)
    w = torch.ops.neuralmem.content_addressing(m, k, s, EPS)
    gw = torch.randn(B, H, N, generator=g, dtype=dtype)
    gm = torch.randn(B, N, D, generator=g, dtype=dtype)
    return gm, gw, w, m, k, s


# N = 700 at D = 3 spans several blocks and chunks of the kernel.
@pytest.mark.parametrize("B,N,D,H", [(2, 7, 4, 1), (3, 5, 3, 2), (1, 1, 2, 3), (2, 700, 3, 2), (2, 6, 5, 0)])
def test_addressing_backward_add_is_the_gradient_plus_grad_memory(B, N, D, H):
    gm, gw, w, m, k, s = _addressing(B, N, D, H)
    dm, dk, ds = torch.ops.neuralmem_dnc.addressing_backward_add(gm, gw, w, m, k, s, EPS)
    want_dm, want_dk, want_ds = torch.ops.neuralmem.content_addressing_backward(gw, w, m, k, s, EPS)
    torch.testing.assert_close(dm, gm + want_dm, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dk, want_dk, rtol=0, atol=0)
    torch.testing.assert_close(ds, want_ds, rtol=0, atol=0)
    assert dm.is_contiguous() and dm.data_ptr() != gm.data_ptr()


def test_addressing_backward_add_strided_grad_memory_and_float32():
    gm, gw, w, m, k, s = _addressing(2, 9, 4, 2)
    strided = gm.transpose(1, 2).contiguous().transpose(1, 2)  # (B,N,D), not contiguous
    assert not strided.is_contiguous()
    before = strided.clone()
    dm, _, _ = torch.ops.neuralmem_dnc.addressing_backward_add(strided, gw, w, m, k, s, EPS)
    want = gm + torch.ops.neuralmem.content_addressing_backward(gw, w, m, k, s, EPS)[0]
    torch.testing.assert_close(dm, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(strided, before)  # the input is not written
    f = [t.float() for t in (gm, gw, w, m, k, s)]
    dm32, dk32, ds32 = torch.ops.neuralmem_dnc.addressing_backward_add(*f, EPS)
    torch.testing.assert_close(dm32.double(), want, rtol=1e-4, atol=1e-4)


def test_addressing_backward_add_non_finite_key_poisons_its_memory_only():
    gm, gw, w, m, k, s = _addressing(2, 6, 3, 2)
    k[1, 0, 0] = float("nan")
    dm, dk, ds = torch.ops.neuralmem_dnc.addressing_backward_add(gm, gw, w, m, k, s, EPS)
    assert torch.isnan(dm[1]).all() and torch.isfinite(dm[0]).all()
    assert torch.isnan(dk[1, 0]).all() and torch.isnan(ds[1, 0])


def test_addressing_backward_add_opcheck():
    x = _addressing(2, 6, 3, 2)
    torch.library.opcheck(torch.ops.neuralmem_dnc.addressing_backward_add, (*x, EPS))


def test_addressing_backward_add_bad_input_names_the_argument():
    op = torch.ops.neuralmem_dnc.addressing_backward_add
    x = list(_addressing(2, 5, 3, 2))
    cases = [(0, torch.zeros(2, 5, 4, dtype=F64), "grad_memory"),
             (1, torch.zeros(2, 2, 4, dtype=F64), "grad_weights"),
             (2, torch.zeros(2, 3, 5, dtype=F64), "weights"),
             (4, torch.zeros(3, 2, 3, dtype=F64), "keys"),
             (5, torch.zeros(2, 3, dtype=F64), "strengths"),
             (0, torch.zeros(2, 5, 3, dtype=torch.float32), "grad_memory")]
    for i, bad, name in cases:
        y = list(x)
        y[i] = bad
        with pytest.raises((ValueError, TypeError, RuntimeError), match=name):
            op(*y, EPS)
    with pytest.raises((ValueError, TypeError, RuntimeError), match="memory"):
        op(*x[:3], x[3].half(), *x[4:], EPS)
    with pytest.raises((ValueError, RuntimeError), match="eps"):
        op(*x, 0.0)


# ---------------------------------------------------------------- addressing_backward_add_ (in place)
@pytest.mark.parametrize("B,N,D,H", [(2, 7, 4, 1), (1, 1, 2, 3), (2, 700, 3, 2), (2, 6, 5, 0)])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_addressing_backward_add_inplace_is_the_out_of_place_op(B, N, D, H, dtype):
    gm, gw, w, m, k, s = (t.to(dtype) for t in _addressing(B, N, D, H))
    want_dm, want_dk, want_ds = torch.ops.neuralmem_dnc.addressing_backward_add(gm, gw, w, m, k, s, EPS)
    ptr, version = gm.data_ptr(), gm._version
    dk, ds = torch.ops.neuralmem_dnc.addressing_backward_add_(gm, gw, w, m, k, s, EPS)
    assert gm.data_ptr() == ptr and gm._version > version
    assert torch.equal(gm, want_dm) and torch.equal(dk, want_dk) and torch.equal(ds, want_ds)


def test_addressing_backward_add_inplace_strided_grad_memory():
    gm, gw, w, m, k, s = _addressing(2, 9, 4, 2)
    want = torch.ops.neuralmem_dnc.addressing_backward_add(gm, gw, w, m, k, s, EPS)[0]
    base = gm.transpose(1, 2).contiguous()
    strided = base.transpose(1, 2)  # (B,N,D), not contiguous
    torch.ops.neuralmem_dnc.addressing_backward_add_(strided, gw, w, m, k, s, EPS)
    assert torch.equal(strided, want) and torch.equal(base.transpose(1, 2), want)


def test_addressing_backward_add_inplace_refuses_overlap_and_differentiable_inputs():
    op = torch.ops.neuralmem_dnc.addressing_backward_add_
    gm, gw, w, m, k, s = _addressing(2, 5, 3, 2)
    with pytest.raises(RuntimeError, match="memory shares memory with grad_memory"):
        op(m, gw, w, m, k, s, EPS)
    big = torch.randn(2 * 5 * 3 + 6, dtype=F64)
    aliased = big[:30].view(2, 5, 3)
    before = big.clone()
    with pytest.raises(RuntimeError, match="keys shares memory with grad_memory"):
        op(aliased, gw, w, m, big[24:36].view(2, 2, 3), s, EPS)
    assert torch.equal(big, before)  # nothing written
    leaf = gm.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="grad_memory is a leaf Variable that requires grad"):
        op(leaf, gw, w, m, k, s, EPS)
    with pytest.raises(RuntimeError, match="keys requires grad"):
        op(gm.clone(), gw, w, m, k.clone().requires_grad_(True), s, EPS)
    with torch.no_grad():  # no gradient is recorded, so inputs that require grad are fine
        op(gm.clone(), gw, w, m, k.clone().requires_grad_(True), s, EPS)


def test_addressing_backward_add_inplace_opcheck_and_bad_input():
    x = _addressing(2, 6, 3, 2)
    op = torch.ops.neuralmem_dnc.addressing_backward_add_
    torch.library.opcheck(op, (x[0].clone(), *x[1:], EPS))
    for i, bad, name in [(0, torch.zeros(2, 6, 4, dtype=F64), "grad_memory"),
                         (1, torch.zeros(2, 2, 4, dtype=F64), "grad_weights"),
                         (4, torch.zeros(3, 2, 3, dtype=F64), "keys"),
                         (5, torch.zeros(2, 3, dtype=F64), "strengths")]:
        y = [t.clone() for t in x]
        y[i] = bad
        gm_before = y[0].clone()
        with pytest.raises((ValueError, TypeError, RuntimeError), match=name):
            op(*y, EPS)
        assert torch.equal(y[0], gm_before)  # a refused call writes nothing
    with pytest.raises((ValueError, RuntimeError), match="eps"):
        op(x[0].clone(), *x[1:], 0.0)


# ---------------------------------------------------------------- access_step
def _step_inputs(B, N, D, W, R, dtype=F64, seed=0):
    """memory, usage, prev_read_weights, prev_write_weights, write_keys, write_strengths, free_gates,
    write_gates, allocation_gates, erase, add, read_keys, read_strengths."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.rand(*s, generator=g, dtype=dtype)  # noqa: E731
    n = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    sm = lambda *s: torch.softmax(2 * n(*s), -1)  # noqa: E731
    return [n(B, N, D), r(B, N), sm(B, R, N), sm(B, W, N) * r(B, W, 1), n(B, W, D), 1 + 5 * r(B, W), r(B, R),
            r(B, W), r(B, W), r(B, W, D), n(B, W, D), n(B, R, D), 1 + 5 * r(B, R)]


DIFF = [i for i in range(13) if i != 3]  # every input but the previous write weights
STEP_SHAPES = [(2, 7, 4, 1, 1), (3, 5, 3, 2, 3), (1, 1, 2, 1, 2), (2, 33, 8, 3, 2)]


def _step_grads(fn, x, up, which=range(5)):
    xs = [t.clone().requires_grad_(i in DIFF) for i, t in enumerate(x)]
    out = fn(*xs)
    torch.autograd.backward([out[i] for i in which], [up[i] for i in which])
    return [xs[i].grad for i in DIFF]


def _upstream(B, N, D, W, R, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=F64) for s in ((B, N, D), (B, N), (B, W, N), (B, R, N), (B, R, D))]


@pytest.mark.parametrize("B,N,D,W,R", STEP_SHAPES)
def test_access_step_equals_the_reference(B, N, D, W, R):
    x = _step_inputs(B, N, D, W, R)
    for a, b in zip(dnc.access_step(*x), dnc.access_step_ref(*x)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    up = _upstream(B, N, D, W, R)
    for a, b in zip(_step_grads(dnc.access_step, x, up), _step_grads(dnc.access_step_ref, x, up)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11 * max(1.0, b.abs().max().item()))


@pytest.mark.parametrize("B,N,D,W,R", STEP_SHAPES)
def test_access_step_adds_in_place_as_into_a_new_tensor(B, N, D, W, R, monkeypatch):
    """The benchmark's baseline (the out-of-place add) gives the same gradients, bit for bit."""
    x, up = _step_inputs(B, N, D, W, R), _upstream(B, N, D, W, R)
    in_place = _step_grads(dnc.access_step, x, up)
    monkeypatch.setattr(dnc._AccessStep, "add_in_place", False)
    for a, b in zip(in_place, _step_grads(dnc.access_step, x, up)):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("which", [(0,), (1,), (2,), (3,), (4,), (0, 4), (1, 3)])
def test_access_step_some_outputs_unused(which):
    B, N, D, W, R = 2, 6, 3, 2, 2
    x, up = _step_inputs(B, N, D, W, R, seed=3), _upstream(B, N, D, W, R)
    got = _step_grads(dnc.access_step, x, up, which)
    want = _step_grads(dnc.access_step_ref, x, up, which)
    for a, b in zip(got, want):
        if b is None:  # the reference does not reach this input from these outputs: the node gives zeros
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)


def test_access_step_gradcheck_and_second_derivatives():
    x = _step_inputs(2, 5, 3, 2, 2)
    xs = [t.requires_grad_(i in DIFF) for i, t in enumerate(x)]
    assert torch.autograd.gradcheck(dnc.access_step, xs)
    assert torch.autograd.gradgradcheck(dnc.access_step, xs)  # create_graph differentiates the reference


def test_access_step_float32_matches_float64():
    x = _step_inputs(4, 64, 16, 1, 4)
    want = dnc.access_step(*x)
    got = dnc.access_step(*[t.float() for t in x])
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


def _core_run(B=2, N=9, D=4, R=2, W=2, T=4, **kw):
    torch.manual_seed(0)
    core = MemoryCore(3, 3, N, D, R, W, hidden_size=8, **kw).double()
    x = torch.randn(B, T, 3, dtype=F64)
    y, st = core(x)
    (y.square().sum() + st.memory.sum() + st.read_weights.square().sum() + st.usage.sum()).backward()
    return [y, st.memory, st.usage, st.read_weights, st.write_weights, st.reads] + [p.grad for p in core.parameters()]


def test_memory_core_through_the_node_equals_the_ops_one_by_one(monkeypatch):
    """Four steps of MemoryCore, float64: the one-node step, the native ops one by one, and the
    "torch" backend's references give the same outputs, final state and parameter gradients. Step by step:
    the whole sequence as one node is tests/test_core_sequence.py's."""
    import neuralmem_fast.nn.access as access_mod
    from neuralmem_fast.nn.core_sequence import CoreSequence

    monkeypatch.setattr(CoreSequence, "enabled", False)

    calls = []
    real = access_mod.access_step

    def counted(*a):
        calls.append(1)
        return real(*a)

    monkeypatch.setattr(access_mod, "access_step", counted)
    node = _core_run()
    assert len(calls) == 4
    monkeypatch.setattr(access_mod, "has_access_step_kernels", lambda: False)
    one_by_one = _core_run()
    reference = _core_run(backend="torch")
    assert len(calls) == 4
    for a, b, c in zip(node, one_by_one, reference):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kw", [dict(alloc_topk=4), dict(usage_grad=True), dict(read_topk=2), dict(write_topk=2),
                                dict(write_rule="previous_reads"), dict(backend="torch")])
def test_the_node_runs_only_the_dncs_own_rules(kw):
    acc = MemoryAccess(6, 3, 2, 1, **kw)
    assert not acc._one_node(torch.zeros(1, 6, 3))
    assert MemoryAccess(6, 3, 2, 1)._one_node(torch.zeros(1, 6, 3))
    assert not MemoryAccess(6, 3, 2, 1)._one_node(torch.zeros(1, 6, 3, dtype=torch.bfloat16))


def test_access_step_gradcheck_with_strided_and_aliased_inputs():
    B, N, D, W, R = 2, 6, 4, 1, 2
    x = _step_inputs(B, N, D, W, R, seed=4)
    x[0] = x[0].transpose(1, 2).contiguous().transpose(1, 2)       # memory (B,N,D), strides (N*D, 1, N)
    x[11] = torch.randn(B, 2 * R, D, dtype=F64)[:, ::2]            # read keys: every other row
    vec = torch.rand(B, W, D, dtype=F64).requires_grad_()          # erase and add alike
    assert not x[0].is_contiguous() and not x[11].is_contiguous()
    xs = [t.requires_grad_(i in DIFF) for i, t in enumerate(x)]

    def f(*t):
        t = list(t)
        return dnc.access_step(*t[:9], vec, vec, *t[11:])

    def f_ref(*t):
        t = list(t)
        return dnc.access_step_ref(*t[:9], vec, vec, *t[11:])

    for a, b in zip(f(*xs), f_ref(*xs)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    assert torch.autograd.gradcheck(lambda v, *t: dnc.access_step(*t[:9], v, v, *t[11:]), [vec, *xs])
