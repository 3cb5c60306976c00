"""The CUDA build and the CUDA kernels' own cases.

The first tests run everywhere the CUDA build is possible (a CUDA build of
torch and nvcc, as in CI without a GPU): the extension must have been
compiled with its CUDA kernels and every neuralmem op must have a CUDA
kernel registered. The rest need a GPU and cover what only the CUDA kernels
have: lane geometries (D = 1, 3, 64, 300 → one to two column tiles,
misaligned rows that take the scalar-load path), head groups (H > 4), the
split-K path of large memories (N = 300000 → many splits), the fused and
split content_write_, gradcheck in float64 through every geometry, and
bitwise-reproducible gradients. The generic (device, backend) matrix lives
in tests/test_ops.py.
"""
import os
import shutil

import pytest
import torch

import neuralmem_fast as nm
from neuralmem_fast import ops
from tests.helpers import DTYPE_ID, assert_close, shape_id

OPS = (
    "content_addressing",
    "content_addressing_backward",
    "memory_read",
    "memory_read_backward",
    "content_read",
    "content_read_backward",
    "memory_write",
    "memory_write_backward",
    "memory_write_",
    "usage_update",
    "content_write_",
    "content_read_write_",
    "content_write",
    "content_write_backward",
    "content_read_write",
    "content_read_write_backward",
)

ALL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _cuda_build_expected():
    if os.environ.get("NEURALMEM_NO_CUDA", "0") == "1":
        return False
    if torch.version.cuda is None:
        return False
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return True
    return os.path.exists("/usr/local/cuda/bin/nvcc") or shutil.which("nvcc") is not None


needs_cuda_build = pytest.mark.skipif(
    not _cuda_build_expected(), reason="needs a CUDA build of torch and nvcc (or NEURALMEM_NO_CUDA=1 is set)"
)
needs_gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and nm.has_cuda_kernels()), reason="needs a CUDA device and the CUDA kernels"
)


# ---------------------------------------------------------------------------
# build (no GPU needed)
# ---------------------------------------------------------------------------
@needs_cuda_build
def test_extension_was_built_with_cuda():
    assert nm.has_extension(), "neuralmem_fast._C did not import"
    assert nm.has_cuda_kernels(), (
        "torch is a CUDA build and nvcc is present, but neuralmem_fast._C was built without its CUDA kernels"
    )


@needs_cuda_build
@pytest.mark.parametrize("op", OPS)
def test_cuda_kernel_registered(op):
    if not nm.has_cuda_kernels():
        pytest.fail("the extension was built without CUDA kernels")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"neuralmem::{op}", "CUDA"), (
        f"neuralmem::{op} has no CUDA kernel"
    )


def test_registration_check_can_fail():
    # The check above must be able to say no: an op without a CUDA kernel.
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("neuralmem::content_read", "XLA")


# ---------------------------------------------------------------------------
# GPU: helpers
# ---------------------------------------------------------------------------
def _rand(*shape, dtype, device="cuda", scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def _inputs(B, N, D, H, dtype, strength=5.0):
    memory = _rand(B, N, D, dtype=dtype)
    keys = _rand(B, H, D, dtype=dtype)
    strengths = (torch.rand(B, H, dtype=torch.float64) * strength).to("cuda", dtype)
    return memory, keys, strengths


def _misaligned(t):
    """Same values, storage offset of one element: rows are no longer 16-byte aligned."""
    base = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = base[1:].view(t.shape)
    out.copy_(t)
    assert out.is_contiguous() and out.data_ptr() % 16 != 0
    return out


# Geometries: D picks the lane group and the tile count, H the head groups.
GEOMS = [
    dict(B=3, N=7, D=64, H=4),
    dict(B=2, N=130, D=3, H=1),
    dict(B=1, N=33, D=1, H=6),
    dict(B=2, N=20, D=300, H=5),
    dict(B=4, N=128, D=16, H=2),
]
GEOM_IDS = [shape_id(**g) for g in GEOMS]


def _case_ids(geoms, dtypes):
    return [shape_id(**g, dtype=dt) for g in geoms for dt in dtypes]


CASES = [(g, dt) for g in GEOMS for dt in ALL_DTYPES]


# ---------------------------------------------------------------------------
# GPU: forward against the references, every dtype and geometry
# ---------------------------------------------------------------------------
@needs_gpu
@pytest.mark.parametrize("geom,dtype", CASES, ids=_case_ids(GEOMS, ALL_DTYPES))
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "misaligned"])
def test_read_ops_match_reference(geom, dtype, aligned):
    memory, keys, strengths = _inputs(**geom, dtype=dtype)
    if not aligned:
        memory, keys = _misaligned(memory), _misaligned(keys)
    w_ref = ops.content_addressing_ref(memory, keys, strengths)
    assert_close(nm.content_addressing(memory, keys, strengths, backend="cuda"), w_ref, name="weights")
    r_ref = ops.content_read_ref(memory, keys, strengths)
    reads, lse = nm.content_read(memory, keys, strengths, backend="cuda", return_lse=True)
    assert_close(reads, r_ref, name="content_read")
    _, lse_ref = nm.content_read(memory, keys, strengths, backend="torch", return_lse=True)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(lse.to(lse_ref.dtype), lse_ref, dtype=torch.float32 if dtype != torch.float64 else dtype,
                 name="lse", tol_scale=10.0)
    assert_close(nm.memory_read(memory, w_ref, backend="cuda"), ops.memory_read_ref(memory, w_ref),
                 name="memory_read")


@needs_gpu
@pytest.mark.parametrize("geom,dtype", CASES, ids=_case_ids(GEOMS, ALL_DTYPES))
def test_write_ops_match_reference(geom, dtype):
    B, N, D, W = geom["B"], geom["N"], geom["D"], geom["H"]
    memory = _rand(B, N, D, dtype=dtype)
    weights = torch.softmax(_rand(B, W, N, dtype=torch.float32), -1).to(dtype)
    erase = torch.rand(B, W, D, device="cuda").to(dtype)
    add = _rand(B, W, D, dtype=dtype)
    usage = torch.rand(B, N, device="cuda").to(dtype)
    ref = ops.memory_write_ref(memory, weights, erase, add)
    assert_close(nm.memory_write(memory, weights, erase, add, backend="cuda"), ref, name="memory_write")
    m2 = memory.clone()
    nm.memory_write_(m2, weights, erase, add, backend="cuda")
    assert_close(m2, ref, name="memory_write_")
    assert_close(nm.usage_update(usage, weights, 0.9, backend="cuda"), ops.usage_update_ref(usage, weights, 0.9),
                 name="usage_update")


def _content_write_ref(memory, keys, strengths, erase, add, usage, decay):
    w = ops.content_addressing_ref(memory, keys, strengths)
    new = ops.memory_write_ref(memory, w, erase, add)
    u = ops.usage_update_ref(usage, w, decay)
    return new, u


@needs_gpu
@pytest.mark.parametrize("geom,dtype", CASES, ids=_case_ids(GEOMS, ALL_DTYPES))
def test_content_write_matches_composition(geom, dtype):
    # H plays W here: W = 5, 6 take the composed fallback, W <= 4 the fused kernel.
    B, N, D, W = geom["B"], geom["N"], geom["D"], geom["H"]
    memory, keys, strengths = _inputs(B, N, D, W, dtype=dtype)
    erase = torch.rand(B, W, D, device="cuda").to(dtype)
    add = _rand(B, W, D, dtype=dtype)
    usage = torch.rand(B, N, device="cuda").to(dtype)
    new_ref, u_ref = _content_write_ref(memory, keys, strengths, erase, add, usage, 0.95)
    m, u = memory.clone(), usage.clone()
    least = nm.content_write_(m, keys, strengths, erase, add, usage=u, decay=0.95, backend="cuda")
    assert_close(m, new_ref, name="memory")
    assert_close(u, u_ref, name="usage")
    assert least.dtype == torch.int64 and least.shape == (B,)
    # The least-used slot of the usage the op itself wrote (exact, ties to the lowest index).
    torch.testing.assert_close(least, torch.argmin(u, dim=1))
    m2 = memory.clone()
    assert nm.content_write_(m2, keys, strengths, erase, add, backend="cuda") is None
    torch.testing.assert_close(m2, m, rtol=0, atol=0)


# ---------------------------------------------------------------------------
# GPU: large N, several splits (Flash-Decoding path)
# ---------------------------------------------------------------------------
@needs_gpu
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=[DTYPE_ID[d] for d in ALL_DTYPES])
def test_large_n_split_path(dtype):
    B, N, D, H = 1, 300_000, 64, 4
    memory, keys, strengths = _inputs(B, N, D, H, dtype=dtype, strength=50.0)
    # Plant each key near one slot so that the softmax is peaked somewhere in the middle.
    slots = torch.tensor([5, 150_001, 299_999, 77_777], device="cuda")
    keys = (memory[0, slots].float() + 0.1 * keys[0].float()).to(dtype).unsqueeze(0)
    r_ref = ops.content_read_ref(memory, keys, strengths)
    reads = nm.content_read(memory, keys, strengths, backend="cuda")
    assert_close(reads, r_ref, name="content_read", tol_scale=2.0)
    w_ref = ops.content_addressing_ref(memory, keys, strengths)
    assert_close(nm.content_addressing(memory, keys, strengths, backend="cuda"), w_ref, name="weights")
    assert_close(nm.memory_read(memory, w_ref, backend="cuda"), ops.memory_read_ref(memory, w_ref),
                 name="memory_read", tol_scale=2.0)

    # Gradients of the fused read against autograd through the reference (float32
    # math). Half inputs are left out here: their backward receives reads rounded to
    # the input dtype, and with a peaked softmax ds = w (g.m - g.r) cancels, so the
    # comparison would measure that rounding, not the split path.
    if dtype not in (torch.float32, torch.float64):
        return
    m32, k32, s32 = (t.detach().float().requires_grad_() for t in (memory, keys, strengths))
    g = torch.randn(B, H, D, device="cuda")
    ops.content_read_ref(m32, k32, s32).backward(g)
    mx, kx, sx = (t.detach().clone().requires_grad_() for t in (memory, keys, strengths))
    nm.content_read(mx, kx, sx, backend="cuda").backward(g.to(dtype))
    for name, got, want in (("memory", mx.grad, m32.grad), ("keys", kx.grad, k32.grad),
                            ("strengths", sx.grad, s32.grad)):
        scale = want.abs().max().clamp_min(1e-6)
        tol = 1e-4
        err = (got.float() - want).abs().max() / scale
        assert err < tol, f"d{name}: max error {err:.3g} (relative to max |grad| {scale:.3g})"


@needs_gpu
def test_large_n_content_write_split_path():
    B, N, D, W = 2, 300_000, 32, 2
    dtype = torch.float32
    memory, keys, strengths = _inputs(B, N, D, W, dtype=dtype, strength=20.0)
    erase = torch.rand(B, W, D, device="cuda")
    add = torch.randn(B, W, D, device="cuda")
    usage = torch.rand(B, N, device="cuda") + 1.0
    usage[0, 123_456] = 0.0  # the least used slots, far from the first split
    usage[1, 299_998] = 0.0
    new_ref, u_ref = _content_write_ref(memory, keys, strengths, erase, add, usage, 0.99)
    m, u = memory.clone(), usage.clone()
    least = nm.content_write_(m, keys, strengths, erase, add, usage=u, decay=0.99, backend="cuda")
    assert_close(m, new_ref, name="memory")
    assert_close(u, u_ref, name="usage")
    torch.testing.assert_close(least, torch.argmin(u, dim=1))
    assert least.tolist() == [123_456, 299_998]


@needs_gpu
def test_argmin_ties_go_to_the_lowest_index():
    B, N, D, W = 1, 5000, 8, 1
    memory = torch.zeros(B, N, D, device="cuda")
    keys = torch.zeros(B, W, D, device="cuda")
    strengths = torch.ones(B, W, device="cuda")
    erase = torch.zeros(B, W, D, device="cuda")
    add = torch.zeros(B, W, D, device="cuda")
    usage = torch.ones(B, N, device="cuda")
    usage[0, [4000, 1234, 4999]] = 0.0  # three equal minima: 1234 must win
    least = nm.content_write_(memory, keys, strengths, erase, add, usage=usage, backend="cuda")
    assert least.tolist() == [1234]


# ---------------------------------------------------------------------------
# GPU: safety of the softmax
# ---------------------------------------------------------------------------
@needs_gpu
@pytest.mark.parametrize("strength", [0.0, 1e4, 1e30])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_extreme_strengths_and_degenerate_inputs(strength, dtype):
    if dtype == torch.float16 and strength > 6e4:
        pytest.skip("not representable in float16")
    B, N, D, H = 2, 50, 8, 3
    memory = _rand(B, N, D, dtype=dtype)
    memory[1] = 0  # an all-zero memory
    keys = -memory[:, :H].clone()  # anti-aligned with their own slot
    if dtype == torch.float32 and strength <= 1e4:
        # An all-zero key: its exact gradient is dq / eps (~1e12 * strength), which
        # float16, and float32 at strength 1e30, cannot represent.
        keys[0, 2] = 0
    strengths = torch.full((B, H), strength, device="cuda", dtype=dtype)
    for t in (memory, keys, strengths):
        t.requires_grad_()
    reads = nm.content_read(memory, keys, strengths, backend="cuda")
    weights = nm.content_addressing(memory, keys, strengths, backend="cuda")
    assert torch.isfinite(reads).all() and torch.isfinite(weights).all()
    torch.testing.assert_close(weights.float().sum(-1), torch.ones(B, H, device="cuda"), atol=5e-3, rtol=0)
    (reads.float().sum() + weights.float().sum()).backward()
    for name, t in (("memory", memory), ("keys", keys), ("strengths", strengths)):
        assert torch.isfinite(t.grad).all(), f"non-finite gradient for {name}"


# ---------------------------------------------------------------------------
# GPU: gradients
# ---------------------------------------------------------------------------
GRAD_GEOMS = [
    dict(B=2, N=7, D=3, H=2),
    dict(B=1, N=40, D=1, H=6),     # two head groups: memory gradient accumulated across launches
    dict(B=1, N=5, D=260, H=1),    # two column tiles
    dict(B=1, N=2500, D=2, H=1),   # two splits
]


@needs_gpu
@pytest.mark.parametrize("geom", GRAD_GEOMS, ids=[shape_id(**g) for g in GRAD_GEOMS])
def test_gradcheck_float64(geom):
    B, N, D, H = geom["B"], geom["N"], geom["D"], geom["H"]
    memory, keys, strengths = _inputs(B, N, D, H, dtype=torch.float64, strength=3.0)
    big = memory.numel() > 600  # keep the numerical Jacobian small: memory then stays fixed
    memory.requires_grad_(not big)
    keys.requires_grad_()
    strengths.requires_grad_()
    inputs = (memory, keys, strengths)
    assert torch.autograd.gradcheck(lambda m, k, s: nm.content_read(m, k, s, backend="cuda"), inputs)
    assert torch.autograd.gradcheck(lambda m, k, s: nm.content_addressing(m, k, s, backend="cuda"), inputs)
    weights = torch.softmax(torch.randn(B, H, N, device="cuda", dtype=torch.float64), -1)
    weights.requires_grad_()
    assert torch.autograd.gradcheck(lambda m, w: nm.memory_read(m, w, backend="cuda"), (memory, weights))
    erase = torch.rand(B, H, D, device="cuda", dtype=torch.float64, requires_grad=True)
    add = torch.randn(B, H, D, device="cuda", dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda m, w, e, a: nm.memory_write(m, w, e, a, backend="cuda"),
                                    (memory, weights, erase, add))


@needs_gpu
def test_memory_write_gradient_with_zero_factors():
    # w e = 1 zeroes a factor of the product: the gradient must come from
    # prefix/suffix products (a division by the factor would give inf/NaN).
    B, N, D, W = 1, 3, 2, 6
    memory = torch.randn(B, N, D, device="cuda", dtype=torch.float64, requires_grad=True)
    weights = torch.rand(B, W, N, device="cuda", dtype=torch.float64)
    erase = torch.rand(B, W, D, device="cuda", dtype=torch.float64)
    weights[0, 1, 0] = 1.0
    erase[0, 1, 0] = 1.0
    weights[0, 5, 2] = 1.0
    erase[0, 5, 1] = 1.0
    weights.requires_grad_()
    erase.requires_grad_()
    add = torch.randn(B, W, D, device="cuda", dtype=torch.float64, requires_grad=True)
    args = (memory, weights, erase, add)
    out = nm.memory_write(*args, backend="cuda")
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, args, g)
    want = torch.autograd.grad(ops.memory_write_ref(*args), args, g)
    for name, a, b in zip(("memory", "weights", "erase", "add"), got, want):
        assert torch.isfinite(a).all(), name
        assert_close(a, b, name=f"d{name}")


def _grads(fn, inputs, g):
    xs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*xs)
    return torch.autograd.grad(out, xs, g)


@needs_gpu
@pytest.mark.parametrize("N", [128, 300_000], ids=["N128", "N300000"])
def test_gradients_are_bitwise_reproducible(N):
    B, D, H = 2, 64, 6
    memory, keys, strengths = _inputs(B, N, D, H, dtype=torch.float32)
    g = torch.randn(B, H, D, device="cuda")
    f = lambda m, k, s: nm.content_read(m, k, s, backend="cuda")  # noqa: E731
    a = _grads(f, (memory, keys, strengths), g)
    b = _grads(f, (memory, keys, strengths), g)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    if N == 128:
        f = lambda m, k, s: nm.content_addressing(m, k, s, backend="cuda")  # noqa: E731
        gw = torch.randn(B, H, N, device="cuda")
        a = _grads(f, (memory, keys, strengths), gw)
        b = _grads(f, (memory, keys, strengths), gw)
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    W = 3
    weights = torch.softmax(torch.randn(B, W, N, device="cuda"), -1)
    erase, add = torch.rand(B, W, D, device="cuda"), torch.randn(B, W, D, device="cuda")
    go = torch.randn(B, N, D, device="cuda")
    f = lambda m, w, e, a_: nm.memory_write(m, w, e, a_, backend="cuda")  # noqa: E731
    a = _grads(f, (memory, weights, erase, add), go)
    b = _grads(f, (memory, weights, erase, add), go)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@needs_gpu
def test_bad_device_is_named():
    memory = torch.randn(1, 4, 8, device="cuda")
    keys = torch.randn(1, 2, 8)  # on the CPU
    strengths = torch.ones(1, 2, device="cuda")
    with pytest.raises((RuntimeError, ValueError), match="keys"):
        torch.ops.neuralmem.content_read(memory, keys, strengths, 1e-12)
