"""No silent wrong answers: numerics that used to come out quietly wrong.

1. Half-precision backwards at large strengths: the gradients of
   content_read and content_addressing against a float64 computation of the
   same (half-rounded) inputs, no worse than a few times the torch backend's.
2. One slot with an all-zero key: the softmax over one slot is constant, so
   the key and strength gradients are exactly zero (the clamped key norm
   multiplies any rounding by 1/eps).
3. Ties in the least-used slot go to the lowest index on every path, the
   sharded memory included: all-zero memory (the tutorial's initial state)
   ties every slot.
4. Non-finite strengths and keys make that head's outputs NaN, exactly where
   the reference formula puts NaN, on every backend.

Written as a user's script would be: public functions, public backends.
"""
import math
import tempfile
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import neuralmem_fast as nm

from .helpers import DTYPE_ID, assert_close, shape_id

BACKENDS = [b for b in nm.available_backends("cpu") if b in ("cpu", "triton", "torch")]
HALF = [torch.float16, torch.bfloat16]
OPS = {"content_read": (nm.content_read, nm.content_read_ref),
       "content_addressing": (nm.content_addressing, nm.content_addressing_ref)}

# Unit roundoff: a gradient returned in half precision is never better than this.
UNIT = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def _id(x):
    if isinstance(x, torch.dtype):
        return DTYPE_ID[x]
    return str(x)


def _grads(fn, inputs, grad_out, **kw):
    """(output, grads of every input) of fn at fresh leaves of `inputs`."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves, **kw)
    out.backward(grad_out)
    return out.detach(), [x.grad for x in leaves]


# --------------------------------------------------------------------------
# 1. half-precision backwards
# --------------------------------------------------------------------------
def _near_parallel(B, N, D, H, beta, dtype, seed=1):
    """Slots and keys around one direction, spread so that beta * cosine spans a
    few units at every strength: the softmax is neither flat nor one-hot, so
    every gradient is well away from zero."""
    g = torch.Generator().manual_seed(seed)
    v = F.normalize(torch.randn(D, generator=g, dtype=torch.float64), dim=0)
    sigma = min(0.6, math.sqrt(3.0 / (8.0 * beta)))
    memory = v + sigma * torch.randn(B, N, D, generator=g, dtype=torch.float64)
    keys = v + sigma * torch.randn(B, H, D, generator=g, dtype=torch.float64)
    strengths = torch.full((B, H), float(beta), dtype=torch.float64)
    return [t.to(dtype) for t in (memory, keys, strengths)]


def _rel_err(a, b):
    return ((a.double() - b).abs().max() / b.abs().max()).item()


HALF_CASES = [(op, dt, beta, be) for op in OPS for dt in HALF for beta in (1, 20, 1000, 10000)
              for be in BACKENDS if be != "torch"]


@pytest.mark.parametrize(
    "op,dtype,beta,backend", HALF_CASES,
    ids=[f"{op}-{shape_id(B=1, N=128, H=4, D=64, dt=dt)}-beta{beta}-{be}" for op, dt, beta, be in HALF_CASES])
def test_half_backward_is_as_accurate_as_torch(op, dtype, beta, backend):
    B, N, D, H = 1, 128, 64, 4
    inputs = _near_parallel(B, N, D, H, beta, dtype)
    fn, ref = OPS[op]
    out_shape = (B, H, D) if op == "content_read" else (B, H, N)
    grad_out = torch.randn(out_shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dtype)
    # The truth: float64 arithmetic on the same half-rounded inputs.
    _, want = _grads(ref, [t.double() for t in inputs], grad_out.double())
    _, base = _grads(fn, inputs, grad_out, backend="torch")
    _, got = _grads(fn, inputs, grad_out, backend=backend)
    for name, a, t, w in zip(("memory", "keys", "strengths"), got, base, want):
        err, err_torch = _rel_err(a, w), _rel_err(t, w)
        assert err <= 4 * err_torch + UNIT[dtype], (
            f"{op} grad {name}: relative error {err:.2e} against float64, torch backend {err_torch:.2e}")


BIG_N = [(op, dt) for op in OPS for dt in HALF]


@pytest.mark.parametrize("op,dtype", BIG_N,
                         ids=[f"{op}-{shape_id(B=1, N=100000, H=4, D=64, dt=dt)}" for op, dt in BIG_N])
def test_half_backward_is_accurate_over_many_slots(op, dtype):
    """10^5 slots: the CPU kernels split them into chunks whose statistics are combined."""
    if "cpu" not in BACKENDS:
        pytest.skip("the native extension is not built")
    B, N, D, H = 1, 100_000, 64, 4
    inputs = _near_parallel(B, N, D, H, 1000, dtype, seed=3)
    fn, ref = OPS[op]
    out_shape = (B, H, D) if op == "content_read" else (B, H, N)
    grad_out = torch.randn(out_shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(dtype)
    _, want = _grads(ref, [t.double() for t in inputs], grad_out.double())
    _, base = _grads(fn, inputs, grad_out, backend="torch")
    _, got = _grads(fn, inputs, grad_out, backend="cpu")
    for name, a, t, w in zip(("memory", "keys", "strengths"), got, base, want):
        err, err_torch = _rel_err(a, w), _rel_err(t, w)
        assert err <= 4 * err_torch + UNIT[dtype], (
            f"{op} grad {name}: relative error {err:.2e} against float64, torch backend {err_torch:.2e}")


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("dtype", HALF, ids=_id)
def test_half_backward_across_triton_splits(op, dtype):
    """The Triton kernels' multi-split path (partial statistics, then combined)."""
    if "triton" not in BACKENDS:
        pytest.skip("triton does not run here")
    from neuralmem_fast.ops.triton import kernels as triton_ops

    B, N, D, H = 2, 50, 16, 3
    inputs = _near_parallel(B, N, D, H, 1000, dtype, seed=5)
    fn, ref = OPS[op]
    out_shape = (B, H, D) if op == "content_read" else (B, H, N)
    grad_out = torch.randn(out_shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64).to(dtype)
    _, want = _grads(ref, [t.double() for t in inputs], grad_out.double())
    _, base = _grads(fn, inputs, grad_out, backend="torch")
    with triton_ops.override(block_n=8, split_slots=16):
        _, got = _grads(fn, inputs, grad_out, backend="triton")
    for name, a, t, w in zip(("memory", "keys", "strengths"), got, base, want):
        err, err_torch = _rel_err(a, w), _rel_err(t, w)
        assert err <= 4 * err_torch + UNIT[dtype], (
            f"{op} grad {name}: relative error {err:.2e} against float64, torch backend {err_torch:.2e}")


# --------------------------------------------------------------------------
# 2. one slot
# --------------------------------------------------------------------------
ONE_SLOT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ONE_SLOT_DTYPES, ids=_id)
@pytest.mark.parametrize("key", ["zero-key", "random-key"])
@pytest.mark.parametrize("op", list(OPS))
def test_one_slot_gradients_are_exact(op, key, dtype, backend):
    B, N, D, H = 2, 1, 64, 4
    g = torch.Generator().manual_seed(7)
    memory = torch.randn(B, N, D, generator=g).to(dtype)
    keys = torch.zeros(B, H, D) if key == "zero-key" else torch.randn(B, H, D, generator=g)
    keys = keys.to(dtype)
    strengths = torch.full((B, H), 5.0).to(dtype)
    fn, _ = OPS[op]
    out_shape = (B, H, D) if op == "content_read" else (B, H, N)
    grad_out = torch.randn(out_shape, generator=g).to(dtype)
    out, (gm, gk, gs) = _grads(fn, (memory, keys, strengths), grad_out, backend=backend)
    # One slot: every weight is 1 whatever the key and strength.
    assert torch.equal(gk, torch.zeros_like(gk)), f"key gradient {gk.abs().max().item():.3g}, not 0"
    assert torch.equal(gs, torch.zeros_like(gs)), f"strength gradient {gs.abs().max().item():.3g}, not 0"
    if op == "content_read":
        assert torch.equal(out, memory.expand(B, H, D)), "reads of one slot are the slot"
        assert_close(gm, grad_out.double().sum(1, keepdim=True), dtype, name="grad memory")
    else:
        assert torch.equal(out, torch.ones_like(out))
        assert torch.equal(gm, torch.zeros_like(gm))


# --------------------------------------------------------------------------
# 3. ties in the least-used slot
# --------------------------------------------------------------------------
def _write_args(B, N, D, W, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(B, W, D, generator=g, dtype=torch.float64)
    strengths = torch.rand(B, W, generator=g, dtype=torch.float64) * 5
    erase = torch.rand(B, W, D, generator=g, dtype=torch.float64)
    add = torch.randn(B, W, D, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (keys, strengths, erase, add)]


TIE_CASES = [(be, dt, N) for be in BACKENDS for dt in (torch.float32, torch.float64) for N in (1, 2, 17, 59, 5000)
             if not (be == "triton" and N > 59)]


@pytest.mark.parametrize("backend,dtype,N", TIE_CASES,
                         ids=[f"{shape_id(B=2, N=N, W=1, D=8, dt=dt)}-{be}" for be, dt, N in TIE_CASES])
def test_tied_usage_takes_the_lowest_index(backend, dtype, N):
    B, D = 2, 8
    keys, strengths, erase, add = _write_args(B, N, D, 1, dtype, seed=N)
    memory = torch.zeros(B, N, D, dtype=dtype)  # every slot ties
    usage = torch.zeros(B, N, dtype=dtype)
    for step in range(3):
        least = nm.content_write_(memory, keys, strengths, erase, add, usage=usage, backend=backend)
        assert torch.equal(least, torch.argmin(usage, dim=1)), (step, least, usage)
        if step == 0:  # exact ties (later rows are equal too, but their logits may differ by an ulp)
            assert torch.equal(least, torch.zeros(B, dtype=torch.int64)), least
    # Ties away from slot 0: two equal minima, the first of them wins.
    if N >= 4:
        memory = torch.zeros(B, N, D, dtype=dtype)
        usage = torch.ones(B, N, dtype=dtype)
        usage[:, N // 2] = 0
        usage[:, N - 1] = 0
        least = nm.content_write_(memory, keys, strengths, erase, add, usage=usage, backend=backend)
        assert torch.equal(least, torch.full((B,), N // 2, dtype=torch.int64)), least


def _sharded_scan_worker(rank, world, init_file, backend, result_file):
    from neuralmem_fast.nn import ShardedMemory

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    failures = []
    try:
        B, D, W = 2, 6, 1
        for dtype in (torch.float32, torch.float64):
            for N in range(world, 60):
                for case in ("zero", "random"):
                    g = torch.Generator().manual_seed(N)
                    if case == "zero":  # the tutorial's initial state: every slot ties
                        mem = torch.zeros(B, N, D, dtype=dtype)
                        usage = torch.zeros(B, N, dtype=dtype)
                    else:
                        mem = torch.randn(B, N, D, generator=g, dtype=dtype)
                        usage = torch.rand(B, N, generator=g, dtype=dtype)
                    keys, strengths, erase, add = _write_args(B, N, D, W, dtype, seed=N + 1000)
                    sm = ShardedMemory(B, N, D, dtype=dtype, backend=backend).load_full_(mem, usage)
                    ref_m, ref_u = mem.clone(), usage.clone()
                    # After one write the rows of the all-zero memory are equal but no longer
                    # zero: their logits tie only to rounding, on one rank as in the unsharded op.
                    for step in range(1 if case == "zero" else 2):
                        least = sm.write_(keys, strengths, erase, add)
                        ref_least = nm.content_write_(ref_m, keys, strengths, erase, add, usage=ref_u,
                                                      backend=backend)
                        full_m, full_u = sm.gather_full()
                        tag = f"{DTYPE_ID[dtype]}-N{N}-{case}-step{step}"
                        if not torch.equal(least, ref_least):
                            failures.append(f"{tag}: sharded least {least.tolist()}, unsharded {ref_least.tolist()}")
                        if not torch.equal(ref_least, torch.argmin(ref_u, dim=1)):
                            failures.append(f"{tag}: unsharded least {ref_least.tolist()} is not argmin of its usage")
                        if case == "zero" and not torch.equal(full_u, ref_u):
                            failures.append(f"{tag}: usage differs by {(full_u - ref_u).abs().max().item():.3g}")
                        if case == "random" and not torch.allclose(full_u, ref_u, rtol=1e-5, atol=1e-6):
                            failures.append(f"{tag}: usage differs by {(full_u - ref_u).abs().max().item():.3g}")
                        if not torch.allclose(full_m, ref_m, rtol=1e-5, atol=1e-6):
                            failures.append(f"{tag}: memory differs by {(full_m - ref_m).abs().max().item():.3g}")
    finally:
        if rank == 0:
            torch.save(failures, result_file)
        dist.destroy_process_group()


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="no gloo")
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("cpu", "torch")])
@pytest.mark.parametrize("world", [2, 3], ids=lambda w: f"world{w}")
def test_sharded_least_used_equals_unsharded(world, backend):
    """N from the world size to 59, float32 and float64, all-zero and random memory."""
    with tempfile.TemporaryDirectory() as d:
        result = f"{d}/failures.pt"
        mp.spawn(_sharded_scan_worker, args=(world, f"{d}/init", backend, result), nprocs=world, join=True)
        failures = torch.load(result)
    assert not failures, f"{len(failures)} mismatches, e.g. " + "; ".join(failures[:5])


# --------------------------------------------------------------------------
# 4. non-finite strengths and keys
# --------------------------------------------------------------------------
INF, NAN = float("inf"), float("nan")
NONFINITE = [("strength", INF), ("strength", -INF), ("strength", NAN), ("key", INF), ("key", -INF),
             ("key", NAN)]


def _nonfinite_inputs(dtype, where, value, B=3, N=9, D=5, H=3):
    g = torch.Generator().manual_seed(11)
    memory = torch.randn(B, N, D, generator=g).to(dtype)
    keys = torch.randn(B, H, D, generator=g).to(dtype)
    strengths = (torch.rand(B, H, generator=g) * 5).to(dtype)
    if where == "strength":
        strengths[1, 2] = value
    else:
        keys[1, 2, 3] = value
    return memory, keys, strengths


NF_CASES = [(be, dt, w, v) for be in BACKENDS for dt in (torch.float32, torch.float64, torch.bfloat16)
            for w, v in NONFINITE]


def _nf_id(be, dt, w, v, heads="H"):
    label = "nan" if v != v else ("+inf" if v > 0 else "-inf")
    return f"{shape_id(B=3, N=9, **{heads: 3}, D=5, dt=dt)}-{w}={label}-{be}"


@pytest.mark.parametrize("backend,dtype,where,value", NF_CASES, ids=[_nf_id(*c) for c in NF_CASES])
def test_nonfinite_heads_are_nan_where_the_reference_is(backend, dtype, where, value):
    memory, keys, strengths = _nonfinite_inputs(dtype, where, value)
    for op, (fn, ref) in OPS.items():
        out_shape = (3, 3, 5) if op == "content_read" else (3, 3, 9)
        grad_out = torch.randn(out_shape, generator=torch.Generator().manual_seed(12)).to(dtype)
        got = _grads(fn, (memory, keys, strengths), grad_out, backend=backend)
        want = _grads(ref, (memory, keys, strengths), grad_out)
        for name, a, b in zip(("output", "grad memory", "grad keys", "grad strengths"),
                              [got[0], *got[1]], [want[0], *want[1]]):
            assert torch.equal(a.isnan(), b.isnan()), (
                f"{op} {name}: NaN at {a.isnan().nonzero().tolist()}, reference at {b.isnan().nonzero().tolist()}")
            assert torch.isfinite(a[~a.isnan()]).all(), f"{op} {name}: inf where the reference is finite"
        assert got[0][1, 2].isnan().all(), f"{op}: the non-finite head's output is not NaN"
    if backend != "torch":
        _, lse = nm.content_read(memory, keys, strengths, backend=backend, return_lse=True)
        expect = torch.zeros_like(lse, dtype=torch.bool)
        expect[1, 2] = True
        assert torch.equal(lse.isnan(), expect), lse


WRITE_NF_CASES = [(be, dt, w, v, W) for be in BACKENDS for dt in (torch.float32, torch.float64)
                  for w, v in NONFINITE for W in (1, 3)]


@pytest.mark.parametrize("backend,dtype,where,value,W", WRITE_NF_CASES,
                         ids=[_nf_id(be, dt, w, v).replace("H3", f"W{W}") for be, dt, w, v, W in WRITE_NF_CASES])
def test_nonfinite_write_heads_write_nan_rows_as_the_reference(backend, dtype, where, value, W):
    memory, keys, strengths = _nonfinite_inputs(dtype, where, value)
    wkeys, wstr = keys[:, -W:].contiguous(), strengths[:, -W:].contiguous()  # head 2 is the bad one
    g = torch.Generator().manual_seed(13)
    erase = torch.rand(3, W, 5, generator=g).to(dtype)
    add = torch.randn(3, W, 5, generator=g).to(dtype)
    usage = torch.rand(3, 9, generator=g).to(dtype)
    results = {}
    for be in (backend, "torch"):
        m, u = memory.clone(), usage.clone()
        least = nm.content_write_(m, wkeys, wstr, erase, add, usage=u, backend=be)
        m2, u2 = memory.clone(), usage.clone()
        reads, least2 = nm.content_read_write_(m2, keys, strengths, wkeys, wstr, erase, add, usage=u2, backend=be)
        results[be] = (m, u, least, m2, u2, reads, least2)
    for name, a, b in zip(("memory", "usage", "least", "memory (read-write)", "usage (read-write)",
                           "reads (read-write)", "least (read-write)"), results[backend], results["torch"]):
        if a.dtype == torch.int64:
            assert torch.equal(a, b), f"{name}: {a.tolist()} != {b.tolist()}"
        else:
            assert torch.equal(a.isnan(), b.isnan()), f"{name}: NaN at {a.isnan().nonzero().tolist()}"
    assert results[backend][0][1].isnan().all(), "the rows of the memory with a non-finite write head"
    # The finite memories are written as usual.
    assert_close(results[backend][0][[0, 2]], results["torch"][0][[0, 2]], dtype, name="finite memories")


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_usage_counts_as_least_as_in_torch_argmin(backend):
    B, N, D = 2, 40, 4
    keys, strengths, erase, add = _write_args(B, N, D, 1, torch.float32, seed=3)
    memory = torch.randn(B, N, D, generator=torch.Generator().manual_seed(4))
    usage = torch.rand(B, N, generator=torch.Generator().manual_seed(5))
    usage[0, 30] = NAN
    usage[0, 21] = NAN
    usage[1, 0] = NAN
    least = nm.content_write_(memory, keys, strengths, erase, add, usage=usage, backend=backend)
    assert torch.equal(least, torch.argmin(usage, dim=1)), (least, torch.argmin(usage, dim=1))
    assert least.tolist() == [21, 0]
