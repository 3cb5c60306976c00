"""neuralmem_fast.replay.torchrl.PrioritizedSampler against TorchRL's own
PrioritizedSampler: the same operations on both, the same stored priorities,
importance weights and sampling distribution, the same edges; its bad input;
its exact resume. Skipped where TorchRL is not installed (except the test that
the module says what to install)."""
import importlib
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

try:
    from tensordict import TensorDict
    from torchrl.data.replay_buffers import (LazyTensorStorage, ListStorage, ReplayBuffer,
                                             TensorDictReplayBuffer)
    from torchrl.data.replay_buffers import PrioritizedSampler as TorchRLSampler

    from torchrl.data.replay_buffers.samplers.prioritized import SumSegmentTreeFp32

    from neuralmem_fast.replay.torchrl import PrioritizedSampler
    HAVE_TORCHRL = True
    HAVE_REFERENCE = SumSegmentTreeFp32 is not None
except ImportError:
    HAVE_TORCHRL = HAVE_REFERENCE = False

needs_torchrl = pytest.mark.skipif(not HAVE_TORCHRL, reason="torchrl not installed (optional: pip install torchrl)")
# TorchRL's own sampler needs its C++ extension, built for one torch version.
needs_reference = pytest.mark.skipif(not HAVE_REFERENCE, reason="TorchRL's own PrioritizedSampler is unavailable "
                                     "(torchrl missing, or its C++ extension did not load with this torch)")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAP, B = 16, 8


def test_module_says_to_install_torchrl_when_it_is_missing(monkeypatch):
    for name in [m for m in sys.modules if m == "torchrl" or m.startswith("torchrl.")] + ["torchrl"]:
        monkeypatch.setitem(sys.modules, name, None)  # an import of any of them now fails
    monkeypatch.delitem(sys.modules, "neuralmem_fast.replay.torchrl", raising=False)
    import neuralmem_fast.replay as replay  # the package itself needs no torchrl
    assert hasattr(replay, "PrioritizedReplayBuffer")
    with pytest.raises(ImportError, match="pip install torchrl"):
        importlib.import_module("neuralmem_fast.replay.torchrl")


# ---------------------------------------------------------------------------
# helpers


def chi2_critical(df: int, z: float = 3.09) -> float:
    """Upper 0.1% quantile of chi-square(df) (Wilson-Hilferty)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def assert_distribution(idx: torch.Tensor, probs: np.ndarray, name: str) -> None:
    counts = np.bincount(idx.numpy(), minlength=probs.size)[: probs.size]
    n = counts.sum()
    assert np.all(counts[probs == 0] == 0), f"{name}: drew an item of probability 0"
    live = probs > 0
    exp = probs[live] * n
    stat = float(((counts[live] - exp) ** 2 / exp).sum())
    assert stat < chi2_critical(int(live.sum()) - 1), f"{name}: chi-square {stat:.1f}"


def ref_leaves(s, n=CAP) -> np.ndarray:
    return torch.as_tensor(s._sum_tree[torch.arange(n)]).double().numpy()


def raw_max(s):
    mp = s._max_priority[0]
    return None if mp is None else float(mp)


def make_pair(cap=CAP, storage=LazyTensorStorage if HAVE_TORCHRL else None, dtype=torch.float32, **kw):
    kw.setdefault("alpha", 0.7)
    kw.setdefault("beta", 0.5)
    # TorchRL's float64 trees refuse float32 priorities (even its own mark_update's):
    # the reference is always its float32 sampler.
    ref = TorchRLSampler(cap, **kw)
    ours = PrioritizedSampler(cap, generator=0, dtype=dtype, **kw)
    rbs = [TensorDictReplayBuffer(storage=storage(cap), sampler=s, priority_key="td_error", batch_size=B)
           for s in (ref, ours)]
    return ref, ours, rbs


def td(n, start, td_error=None):
    d = {"obs": torch.arange(start, start + n, dtype=torch.float32).unsqueeze(-1)}
    if td_error is not None:
        d["td_error"] = td_error
    return TensorDict(d, [n])


def assert_same_state(ref, ours, n=CAP, rtol=1e-6):
    np.testing.assert_allclose(ours.priorities().numpy()[:n], ref_leaves(ref, n), rtol=rtol, atol=0)
    if raw_max(ref) is None:
        assert ours._max_priority[0] is None
    else:
        assert ours._max_priority[0] == pytest.approx(raw_max(ref), rel=rtol)
    assert float(ours.default_priority) == pytest.approx(float(ref.default_priority), rel=rtol)


def run_sequence(ref, ours, rbs, width=None):
    """extend (with and without priorities, overwriting), sample, update: both buffers, same operations."""
    g = torch.Generator().manual_seed(1)
    pri = torch.rand(12, generator=g) * 2
    pri[3] = 0.0  # a priority of 0
    for rb in rbs:
        rb.extend(td(12, 0, pri))
    assert_same_state(ref, ours)
    for rb in rbs:
        rb.extend(td(6, 100))  # no priority: the writer's mark_update gives default_priority
    assert_same_state(ref, ours)
    for step in range(4):
        sample = rbs[1].sample()
        err = torch.rand(B, generator=g) * (5.0 if step == 1 else 1.0)
        # a priority per item, or per item and step (reduced with `reduction` by TorchRL's buffer)
        sample["td_error"] = err if width is None else err.unsqueeze(-1) * torch.linspace(0.5, 1.5, width)
        for rb in rbs:
            rb.update_tensordict_priority(sample.clone())
        assert_same_state(ref, ours)
        new = None if step % 2 else torch.rand(5, generator=g)
        for rb in rbs:  # overwrite slots, among them (at some step) the one of the largest priority
            rb.extend(td(5, 200 + 10 * step, new))
        assert_same_state(ref, ours)


# ---------------------------------------------------------------------------
# equivalence


@needs_reference
@pytest.mark.parametrize("within", [False, True], ids=["max-ever", "max-within-buffer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_same_priorities_weights_and_distribution_as_torchrl(within, dtype):
    ref, ours, rbs = make_pair(max_priority_within_buffer=within, dtype=dtype)
    run_sequence(ref, ours, rbs)
    n = len(rbs[0])
    leaves = ref_leaves(ref, n)
    p_min = ref._min_tree.query(0, n)
    # importance weights: ours for the indices it drew, TorchRL's formula on TorchRL's trees
    idx, info = ours.sample(rbs[1].storage, 64)
    w = info["priority_weight"]
    assert w.dtype == dtype and idx.dtype == torch.int64
    expected = torch.pow(torch.as_tensor(ref._sum_tree[idx]) / p_min, -0.5)
    torch.testing.assert_close(w.double(), expected.double(), rtol=1e-6, atol=0)
    # TorchRL's own weights for its draws match what ours gives those slots
    ridx, rinfo = ref.sample(rbs[0].storage, 64)
    ours_w = (ours.priorities()[ridx] / ours.priorities()[:n][ours.priorities()[:n] > 0].min()) ** -0.5
    torch.testing.assert_close(rinfo["priority_weight"].double(), ours_w, rtol=1e-6, atol=0)
    # sampling distribution: leaf / total, for both
    probs = leaves / leaves.sum()
    draws = torch.cat([ours.sample(rbs[1].storage, 1000)[0] for _ in range(20)])
    assert_distribution(draws, probs, "neuralmem_fast sampler")
    np.random.seed(0)
    assert_distribution(torch.cat([ref.sample(rbs[0].storage, 1000)[0] for _ in range(20)]), probs, "torchrl")


@needs_reference
@pytest.mark.parametrize("reduction", ["max", "min", "mean", "median", "sum"])
def test_reduction_modes_match_torchrl(reduction):
    ref, ours, rbs = make_pair(reduction=reduction)
    run_sequence(ref, ours, rbs, width=3)


@needs_reference
def test_plain_replay_buffer_with_list_storage_and_index_shapes_as_torchrl_passes_them():
    ref, ours = TorchRLSampler(CAP, 0.6, 0.4), PrioritizedSampler(CAP, 0.6, 0.4, generator=1)
    rbs = [ReplayBuffer(storage=ListStorage(CAP), sampler=s, batch_size=4, collate_fn=list) for s in (ref, ours)]
    for rb in rbs:
        rb.extend(list(range(10)))
        rb.add(99)
        rb.update_priority(3, 2.5)  # int index, scalar
        rb.update_priority(torch.tensor(4), torch.tensor(0.25))  # 0-d
        rb.update_priority(torch.tensor([5, 6]), torch.tensor([[0.5], [3.0]]))  # (B,) with (B, 1)
        rb.update_priority(torch.tensor([7, -1, 8]), torch.tensor([0.1, 50.0, 0.2]))  # -1 skipped
        rb.update_priority(torch.tensor([1, 2]), 0.75)  # one priority for all
    assert_same_state(ref, ours, n=11)
    data, info = rbs[1].sample(return_info=True)
    assert isinstance(data, list) and info["index"].shape == (4,) and info["priority_weight"].shape == (4,)


@needs_reference
def test_two_dimensional_storage_indices_as_torchrl():
    ref, ours = TorchRLSampler(24, 0.8, 0.6), PrioritizedSampler(24, 0.8, 0.6, generator=2)
    rbs = [TensorDictReplayBuffer(storage=LazyTensorStorage(24, ndim=2), sampler=s, batch_size=6) for s in (ref, ours)]
    data = TensorDict({"obs": torch.randn(4, 6)}, [4, 6])
    for rb in rbs:
        rb.extend(data)
    assert rbs[1].storage.shape == (6, 4)
    idx = torch.tensor([[0, 1], [5, 3], [2, 2]])
    for rb in rbs:
        rb.update_priority(idx, torch.tensor([4.0, 0.5, 2.0]))
    assert_same_state(ref, ours, n=24)
    before = ours.priorities().clone()
    with pytest.raises(IndexError, match="outside the storage's shape"):
        rbs[1].update_priority(torch.tensor([[0, 1], [3, 5]]), torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match="must have shape"):
        ours.update_priority(idx, torch.tensor([4.0, 0.5, 2.0]))  # 2-D index without the storage
    assert torch.equal(ours.priorities(), before)
    sample = rbs[1].sample()
    assert sample["index"].shape == (6, 2)
    sample["td_error"] = torch.rand(6)
    for rb in rbs:
        rb.update_tensordict_priority(sample.clone())
    assert_same_state(ref, ours, n=24)


@needs_reference
def test_edges_empty_zero_priorities_and_eps_zero():
    for s in (TorchRLSampler(CAP, 0.7, 0.5), PrioritizedSampler(CAP, 0.7, 0.5)):
        with pytest.raises(RuntimeError, match="Cannot sample from an empty storage"):
            s.sample(LazyTensorStorage(CAP), 4)
    # every priority 0 with eps = 0: both refuse to sample
    ref, ours, rbs = make_pair(eps=0.0)
    for rb in rbs:
        rb.extend(td(4, 0, torch.zeros(4)))
    for s, rb in zip((ref, ours), rbs):
        with pytest.raises(RuntimeError, match="non-positive p_sum"):
            s.sample(rb.storage, 4)
    # one priority 0 with eps = 0: TorchRL raises, ours never draws it (the documented difference)
    for rb in rbs:
        rb.update_priority(torch.tensor([1, 2, 3]), torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(RuntimeError, match="non-positive p_min"):
        ref.sample(rbs[0].storage, 4)
    idx, info = ours.sample(rbs[1].storage, 2000)
    assert (idx != 0).all()
    leaves = ours.priorities().numpy()[1:4]
    torch.testing.assert_close(info["priority_weight"].double(),
                               torch.from_numpy((leaves[idx.numpy() - 1] / leaves.min()) ** -0.5), rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------
# bad input


def _filled(cap=CAP):
    s = PrioritizedSampler(cap, 0.6, 0.4, generator=0)
    st = LazyTensorStorage(cap)
    rb = TensorDictReplayBuffer(storage=st, sampler=s, batch_size=4)
    rb.extend(td(10, 0, torch.linspace(0.1, 2, 10)))
    return s, rb


@needs_torchrl
@pytest.mark.parametrize("index, priority, exc, match", [
    (torch.tensor([0, 1]), torch.tensor([1.0, float("nan")]), ValueError, "finite and >= 0"),
    (torch.tensor([0, 1]), torch.tensor([float("inf"), 1.0]), ValueError, "finite and >= 0"),
    (torch.tensor([0, 1]), torch.tensor([1.0, -0.5]), ValueError, "finite and >= 0"),
    (torch.tensor([0, CAP]), torch.tensor([1.0, 1.0]), IndexError, "out of range for max_capacity"),
    (torch.tensor([0, -2]), torch.tensor([1.0, 1.0]), IndexError, "out of range"),
    (torch.tensor([0, 1, 2]), torch.tensor([1.0, 1.0]), ValueError, "one number or one per index"),
    (torch.tensor([[0, 1], [2, 3]]), torch.tensor([1.0, 1.0]), ValueError, "must have shape"),
    (torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0]), TypeError, "must hold integers"),
])
def test_bad_input_raises_and_stores_nothing(index, priority, exc, match):
    s, rb = _filled()
    before, mp = s.priorities().clone(), s._max_priority
    with pytest.raises(exc, match=match):
        s.update_priority(index, priority)
    assert torch.equal(s.priorities(), before) and s._max_priority == mp


@needs_torchrl
def test_index_past_the_storage_length_is_refused_when_the_buffer_passes_its_storage():
    s, rb = _filled()
    before = s.priorities().clone()
    with pytest.raises(IndexError, match="storage length 10"):
        rb.update_priority(torch.tensor([2, 12]), torch.tensor([1.0, 1.0]))
    assert torch.equal(s.priorities(), before)


@needs_torchrl
def test_state_of_another_capacity_is_refused_and_nothing_is_lost(tmp_path):
    s, rb = _filled()
    before, mp = s.priorities().clone(), s._max_priority
    other = PrioritizedSampler(CAP + 1, 0.6, 0.4)
    with pytest.raises(ValueError, match="max_capacity 17, this one's is 16"):
        s.load_state_dict(other.state_dict())
    other.dumps(tmp_path / "other")
    with pytest.raises(ValueError, match="max_capacity 17, this one's is 16"):
        s.loads(tmp_path / "other")
    bad = s.state_dict()
    bad["_priorities"] = bad["_priorities"].clone()
    bad["_priorities"][3] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        s.load_state_dict(bad)
    assert torch.equal(s.priorities(), before) and s._max_priority == mp


# ---------------------------------------------------------------------------
# state: round trips, TorchRL's dumps, resume in a new process


@needs_reference
def test_dumps_and_loads_interchange_with_torchrl(tmp_path):
    ref, ours, rbs = make_pair(max_priority_within_buffer=True)
    run_sequence(ref, ours, rbs)
    for rb in rbs:  # TorchRL's dumps needs a tracked max priority
        rb.update_priority(torch.tensor([4, 5]), torch.tensor([0.3, 2.5]))
    ref.dumps(tmp_path / "ref")
    ours.dumps(tmp_path / "ours")
    ours2, ref2 = PrioritizedSampler(CAP, 0.1, 0.1, max_priority_within_buffer=True), TorchRLSampler(CAP, 0.1, 0.1)
    ours2.loads(tmp_path / "ref")
    ref2.loads(tmp_path / "ours")
    assert_same_state(ref, ours2)
    assert_same_state(ref2, ours)
    assert (ours2.alpha, ours2.beta, ref2.alpha, ref2.beta) == (0.7, 0.5, 0.7, 0.5)


@needs_torchrl
def test_replay_buffer_state_dict_round_trip_and_resume_in_a_new_process(tmp_path):
    s, rb = _filled()
    path = tmp_path / "sampler.pt"
    torch.save(s.state_dict(), path)
    twin = PrioritizedSampler(CAP, 0.6, 0.4, generator=123)
    twin.load_state_dict(torch.load(path, weights_only=True))
    assert torch.equal(twin.sample(rb.storage, 32)[0], s.sample(rb.storage, 32)[0])
    expected = [s.sample(rb.storage, 16)[0].tolist() for _ in range(3)]
    code = f"""
import json, torch
from torchrl.data.replay_buffers import LazyTensorStorage
from neuralmem_fast.replay.torchrl import PrioritizedSampler
st = LazyTensorStorage({CAP}); st.set(torch.arange(10), torch.zeros(10))
s = PrioritizedSampler({CAP}, 0.6, 0.4, generator=999)
s.load_state_dict(torch.load({str(path)!r}, weights_only=True))
s.sample(st, 32)
print(json.dumps([s.sample(st, 16)[0].tolist() for _ in range(3)]))
"""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == expected
    # the buffer's own state dict (sampler inside) and a buffer generator, as TorchRL's
    rb2 = TensorDictReplayBuffer(storage=LazyTensorStorage(CAP), sampler=PrioritizedSampler(CAP, 0.6, 0.4),
                                 batch_size=4)
    rb2.load_state_dict(rb.state_dict())
    assert torch.equal(rb2.sampler.priorities(), s.priorities())
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    rb.set_rng(g1)
    rb2.set_rng(g2)
    assert torch.equal(rb.sample()["index"], rb2.sample()["index"])


@needs_torchrl
def test_replay_buffer_dumps_and_loads_with_the_sampler_inside(tmp_path):
    def buffer(seed):
        return TensorDictReplayBuffer(storage=LazyTensorStorage(32), batch_size=8, priority_key="td_error",
                                      sampler=PrioritizedSampler(32, 0.6, 0.4, generator=seed))
    rb = buffer(3)
    rb.extend(TensorDict({"obs": torch.randn(20, 2), "td_error": torch.rand(20)}, [20]))
    rb.dumps(tmp_path)
    rb2 = buffer(9)
    rb2.loads(tmp_path)
    assert torch.equal(rb.sampler.priorities(), rb2.sampler.priorities())
    assert torch.equal(rb.sample()["index"], rb2.sample()["index"])  # the generator travelled too
