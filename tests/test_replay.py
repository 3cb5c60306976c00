"""Prioritized replay: the sum tree (C++ and numpy), PrioritizedReplayBuffer, ExperienceReplay.

Statistical tests run at fixed seeds with a 0.1% chi-square threshold, so they
are deterministic and still fail for a wrong distribution (alpha applied
twice, an off-by-one at a boundary, a biased without-replacement draw).
"""
import io
import math
import threading
import time

import numpy as np
import pytest
import torch

from neuralmem_fast import replay
from neuralmem_fast._ext import _C
from neuralmem_fast.replay import storage as replay_storage
from neuralmem_fast.replay import ExperienceReplay, NumpySumTree, PrioritizedReplayBuffer, SumTree

from .helpers import DEVICES, load_seed, run_on_instruction_set

TREE_BACKENDS = [
    pytest.param("cpu", marks=pytest.mark.skipif(not replay.has_native_sum_tree(), reason="extension not built")),
    "numpy",
]


def chi2_critical(df: int, z: float = 3.09) -> float:
    """Upper 0.1% quantile of chi-square(df) (Wilson-Hilferty)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def assert_frequencies(counts: np.ndarray, probs: np.ndarray, name: str) -> None:
    n = counts.sum()
    assert np.all(counts[probs == 0] == 0), f"{name}: drew an item of zero probability"
    live = probs > 0
    if live.sum() == 1:
        assert counts[live].sum() == n
        return
    exp = probs[live] * n
    stat = float(((counts[live] - exp) ** 2 / exp).sum())
    df = int(live.sum()) - 1
    crit = chi2_critical(df)
    assert stat < crit, f"{name}: chi-square {stat:.1f} >= {crit:.1f} (df {df})"


def make_priorities(capacity: int, rng: np.random.Generator) -> np.ndarray:
    p = rng.uniform(0.05, 3.0, capacity)
    if capacity > 2:
        p[rng.choice(capacity, capacity // 4, replace=False)] = 0.0  # unreachable items
    return p


# ---------------------------------------------------------------------------
# sum tree


@pytest.mark.parametrize("backend", TREE_BACKENDS)
@pytest.mark.parametrize("capacity", [1, 3, 64, 65], ids=lambda c: f"N{c}")
def test_tree_frequencies_chi_square(backend, capacity):
    rng = np.random.default_rng(capacity)
    tree = SumTree(capacity, backend)
    p = make_priorities(capacity, rng)
    if capacity == 1:
        p[:] = 0.7
    tree.update(np.arange(capacity), p)
    draws = 40_000
    idx = tree.find(rng.random(draws) * tree.total())
    assert_frequencies(np.bincount(idx, minlength=capacity), p / p.sum(), f"{backend} N{capacity}")


@pytest.mark.parametrize("stratified", [False, True], ids=["iid", "stratified"])
@pytest.mark.parametrize("capacity", [1, 3, 64, 65], ids=lambda c: f"N{c}")
def test_buffer_frequencies_follow_p_alpha(capacity, stratified):
    rng = np.random.default_rng(10 + capacity)
    alpha = 0.6
    buf = PrioritizedReplayBuffer(capacity, alpha=alpha, eps=0.0, generator=capacity, stratified=stratified)
    p = make_priorities(capacity, rng)
    if capacity == 1:
        p[:] = 0.7
    buf.extend(torch.arange(capacity), priorities=p)
    counts = np.zeros(capacity, dtype=np.int64)
    for _ in range(8):
        _, idx, _ = buf.sample(5000)
        counts += np.bincount(idx.numpy(), minlength=capacity)
    pa = p**alpha
    assert_frequencies(counts, pa / pa.sum(), f"N{capacity} alpha={alpha}")


@pytest.mark.parametrize("backend", TREE_BACKENDS)
@pytest.mark.parametrize(
    "values",
    [
        [0, 1, 0, 0, 2, 3, 0],
        [5],
        [0, 0, 4],
        [2, 0, 0, 0, 0, 0, 0, 0, 0],  # capacity 2^3 + 1, all mass first
        [1] * 16,
        [0, 3, 1, 0, 0, 2, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 1],  # 2^4 + 1, trailing padding
    ],
    ids=lambda v: f"N{len(v)}",
)
def test_tree_boundary_masses(backend, values):
    v = np.asarray(values, dtype=np.float64)  # integers: every prefix sum is exact
    tree = SumTree(v.size, backend)
    tree.update(np.arange(v.size), v)
    prefix = np.concatenate([[0.0], np.cumsum(v)])
    total = prefix[-1]
    assert tree.total() == total
    positive = np.flatnonzero(v > 0)
    # Leaf i owns [P_i, P_i+1): a mass equal to a boundary starts the next positive leaf.
    masses = prefix[:-1]
    got = tree.find(masses)
    expected = [positive[positive >= k][0] if (positive >= k).any() else positive[-1] for k in range(v.size)]
    np.testing.assert_array_equal(got, expected)
    edge = np.array([0.0, -0.0, total, np.nextafter(total, np.inf), total * (1 + 1e-12), total * 2, -1.0])
    got = tree.find(edge)
    assert np.all((got >= 0) & (got < v.size)), got
    assert np.all(v[got] > 0), f"zero-priority leaf returned for {edge}: {got}"
    assert got[2] == positive[-1] and got[0] == positive[0]


@pytest.mark.parametrize("backend", TREE_BACKENDS)
def test_tree_never_returns_zero_or_padding_random(backend):
    rng = np.random.default_rng(3)
    for capacity in (5, 33, 1000):
        v = rng.random(capacity) * (rng.random(capacity) < 0.3)
        v[rng.integers(capacity)] = 0.5
        tree = SumTree(capacity, backend)
        tree.update(np.arange(capacity), v)
        masses = np.concatenate([np.cumsum(v), [tree.total()], rng.random(2000) * tree.total()])
        idx = tree.find(masses)
        assert idx.min() >= 0 and idx.max() < capacity
        assert np.all(v[idx] > 0)


@pytest.mark.parametrize("backend", TREE_BACKENDS)
def test_tree_update_last_write_wins_get_min(backend):
    tree = SumTree(10, backend)
    tree.update([3, 3, 7, 3], [1.0, 2.0, 5.0, 4.0])
    np.testing.assert_array_equal(tree.get([3, 7, 0]), [4.0, 5.0, 0.0])
    assert tree.total() == 9.0
    assert tree.min() == 4.0  # zeros are not reachable, so they do not count
    tree.update(torch.tensor([7]), torch.tensor([0.5], dtype=torch.float32))
    assert tree.min() == 0.5 and tree.total() == 4.5
    assert SumTree(4, backend).min() == math.inf


@pytest.mark.skipif(not replay.has_native_sum_tree(), reason="extension not built")
def test_cpp_tree_no_drift_after_1e7_updates():
    rng = np.random.default_rng(7)
    capacity = 100_003
    tree = SumTree(capacity, "cpu")
    for _ in range(10):
        idx = rng.integers(0, capacity, 1_000_000)
        # values over many magnitudes, where delta-patched sums would drift
        vals = np.exp(rng.uniform(-20, 10, idx.size)) * (rng.random(idx.size) < 0.9)
        tree.update(idx, vals)
    leaves = tree.leaves()
    exact = math.fsum(leaves.tolist())
    assert abs(tree.total() - exact) <= 1e-9 * exact, (tree.total(), exact)
    assert tree.min() == leaves[leaves > 0].min()
    fresh = SumTree(capacity, "cpu")
    fresh.assign(leaves)
    assert fresh.total() == tree.total()  # the tree is a function of its leaves, bit for bit


@pytest.mark.skipif(not replay.has_native_sum_tree(), reason="extension not built")
def test_cpp_and_numpy_trees_agree():
    rng = np.random.default_rng(11)
    for capacity in (1, 7, 64, 513):
        a, b = SumTree(capacity, "cpu"), NumpySumTree(capacity)
        for step in range(6):
            n = int(rng.integers(1, 3 * capacity + 2))
            idx = rng.integers(0, capacity, n)  # with duplicates
            vals = rng.random(n) * (rng.random(n) < 0.8)
            if step == 0:
                vals[:] = rng.random(n) + 0.1
            a.update(idx, vals)
            b.update(idx, vals)
            np.testing.assert_array_equal(a.leaves(), b.leaves())
            assert a.total() == b.total() and a.min() == b.min()
            if a.total() == 0:
                continue
            m = rng.random(300) * a.total()
            np.testing.assert_array_equal(a.find(m), b.find(m))
            u = rng.random(300)
            for x, y in zip(a.sample(u), b.sample(u)):
                np.testing.assert_array_equal(x, y)
            for strat in (False, True):
                ia, wa = a.sample_weighted(u, 0.4, strat)
                ib, wb = b.sample_weighted(u, 0.4, strat)
                np.testing.assert_array_equal(ia, ib)
                np.testing.assert_allclose(wa, wb, rtol=1e-6)
            k = min(3, int((a.leaves() > 0).sum()))
            excl = np.flatnonzero(a.leaves() > 0)[:1] if k > 1 else None
            k = k - (1 if excl is not None else 0)
            if k > 0:
                uk = rng.random(k)
                for x, y in zip(a.sample_without_replacement(uk, excl), b.sample_without_replacement(uk, excl)):
                    np.testing.assert_array_equal(x, y)
            np.testing.assert_array_equal(a.leaves(), b.leaves())  # unchanged by the draws
            probe = rng.integers(0, capacity, 20)
            np.testing.assert_array_equal(a.get(probe), b.get(probe))


_TREE_ISA_SCRIPT = """
import numpy as np, torch
from neuralmem_fast.replay import NumpySumTree, SumTree
from tests.test_replay import test_cpp_and_numpy_trees_agree
assert torch.ops.neuralmem.cpu_capability() == "{isa}", torch.ops.neuralmem.cpu_capability()
test_cpp_and_numpy_trees_agree()
# a deep tree, batches wider and narrower than its levels, zero leaves
rng = np.random.default_rng(3)
a, b = SumTree(70_000, "cpu"), NumpySumTree(70_000)
for n in (70_000, 256, 1, 5000):
    idx = rng.integers(0, 70_000, n)
    vals = np.exp(rng.uniform(-20, 10, n)) * (rng.random(n) < 0.9)
    a.update(idx, vals)
    b.update(idx, vals)
    assert a.total() == b.total() and a.min() == b.min(), (a.total(), b.total(), a.min(), b.min())
    m = np.concatenate([rng.random(1001) * a.total(), [0.0, a.total()]])  # 8-wide steps and a tail
    np.testing.assert_array_equal(a.find(m), b.find(m))
print("ok")
"""


@pytest.mark.skipif(not replay.has_native_sum_tree(), reason="extension not built")
@pytest.mark.parametrize("isa", ["default", "avx2", "avx512"])
def test_cpp_tree_same_bits_on_every_instruction_set(isa):
    """The parents and the descent run in the CPU kernel table (512-bit vectors
    where available): every build must give the numpy twin's bits and leaves."""
    run_on_instruction_set(isa, _TREE_ISA_SCRIPT.format(isa=isa))


@pytest.mark.skipif(not replay.has_native_sum_tree(), reason="extension not built")
def test_generation_counters_strided_pair_cpp_matches_numpy():
    # The buffers keep both per-slot counters as the columns of one (N, 2)
    # array; the C++ tree reads them through the shared stride.
    rng = np.random.default_rng(5)
    cap = 37
    trees = (SumTree(cap, "cpu"), NumpySumTree(cap))
    pairs = []
    leaves = rng.random(cap) + 0.1
    for t in trees:
        gen, sgen = replay_storage._generation_counters(cap)
        assert gen.base is not None and gen.strides == (16,) and (gen == 0).all() and (sgen == -1).all()
        t.update(np.arange(cap), leaves)
        pairs.append((gen, sgen))
    u = rng.random(50)
    for t, (gen, sgen) in zip(trees, pairs):
        gen[::3] += 2
        idx, _ = t.sample_weighted(u, 0.4, False, gen, sgen)
        np.testing.assert_array_equal(sgen[idx], gen[idx])
        gen[idx[:5]] += 1  # these slots are overwritten after the draw
        fresh = np.isin(idx, idx[:5], invert=True)
        prio = np.where(fresh, 2.0 + np.arange(idx.size) % 3, 100.0)  # the stale ones would be the largest
        running = np.array([1.5])
        applied = t.update_priorities(idx, prio, 0.6, 1e-6, cap, gen, sgen, running)
        assert applied == int(fresh.sum()) and running[0] == prio[fresh].max() == 4.0
        assert t.update_priorities(idx[:5], np.full(5, 9.0), 0.6, 1e-6, cap, gen, sgen, running) == 0
        assert running[0] == 4.0  # nothing applied, nothing raised
    np.testing.assert_array_equal(pairs[0][1], pairs[1][1])
    # (p + eps)^alpha: a vectorised pow in C++, numpy's here (within 1 ulp)
    np.testing.assert_allclose(trees[0].leaves(), trees[1].leaves(), rtol=1e-15, atol=0)
    gen, _ = pairs[0]
    with pytest.raises(ValueError, match="same stride"):
        trees[0].sample_weighted(u, 0.4, False, gen, np.full(cap, -1, dtype=np.int64))
    with pytest.raises(TypeError, match="generation"):
        trees[0].sample_weighted(u, 0.4, False, gen.astype(np.float64), pairs[0][1])


@pytest.mark.skipif(not replay.has_native_sum_tree(), reason="extension not built")
@pytest.mark.parametrize("capacity", [1, 5, 64, 1000], ids=lambda c: f"N{c}")
def test_sample_distinct_cpp_matches_numpy_and_keeps_first_occurrences(capacity):
    rng = np.random.default_rng(capacity)
    leaves = rng.random(capacity) + 0.05
    for n in (1, 3, 40):
        u = rng.random(n)
        out = []
        for t in (SumTree(capacity, "cpu"), NumpySumTree(capacity)):
            t.update(np.arange(capacity), leaves)
            gen, sgen = replay_storage._generation_counters(capacity)
            gen += 7
            idx, vals, w = t.sample_distinct(u, 0.4, gen, sgen)
            drawn = t.find(u * t.total())
            first = sorted(np.unique(drawn, return_index=True)[1])
            np.testing.assert_array_equal(idx, drawn[first])  # first occurrences, in draw order
            np.testing.assert_array_equal(vals, leaves[idx])
            if idx.size == n:
                np.testing.assert_allclose(w, (vals / vals.min()) ** -0.4, rtol=1e-6)
                assert w.dtype == np.float32 and w.max() == 1.0
                assert (sgen[idx] == 7).all() and (np.delete(sgen, idx) == -1).all()
            else:
                assert w is None and (sgen == -1).all()  # the caller completes the batch
            out.append((idx, vals, w))
        for x, y, what in zip(out[0], out[1], ("indices", "values", "weights")):
            if x is None:
                assert y is None
            elif what == "weights":  # float32 pow: libm and numpy may round apart
                np.testing.assert_allclose(x, y, rtol=1e-6, err_msg=what)
            else:
                np.testing.assert_array_equal(x, y, err_msg=what)


@pytest.mark.skipif(not replay.has_native_sum_tree(), reason="extension not built")
def test_gather_rows_matches_index_select_for_every_field_size():
    # Packed rows whose fields take 1, 2, 4, 8, 12, 16, 32 and 40 bytes: the
    # fixed-size copies and the general one.
    specs = [((), torch.bool), ((), torch.float16), ((), torch.int32), ((), torch.float64), ((3,), torch.float32),
             ((4,), torch.float32), ((2, 4), torch.float32), ((5,), torch.int64)]
    cap = 97
    views = replay_storage._packed_storage(cap, specs, "cpu")
    g = torch.Generator().manual_seed(0)
    for v in views:
        v.copy_((torch.randn(v.shape, generator=g) * 50).to(v.dtype))
    idx = torch.randint(0, cap, (300,), generator=g)
    for got, v in zip(_C.gather_rows(views, idx), views):
        assert got.is_contiguous() and got.dtype == v.dtype
        torch.testing.assert_close(got, v.index_select(0, idx), rtol=0, atol=0)
    with pytest.raises(IndexError, match="storage length"):
        _C.gather_rows(views, torch.tensor([cap]))


@pytest.mark.skipif(not replay.has_native_sum_tree(), reason="extension not built")
@pytest.mark.parametrize("nbytes", [0, 1, 5 << 20])
def test_zeros_hugepages_is_zeroed_and_writable(nbytes):
    t = _C.zeros_hugepages(nbytes)
    assert t.dtype == torch.uint8 and t.shape == (nbytes,) and int(t.sum()) == 0
    t.fill_(3)
    assert int(t.sum()) == 3 * nbytes
    with pytest.raises(ValueError, match="nbytes"):
        _C.zeros_hugepages(-1)


@pytest.mark.parametrize("backend", TREE_BACKENDS)
def test_tree_bad_input_leaves_it_unchanged(backend):
    tree = SumTree(8, backend)
    tree.update(np.arange(8), np.arange(8, dtype=np.float64))
    before = tree.leaves()
    bad_calls = [
        (IndexError, lambda: tree.update([1, 8], [1.0, 1.0])),
        (IndexError, lambda: tree.update([-1], [1.0])),
        (ValueError, lambda: tree.update([1, 2], [1.0, float("nan")])),
        (ValueError, lambda: tree.update([1], [float("inf")])),
        (ValueError, lambda: tree.update([1], [-1.0])),
        (ValueError, lambda: tree.update([1, 2], [1.0])),
        (TypeError, lambda: tree.update([1.5], [1.0])),
        (ValueError, lambda: tree.find([float("nan")])),
        (IndexError, lambda: tree.get([9])),
        (ValueError, lambda: tree.assign(np.ones(3))),
        (ValueError, lambda: tree.sample_without_replacement(np.full(8, 0.5))),  # only 7 positive
    ]
    for exc, call in bad_calls:
        with pytest.raises(exc):
            call()
        np.testing.assert_array_equal(tree.leaves(), before)
    with pytest.raises(ValueError, match="capacity"):
        SumTree(0, backend)
    with pytest.raises(ValueError, match="empty"):
        SumTree(3, backend).find([0.0])


@pytest.mark.skipif(not replay.has_native_sum_tree(), reason="extension not built")
def test_cpp_tree_reads_inputs_without_copies_and_rejects_cuda_or_float_indices():
    tree = SumTree(16, "cpu")
    idx = torch.arange(16)
    vals = torch.linspace(0, 1, 16, dtype=torch.float64)
    tree.update(idx, vals)  # contiguous int64 / float64 tensors are read in place
    tree.update(idx[::2], vals[::2] * 2)  # strided views are converted
    np.testing.assert_array_equal(tree.get(np.arange(0, 16, 2)), (vals[::2] * 2).numpy())
    with pytest.raises(TypeError, match="integers"):
        tree.update(torch.tensor([1.0]), [1.0])


# ---------------------------------------------------------------------------
# PrioritizedReplayBuffer


def transitions(n, start=0):
    ids = torch.arange(start, start + n)
    return {
        "obs": ids.float().unsqueeze(1).repeat(1, 3),
        "action": ids,
        "reward": ids.double() * 0.5,
    }


@pytest.mark.parametrize("backend", TREE_BACKENDS)
def test_buffer_weights_match_brute_force_and_peak_at_one(backend):
    rng = np.random.default_rng(5)
    cap, alpha, beta, eps = 37, 0.7, 0.5, 1e-3
    buf = PrioritizedReplayBuffer(cap, alpha=alpha, beta=beta, eps=eps, generator=1, backend=backend)
    p = rng.uniform(0, 4, 30)
    buf.extend(transitions(30), priorities=p)
    batch, idx, w = buf.sample(4000)
    leaf = (p + eps) ** alpha
    prob = leaf / leaf.sum()
    n = len(buf)
    brute = (n * prob) ** (-beta)
    brute = brute / brute.max()
    np.testing.assert_allclose(w.numpy(), brute[idx.numpy()], rtol=1e-6)
    assert w.max().item() == 1.0  # the smallest priority was drawn; its weight is exactly 1
    assert w.dtype == torch.float32
    # the batch is the stored rows of the drawn slots
    torch.testing.assert_close(batch["action"], idx)
    torch.testing.assert_close(batch["reward"], idx.double() * 0.5)


def test_buffer_add_extend_ring_and_default_priority():
    buf = PrioritizedReplayBuffer(5, alpha=1.0, eps=0.0, generator=0)
    assert len(buf) == 0
    assert buf.add(torch.tensor([1.0, 2.0])) == 0  # default priority: 1.0 before anything is seen
    assert buf.add(torch.tensor([3.0, 4.0]), priority=7.0) == 1
    buf.add(torch.tensor([5.0, 6.0]))  # default priority: the largest seen, 7
    np.testing.assert_array_equal(buf.tree.get([0, 1, 2]), [1.0, 7.0, 7.0])
    slots = buf.extend(torch.arange(14.0).reshape(7, 2), priorities=np.arange(1, 8))
    # 10 items into 5 slots: the last 5 survive, oldest overwritten first
    assert len(buf) == 5
    # item j of the batch goes to slot (3 + j) % 5; items 2..6 survive, in slots 0..4
    np.testing.assert_array_equal(slots.numpy(), [0, 1, 2, 3, 4])
    torch.testing.assert_close(buf._storage[0], torch.arange(4.0, 14.0).reshape(5, 2))
    np.testing.assert_array_equal(buf.tree.get([0, 1, 2, 3, 4]), [3, 4, 5, 6, 7])
    assert buf._pos == 0


@pytest.mark.parametrize("backend", TREE_BACKENDS)
def test_buffer_add_one_item_equals_extend(backend):
    # add() has a short path for an item of the stored structure; it must
    # leave the buffer exactly as extend() of the same items does.
    g = torch.Generator().manual_seed(3)
    items = [(torch.randn(4, generator=g), torch.randint(0, 9, (), generator=g)) for _ in range(11)]
    prios = [None, 0.5, 2, None, 0.0, 3.25, None, 1.0, None, 0.125, 7.0]
    a = PrioritizedReplayBuffer(8, alpha=0.7, backend=backend, generator=0)
    b = PrioritizedReplayBuffer(8, alpha=0.7, backend=backend, generator=0)
    for item, p in zip(items, prios):
        slot = a.add(item, p)
        b.extend((item[0][None], item[1][None]), None if p is None else [p])
        assert slot == (len(a) - 1 if len(a) < 8 else (a._pos - 1) % 8)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if isinstance(sa[k], torch.Tensor):
            torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)
        elif isinstance(sa[k], (list, tuple)) and sa[k] and isinstance(sa[k][0], torch.Tensor):
            for x, y in zip(sa[k], sb[k]):
                torch.testing.assert_close(x, y, rtol=0, atol=0, msg=k)
        else:
            assert sa[k] == sb[k], k
    np.testing.assert_array_equal(a.tree.leaves(), b.tree.leaves())
    # anything unusual still goes through the checks of the general path
    with pytest.raises(ValueError, match="priorit"):
        a.add(items[0], -1.0)
    with pytest.raises(ValueError, match="structure"):
        a.add(items[0][0])
    np.testing.assert_array_equal(a.tree.leaves(), b.tree.leaves())


def test_buffer_tuple_items_and_update_priorities_alpha_once():
    buf = PrioritizedReplayBuffer(8, alpha=0.5, eps=0.0, generator=0)
    for i in range(6):
        buf.add((torch.full((2,), float(i)), torch.tensor(i)), priority=1.0)
    (x, a), idx, _ = buf.sample(16)
    torch.testing.assert_close(a, idx)
    torch.testing.assert_close(x[:, 0], idx.float())
    applied = buf.update_priorities(torch.tensor([2, 4, 2]), torch.tensor([9.0, 16.0, 25.0]))
    assert applied == 3
    np.testing.assert_allclose(buf.tree.get([2, 4]), [5.0, 4.0])  # sqrt once; the last write wins
    assert buf.max_priority == 25.0


@pytest.mark.parametrize("n", [1, 3, 8, 13, 300], ids=lambda n: f"n{n}")
def test_update_priorities_transform_is_pow_alpha(n):
    # (p + eps)^alpha over batches of every length (vector tails included).
    rng = np.random.default_rng(n)
    cap = 512
    buf = PrioritizedReplayBuffer(cap, alpha=0.6, eps=1e-3, generator=0)
    buf.extend(torch.zeros(cap, 1))
    idx = rng.permutation(cap)[: min(n, cap)]
    p = rng.uniform(0, 50, idx.size)
    p[0] = 0.0
    assert buf.update_priorities(torch.from_numpy(idx), torch.from_numpy(p)) == idx.size
    np.testing.assert_allclose(buf.tree.get(idx), (p + 1e-3) ** 0.6, rtol=1e-15, atol=0)


def test_buffer_ignores_updates_for_overwritten_slots():
    buf = PrioritizedReplayBuffer(4, alpha=1.0, eps=0.0, generator=0)
    buf.extend(torch.arange(4.0), priorities=np.ones(4))
    _, idx, _ = buf.sample(64)
    assert set(idx.tolist()) == {0, 1, 2, 3}
    buf.extend(torch.tensor([10.0, 11.0]), priorities=[3.0, 3.0])  # overwrites slots 0, 1
    applied = buf.update_priorities(torch.arange(4), torch.full((4,), 50.0))
    assert applied == 2
    np.testing.assert_array_equal(buf.tree.get([0, 1, 2, 3]), [3.0, 3.0, 50.0, 50.0])
    # once a rewritten slot is sampled again, its updates apply to the new item
    for _ in range(50):
        _, idx, _ = buf.sample(8)
        if 0 in idx.tolist():
            break
    assert buf.update_priorities([0], [2.0]) == 1 and buf.tree.get([0])[0] == 2.0


@pytest.mark.parametrize("device", DEVICES)
def test_buffer_state_dict_round_trip(device):
    buf = PrioritizedReplayBuffer(10, alpha=0.6, beta=0.3, eps=1e-4, device=device, generator=2)
    buf.extend(transitions(13), priorities=np.linspace(0.1, 2, 13))
    _, idx, _ = buf.sample(6)
    buf.update_priorities(idx, torch.rand(6))
    state = buf.state_dict()
    blob = io.BytesIO()
    torch.save(state, blob)
    blob.seek(0)
    other = PrioritizedReplayBuffer(10, device=device, generator=2)
    other.load_state_dict(torch.load(blob, weights_only=False))
    assert len(other) == len(buf) == 10
    assert (other._pos, other.alpha, other.beta, other.eps, other.max_priority) == (
        buf._pos, buf.alpha, buf.beta, buf.eps, buf.max_priority)
    np.testing.assert_array_equal(other.tree.leaves(), buf.tree.leaves())
    assert other.tree.total() == buf.tree.total()
    for k in ("obs", "action", "reward"):
        torch.testing.assert_close(other._storage[list(transitions(1)).index(k)], buf._storage[list(transitions(1)).index(k)])
    # same generator state: identical draws afterwards
    buf.generator = np.random.default_rng(9)
    other.generator = np.random.default_rng(9)
    (b1, i1, w1), (b2, i2, w2) = buf.sample(5), other.sample(5)
    torch.testing.assert_close(i1, i2)
    torch.testing.assert_close(w1, w2)
    torch.testing.assert_close(b1["obs"], b2["obs"])
    # the stale-update bookkeeping travels too
    buf.extend(transitions(1, 99))
    other.extend(transitions(1, 99))
    assert buf.update_priorities(i1, torch.ones(5)) == other.update_priorities(i2, torch.ones(5))


def snapshot(buf):
    s = buf.state_dict()
    return s, (None if s["storage"] is None else {k: v.clone() for k, v in s["storage"].items()})


def assert_same(buf, snap):
    s0, st0 = snap
    s1 = buf.state_dict()
    for k in ("position", "size", "max_priority"):
        assert s1[k] == s0[k], k
    for k in ("priorities", "generation", "sampled_generation"):
        assert torch.equal(s1[k], s0[k]), k
    if st0 is not None:
        for k, v in st0.items():
            assert torch.equal(s1["storage"][k], v), k


@pytest.mark.parametrize("backend", TREE_BACKENDS)
def test_buffer_bad_input_raises_and_changes_nothing(backend):
    buf = PrioritizedReplayBuffer(6, backend=backend, generator=0)
    with pytest.raises(RuntimeError, match="empty"):
        buf.sample(4)
    with pytest.raises(ValueError):
        buf.add(transitions(1), priority=float("nan"))
    assert len(buf) == 0 and buf._storage is None  # a rejected first item defines nothing
    buf.extend(transitions(4), priorities=[1.0, 2.0, 3.0, 4.0])
    snap = snapshot(buf)
    nan, inf = float("nan"), float("inf")
    bad_calls = [
        (ValueError, lambda: buf.add({k: v[0] for k, v in transitions(1).items()}, priority=nan)),
        (ValueError, lambda: buf.add({k: v[0] for k, v in transitions(1).items()}, priority=-1.0)),
        (ValueError, lambda: buf.extend(transitions(2), priorities=[1.0, inf])),
        (ValueError, lambda: buf.extend(transitions(3), priorities=[1.0, 2.0])),
        (ValueError, lambda: buf.extend((torch.zeros(2, 3), torch.zeros(2)))),  # tuple, first was a dict
        (ValueError, lambda: buf.extend({"obs": torch.zeros(2, 3), "action": torch.zeros(2, dtype=torch.long)})),
        (ValueError, lambda: buf.extend({**transitions(2), "obs": torch.zeros(2, 4)})),  # shape
        (TypeError, lambda: buf.extend({**transitions(2), "action": torch.zeros(2)})),  # float into int64
        (ValueError, lambda: buf.extend({**transitions(2), "reward": torch.zeros(3, dtype=torch.float64)})),
        (IndexError, lambda: buf.update_priorities([0, 4], [1.0, 1.0])),  # slot 4 not written yet
        (IndexError, lambda: buf.update_priorities([-1], [1.0])),
        (ValueError, lambda: buf.update_priorities([0, 1], [1.0, nan])),
        (ValueError, lambda: buf.update_priorities([0, 1], [1.0, -2.0])),
        (ValueError, lambda: buf.update_priorities([0, 1], [1.0])),
        (TypeError, lambda: buf.update_priorities([0.5], [1.0])),
        (ValueError, lambda: buf.sample(0)),
        (ValueError, lambda: buf.sample(2, beta=nan)),
    ]
    for exc, call in bad_calls:
        with pytest.raises(exc):
            call()
        assert_same(buf, snap)
    batch, idx, w = buf.sample(3)  # still usable
    assert idx.max() < 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_buffer_on_cuda_returns_device_tensors():
    buf = PrioritizedReplayBuffer(16, device="cuda", generator=0)
    buf.extend(transitions(10))
    batch, idx, w = buf.sample(4)
    assert batch["obs"].is_cuda and w.is_cuda and not idx.is_cuda
    torch.testing.assert_close(batch["action"].cpu(), idx)


@pytest.mark.skipif(not replay.has_native_sum_tree(), reason="extension not built")
def test_threads_writers_and_sampler():
    rng = np.random.default_rng(0)
    cap = 500
    buf = PrioritizedReplayBuffer(cap, generator=0)
    buf.extend(transitions(50), priorities=rng.random(50) + 0.1)
    tree = SumTree(1000, "cpu")
    tree.update(np.arange(1000), np.ones(1000))
    stop = time.perf_counter() + 1.5
    errors, bad = [], []

    def writer(seed):
        r = np.random.default_rng(seed)
        try:
            while time.perf_counter() < stop:
                n = int(r.integers(1, 20))
                buf.extend(transitions(n, int(r.integers(1000))), priorities=r.random(n) + 0.01)
                k = int(r.integers(1, 10))
                buf.update_priorities(r.integers(0, len(buf), k), r.random(k))
                tree.update(r.integers(0, 1000, 64), r.random(64) * (r.random(64) < 0.9))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def sampler():
        try:
            while time.perf_counter() < stop:
                batch, idx, w = buf.sample(32)
                n = len(buf)
                if idx.min() < 0 or idx.max() >= n or not torch.isfinite(w).all() or w.max() > 1:
                    bad.append((idx, w))
                if not torch.equal(batch["reward"], batch["action"].double() * 0.5):
                    bad.append("torn row")
                if tree.total() > 0:
                    # indices and their values read under one lock
                    ti, vals, _, _ = tree.sample(np.random.random(64))
                    if ti.max() >= 1000 or (vals <= 0).any():
                        bad.append(("tree", ti))
        except Exception as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(s,)) for s in range(3)] + [threading.Thread(target=sampler)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert not bad, bad[:3]
    for t in (buf.tree, tree):
        leaves = t.leaves()
        exact = math.fsum(leaves.tolist())
        assert abs(t.total() - exact) <= 1e-9 * exact
        assert t.min() == leaves[leaves > 0].min()
    assert len(buf) == cap


# ---------------------------------------------------------------------------
# ExperienceReplay (the tutorial's class)


def test_experience_replay_matches_seed_bookkeeping():
    seed = load_seed()
    ours, theirs = ExperienceReplay(capacity=7, alpha=0.6), seed.ExperienceReplay(capacity=7, alpha=0.6)
    assert ours.sample(4) == ([], []) == theirs.sample(4)
    rng = np.random.default_rng(0)
    for i in range(12):
        p = float(rng.uniform(0.1, 2))
        ours.push((torch.tensor([i]), i), priority=p)
        theirs.push((torch.tensor([i]), i), priority=p)
        assert len(ours.buffer) == len(theirs.buffer) and len(ours.priorities) == len(theirs.priorities)
    assert [e[1] for e in ours.buffer] == [e[1] for e in theirs.buffer]
    np.testing.assert_allclose(np.array(ours.priorities), np.array(theirs.priorities), rtol=1e-12)
    samples, weights = ours.sample(3)
    assert len(samples) == 3 and len({s[1] for s in samples}) == 3 and weights.dtype == torch.float32
    samples, weights = ours.sample(50)  # min(batch_size, len)
    assert len(samples) == 7 and len({s[1] for s in samples}) == 7
    # weights: the seed's formula on the drawn items, normalised by the batch maximum
    probs = np.array(theirs.priorities) / np.sum(theirs.priorities)
    pos = {e[1]: j for j, e in enumerate(theirs.buffer)}
    brute = (7 * probs[[pos[s[1]] for s in samples]]) ** -0.4
    np.testing.assert_allclose(weights.numpy(), brute / brute.max(), rtol=1e-6)


def test_experience_replay_without_replacement_distribution():
    # 4 items, batches of 2: the ordered pair (i, j) has probability p_i p_j / (1 - p_i),
    # as for numpy's choice(replace=False, p=...).
    np.random.seed(123)
    pr = np.array([0.1, 0.2, 0.3, 0.4])
    er = ExperienceReplay(capacity=4, alpha=1.0)
    for i, p in enumerate(pr):
        er.push(i, priority=p)
    counts = np.zeros((4, 4))
    for _ in range(6000):
        s, _, _ = er.sample(2, return_indices=True)
        counts[s[0], s[1]] += 1
    expected = pr[:, None] * pr[None, :] / (1 - pr[:, None])
    np.fill_diagonal(expected, 0)
    assert_frequencies(counts.ravel().astype(np.int64), expected.ravel(), "ordered pairs")
    # batch == len goes through the one-by-one path for the last draws: still all distinct
    for _ in range(50):
        s, w = er.sample(4)
        assert sorted(s) == [0, 1, 2, 3] and w.max().item() == 1.0


def test_experience_replay_update_priorities_and_bad_input():
    er = ExperienceReplay(capacity=4, alpha=1.0)
    for i in range(4):
        er.push(i, priority=1.0)
    _, _, idx = er.sample(4, return_indices=True)
    np.testing.assert_array_equal(np.sort(idx), np.arange(4))
    er.push(4, priority=1.0)  # overwrites slot 0
    assert er.update_priorities(np.arange(4), [5.0, 6.0, 7.0, 8.0]) == 3
    np.testing.assert_array_equal(np.array(er.priorities), [6.0, 7.0, 8.0, 1.0])  # oldest first
    before = np.array(er.priorities)
    for exc, call in [
        (ValueError, lambda: er.push(9, priority=float("nan"))),
        (ValueError, lambda: er.push(9, priority=-1.0)),
        (ValueError, lambda: er.push(9, priority=float("inf"))),
        (IndexError, lambda: er.update_priorities([4], [1.0])),
        (ValueError, lambda: er.update_priorities([1, 2], [1.0])),
        (ValueError, lambda: er.update_priorities([1], [float("nan")])),
        (ValueError, lambda: er.sample(0)),
    ]:
        with pytest.raises(exc):
            call()
        np.testing.assert_array_equal(np.array(er.priorities), before)
        assert [e for e in er.buffer] == [1, 2, 3, 4]


@pytest.mark.parametrize("backend", TREE_BACKENDS)
def test_experience_replay_in_the_seed_agent_loop(backend):
    # the tutorial's call pattern: push every step, sample 8 once more than 16 are stored
    er = ExperienceReplay(capacity=20, backend=backend)
    for step in range(40):
        x, y = torch.randn(1, 4), torch.randn(1, 2)
        er.push((x, y), priority=float(step % 5) + 1e-6)
        if len(er.buffer) > 16:
            samples, weights = er.sample(8)
            assert len(samples) == 8 and weights.shape == (8,)
            for (rx, ry), w in zip(samples, weights):
                assert rx.shape == (1, 4) and 0 < w.item() <= 1.0


# ---------------------------------------------------------------------------
# No silent conversions, no ambiguous pairings (what a user's script would do)


def _everything(buf):
    """All a buffer holds, as plain values: storage, leaves, counters, ring, RNG."""
    s = buf.state_dict()
    st = s.pop("storage")
    fields = {} if st is None else (st if isinstance(st, dict) else dict(enumerate(st)) if isinstance(st, tuple)
                                    else {"item": st})
    return ({k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()},
            {k: v.clone() for k, v in fields.items()}, repr(buf.generator.bit_generator.state))


def _assert_unchanged(buf, before):
    s0, f0, g0 = before
    s1, f1, g1 = _everything(buf)
    assert s1.keys() == s0.keys() and f1.keys() == f0.keys() and g1 == g0
    for k in s0:
        assert torch.equal(s1[k], s0[k]) if torch.is_tensor(s0[k]) else s1[k] == s0[k], k
    for k in f0:
        assert f1[k].dtype == f0[k].dtype and torch.equal(f1[k], f0[k]), k


@pytest.mark.parametrize("backend", TREE_BACKENDS)
def test_float64_data_into_float32_storage_is_refused_and_nothing_is_stored(backend):
    buf = PrioritizedReplayBuffer(4, backend=backend, generator=0)
    # The first item fixes the storage: float32 observations.
    buf.extend({"obs": torch.rand(3, 5), "action": torch.arange(3), "reward": torch.rand(3)})
    buf.update_priorities(torch.tensor([0, 1]), torch.tensor([2.0, 3.0]))
    before = _everything(buf)
    # A float64 observation would be rounded to float32 without a word: refused,
    # naming the field and both dtypes. The batch is larger than the free space,
    # so a partial write would also have overwritten old items.
    obs64 = torch.rand(3, 5, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"'obs'.*torch\.float64.*torch\.float32"):
        buf.extend({"obs": obs64, "action": torch.arange(3), "reward": torch.rand(3)})
    _assert_unchanged(buf, before)
    # The bad field last: the good fields before it are not written either.
    with pytest.raises(TypeError, match=r"'reward'.*torch\.float64.*torch\.float32"):
        buf.extend({"obs": torch.rand(3, 5), "action": torch.arange(3), "reward": torch.rand(3, dtype=torch.float64)})
    _assert_unchanged(buf, before)
    with pytest.raises(TypeError, match=r"'obs'.*torch\.float64.*torch\.float32"):
        buf.add({"obs": obs64[0], "action": torch.tensor(0), "reward": torch.tensor(1.0)}, priority=5.0)
    _assert_unchanged(buf, before)
    # numpy float64 data (np.random, gym) is float64 too
    with pytest.raises(TypeError, match=r"'obs'.*torch\.float64.*torch\.float32"):
        buf.add({"obs": np.zeros(5), "action": 1, "reward": 0.5})
    # int64 into float32 may round (2**24 + 1): refused as well
    with pytest.raises(TypeError, match=r"'reward'.*torch\.int64.*torch\.float32"):
        buf.extend({"obs": torch.rand(1, 5), "action": torch.arange(1), "reward": torch.tensor([2 ** 24 + 1])})
    _assert_unchanged(buf, before)
    assert len(buf) == 3 and buf.sample(8)[0]["obs"].dtype == torch.float32

    # Tuple items: the field is named by its position.
    tup = PrioritizedReplayBuffer(4, backend=backend, generator=0)
    tup.add((torch.zeros(2), torch.tensor(1)))
    before = _everything(tup)
    with pytest.raises(TypeError, match=r"field 0.*torch\.float64.*torch\.float32"):
        tup.add((torch.zeros(2, dtype=torch.float64), torch.tensor(1)))
    _assert_unchanged(tup, before)
    # A plain tensor item
    one = PrioritizedReplayBuffer(4, backend=backend, generator=0)
    one.extend(torch.zeros(2, 3))
    with pytest.raises(TypeError, match=r"torch\.float64.*torch\.float32"):
        one.extend(torch.zeros(2, 3, dtype=torch.float64))
    assert len(one) == 2


@pytest.mark.parametrize("backend", TREE_BACKENDS)
def test_conversions_that_keep_every_value_are_still_accepted(backend):
    buf = PrioritizedReplayBuffer(8, backend=backend, generator=0)
    buf.add({"obs": torch.zeros(3, dtype=torch.float64), "action": torch.tensor(0), "reward": 0.5, "done": False,
             "value": torch.tensor(0.0, dtype=torch.float64)})
    # float32 -> float64, int32 -> int64, bool -> float: every value survives
    buf.add({"obs": torch.full((3,), 0.1, dtype=torch.float32), "action": torch.tensor(7, dtype=torch.int32),
             "reward": torch.tensor(True), "done": torch.tensor(True), "value": torch.tensor(0.1)})
    # Python numbers have no dtype of their own: a Python float lands in float32
    # storage as torch stores any Python float there (and keeps its double
    # precision in float64 storage); an int must fit exactly.
    buf.add({"obs": np.array([0.1, 0.2, 0.3]), "action": 3, "reward": 1, "done": True, "value": 0.1})
    out = buf.state_dict()["storage"]
    assert out["obs"].dtype == out["value"].dtype == torch.float64 and out["reward"].dtype == torch.float32
    assert out["obs"][1, 0].item() == out["value"][1].item() == float(np.float32(0.1))  # widened exactly
    assert out["obs"][2, 0].item() == out["value"][2].item() == 0.1  # double precision kept
    assert out["action"][:3].tolist() == [0, 7, 3] and out["reward"][:3].tolist() == [0.5, 1.0, 1.0]
    assert out["done"][:3].tolist() == [False, True, True]
    before = _everything(buf)
    for bad, field in ((dict(reward=2 ** 24 + 1), "'reward'"), (dict(action=0.5), "'action'"),
                       (dict(action=2 ** 70), "'action'"), (dict(done=1), "'done'"),
                       (dict(reward=1e300), "'reward'")):
        item = {"obs": torch.zeros(3, dtype=torch.float64), "action": 0, "reward": 0.0, "done": False,
                "value": 0.0, **bad}
        with pytest.raises((TypeError, ValueError), match=field):
            buf.add(item)
        _assert_unchanged(buf, before)


@pytest.mark.parametrize("backend", TREE_BACKENDS)
def test_update_priorities_requires_indices_and_priorities_of_one_shape(backend):
    buf = PrioritizedReplayBuffer(8, alpha=1.0, eps=0.0, backend=backend, generator=0)
    buf.extend(torch.zeros(8, 2))
    _, idx, _ = buf.sample(4)
    before = _everything(buf)
    # (2, 2) indices with (1, 4) priorities: which priority goes to which index is a guess. Refused.
    with pytest.raises(ValueError, match=r"indices.*\(2, 2\).*priorities.*\(1, 4\)"):
        buf.update_priorities(idx.view(2, 2), torch.rand(1, 4))
    _assert_unchanged(buf, before)
    # One priority for several indices is not broadcast either.
    with pytest.raises(ValueError, match=r"indices.*\(4,\).*priorities.*\(\)"):
        buf.update_priorities(idx, 3.0)
    with pytest.raises(ValueError, match=r"indices.*\(4,\).*priorities.*\(2, 2\)"):
        buf.update_priorities(idx.numpy(), np.ones((2, 2)))
    with pytest.raises(ValueError, match=r"indices.*\(2,\).*priorities.*\(3,\)"):
        buf.update_priorities([0, 1], [1.0, 2.0, 3.0])
    _assert_unchanged(buf, before)
    # The documented shapes: equal shapes, up to dimensions of size 1 (a (B, 1) TD-error column).
    idx = torch.tensor([0, 1, 2, 3])
    for p in (torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([[1.0], [2.0], [3.0], [4.0]]),
              np.array([[1.0, 2.0, 3.0, 4.0]]), [1.0, 2.0, 3.0, 4.0]):
        buf.update_priorities(idx, torch.zeros(4))
        n = buf.update_priorities(idx, p)
        assert n == 4 and buf.tree.get(np.arange(4)).tolist() == [1.0, 2.0, 3.0, 4.0], type(p)
    assert buf.update_priorities(idx.view(2, 2), torch.tensor([[5.0, 6.0], [7.0, 8.0]])) == 4
    assert buf.tree.get(np.arange(4)).tolist() == [5.0, 6.0, 7.0, 8.0]
    assert buf.update_priorities(torch.tensor(2), torch.tensor(9.0)) == 1  # a scalar pairs with a scalar
    assert buf.tree.get(np.array([2])).tolist() == [9.0]


@pytest.mark.parametrize("backend", TREE_BACKENDS)
def test_experience_replay_update_priorities_requires_one_shape(backend):
    er = ExperienceReplay(capacity=8, alpha=1.0, backend=backend)
    for i in range(4):
        er.push(i, priority=1.0)
    _, _, idx = er.sample(4, return_indices=True)
    before = np.array(er.priorities)
    with pytest.raises(ValueError, match=r"indices.*\(2, 2\).*priorities.*\(1, 4\)"):
        er.update_priorities(idx.reshape(2, 2), np.ones((1, 4)))
    with pytest.raises(ValueError, match=r"indices.*\(4,\).*priorities.*\(\)"):
        er.update_priorities(idx, 2.0)
    np.testing.assert_array_equal(np.array(er.priorities), before)
    assert er.update_priorities(idx, np.arange(1.0, 5.0).reshape(4, 1)) == 4
    np.testing.assert_array_equal(er._tree.get(idx), np.arange(1.0, 5.0))
