"""The native sparse access ops (torch.ops.neuralmem_sparse) against their references.

sparse_read (forward, backward, gradcheck, gradgradcheck), cosine_topk (vs the
stable-sort reference and torch.topk, ties, NaN, chunk merges), lru_touch_ /
lru_oldest (vs the Python loops), opcheck of every op, bad input refused with
the inputs unchanged, the version counter of lru_touch_, half precision at
large strengths and aliased inputs.
"""
import pytest
import torch

from neuralmem_fast.ops import sparse as sp

from .helpers import DEVICES, TOL

pytestmark = pytest.mark.skipif(not sp.has_sparse_kernels("cpu"), reason="native sparse ops not built")

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
IDS = ["fp64", "fp32", "fp16", "bf16"]
EPS = 1e-12


def _ops():
    return torch.ops.neuralmem_sparse


def _read_inputs(B, H, K, D, dtype, scale=5.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(B, H, K, D, generator=g, dtype=torch.float64)
    keys = torch.randn(B, H, D, generator=g, dtype=torch.float64)
    s = torch.rand(B, H, generator=g, dtype=torch.float64) * scale
    return rows.to(dtype), keys.to(dtype), s.to(dtype)


def _close(got, want, dtype, name, scale=1.0):
    t = TOL[dtype]
    torch.testing.assert_close(got.to(want.dtype), want, atol=t["atol"] * scale, rtol=t["rtol"] * scale,
                               msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------- sparse_read
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_sparse_read_matches_the_reference(dtype):
    rows, keys, s = _read_inputs(2, 3, 5, 13, dtype)
    if dtype in (torch.float32, torch.float64):
        rows[0, 1, 2] = 0  # a zero row: the clamped normalization
    reads, w = _ops().sparse_read(rows, keys, s, EPS)
    rr, wr = sp.sparse_read_ref(rows, keys, s, EPS)
    assert reads.dtype == dtype and w.dtype == dtype
    _close(reads, rr, dtype, "reads")
    _close(w, wr, dtype, "weights")
    r2, w2 = sp.sparse_read(rows, keys, s, EPS, backend="cpu")  # the public function takes the native path
    assert torch.equal(r2, reads) and torch.equal(w2, w)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_sparse_read_backward_matches_autograd_of_the_reference(dtype):
    rows, keys, s = _read_inputs(2, 3, 6, 11, dtype, seed=1)
    if dtype in (torch.float32, torch.float64):
        rows[1, 0, 3] = 0  # gradient 1/eps per term (the clamp's derivative), huge but exact
    g = torch.randn(2, 3, 11, dtype=torch.float64)
    gw = torch.randn(2, 3, 6, dtype=torch.float64)
    ins = [t.double().requires_grad_() for t in (rows, keys, s)]
    reads, w = sp.sparse_read_ref(*ins, EPS)
    want = torch.autograd.grad((reads, w), ins, (g, gw))
    _, wn = _ops().sparse_read(rows, keys, s, EPS)
    got = _ops().sparse_read_backward(g.to(dtype), gw.to(dtype), wn, rows, keys, s, EPS)
    half = dtype in (torch.float16, torch.bfloat16)
    for name, x, y in zip(("grad_rows", "grad_keys", "grad_strengths"), got, want):
        assert x.dtype == dtype and x.shape == y.shape
        _close(x, y, dtype, name, scale=5.0 if half else 1.0)


def test_sparse_read_gradcheck_through_reads_and_weights():
    rows, keys, s = _read_inputs(2, 2, 4, 5, torch.float64, scale=3.0, seed=2)
    ins = [t.requires_grad_() for t in (rows, keys, s)]
    assert torch.autograd.gradcheck(lambda r, k, st: sp.sparse_read(r, k, st, EPS), ins)
    assert torch.autograd.gradcheck(lambda r, k, st: sp.sparse_read(r, k, st, EPS)[0], ins)
    assert torch.autograd.gradcheck(lambda r, k, st: sp.sparse_read(r, k, st, EPS)[1], ins)


def test_sparse_read_gradcheck_where_the_norms_are_clamped():
    # eps = 0.5 and rows/keys of norm ~0.1: x / eps, derivative 1/eps, away from the kink at |x| = eps
    rows, keys, s = _read_inputs(1, 2, 4, 3, torch.float64, scale=3.0, seed=3)
    rows[0, 0, :2] *= 0.05
    keys[0, 1] *= 0.05
    assert rows[0, 0, :2].norm(dim=-1).max() < 0.5 and keys[0, 1].norm() < 0.5
    ins = [t.requires_grad_() for t in (rows, keys, s)]
    assert torch.autograd.gradcheck(lambda r, k, st: sp.sparse_read(r, k, st, 0.5), ins)


def test_sparse_read_gradgradcheck():
    rows, keys, s = _read_inputs(1, 2, 3, 4, torch.float64, scale=2.0, seed=4)
    ins = [t.requires_grad_() for t in (rows, keys, s)]
    assert torch.autograd.gradgradcheck(lambda r, k, st: sp.sparse_read(r, k, st, EPS), ins)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_sparse_read_half_at_large_strength(dtype):
    rows, keys, _ = _read_inputs(2, 3, 8, 16, dtype, seed=5)
    s = torch.full((2, 3), 1000.0, dtype=dtype)
    reads, w = _ops().sparse_read(rows, keys, s, EPS)
    assert torch.isfinite(reads).all() and torch.isfinite(w).all()
    rr, wr = sp.sparse_read_ref(rows.float(), keys.float(), s.float(), EPS)
    _close(reads, rr, dtype, "reads")
    _close(w, wr, dtype, "weights")
    gr = _ops().sparse_read_backward(torch.randn_like(reads), torch.randn_like(w), w, rows, keys, s, EPS)
    assert all(torch.isfinite(t).all() for t in gr)


def test_sparse_read_aliased_inputs_match_clones():
    rows, _, s = _read_inputs(2, 3, 4, 8, torch.float32, seed=6)
    keys = rows[:, :, 1, :]  # a view of the rows
    strengths = rows[:, :, 0, 0].abs()  # a view too
    assert keys.data_ptr() != 0 and not keys.is_contiguous()
    got = sp.sparse_read(rows, keys, strengths, EPS)
    want = sp.sparse_read(rows.clone(), keys.clone(), strengths.clone(), EPS)
    for x, y in zip(got, want):
        assert torch.equal(x, y)
    g = torch.randn(2, 3, 8)
    gw = torch.randn(2, 3, 4)
    got = _ops().sparse_read_backward(g, gw, got[1], rows, keys, strengths, EPS)
    want = _ops().sparse_read_backward(g, gw, want[1], rows.clone(), keys.clone(), strengths.clone(), EPS)
    for x, y in zip(got, want):
        assert torch.equal(x, y)


# ---------------------------------------------------------------- cosine_topk
def _check_topk(memory, keys, k, scores, idx, dtype):
    """scores match the reference; the chosen slots' exact cosines are the k best ones."""
    vals, ref_idx = sp.cosine_topk_ref(memory, keys, k, EPS)
    _close(scores, vals, dtype, "scores")
    kn = torch.nn.functional.normalize(keys.double(), dim=-1, eps=EPS)
    mn = torch.nn.functional.normalize(memory.double(), dim=-1, eps=EPS)
    cos = kn @ mn.transpose(-1, -2)
    _close(cos.gather(-1, idx).to(dtype), vals, dtype, "cosine of the chosen slots")
    for row in idx.reshape(-1, k):
        assert len(set(row.tolist())) == k, "a slot chosen twice"
    return ref_idx


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("N,k", [(37, 1), (37, 5), (37, 37), (9001, 10)])
def test_cosine_topk_matches_the_reference(dtype, N, k):
    g = torch.Generator().manual_seed(N + k)
    memory = torch.randn(2, N, 11, generator=g, dtype=torch.float64).to(dtype)
    keys = torch.randn(2, 3, 11, generator=g, dtype=torch.float64).to(dtype)
    scores, idx = _ops().cosine_topk(memory, keys, k, EPS)
    assert scores.dtype == dtype and idx.dtype == torch.int64 and scores.shape == (2, 3, k)
    ref_idx = _check_topk(memory, keys, k, scores, idx, dtype)
    if dtype == torch.float64:
        assert torch.equal(idx, ref_idx)
        tk = torch.topk(torch.nn.functional.normalize(keys, dim=-1, eps=EPS)
                        @ torch.nn.functional.normalize(memory, dim=-1, eps=EPS).transpose(-1, -2), k, dim=-1)
        torch.testing.assert_close(scores, tk.values)
        assert torch.equal(idx, tk.indices)


def test_cosine_topk_large_k_merges_chunks():
    g = torch.Generator().manual_seed(7)
    memory = torch.randn(1, 10007, 4, generator=g, dtype=torch.float64)
    keys = torch.randn(1, 2, 4, generator=g, dtype=torch.float64)
    for k in (4500, 10007):  # two chunks of >= k slots; one chunk holding every slot
        scores, idx = _ops().cosine_topk(memory, keys, k, EPS)
        vals, ref_idx = sp.cosine_topk_ref(memory, keys, k, EPS)
        torch.testing.assert_close(scores, vals)
        assert torch.equal(idx, ref_idx)


def test_cosine_topk_ties_in_increasing_slot_order():
    N, D = 9000, 4
    memory = torch.zeros(1, N, D)
    keys = torch.tensor([[[1.0, 0, 0, 0]]])
    memory[0, :, 0] = -1.0  # cosine -1 everywhere ...
    for n in (8000, 100, 5000, 4097):  # ... but 0 at these zero rows, across chunk boundaries
        memory[0, n] = 0
    memory[0, 7] = torch.tensor([2.0, 0, 0, 0])  # cosine 1
    memory[0, 6000] = torch.tensor([3.0, 0, 0, 0])  # cosine 1 too
    scores, idx = sp.cosine_topk(memory, keys, 6)
    assert idx.tolist() == [[[7, 6000, 100, 4097, 5000, 8000]]]
    assert scores.tolist() == [[[1.0, 1.0, 0.0, 0.0, 0.0, 0.0]]]
    assert torch.equal(idx, sp.cosine_topk_ref(memory, keys, 6)[1])
    # duplicated rows give bit-identical scores: slot order
    m2 = torch.randn(1, 50, 8).repeat(1, 3, 1)
    k2 = torch.randn(1, 2, 8)
    s2, i2 = _ops().cosine_topk(m2, k2, 9, EPS)
    assert torch.equal(i2.view(1, 2, 3, 3)[..., 1] - i2.view(1, 2, 3, 3)[..., 0], torch.full((1, 2, 3), 50))
    assert torch.equal(s2.view(1, 2, 3, 3).diff(dim=-1), torch.zeros(1, 2, 3, 2))


def test_cosine_topk_strided_inputs_through_the_api():
    g = torch.Generator().manual_seed(8)
    base = torch.randn(2, 16, 50, generator=g)
    memory = base.transpose(1, 2)  # (2, 50, 16), non-contiguous
    keys = torch.randn(2, 16, 6, generator=g)[:, :, ::2].transpose(1, 2)  # (2, 3, 16), strided
    got = sp.cosine_topk(memory, keys, 7)
    want = sp.cosine_topk(memory.contiguous(), keys.contiguous(), 7)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    _check_topk(memory, keys, 7, *got, torch.float32)


def test_cosine_topk_nan_ranks_first_as_in_torch_sort():
    """Documented: a NaN score ranks above every number (torch.sort's order), NaNs in slot order."""
    memory = torch.randn(1, 20, 4, dtype=torch.float64)
    keys = torch.randn(1, 2, 4, dtype=torch.float64)
    memory[0, 9, 1] = float("nan")
    memory[0, 3, 0] = float("nan")
    scores, idx = _ops().cosine_topk(memory, keys, 5, EPS)
    vals, ref_idx = sp.cosine_topk_ref(memory, keys, 5, EPS)
    assert idx[0, :, :2].tolist() == [[3, 9], [3, 9]] and torch.isnan(scores[..., :2]).all()
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(scores, vals, equal_nan=True)
    keys[0, 1, 0] = float("nan")  # a NaN key: every score NaN, slots 0..k-1
    scores, idx = _ops().cosine_topk(memory, keys, 5, EPS)
    assert idx[0, 1].tolist() == [0, 1, 2, 3, 4] and torch.isnan(scores[0, 1]).all()
    assert torch.equal(idx, sp.cosine_topk_ref(memory, keys, 5, EPS)[1])


def test_cosine_topk_aliased_keys_match_clones():
    memory = torch.randn(2, 30, 8)
    keys = memory[:, 3:6, :]  # the keys are memory rows
    got = _ops().cosine_topk(memory, keys, 4, EPS)
    want = _ops().cosine_topk(memory.clone(), keys.clone(), 4, EPS)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert got[1][0, :, 0].tolist() == [3, 4, 5]  # each row is its own best match


# ---------------------------------------------------------------- LRU
def _random_touches(B, N, M, gen):
    idx = torch.randint(-1, N, (B, M), generator=gen)
    idx[:, 1] = idx[:, 0]  # a duplicate
    return idx


def test_lru_native_matches_the_reference_loops():
    gen = torch.Generator().manual_seed(9)
    B, N = 3, 12
    links, ref = sp.lru_init(B, N), sp.lru_init(B, N)
    for step in range(20):
        idx = _random_touches(B, N, 2 + step % 6, gen)
        sp.lru_touch_(links, idx)
        sp.lru_touch_ref_(ref, idx)
        assert torch.equal(links, ref), f"step {step}"
        skip = torch.rand(B, N, generator=gen) < 0.3
        for count in (0, 1, 5, N, N + 3):
            assert torch.equal(sp.lru_oldest(links, count, skip), sp.lru_oldest_ref(ref, count, skip))
            assert torch.equal(sp.lru_oldest(links, count), sp.lru_oldest_ref(ref, count))
    for b in range(B):
        assert sorted(sp.lru_order(links, b)) == list(range(N))


def test_lru_order_after_touches():
    links = sp.lru_init(1, 5)
    sp.lru_touch_(links, torch.tensor([[3, -1, 1, 3]]))
    assert sp.lru_order(links) == [0, 2, 4, 1, 3]
    assert _ops().lru_oldest(links, 3, None).tolist() == [[0, 2, 4]]
    skip = torch.tensor([[True, False, False, False, True]])
    assert _ops().lru_oldest(links, 6, skip).tolist() == [[2, 1, 3, -1, -1, -1]]


def test_lru_touch_bumps_the_version_counter():
    links = sp.lru_init(2, 6)
    v = links._version
    sp.lru_touch_(links, torch.tensor([[1], [2]]))
    assert links._version > v
    v = links._version
    _ops().lru_touch_(links, torch.tensor([[4], [-1]]))
    assert links._version > v


# ---------------------------------------------------------------- opcheck
def _opcheck_cases():
    rows, keys, s = _read_inputs(2, 2, 3, 5, torch.float32, seed=10)
    reads, w = _ops().sparse_read(rows, keys, s, EPS)
    return {
        "sparse_read": (_ops().sparse_read, (rows, keys, s, EPS)),
        "sparse_read_backward": (_ops().sparse_read_backward,
                                 (torch.randn_like(reads), torch.randn_like(w), w, rows, keys, s, EPS)),
        "cosine_topk": (_ops().cosine_topk, (torch.randn(2, 20, 5), torch.randn(2, 3, 5), 4, EPS)),
        "lru_touch_": (_ops().lru_touch_, (sp.lru_init(2, 6), torch.tensor([[1, 2], [5, -1]]))),
        "lru_oldest": (_ops().lru_oldest, (sp.lru_init(2, 6), 3, torch.zeros(2, 6, dtype=torch.bool))),
        "lru_oldest_noskip": (_ops().lru_oldest, (sp.lru_init(2, 6), 3, None)),
    }


@pytest.mark.parametrize("name", ["sparse_read", "sparse_read_backward", "cosine_topk", "lru_touch_", "lru_oldest",
                                  "lru_oldest_noskip"])
def test_opcheck(name):
    op, args = _opcheck_cases()[name]
    torch.library.opcheck(op, args)


def test_opcheck_sparse_read_with_grad():
    rows, keys, s = _read_inputs(2, 2, 3, 5, torch.float64, seed=11)
    torch.library.opcheck(_ops().sparse_read, tuple(t.requires_grad_() for t in (rows, keys, s)) + (EPS,))


# ---------------------------------------------------------------- bad input
def _unchanged(fn, tensors, exc, match):
    before = [t.clone() for t in tensors]
    with pytest.raises(exc, match=match):
        fn()
    for t, b in zip(tensors, before):
        assert torch.equal(t, b), "a refused call changed its input"


def test_bad_input_is_refused_by_name_and_changes_nothing():
    O = _ops()
    m, k = torch.randn(1, 10, 4), torch.randn(1, 2, 4)
    for kk in (0, 11, -1):
        _unchanged(lambda: O.cosine_topk(m, k, kk, EPS), [m, k], (ValueError, RuntimeError), "k must be in")
        _unchanged(lambda: sp.cosine_topk(m, k, kk), [m, k], ValueError, "k must be")
    _unchanged(lambda: O.cosine_topk(m, k.double(), 2, EPS), [m, k], TypeError, "keys must have the dtype")
    _unchanged(lambda: O.cosine_topk(m, k[:, :, :3], 2, EPS), [m, k], ValueError, "keys must have shape")
    _unchanged(lambda: O.cosine_topk(m.int(), k, 2, EPS), [m, k], TypeError, "memory must be a floating")
    _unchanged(lambda: O.cosine_topk(m, k, 2, 0.0), [m, k], ValueError, "eps must be positive")
    rows, keys, s = _read_inputs(1, 2, 3, 4, torch.float32)
    _unchanged(lambda: O.sparse_read(rows, keys[:, :1], s, EPS), [rows, keys, s], ValueError, "keys must have shape")
    _unchanged(lambda: O.sparse_read(rows, keys, s.double(), EPS), [rows, keys, s], TypeError, "strengths must have")
    _unchanged(lambda: O.sparse_read_backward(keys, torch.zeros(1, 2, 2), torch.zeros(1, 2, 3), rows, keys, s, EPS),
               [rows, keys, s], ValueError, "grad_weights must have shape")
    links = sp.lru_init(2, 5)
    for bad in (torch.tensor([[1, 5], [0, 0]]), torch.tensor([[1, 2], [-2, 0]])):
        _unchanged(lambda: O.lru_touch_(links, bad), [links], ValueError, "indices must lie in")
        _unchanged(lambda: sp.lru_touch_(links, bad), [links], ValueError, "indices must lie in")
    _unchanged(lambda: O.lru_touch_(links, torch.tensor([[1.0], [2.0]])), [links], TypeError, "indices must be int64")
    _unchanged(lambda: O.lru_touch_(links, torch.tensor([[1]])), [links], ValueError, "indices must be a")
    _unchanged(lambda: O.lru_oldest(links, -1, None), [links], ValueError, "count must be")
    _unchanged(lambda: O.lru_oldest(links, 2, torch.zeros(2, 4, dtype=torch.bool)), [links], ValueError,
               "skip must have shape")
    corrupt = links.clone()
    corrupt[1, 2, 1] = 99  # slot 2's next out of range
    _unchanged(lambda: O.lru_touch_(corrupt, torch.tensor([[0], [2]])), [corrupt], ValueError, "corrupted")
    _unchanged(lambda: O.lru_oldest(corrupt, 5, None), [corrupt], ValueError, "corrupted")
    cyc = links.clone()
    cyc[0, 3, 1] = 1  # 0 -> 1 -> 2 -> 3 -> 1 ...
    _unchanged(lambda: O.lru_oldest(cyc, 10, None), [cyc], ValueError, "corrupted")


def test_cosine_topk_baseline_instruction_set_path():
    """NEURALMEM_CPU_CAPABILITY=default takes the baseline copy of the scoring loop: the same slots."""
    import os
    import subprocess
    import sys

    code = ("import torch; from neuralmem_fast.ops import sparse as sp; g = torch.Generator().manual_seed(14); "
            "m = torch.randn(2, 5000, 37, generator=g, dtype=torch.float64); "
            "k = torch.randn(2, 6, 37, generator=g, dtype=torch.float64); "
            "s, i = sp.cosine_topk(m, k, 9); v, r = sp.cosine_topk_ref(m, k, 9); "
            "torch.testing.assert_close(s, v); assert torch.equal(i, r); "
            "s, i = sp.cosine_topk(m.float(), k.float(), 9); v, r = sp.cosine_topk_ref(m.float(), k.float(), 9); "
            "torch.testing.assert_close(s, v); print('ok')")
    repo = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
    env = dict(os.environ, NEURALMEM_CPU_CAPABILITY="default",
               PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


# ---------------------------------------------------------------- every device
@pytest.mark.parametrize("device", DEVICES)
def test_each_op_on_the_device_matches_the_reference(device):
    """The device's kernels (CUDA where there is a GPU) against the references computed on the CPU."""
    if not sp.has_sparse_kernels(torch.device(device).type):
        pytest.skip(f"no native sparse kernels for {device}")
    for dt in DTYPES:
        rows, keys, s = _read_inputs(2, 5, 64, 70, dt, seed=12)  # K = 64: the CUDA limit
        reads, w = sp.sparse_read(rows.to(device), keys.to(device), s.to(device), EPS)
        rr, wr = sp.sparse_read_ref(rows, keys, s, EPS)
        _close(reads.cpu(), rr, dt, f"reads {dt}")
        _close(w.cpu(), wr, dt, f"weights {dt}")
        g, gw = torch.randn(2, 5, 70, dtype=torch.float64), torch.randn(2, 5, 64, dtype=torch.float64)
        ins = [t.double().requires_grad_() for t in (rows, keys, s)]
        want = torch.autograd.grad(sp.sparse_read_ref(*ins, EPS), ins, (g, gw))
        got = _ops().sparse_read_backward(g.to(dt).to(device), gw.to(dt).to(device), w, rows.to(device),
                                          keys.to(device), s.to(device), EPS)
        for name, x, y in zip(("grad_rows", "grad_keys", "grad_strengths"), got, want):
            _close(x.cpu(), y, dt, f"{name} {dt}", scale=1.0 if dt in (torch.float32, torch.float64) else 5.0)
        N = 30011 if dt == torch.float32 else 3001  # float32: many splits on a GPU
        memory = torch.randn(2, N, 33, dtype=torch.float64).to(dt)
        memory[1, 10] = 0
        memory[1, 2000] = 0
        mk = torch.randn(2, 6, 33, dtype=torch.float64).to(dt)
        for k in (1, 64):
            scores, idx = sp.cosine_topk(memory.to(device), mk.to(device), k)
            _check_topk(memory, mk, k, scores.cpu(), idx.cpu(), dt)
            if dt == torch.float64:
                assert torch.equal(idx.cpu(), sp.cosine_topk_ref(memory, mk, k, EPS)[1])
    zero = torch.zeros(1, 100, 4, device=device)
    zero[0, 50, 0] = 1.0
    s0, i0 = sp.cosine_topk(zero, torch.tensor([[[1.0, 0, 0, 0]]], device=device), 5)
    assert i0.tolist() == [[[50, 0, 1, 2, 3]]] and s0.tolist() == [[[1.0, 0, 0, 0, 0]]]
    gen = torch.Generator().manual_seed(13)
    links, ref = sp.lru_init(3, 10, device=device), sp.lru_init(3, 10)
    for step in range(6):
        idx = _random_touches(3, 10, 3 + step, gen)
        sp.lru_touch_(links, idx.to(device))
        sp.lru_touch_ref_(ref, idx)
        assert torch.equal(links.cpu(), ref)
        skip = torch.rand(3, 10, generator=gen) < 0.3
        assert torch.equal(sp.lru_oldest(links, 12, skip.to(device)).cpu(), sp.lru_oldest_ref(ref, 12, skip))
    v = links._version
    _ops().lru_touch_(links, torch.tensor([[1], [2], [-1]], device=device))
    assert links._version > v


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_limits_are_refused_by_name():
    if not sp.has_sparse_kernels("cuda"):
        pytest.skip("no native sparse CUDA kernels")
    m, k = torch.randn(1, 100, 4, device="cuda"), torch.randn(1, 2, 4, device="cuda")
    with pytest.raises(ValueError, match="k"):
        _ops().cosine_topk(m, k, 65, EPS)
    rows, keys, s = (t.cuda() for t in _read_inputs(1, 1, 65, 4, torch.float32))
    with pytest.raises(ValueError, match="K=65"):
        _ops().sparse_read(rows, keys, s, EPS)


# ---------------------------------------------------------------- CUDA kernels in the CPU emulator
def test_sparse_cuda_kernels_in_the_emulator():
    """csrc/cuda/sparse_kernels.cu run by csrc/cuda/emu (one OS thread per CUDA thread) against the references."""
    import os
    import shutil
    import subprocess
    import sys

    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("needs a C++20 compiler")
    repo = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, os.path.join(repo, "csrc", "cuda", "emu", "emulate.py"), "sparse", "--quick",
                          "--build-dir", os.path.join(repo, "build", "emu_sparse")], cwd=repo, env=env,
                         capture_output=True, text=True, timeout=1200)
    out = res.stdout + res.stderr[-3000:]
    assert res.returncode == 0 and "FAILURES: 0" in res.stdout, out[-6000:]
    compared = set(res.stdout.split("compared:")[1].splitlines()[0].strip().split(", "))
    want = {"sparse_read", "sparse_read_weights", "sparse_read_backward_grad_rows", "sparse_read_backward_grad_keys",
            "sparse_read_backward_grad_strengths", "cosine_topk", "cosine_topk_indices", "cosine_topk_chosen",
            "cosine_topk_nan", "lru_touch", "lru_oldest", "lru_oldest_noskip"}
    assert want <= compared, sorted(want - compared)
    assert res.stdout.count("sparse ok ") == 4, res.stdout[-2000:]
