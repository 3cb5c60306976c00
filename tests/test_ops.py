"""The memory ops of the native backends against their references.

Parametrized over (device, backend) pairs: ("cpu", "cpu") always, and
("cuda", "cuda") where a GPU and the CUDA kernels are present. Every op is
compared with its `*_ref` (outputs and gradients, float32 and float64; half
and bfloat16 forward against the float32 reference), gradchecked in float64,
opchecked, traced by torch.compile, and fed the numerically hard and the
malformed inputs the contract names.
"""
import textwrap

import pytest
import torch
import torch.nn.functional as F

import neuralmem_fast as nm
from tests.helpers import assert_close, make_inputs, run_on_instruction_set, shape_id

OPS = torch.ops.neuralmem


def _pair(device, backend):
    marks = []
    if device == "cuda":
        marks.append(pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))
        marks.append(pytest.mark.skipif(not nm.has_cuda_kernels(), reason="extension built without CUDA kernels"))
    else:
        marks.append(pytest.mark.skipif(not nm.has_extension(), reason="native extension not built"))
    return pytest.param(device, backend, marks=marks, id=f"{device}-{backend}")


PAIRS = [_pair("cpu", "cpu"), _pair("cuda", "cuda")]

# (B, N, D, H, W): N in 1, 7, 128, 1000; D in 1, 3, 64; H in 1, 4; W in 1, 2;
# B in 1, 3. (3, 1000, 64, 4, 2) splits the slots into several chunks on the
# CPU, so the partial-record combine is exercised forward and backward.
SHAPES = [
    (1, 1, 1, 1, 1),
    (3, 7, 3, 4, 2),
    (1, 128, 64, 4, 1),
    (3, 1000, 64, 4, 2),
    (1, 1000, 3, 1, 1),
    (3, 7, 64, 1, 2),
]
SHAPE_IDS = [shape_id(B=b, N=n, D=d, H=h, W=w) for b, n, d, h, w in SHAPES]
DTYPES = [torch.float32, torch.float64]
HALF_DTYPES = [torch.float16, torch.bfloat16]


def _dtype_id(dt):
    return shape_id(dtype=dt)


# --------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------


def _leaves(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


def _grads(out, inputs, seed=1):
    """Gradients of <out, G> for a fixed random G (a vector-Jacobian product)."""
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out)
    return torch.autograd.grad((out * G).sum(), inputs)


def _check_fwd_bwd(fast_fn, ref_fn, inputs, names, dtype, out_name):
    fast_in = _leaves(*inputs)
    ref_in = _leaves(*inputs)
    out = fast_fn(*fast_in)
    ref = ref_fn(*ref_in)
    assert out.dtype == ref.dtype and out.shape == ref.shape, (out.dtype, out.shape, ref.dtype, ref.shape)
    assert_close(out, ref, dtype, name=out_name)
    for name, a, b in zip(names, _grads(out, fast_in), _grads(ref, ref_in)):
        assert_close(a, b, dtype, name=f"grad {name}")


# --------------------------------------------------------------------------
# every op against its reference: outputs and gradients
# --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("device,backend", PAIRS)
class TestAgainstReference:
    def test_content_addressing(self, device, backend, shape, dtype):
        t = make_inputs(*shape, dtype=dtype, device=device)
        _check_fwd_bwd(
            lambda m, k, s: nm.content_addressing(m, k, s, backend=backend),
            nm.content_addressing_ref,
            [t["memory"], t["keys"], t["strengths"]], ["memory", "keys", "strengths"], dtype, "weights",
        )

    def test_memory_read(self, device, backend, shape, dtype):
        t = make_inputs(*shape, dtype=dtype, device=device)
        _check_fwd_bwd(
            lambda m, w: nm.memory_read(m, w, backend=backend),
            nm.memory_read_ref,
            [t["memory"], t["weights"]], ["memory", "weights"], dtype, "reads",
        )

    def test_content_read(self, device, backend, shape, dtype):
        t = make_inputs(*shape, dtype=dtype, device=device)
        _check_fwd_bwd(
            lambda m, k, s: nm.content_read(m, k, s, backend=backend),
            nm.content_read_ref,
            [t["memory"], t["keys"], t["strengths"]], ["memory", "keys", "strengths"], dtype, "reads",
        )
        _, lse = nm.content_read(t["memory"], t["keys"], t["strengths"], backend=backend, return_lse=True)
        _, lse_ref = nm.content_read(t["memory"], t["keys"], t["strengths"], backend="torch", return_lse=True)
        assert lse.dtype == dtype
        assert_close(lse, lse_ref, dtype, name="lse")

    def test_memory_write(self, device, backend, shape, dtype):
        t = make_inputs(*shape, dtype=dtype, device=device)
        _check_fwd_bwd(
            lambda m, w, e, a: nm.memory_write(m, w, e, a, backend=backend),
            nm.memory_write_ref,
            [t["memory"], t["wweights"], t["erase"], t["add"]], ["memory", "weights", "erase", "add"], dtype,
            "new memory",
        )

    def test_usage_update(self, device, backend, shape, dtype):
        t = make_inputs(*shape, dtype=dtype, device=device)
        _check_fwd_bwd(
            lambda u, w: nm.usage_update(u, w, 0.99, backend=backend),
            lambda u, w: nm.usage_update_ref(u, w, 0.99),
            [t["usage"], t["wweights"]], ["usage", "weights"], dtype, "usage",
        )

    def test_memory_write_with_usage(self, device, backend, shape, dtype):
        t = make_inputs(*shape, dtype=dtype, device=device)
        out, usage = nm.memory_write(t["memory"], t["wweights"], t["erase"], t["add"], usage=t["usage"],
                                     decay=0.95, backend=backend)
        assert_close(out, nm.memory_write_ref(t["memory"], t["wweights"], t["erase"], t["add"]), dtype,
                     name="new memory")
        assert_close(usage, nm.usage_update_ref(t["usage"], t["wweights"], 0.95), dtype, name="usage")

    def test_memory_write_inplace_equals_memory_write(self, device, backend, shape, dtype):
        t = make_inputs(*shape, dtype=dtype, device=device)
        expected = nm.memory_write(t["memory"], t["wweights"], t["erase"], t["add"], backend=backend)
        expected_usage = nm.usage_update_ref(t["usage"], t["wweights"], 0.99)
        mem, usage = t["memory"].clone(), t["usage"].clone()
        ret = nm.memory_write_(mem, t["wweights"], t["erase"], t["add"], usage=usage, backend=backend)
        assert ret is mem
        torch.testing.assert_close(mem, expected, rtol=0, atol=0, msg=lambda m: f"in-place memory: {m}")
        assert_close(usage, expected_usage, dtype, name="in-place usage")

    @pytest.mark.parametrize("with_usage", [True, False], ids=["usage", "no-usage"])
    def test_content_write_(self, device, backend, shape, dtype, with_usage):
        t = make_inputs(*shape, dtype=dtype, device=device)
        m0, k, s, e, a, u0 = t["memory"], t["wkeys"], t["wstrengths"], t["erase"], t["add"], t["usage"]
        w = nm.content_addressing_ref(m0, k, s)
        mem_ref = nm.memory_write_ref(m0, w, e, a)
        usage_ref = nm.usage_update_ref(u0, w, 0.9)
        mem = m0.clone()
        usage = u0.clone() if with_usage else None
        least = nm.content_write_(mem, k, s, e, a, usage=usage, decay=0.9, backend=backend)
        assert_close(mem, mem_ref, dtype, name="memory after content_write_")
        if not with_usage:
            assert least is None
            return
        assert_close(usage, usage_ref, dtype, name="usage after content_write_")
        assert least.dtype == torch.int64 and least.shape == (shape[0],)
        # The least-used slot of the usage the kernel wrote (ties: lowest index).
        torch.testing.assert_close(least, torch.argmin(usage, dim=1), rtol=0, atol=0)


    @pytest.mark.parametrize("with_usage", [True, False], ids=["usage", "no-usage"])
    def test_content_read_write_(self, device, backend, shape, dtype, with_usage):
        # One fused step against the reference read and write, both of the
        # memory before the write; and against the two ops it replaces.
        t = make_inputs(*shape, dtype=dtype, device=device)
        m0, u0 = t["memory"], t["usage"]
        k, s, wk, ws, e, a = t["keys"], t["strengths"], t["wkeys"], t["wstrengths"], t["erase"], t["add"]
        w = nm.content_addressing_ref(m0, wk, ws)
        mem, usage = m0.clone(), (u0.clone() if with_usage else None)
        reads, least = nm.content_read_write_(mem, k, s, wk, ws, e, a, usage=usage, decay=0.9, backend=backend)
        assert_close(reads, nm.content_read_ref(m0, k, s), dtype, name="reads of the memory before the write")
        assert_close(mem, nm.memory_write_ref(m0, w, e, a), dtype, name="memory after the write")
        mem2, usage2 = m0.clone(), (u0.clone() if with_usage else None)
        reads2 = nm.content_read(mem2, k, s, backend=backend)
        least2 = nm.content_write_(mem2, wk, ws, e, a, usage=usage2, decay=0.9, backend=backend)
        torch.testing.assert_close(reads, reads2, rtol=0, atol=0, msg=lambda m: f"reads vs content_read: {m}")
        assert_close(mem, mem2, dtype, name="memory vs content_write_")
        if not with_usage:
            assert least is None
            return
        assert_close(usage, nm.usage_update_ref(u0, w, 0.9), dtype, name="usage after the write")
        torch.testing.assert_close(least, torch.argmin(usage, dim=1), rtol=0, atol=0)
        assert_close(usage, usage2, dtype, name="usage vs content_write_")


def test_content_read_write_bad_input_names_argument_and_leaves_memory():
    t = make_inputs(2, 9, 5, 3, 1)
    m, u = t["memory"], t["usage"]
    k, s, wk, ws, e, a = t["keys"], t["strengths"], t["wkeys"], t["wstrengths"], t["erase"], t["add"]
    cases = [
        ("read_keys", dict(read_keys=k[:, :, :4])),
        ("read_strengths", dict(read_strengths=s[:, :2])),
        ("write_keys", dict(write_keys=wk.double())),
        ("write_strengths", dict(write_strengths=ws[:1])),
        ("erase", dict(erase=e[:, :, :2])),
        ("usage", dict(usage=u[:, :4])),
    ]
    for name, bad in cases:
        args = dict(read_keys=k, read_strengths=s, write_keys=wk, write_strengths=ws, erase=e, add=a, usage=u.clone())
        args.update(bad)
        mem = m.clone()
        with pytest.raises((ValueError, TypeError), match=name):
            nm.content_read_write_(mem, **args)
        torch.testing.assert_close(mem, m, rtol=0, atol=0)


# --------------------------------------------------------------------------
# half precision: float32 accumulation, output in the input dtype
# --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3]], ids=[SHAPE_IDS[1], SHAPE_IDS[3]])
@pytest.mark.parametrize("device,backend", PAIRS)
def test_half_forward(device, backend, shape, dtype):
    t = make_inputs(*shape, dtype=dtype, device=device)
    f = {k: v.float() for k, v in t.items()}  # the same rounded values, in float32

    def check(out, ref, name):
        assert out.dtype == dtype, (name, out.dtype)
        assert_close(out.float(), ref, dtype, name=name)

    check(nm.content_addressing(t["memory"], t["keys"], t["strengths"], backend=backend),
          nm.content_addressing_ref(f["memory"], f["keys"], f["strengths"]), "weights")
    check(nm.memory_read(t["memory"], t["weights"], backend=backend),
          nm.memory_read_ref(f["memory"], f["weights"]), "reads")
    reads, lse = nm.content_read(t["memory"], t["keys"], t["strengths"], backend=backend, return_lse=True)
    check(reads, nm.content_read_ref(f["memory"], f["keys"], f["strengths"]), "content reads")
    assert lse.dtype == torch.float32
    _, lse_ref = nm.content_read(f["memory"], f["keys"], f["strengths"], backend="torch", return_lse=True)
    assert_close(lse, lse_ref, torch.float32, name="lse", tol_scale=10)
    check(nm.memory_write(t["memory"], t["wweights"], t["erase"], t["add"], backend=backend),
          nm.memory_write_ref(f["memory"], f["wweights"], f["erase"], f["add"]), "new memory")
    check(nm.usage_update(t["usage"], t["wweights"], backend=backend),
          nm.usage_update_ref(f["usage"], f["wweights"]), "usage")
    mem, usage = t["memory"].clone(), t["usage"].clone()
    nm.content_write_(mem, t["wkeys"], t["wstrengths"], t["erase"], t["add"], usage=usage, backend=backend)
    w = nm.content_addressing_ref(f["memory"], f["wkeys"], f["wstrengths"])
    check(mem, nm.memory_write_ref(f["memory"], w, f["erase"], f["add"]), "content_write_ memory")
    check(usage, nm.usage_update_ref(f["usage"], w), "content_write_ usage")


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("device,backend", PAIRS)
def test_half_backward(device, backend, dtype):
    """Gradients of half inputs, against the float32 reference of the same values."""
    t = make_inputs(3, 7, 3, 4, 2, dtype=dtype, device=device)
    f = {k: v.float() for k, v in t.items()}
    cases = [
        (lambda m, k, s: nm.content_read(m, k, s, backend=backend), nm.content_read_ref, ("memory", "keys", "strengths")),
        (lambda m, k, s: nm.content_addressing(m, k, s, backend=backend), nm.content_addressing_ref,
         ("memory", "keys", "strengths")),
        (lambda m, w: nm.memory_read(m, w, backend=backend), nm.memory_read_ref, ("memory", "weights")),
        (lambda m, w, e, a: nm.memory_write(m, w, e, a, backend=backend), nm.memory_write_ref,
         ("memory", "wweights", "erase", "add")),
    ]
    for fast, ref, names in cases:
        fin = _leaves(*[t[n] for n in names])
        rin = _leaves(*[f[n] for n in names])
        for name, a, b in zip(names, _grads(fast(*fin), fin), _grads(ref(*rin), rin)):
            assert a.dtype == dtype
            # Gradients pass through a few more roundings than outputs.
            assert_close(a.float(), b, dtype, name=f"grad {name}", tol_scale=4)


# --------------------------------------------------------------------------
# gradcheck (float64) of every differentiable op
# --------------------------------------------------------------------------
# (1, 9, 16, 2, 1): whole vectors and one write head, the CPU write backward's register path
GRAD_SHAPES = [(1, 1, 1, 1, 1), (2, 7, 3, 2, 2), (1, 128, 3, 4, 1), (1, 9, 16, 2, 1)]
GRAD_IDS = [shape_id(B=b, N=n, D=d, H=h, W=w) for b, n, d, h, w in GRAD_SHAPES]


@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=GRAD_IDS)
@pytest.mark.parametrize("device,backend", PAIRS)
def test_gradcheck(device, backend, shape):
    t = make_inputs(*shape, dtype=torch.float64, device=device)
    cases = {
        "content_addressing": (lambda m, k, s: nm.content_addressing(m, k, s, backend=backend),
                               ("memory", "keys", "strengths")),
        "memory_read": (lambda m, w: nm.memory_read(m, w, backend=backend), ("memory", "weights")),
        "content_read": (lambda m, k, s: nm.content_read(m, k, s, backend=backend), ("memory", "keys", "strengths")),
        "memory_write": (lambda m, w, e, a: nm.memory_write(m, w, e, a, backend=backend),
                         ("memory", "wweights", "erase", "add")),
        "usage_update": (lambda u, w: nm.usage_update(u, w, 0.97, backend=backend), ("usage", "wweights")),
    }
    for name, (fn, args) in cases.items():
        inputs = tuple(t[a].detach().clone().requires_grad_(True) for a in args)
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5), name


@pytest.mark.parametrize("device,backend", PAIRS)
def test_gradcheck_sharp_and_flat_softmax(device, backend):
    t = make_inputs(2, 7, 3, 2, 1, dtype=torch.float64, device=device)
    s = torch.tensor([[30.0, 0.0], [5.0, 200.0]], dtype=torch.float64, device=device)
    for fn in (nm.content_read, nm.content_addressing):
        inputs = tuple(x.detach().clone().requires_grad_(True) for x in (t["memory"], t["keys"], s))
        assert torch.autograd.gradcheck(lambda a, b, c: fn(a, b, c, backend=backend), inputs,
                                        eps=1e-7, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("device,backend", PAIRS)
def test_degenerate_norm_gradients_match_reference(device, backend):
    """A zero slot and a zero key take F.normalize's clamped branch (x / eps).

    Finite differences cannot check this (the function jumps at 0), so the
    gradients are compared with autograd through F.normalize instead.
    """
    t = make_inputs(2, 7, 3, 2, 1, dtype=torch.float64, device=device)
    m, k = t["memory"].clone(), t["keys"].clone()
    m[0, 3] = 0.0
    m[1, 5] = 1e-14  # below eps, not zero
    k[1, 0] = 0.0
    for fast, ref in ((nm.content_read, nm.content_read_ref), (nm.content_addressing, nm.content_addressing_ref)):
        _check_fwd_bwd(lambda a, b, c: fast(a, b, c, backend=backend), ref, [m, k, t["strengths"]],
                       ["memory", "keys", "strengths"], torch.float64, fast.__name__)


# --------------------------------------------------------------------------
# torch.library.opcheck of every registered op
# --------------------------------------------------------------------------
def _opcheck_cases(device):
    t = make_inputs(2, 7, 3, 2, 2, dtype=torch.float32, device=device)
    m, k, s, w = t["memory"], t["keys"], t["strengths"], t["weights"]
    ww, e, a, u, wk, ws = t["wweights"], t["erase"], t["add"], t["usage"], t["wkeys"], t["wstrengths"]
    eps = 1e-12
    reads, lse = OPS.content_read(m, k, s, eps)
    gr = torch.randn_like(reads)
    return {
        "content_addressing": (OPS.content_addressing, (m, k, s, eps)),
        "content_addressing_backward": (OPS.content_addressing_backward,
                                        (torch.randn_like(w), OPS.content_addressing(m, k, s, eps), m, k, s, eps)),
        "memory_read": (OPS.memory_read, (m, w)),
        "memory_read_backward": (OPS.memory_read_backward, (gr, m, w)),
        "content_read": (OPS.content_read, (m, k, s, eps)),
        "content_read_backward": (OPS.content_read_backward, (gr, reads, lse, m, k, s, eps)),
        "content_read_backward-no-memory-grad": (OPS.content_read_backward, (gr, reads, lse, m, k, s, eps, False)),
        "memory_write": (OPS.memory_write, (m, ww, e, a)),
        "memory_write_backward": (OPS.memory_write_backward, (torch.randn_like(m), m, ww, e, a)),
        "memory_write_": (OPS.memory_write_, (m.clone(), ww, e, a)),
        "content_write": (OPS.content_write, (m, wk, ws, e, a, eps)),
        "content_write_backward": (OPS.content_write_backward,
                                   (torch.randn_like(m), OPS.content_write(m, wk, ws, e, a, eps)[1], m, wk, ws, e, a,
                                    eps)),
        "content_read_write": (OPS.content_read_write, (m, k, s, wk, ws, e, a, eps)),
        "content_read_write_backward": (OPS.content_read_write_backward,
                                        (gr, torch.randn_like(m), reads, lse,
                                         OPS.content_write(m, wk, ws, e, a, eps)[1], m, k, s, wk, ws, e, a, eps)),
        "usage_update": (OPS.usage_update, (u, ww, 0.99)),
        "content_write_": (OPS.content_write_, (m.clone(), u.clone(), wk, ws, e, a, eps, 0.99)),
        "content_write_-no-usage": (OPS.content_write_, (m.clone(), None, wk, ws, e, a, eps, 0.99)),
        "content_read_write_": (OPS.content_read_write_, (m.clone(), u.clone(), k, s, wk, ws, e, a, eps, 0.99)),
        "content_read_write_-no-usage": (OPS.content_read_write_, (m.clone(), None, k, s, wk, ws, e, a, eps, 0.99)),
    }


OPCHECK_NAMES = list(_opcheck_cases("cpu").keys()) if nm.has_extension() else []


@pytest.mark.parametrize("name", OPCHECK_NAMES)
@pytest.mark.parametrize("device,backend", PAIRS)
def test_opcheck(device, backend, name):
    op, args = _opcheck_cases(device)[name]
    torch.library.opcheck(op, args)


# --------------------------------------------------------------------------
# torch.compile: a read-then-write step in one graph, forward and backward
# --------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", PAIRS)
def test_compile_read_then_write_step(device, backend):
    torch._dynamo.reset()
    t = make_inputs(2, 7, 3, 4, 1, dtype=torch.float64, device=device)

    def step(memory, keys, strengths, wkeys, wstrengths, erase, add, be):
        reads = nm.content_read(memory, keys, strengths, backend=be)
        w = nm.content_addressing(memory, wkeys, wstrengths, backend=be)
        new_memory = nm.memory_write(memory, w, erase, add, backend=be)
        return reads, new_memory

    names = ("memory", "keys", "strengths", "wkeys", "wstrengths", "erase", "add")
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    cin = _leaves(*[t[n] for n in names])
    rin = _leaves(*[t[n] for n in names])
    out = compiled(*cin, backend)
    ref = step(*rin, "torch")
    for o, r, n in zip(out, ref, ("reads", "new memory")):
        assert_close(o, r, torch.float64, name=f"compiled {n}")
    loss_c = out[0].square().sum() + (out[1] * torch.arange(out[1].numel(), device=device).view_as(out[1])).sum()
    loss_r = ref[0].square().sum() + (ref[1] * torch.arange(ref[1].numel(), device=device).view_as(ref[1])).sum()
    for n, a, b in zip(names, torch.autograd.grad(loss_c, cin), torch.autograd.grad(loss_r, rin)):
        assert_close(a, b, torch.float64, name=f"compiled grad {n}")


# --------------------------------------------------------------------------
# numerical safety
# --------------------------------------------------------------------------
def _anti_aligned(B, N, D, H, dtype, device):
    """Every key points away from every slot: all logits are -strength."""
    g = torch.Generator().manual_seed(3)
    v = F.normalize(torch.rand(D, generator=g, dtype=torch.float64) + 0.5, dim=0)
    scale = 0.5 + torch.rand(B, N, 1, generator=g, dtype=torch.float64)
    memory = v * scale + 1e-3 * torch.randn(B, N, D, generator=g, dtype=torch.float64)
    keys = -v.expand(B, H, D) * (1 + torch.rand(B, H, 1, generator=g, dtype=torch.float64))
    return memory.to(dtype=dtype, device=device), keys.contiguous().to(dtype=dtype, device=device)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("strength", [0.0, 1.0, 100.0, 1e4, 1e30], ids=lambda s: f"beta{s:g}")
@pytest.mark.parametrize("case", ["random", "anti-aligned", "zero-memory", "zero-keys"])
@pytest.mark.parametrize("device,backend", PAIRS)
def test_numerical_safety(device, backend, case, strength, dtype):
    if strength > 1e4 and case.startswith("zero") and dtype == torch.float32:
        # The exact gradient through a zero vector is strength / eps ~ 1e42 here:
        # beyond float32, whatever the kernel does.
        pytest.skip("gradient not representable in float32")
    B, N, D, H = 2, 130, 8, 3
    t = make_inputs(B, N, D, H, 1, dtype=dtype, device=device)
    memory, keys = t["memory"], t["keys"]
    if case == "anti-aligned":
        memory, keys = _anti_aligned(B, N, D, H, dtype, device)
    elif case == "zero-memory":
        memory = torch.zeros_like(memory)
    elif case == "zero-keys":
        keys = torch.zeros_like(keys)
    strengths = torch.full((B, H), strength, dtype=dtype, device=device)
    args = (memory, keys, strengths)
    for fn, ref in ((nm.content_read, nm.content_read_ref), (nm.content_addressing, nm.content_addressing_ref)):
        inputs = _leaves(*args)
        out = fn(*inputs, backend=backend)
        assert torch.isfinite(out).all(), f"{fn.__name__}: non-finite output"
        grads = _grads(out, inputs)
        for n, gr in zip(("memory", "keys", "strengths"), grads):
            assert torch.isfinite(gr).all(), f"{fn.__name__}: non-finite grad {n}"
        if dtype == torch.float64 and strength <= 1e4:
            rin = _leaves(*args)
            r = ref(*rin)
            assert_close(out, r, dtype, name=f"{fn.__name__} output")
            if case != "zero-memory" and case != "zero-keys":
                # With a zero vector the exact gradients are O(1/eps): compare
                # only where they are O(1).
                for n, a, b in zip(("memory", "keys", "strengths"), grads, _grads(r, rin)):
                    assert_close(a, b, dtype, name=f"{fn.__name__} grad {n}", tol_scale=1e3 if strength >= 1e4 else 1)
    # The write path addresses with the same softmax.
    mem = memory.clone()
    usage = torch.zeros(B, N, dtype=dtype, device=device)
    nm.content_write_(mem, keys[:, :1].contiguous(), strengths[:, :1].contiguous(), t["erase"], t["add"],
                      usage=usage, backend=backend)
    assert torch.isfinite(mem).all() and torch.isfinite(usage).all()
    torch.testing.assert_close(usage.sum(dim=1), torch.ones(B, dtype=dtype, device=device))


@pytest.mark.parametrize("device,backend", PAIRS)
def test_anti_aligned_gives_uniform_reads(device, backend):
    memory, keys = _anti_aligned(1, 50, 4, 2, torch.float64, device)
    memory = F.normalize(memory, dim=-1)  # exactly equal cosines up to rounding
    strengths = torch.full((1, 2), 1e4, dtype=torch.float64, device=device)
    w = nm.content_addressing(memory, keys, strengths, backend=backend)
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 2, dtype=torch.float64, device=device))


# --------------------------------------------------------------------------
# bad input: errors name the argument
# --------------------------------------------------------------------------
def _bad_cases(device):
    t = make_inputs(2, 5, 3, 2, 1, device=device)
    m, k, s, w, ww, e, a, u = (t[n] for n in ("memory", "keys", "strengths", "weights", "wweights", "erase", "add",
                                              "usage"))
    meta = torch.device("meta")
    return [
        ("read-memory-rank", lambda be: nm.content_read(m[0], k, s, backend=be), ValueError, "memory"),
        ("read-keys-D", lambda be: nm.content_read(m, k[..., :2], s, backend=be), ValueError, "keys"),
        ("read-keys-B", lambda be: nm.content_read(m, k[:1], s, backend=be), ValueError, "keys"),
        ("read-strengths-H", lambda be: nm.content_read(m, k, s[:, :1], backend=be), ValueError, "strengths"),
        ("read-strengths-rank", lambda be: nm.content_read(m, k, s[..., None], backend=be), ValueError, "strengths"),
        ("read-keys-dtype", lambda be: nm.content_read(m, k.double(), s, backend=be), TypeError, "keys"),
        ("read-keys-int", lambda be: nm.content_read(m, k.int(), s, backend=be), TypeError, "keys"),
        ("read-keys-device", lambda be: nm.content_read(m, k.to(meta), s, backend=be), ValueError, "keys"),
        ("read-eps", lambda be: nm.content_read(m, k, s, eps=0.0, backend=be), ValueError, "eps"),
        ("addressing-keys-dtype", lambda be: nm.content_addressing(m, k, s.double(), backend=be), TypeError,
         "strengths"),
        ("mread-weights-N", lambda be: nm.memory_read(m, w[..., :4], backend=be), ValueError, "weights"),
        ("mread-weights-rank", lambda be: nm.memory_read(m, w[0], backend=be), ValueError, "weights"),
        ("write-erase-W", lambda be: nm.memory_write(m, ww, e.expand(2, 2, 3), a, backend=be), ValueError,
         "erase"),
        ("write-add-D", lambda be: nm.memory_write(m, ww, e, a[..., :1], backend=be), ValueError, "add"),
        ("write-add-device", lambda be: nm.memory_write(m, ww, e, a.to(meta), backend=be), ValueError, "add"),
        ("write-usage-N", lambda be: nm.memory_write(m, ww, e, a, usage=u[:, :3], backend=be), ValueError, "usage"),
        ("write-decay", lambda be: nm.memory_write(m, ww, e, a, usage=u, decay=1.5, backend=be), ValueError,
         "decay"),
        ("write_-noncontiguous", lambda be: nm.memory_write_(m.transpose(1, 2).contiguous().transpose(1, 2), ww, e,
                                                              a, backend=be), ValueError, "memory"),
        ("usage-weights-dtype", lambda be: nm.usage_update(u.double(), ww, backend=be), TypeError, "usage"),
        ("cwrite-strengths-W", lambda be: nm.content_write_(m.clone(), k[:, :1], s, e, a, backend=be), ValueError,
         "strengths"),
        ("backend-name", lambda be: nm.content_read(m, k, s, backend="fast"), ValueError, "backend"),
    ]


BAD_IDS = [c[0] for c in _bad_cases("cpu")]


@pytest.mark.parametrize("case", range(len(BAD_IDS)), ids=BAD_IDS)
@pytest.mark.parametrize("device,backend", PAIRS)
def test_bad_input_public(device, backend, case):
    _, fn, exc, word = _bad_cases(device)[case]
    with pytest.raises(exc, match=word):
        fn(backend)


def _bad_native_cases(device):
    """The native ops validate too (they are callable without the Python layer)."""
    t = make_inputs(2, 5, 3, 2, 1, device=device)
    m, k, s, w, ww, e, a, u = (t[n] for n in ("memory", "keys", "strengths", "weights", "wweights", "erase", "add",
                                              "usage"))
    reads, lse = OPS.content_read(m, k, s, 1e-12)
    return [
        ("memory-rank", lambda: OPS.content_read(m[0], k, s, 1e-12), ValueError, "memory"),
        ("keys-D", lambda: OPS.content_addressing(m, k[..., :2], s, 1e-12), ValueError, "keys"),
        ("strengths-dtype", lambda: OPS.content_read(m, k, s.double(), 1e-12), TypeError, "strengths"),
        ("eps", lambda: OPS.content_read(m, k, s, -1.0), ValueError, "eps"),
        ("weights-N", lambda: OPS.memory_read(m, w[..., :4]), ValueError, "weights"),
        ("grad_reads-H", lambda: OPS.memory_read_backward(reads[:, :1], m, w), ValueError, "grad_reads"),
        ("lse-dtype", lambda: OPS.content_read_backward(reads, reads, lse.double(), m, k, s, 1e-12), TypeError,
         "lse"),
        ("erase-W", lambda: OPS.memory_write(m, ww, e.expand(2, 2, 3), a), ValueError, "erase"),
        ("grad_out-shape", lambda: OPS.memory_write_backward(m[:, :2], m, ww, e, a), ValueError, "grad_out"),
        ("write_-noncontiguous", lambda: OPS.memory_write_(m.transpose(1, 2).contiguous().transpose(1, 2), ww, e, a),
         ValueError, "memory"),
        ("usage-N", lambda: OPS.usage_update(u[:, :2], ww, 0.9), ValueError, "usage"),
        ("decay", lambda: OPS.usage_update(u, ww, 2.0), ValueError, "decay"),
        ("cwrite-usage-dtype", lambda: OPS.content_write_(m.clone(), u.double(), k[:, :1], s[:, :1], e, a, 1e-12,
                                                          0.9), TypeError, "usage"),
    ]


BAD_NATIVE_IDS = [c[0] for c in _bad_native_cases("cpu")] if nm.has_extension() else []


@pytest.mark.parametrize("case", range(len(BAD_NATIVE_IDS)), ids=BAD_NATIVE_IDS)
@pytest.mark.parametrize("device,backend", PAIRS)
def test_bad_input_native(device, backend, case):
    _, fn, exc, word = _bad_native_cases(device)[case]
    with pytest.raises(exc, match=word):
        fn()


# --------------------------------------------------------------------------
# layouts: non-contiguous and expanded inputs
# --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("device,backend", PAIRS)
def test_noncontiguous_and_expanded(device, backend, dtype):
    B, N, D, H, W = 3, 129, 5, 4, 2
    t = make_inputs(B, N, D, H, W, dtype=dtype, device=device)
    # memory stored (B, D, N) and viewed (B, N, D); keys and strengths broadcast
    # from one memory; weights a strided slice; erase expanded over heads.
    memory = t["memory"].transpose(1, 2).contiguous().transpose(1, 2)
    keys = t["keys"][:1].expand(B, H, D)
    strengths = t["strengths"][:, :1].expand(B, H)
    weights = torch.cat([t["weights"], t["weights"]], dim=-1)[..., ::2]
    erase = t["erase"][:, :1].expand(B, W, D)
    wweights = t["wweights"].transpose(0, 1).contiguous().transpose(0, 1)
    add = t["add"]
    assert not memory.is_contiguous() and not weights.is_contiguous() and not wweights.is_contiguous()
    cases = [
        (lambda m, k, s: nm.content_read(m, k, s, backend=backend), nm.content_read_ref, (memory, keys, strengths)),
        (lambda m, k, s: nm.content_addressing(m, k, s, backend=backend), nm.content_addressing_ref,
         (memory, keys, strengths)),
        (lambda m, w: nm.memory_read(m, w, backend=backend), nm.memory_read_ref, (memory, weights)),
        (lambda m, w, e, a: nm.memory_write(m, w, e, a, backend=backend), nm.memory_write_ref,
         (memory, wweights, erase, add)),
    ]
    for fast, ref, args in cases:
        _check_fwd_bwd(fast, ref, list(args), [f"arg{i}" for i in range(len(args))], dtype, "output")
    # The native ops themselves accept strided inputs.
    r, _ = OPS.content_read(memory, keys, strengths, 1e-12)
    assert_close(r, nm.content_read_ref(memory, keys, strengths), dtype, name="native content_read")
    # In-place ops read strided weights/erase/add into a contiguous memory.
    mem = memory.contiguous()
    nm.memory_write_(mem, wweights, erase, add, backend=backend)
    assert_close(mem, nm.memory_write_ref(memory, wweights, erase, add), dtype, name="memory_write_")
    mem = memory.contiguous()
    nm.content_write_(mem, keys[:, :W], strengths[:, :W], erase, add, backend=backend)
    w = nm.content_addressing_ref(memory, keys[:, :W], strengths[:, :W])
    assert_close(mem, nm.memory_write_ref(memory, w, erase, add), dtype, name="content_write_")


# --------------------------------------------------------------------------
# determinism: chunking depends on the shape only
# --------------------------------------------------------------------------
@pytest.mark.parametrize("device,backend", [p for p in PAIRS if p.values[0] == "cpu"])
def test_cpu_results_do_not_depend_on_thread_count(device, backend):
    t = make_inputs(2, 3000, 64, 4, 2, device=device)
    inputs = (t["memory"], t["keys"], t["strengths"])

    def run():
        leaves = _leaves(*inputs)
        out = nm.content_read(*leaves, backend=backend)
        return (out, *_grads(out, leaves))

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(max(2, threads))
        many = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------
# every instruction-set build of the CPU kernels
# --------------------------------------------------------------------------
_ISA_SCRIPT = textwrap.dedent(
    """
    import torch, neuralmem_fast as nm
    from tests.helpers import make_inputs
    assert torch.ops.neuralmem.cpu_capability() == "{isa}", torch.ops.neuralmem.cpu_capability()
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-4)):
        for shape in ((3, 7, 3, 4, 2), (2, 1000, 64, 4, 2), (1, 33, 17, 5, 3)):
            t = make_inputs(*shape, dtype=dtype)
            m, k, s = [x.clone().requires_grad_(True) for x in (t["memory"], t["keys"], t["strengths"])]
            mr, kr, sr = [x.clone().requires_grad_(True) for x in (t["memory"], t["keys"], t["strengths"])]
            for fast, ref in ((nm.content_read, nm.content_read_ref), (nm.content_addressing, nm.content_addressing_ref)):
                o, r = fast(m, k, s, backend="cpu"), ref(mr, kr, sr)
                torch.testing.assert_close(o, r, atol=tol, rtol=tol)
                G = torch.randn_like(o)
                for a, b in zip(torch.autograd.grad((o * G).sum(), (m, k, s)), torch.autograd.grad((r * G).sum(), (mr, kr, sr))):
                    torch.testing.assert_close(a, b, atol=tol, rtol=tol)
            o = nm.memory_read(t["memory"], t["weights"], backend="cpu")
            torch.testing.assert_close(o, nm.memory_read_ref(t["memory"], t["weights"]), atol=tol, rtol=tol)
            args = [x.clone().requires_grad_(True) for x in (t["memory"], t["wweights"], t["erase"], t["add"])]
            rargs = [x.clone().requires_grad_(True) for x in args]
            o, r = nm.memory_write(*args, backend="cpu"), nm.memory_write_ref(*rargs)
            torch.testing.assert_close(o, r, atol=tol, rtol=tol)
            for a, b in zip(torch.autograd.grad(o.sum(), args), torch.autograd.grad(r.sum(), rargs)):
                torch.testing.assert_close(a, b, atol=tol, rtol=tol)
            mem, usage = t["memory"].clone(), t["usage"].clone()
            nm.content_write_(mem, t["wkeys"], t["wstrengths"], t["erase"], t["add"], usage=usage, backend="cpu")
            w = nm.content_addressing_ref(t["memory"], t["wkeys"], t["wstrengths"])
            torch.testing.assert_close(mem, nm.memory_write_ref(t["memory"], w, t["erase"], t["add"]), atol=tol, rtol=tol)
        h = make_inputs(3, 100, 20, 4, 2, dtype=torch.bfloat16)
        o = nm.content_read(h["memory"], h["keys"], h["strengths"], backend="cpu")
        r = nm.content_read_ref(h["memory"].float(), h["keys"].float(), h["strengths"].float())
        torch.testing.assert_close(o.float(), r, atol=2e-2, rtol=2e-2)
    print("ok")
    """
)


@pytest.mark.skipif(not nm.has_extension(), reason="native extension not built")
@pytest.mark.parametrize("isa", ["default", "avx2"])
def test_cpu_instruction_set_builds(isa):
    """The build the host does not pick by itself, run in a fresh process."""
    run_on_instruction_set(isa, _ISA_SCRIPT.format(isa=isa))
