"""The DNC access's write-then-read op (ops/dnc.py `write_read`, csrc/dnc/write_read.cpp) against its
reference, the three ops' formulas, in float64; and MemoryCore through it against the three ops."""
import pytest
import torch

from neuralmem_fast.nn import MemoryCore
from neuralmem_fast.ops import dnc

F64 = torch.float64
EPS = 1e-12

pytestmark = pytest.mark.skipif(not dnc.has_write_read_kernel(), reason="the native extension is not built")

# (2, 70, 24, 1, 4): one write head and rows of whole vectors, the kernels' fast path, with an odd number
# of vectors per row on some instruction sets.
SHAPES = [(2, 7, 4, 1, 1), (3, 5, 3, 2, 3), (1, 1, 2, 1, 2), (2, 33, 8, 3, 2), (2, 70, 24, 1, 4)]


def _inputs(B, N, D, W, R, dtype=F64, seed=0, faint=False, strength=5.0):
    """memory, write_weights, erase, add, read_keys, read_strengths. faint: slot 0 stays zero and slot 1
    below eps after the write (no head writes them), and key 0 is zero: the norm floor's branch."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(B, N, D, generator=g, dtype=dtype)
    ww = torch.softmax(2 * torch.randn(B, W, N, generator=g, dtype=dtype), -1) * torch.rand(B, W, 1, generator=g,
                                                                                           dtype=dtype)
    e = torch.rand(B, W, D, generator=g, dtype=dtype)
    a = torch.randn(B, W, D, generator=g, dtype=dtype)
    k = torch.randn(B, R, D, generator=g, dtype=dtype)
    s = 1 + strength * torch.rand(B, R, generator=g, dtype=dtype)
    if faint and N >= 2:
        m[:, 0] = 0
        m[:, 1] *= 1e-14
        ww[:, :, :2] = 0
        k[:, 0] = 0
    return [m, ww, e, a, k, s]


def _upstream(B, N, D, R, dtype=F64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, N, D, generator=g, dtype=dtype), torch.randn(B, R, N, generator=g, dtype=dtype),
            torch.randn(B, R, D, generator=g, dtype=dtype))


def _grads(fn, x, up, which=(0, 1, 2)):
    xs = [t.clone().requires_grad_() for t in x]
    out = fn(*xs)
    torch.autograd.backward([out[i] for i in which], [up[i] for i in which])
    return [t.grad for t in xs]


def _ref(*t):
    return dnc.write_read_ref(*t, EPS)


@pytest.mark.parametrize("faint", [False, True])
@pytest.mark.parametrize("B,N,D,W,R", SHAPES)
def test_forward_and_gradients_equal_the_reference(B, N, D, W, R, faint):
    x = _inputs(B, N, D, W, R, faint=faint)
    for a, b in zip(dnc.write_read(*x), _ref(*x)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    up = _upstream(B, N, D, R)
    # Below the norm floor the slot's gradient is (key term) / eps: compare relative to its size.
    for a, b in zip(_grads(dnc.write_read, x, up), _grads(_ref, x, up)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11 * max(1.0, b.abs().max().item()))


@pytest.mark.parametrize("W", [1, 2])
@pytest.mark.parametrize("faint", [False, True])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_blocks_of_slots_equal_the_reference(dtype, faint, W):
    """Width 64: the kernels go by blocks of 64 slots, here two whole blocks and a partial one, with the
    lanes in whole vectors and the gradients of all three outputs, in both dtypes. W = 1: the backward's
    one-head slot loop (on AVX-512 in float, its erase, add and sums held in registers)."""
    B, N, D, R = 2, 150, 64, 3
    x = _inputs(B, N, D, W, R, dtype=dtype, faint=faint)
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == F64 else dict(rtol=1e-5, atol=1e-6)
    for a, b in zip(dnc.write_read(*x), _ref(*x)):
        torch.testing.assert_close(a, b, **tol)
    up = _upstream(B, N, D, R, dtype=dtype)
    for which in ((0, 1, 2), (1, 2), (0,)):
        for a, b in zip(_grads(dnc.write_read, x, up, which), _grads(_ref, x, up, which)):
            if b is None:  # the new memory alone does not depend on the read keys and strengths
                assert a is None or not a.any()
                continue
            scale = max(1.0, b.abs().max().item())
            if dtype == F64:
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11 * scale)
            else:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("B,N,D,W,R", SHAPES)
def test_gradcheck_and_second_derivatives(B, N, D, W, R):
    x = [t.requires_grad_() for t in _inputs(B, N, D, W, R)]
    torch.autograd.gradcheck(lambda *t: dnc.write_read(*t), x)
    if N <= 7:  # create_graph differentiates the reference
        torch.autograd.gradgradcheck(lambda *t: dnc.write_read(*t), x)


def test_gradcheck_with_strided_and_aliased_inputs():
    B, N, D, W, R = 2, 6, 4, 1, 2
    x = _inputs(B, N, D, W, R)
    memory = x[0].transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()   # (B,N,D), strides (N*D, 1, N)
    assert not memory.is_contiguous()
    keys = torch.randn(B, 2 * R, D, dtype=F64)[:, ::2].requires_grad_()           # every other row
    vec = torch.rand(B, W, D, dtype=F64).requires_grad_()                          # erase and add alike
    rest = [t.requires_grad_() for t in (x[1], x[5])]
    torch.autograd.gradcheck(lambda m, w, v, k, s: dnc.write_read(m, w, v, v, k, s), (memory, rest[0], vec, keys,
                                                                                       rest[1]))


@pytest.mark.parametrize("W,D", [(2, 4), (1, 24)])
@pytest.mark.parametrize("which", [(0,), (1,), (2,), (0, 2)])
def test_some_outputs_unused(which, W, D):
    x = _inputs(2, 9, D, W, 3)
    up = _upstream(2, 9, D, 3)
    for a, b in zip(_grads(dnc.write_read, x, up, which), _grads(_ref, x, up, which)):
        # an input the used outputs do not depend on: zeros from the op, None from the reference
        torch.testing.assert_close(a, torch.zeros_like(a) if b is None else b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("strength", [100.0, 1e4])
def test_peaked_softmax(strength):
    x = _inputs(2, 40, 8, 1, 2, strength=strength)
    for a, b in zip(dnc.write_read(*x), _ref(*x)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    up = _upstream(2, 40, 8, 2)
    for a, b in zip(_grads(dnc.write_read, x, up), _grads(_ref, x, up)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8 * max(1.0, b.abs().max().item()))


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("B,N,D,W,R", [(2, 150, 64, 1, 4), (3, 70, 24, 2, 3), (2, 5, 3, 1, 0)])
def test_kept_dots_give_the_same_bits(B, N, D, W, R, dtype):
    """MemoryCore's sequence node runs write_read keeping the read heads' cosine numerators and the rows'
    squared norms, and its backward takes them instead of computing them again: the same outputs and
    gradients as the registered ops, bit for bit, with and without a pending addressing gradient."""
    from neuralmem_fast import _ext

    C = _ext._C
    x = _inputs(B, N, D, W, R, dtype=dtype, faint=R > 0)
    up = _upstream(B, N, D, R, dtype=dtype)
    op = torch.ops.neuralmem_dnc
    new, rw, rd = op.write_read(*x, EPS)
    new_k, rw_k, rd_k, dots = C.write_read_keep(*x, EPS)
    for a, b in zip((new, rw, rd), (new_k, rw_k, rd_k)):
        assert torch.equal(a, b)
    assert dots.shape == (B, R + 1, N)
    # no read heads: nothing to keep, the row of norms is zeros
    norms = new.pow(2).sum(-1) if R else torch.zeros(B, N, dtype=dtype)
    torch.testing.assert_close(dots[:, R], norms, rtol=1e-5, atol=1e-6)
    g = torch.Generator().manual_seed(5)
    pend = (torch.randn(B, N, generator=g, dtype=dtype), torch.randn(B, 1, N, generator=g, dtype=dtype),
            torch.randn(B, 1, D, generator=g, dtype=dtype))
    for which in ((0, 1, 2), (1, 2), (0,)):
        gs = [up[i] if i in which else None for i in range(3)]
        for p in (None, pend):
            pp = p if p is not None else (None, None, None)
            want = C.write_read_backward_pending(*gs, *x, new, rw, EPS, *pp, None)
            got = C.write_read_backward_pending(*gs, *x, new, rw, EPS, *pp, dots)
            for a, b in zip(got, want):
                assert torch.equal(a, b)
            if p is None:
                for a, b in zip(want, op.write_read_backward(*gs, *x, new, rw, EPS)):
                    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="dots"):
        C.write_read_backward_pending(*up, *x, new, rw, EPS, None, None, None, dots[:, :R])


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("B,N,D,H", [(2, 150, 64, 1), (3, 70, 24, 2), (2, 5, 3, 1)])
def test_write_addressing_with_kept_norms_and_dots_gives_the_same_bits(B, N, D, H, dtype):
    """The sequence node's write addressing of step t takes the squared norms of the rows that step t - 1's
    write_read kept, and keeps its raw dots for the backward's coefficients: the same weights as
    content_addressing and the same coefficients and gradients as computing both again, bit for bit."""
    from neuralmem_fast import _ext

    C = _ext._C
    R = 3
    x = _inputs(B, N, D, 1, R, dtype=dtype, faint=True)
    new, _, _, dots = C.write_read_keep(*x, EPS)
    g = torch.Generator().manual_seed(7)
    keys = torch.randn(B, H, D, generator=g, dtype=dtype)
    keys[0, 0] = 0  # the key's norm floor
    strengths = 1 + 5 * torch.rand(B, H, generator=g, dtype=dtype)
    want = torch.ops.neuralmem.content_addressing(new, keys, strengths, EPS)
    norms2 = dots[:, R]  # strided: a column of (B, R + 1, N)
    for given in (None, norms2):
        w, ca = C.content_addressing_keep(new, keys, strengths, EPS, given)
        assert torch.equal(w, want)
    q = keys / keys.norm(dim=-1, keepdim=True).clamp_min(EPS)
    torch.testing.assert_close(ca, q @ new.transpose(1, 2), rtol=1e-4, atol=1e-4)
    gw = torch.randn(B, H, N, generator=g, dtype=dtype)
    a = C.addressing_backward_coefs(gw, w, new, keys, strengths, EPS, None, None)
    b = C.addressing_backward_coefs(gw, w, new, keys, strengths, EPS, ca, norms2)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    with pytest.raises(ValueError, match="together"):
        C.addressing_backward_coefs(gw, w, new, keys, strengths, EPS, ca, None)
    with pytest.raises(ValueError, match="norms2"):
        C.content_addressing_keep(new, keys, strengths, EPS, norms2[:, :-1])


def test_float32_matches_float64():
    x = _inputs(3, 50, 16, 2, 4)
    up = _upstream(3, 50, 16, 4)
    want = _ref(*x)
    got = dnc.write_read(*[t.float() for t in x])
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)
    g32 = _grads(dnc.write_read, [t.float() for t in x], [u.float() for u in up])
    for a, b in zip(g32, _grads(_ref, x, up)):
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-4 * max(1.0, b.abs().max().item()))


def test_opcheck():
    x = _inputs(2, 5, 3, 2, 3)
    op = torch.ops.neuralmem_dnc
    torch.library.opcheck(op.write_read, (*x, EPS))
    torch.library.opcheck(op.write_read, (*[t.clone().requires_grad_() for t in x], EPS))
    new, w, _ = op.write_read(*x, EPS)
    up = _upstream(2, 5, 3, 3)
    torch.library.opcheck(op.write_read_backward, (*up, *x, new, w, EPS))
    torch.library.opcheck(op.write_read_backward, (None, up[1], None, *x, new, w, EPS))


def test_bad_input_names_the_argument():
    op = torch.ops.neuralmem_dnc
    x = _inputs(2, 5, 3, 1, 2)
    cases = [(1, torch.zeros(2, 1, 4, dtype=F64), "write_weights"),
             (2, torch.zeros(2, 1, 2, dtype=F64), "erase"),
             (3, torch.zeros(2, 1, 3, dtype=torch.float32), "add"),
             (4, torch.zeros(3, 2, 3, dtype=F64), "read_keys"),
             (5, torch.zeros(2, 3, dtype=F64), "read_strengths")]
    for i, bad, name in cases:
        y = list(x)
        y[i] = bad
        with pytest.raises((ValueError, TypeError, RuntimeError), match=name):
            op.write_read(*y, EPS)
    with pytest.raises((ValueError, TypeError, RuntimeError), match="memory"):
        op.write_read(x[0].half(), *x[1:], EPS)
    with pytest.raises((ValueError, RuntimeError), match="eps"):
        op.write_read(*x, 0.0)
    new, w, _ = op.write_read(*x, EPS)
    with pytest.raises((ValueError, RuntimeError), match="grad_reads"):
        op.write_read_backward(None, None, torch.zeros(2, 2, 4, dtype=F64), *x, new, w, EPS)


def test_other_backends_and_dtypes_run_the_three_ops():
    x = _inputs(2, 6, 4, 1, 2, dtype=torch.float32)
    for a, b in zip(dnc.write_read(*x, backend="torch"), dnc.write_read_ref(*x)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    half = [t.bfloat16() for t in x]
    for a, b in zip(dnc.write_read(*half), dnc.write_read_ref(*half)):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def test_memory_core_through_the_op_equals_the_three_ops(monkeypatch):
    """Four steps of MemoryCore: the native op, and the three ops of the "torch" backend (the references),
    give the same outputs, final state and parameter gradients in float64."""
    import neuralmem_fast.nn.access as access_mod

    B, N, D, R, W = 2, 9, 4, 2, 2
    # the step's ops one by one (not the one-node access_step, tests/test_dnc_access_step.py)
    monkeypatch.setattr(access_mod, "has_access_step_kernels", lambda: False)

    def run():
        torch.manual_seed(0)
        core = MemoryCore(3, 3, N, D, R, W, hidden_size=8).double()
        x = torch.randn(B, 4, 3, dtype=F64)
        y, st = core(x)
        (y.square().sum() + st.memory.sum() + st.read_weights.square().sum()).backward()
        return [y, st.memory, st.read_weights, st.reads] + [p.grad for p in core.parameters()]

    native = run()
    calls = []

    def three_ops(*a, backend="auto"):
        calls.append(1)
        return dnc.write_read(*a, backend="torch")

    monkeypatch.setattr(access_mod, "write_read", three_ops)
    ref = run()
    assert len(calls) == 4
    for a, b in zip(native, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("B,N,D,W,R", [(2, 5, 3, 1, 0), (2, 5, 3, 0, 2), (0, 4, 3, 1, 2)])
def test_no_heads_and_no_memories(B, N, D, W, R):
    x = _inputs(B, N, D, W, R) if B else [torch.zeros(*s, dtype=F64) for s in
                                         ((0, N, D), (0, W, N), (0, W, D), (0, W, D), (0, R, D), (0, R))]
    for a, b in zip(dnc.write_read(*x), _ref(*x)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    up = _upstream(B, N, D, R)
    for a, b in zip(_grads(dnc.write_read, x, up), _grads(_ref, x, up)):
        torch.testing.assert_close(a, torch.zeros_like(a) if b is None else b, rtol=1e-10, atol=1e-12)
