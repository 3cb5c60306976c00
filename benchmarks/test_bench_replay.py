"""Prioritized replay benchmarks: capacity 1,000,000, batch 256, on the CPU.

Every provider stores the same transition (obs (4,) f32, action i64, reward
f32, next_obs (4,) f32, done bool), holds 1,000,000 of them with random
priorities, and is timed on the same operations:

* sample: draw 256, compute the importance weights and gather the stored rows
  (TorchRL's TensorDictPrioritizedReplayBuffer, cpprb's
  PrioritizedReplayBuffer, ours);
* update_priorities: 256 new priorities at random slots (each call takes the
  next of 64 precomputed index batches, so no call replays a cache-hot path);
* update_priorities+sample: one training step's replay work. cpprb marks
  updated leaves and recomputes its tree lazily at the next sample, so its
  update_priorities alone hides that cost; this group charges it;
* ExperienceReplay.sample: the tutorial's class against ours (same semantics,
  without replacement) and against our PrioritizedReplayBuffer;
* the TorchRL learner loop: TorchRL's TensorDictReplayBuffer over its
  LazyTensorStorage and default writer, ``sample()`` then
  ``update_tensordict_priority()`` with 256 new TD errors, once with
  neuralmem_fast.replay.torchrl.PrioritizedSampler and once with TorchRL's own
  PrioritizedSampler (same alpha, beta, eps).

Peers that are not installed are skipped (`pip install .[peers]`). Run:
    python -m pytest benchmarks/test_bench_replay.py --benchmark-json=bench_replay.json
On a shared, busy machine add --benchmark-timer=time.process_time (CPU time
of the process, all threads) so that other load does not inflate the rows.
"""
import itertools

import numpy as np
import pytest
import torch

from neuralmem_fast.replay import ExperienceReplay, PrioritizedReplayBuffer

CAP = 1_000_000
BATCH = 256
ALPHA, BETA = 0.6, 0.4


def _transitions(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "obs": torch.randn(n, 4, generator=g),
        "action": torch.randint(0, 4, (n,), generator=g),
        "reward": torch.randn(n, generator=g),
        "next_obs": torch.randn(n, 4, generator=g),
        "done": torch.rand(n, generator=g) < 0.01,
    }


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return {
        "items": _transitions(CAP),
        "priorities": rng.uniform(0.01, 2.0, CAP),
        "index_batches": [rng.integers(0, CAP, BATCH) for _ in range(64)],
        "new_priorities": [rng.uniform(0.01, 2.0, BATCH) for _ in range(64)],
    }


def _ours(data):
    buf = PrioritizedReplayBuffer(CAP, alpha=ALPHA, beta=BETA, generator=0)
    buf.extend(data["items"], priorities=data["priorities"])
    return buf


def _torchrl(data):
    pytest.importorskip("torchrl")
    from tensordict import TensorDict
    from torchrl.data import LazyTensorStorage, TensorDictPrioritizedReplayBuffer

    rb = TensorDictPrioritizedReplayBuffer(
        alpha=ALPHA, beta=BETA, storage=LazyTensorStorage(CAP), batch_size=BATCH, priority_key="td_error"
    )
    rb.extend(TensorDict(dict(data["items"]), batch_size=[CAP]))
    rb.update_priority(torch.arange(CAP), torch.from_numpy(data["priorities"]).float())
    return rb


def _cpprb(data):
    cpprb = pytest.importorskip("cpprb")
    env = {
        "obs": {"shape": 4, "dtype": np.float32},
        "action": {"dtype": np.int64},
        "reward": {"dtype": np.float32},
        "next_obs": {"shape": 4, "dtype": np.float32},
        "done": {"dtype": np.bool_},
    }
    rb = cpprb.PrioritizedReplayBuffer(CAP, env, alpha=ALPHA)
    rb.add(**{k: v.numpy() for k, v in data["items"].items()}, priorities=data["priorities"])
    return rb


def _info(benchmark, group, provider, baseline=False):
    benchmark.group = group
    benchmark.extra_info.update({"provider": provider, "baseline": baseline, "N": CAP, "B": BATCH})


SAMPLE = f"replay sample C{CAP} B{BATCH}"
UPDATE = f"replay update_priorities C{CAP} B{BATCH}"
STEP = f"replay update_priorities+sample C{CAP} B{BATCH}"
SEED_SAMPLE = f"ExperienceReplay.sample C{CAP} B{BATCH}"
LEARNER = f"replay TorchRL learner sample+update_tensordict_priority C{CAP} B{BATCH}"


# -- sample ------------------------------------------------------------------


def test_sample_ours(benchmark, data):
    buf = _ours(data)
    _info(benchmark, SAMPLE, "neuralmem_fast")
    batch, idx, w = benchmark(buf.sample, BATCH)
    assert idx.shape == (BATCH,) and batch["obs"].shape == (BATCH, 4) and w.max() <= 1


def test_sample_torchrl(benchmark, data):
    rb = _torchrl(data)
    _info(benchmark, SAMPLE, "torchrl", baseline=True)
    s = benchmark(rb.sample)
    assert s["obs"].shape == (BATCH, 4) and "priority_weight" in s.keys()


def test_sample_cpprb(benchmark, data):
    rb = _cpprb(data)
    _info(benchmark, SAMPLE, "cpprb")
    s = benchmark(rb.sample, BATCH, BETA)
    assert s["obs"].shape == (BATCH, 4) and s["weights"].shape == (BATCH,)


# -- update_priorities ---------------------------------------------------------


def _cycler(data, as_tensor):
    pairs = list(zip(data["index_batches"], data["new_priorities"]))
    if as_tensor:
        pairs = [(torch.from_numpy(i), torch.from_numpy(p).float()) for i, p in pairs]
    return itertools.cycle(pairs)


def test_update_ours(benchmark, data):
    buf = _ours(data)
    it = _cycler(data, as_tensor=True)
    _info(benchmark, UPDATE, "neuralmem_fast")
    benchmark(lambda: buf.update_priorities(*next(it)))


def test_update_torchrl(benchmark, data):
    rb = _torchrl(data)
    it = _cycler(data, as_tensor=True)
    _info(benchmark, UPDATE, "torchrl", baseline=True)
    benchmark(lambda: rb.update_priority(*next(it)))


def test_update_cpprb(benchmark, data):
    rb = _cpprb(data)
    it = _cycler(data, as_tensor=False)
    _info(benchmark, UPDATE, "cpprb")
    benchmark(lambda: rb.update_priorities(*next(it)))


# -- one step: update the last batch's priorities, draw the next batch ----------


def test_step_ours(benchmark, data):
    buf = _ours(data)
    it = _cycler(data, as_tensor=True)
    _info(benchmark, STEP, "neuralmem_fast")

    def step():
        buf.update_priorities(*next(it))
        return buf.sample(BATCH)

    benchmark(step)


def test_step_torchrl(benchmark, data):
    rb = _torchrl(data)
    it = _cycler(data, as_tensor=True)
    _info(benchmark, STEP, "torchrl", baseline=True)

    def step():
        rb.update_priority(*next(it))
        return rb.sample()

    benchmark(step)


def test_step_cpprb(benchmark, data):
    rb = _cpprb(data)
    it = _cycler(data, as_tensor=False)
    _info(benchmark, STEP, "cpprb")

    def step():
        rb.update_priorities(*next(it))
        return rb.sample(BATCH, BETA)

    benchmark(step)


# -- the tutorial's ExperienceReplay ---------------------------------------------


def _seed_module():
    from tests.helpers import load_seed

    return load_seed()


def _fill_experience_replay(er, data):
    items = list(range(CAP))  # any object will do; the tutorial stores (x, y) tuples
    for i, p in zip(items, data["priorities"].tolist()):
        er.push(i, p)
    return er


def test_seed_sample_seed(benchmark, data):
    seed = _seed_module()
    er = _fill_experience_replay(seed.ExperienceReplay(capacity=CAP, alpha=ALPHA), data)
    _info(benchmark, SEED_SAMPLE, "seed", baseline=True)
    samples, weights = benchmark.pedantic(er.sample, args=(BATCH, BETA), rounds=5, iterations=1, warmup_rounds=1)
    assert len(samples) == BATCH


def test_seed_sample_ours_experience_replay(benchmark, data):
    er = _fill_experience_replay(ExperienceReplay(capacity=CAP, alpha=ALPHA), data)
    _info(benchmark, SEED_SAMPLE, "neuralmem_fast ExperienceReplay")
    samples, weights = benchmark(er.sample, BATCH, BETA)
    assert len(samples) == BATCH and len(set(samples)) == BATCH


def test_seed_sample_ours_prioritized(benchmark, data):
    buf = _ours(data)
    _info(benchmark, SEED_SAMPLE, "neuralmem_fast PrioritizedReplayBuffer")
    benchmark(buf.sample, BATCH)


# -- TorchRL's learner loop, with either sampler ------------------------------------


def _torchrl_learner_buffer(data, ours):
    pytest.importorskip("torchrl")
    from tensordict import TensorDict
    from torchrl.data import LazyTensorStorage, TensorDictReplayBuffer

    if ours:
        from neuralmem_fast.replay.torchrl import PrioritizedSampler

        sampler = PrioritizedSampler(CAP, ALPHA, BETA, generator=0)
    else:
        from torchrl.data.replay_buffers import PrioritizedSampler

        sampler = PrioritizedSampler(CAP, ALPHA, BETA)
    rb = TensorDictReplayBuffer(storage=LazyTensorStorage(CAP), sampler=sampler, batch_size=BATCH,
                                priority_key="td_error")
    rb.extend(TensorDict(dict(data["items"]), batch_size=[CAP]))
    rb.update_priority(torch.arange(CAP), torch.from_numpy(data["priorities"]).float())
    return rb


def _learner_step(rb, data):
    errors = itertools.cycle([torch.from_numpy(p).float() for p in data["new_priorities"]])

    def step():
        batch = rb.sample()
        batch["td_error"] = next(errors)
        rb.update_tensordict_priority(batch)
        return batch

    return step


@pytest.fixture
def one_thread():
    """Both learner rows run with one intra-op thread: a step's tensors have 256
    rows, where torch's thread pool only adds synchronisation (on a loaded
    machine, a scheduler slice per parallel region: 20 ms steps were seen)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_learner_loop_ours(benchmark, data, one_thread):
    rb = _torchrl_learner_buffer(data, ours=True)
    _info(benchmark, LEARNER, "neuralmem_fast sampler")
    batch = benchmark(_learner_step(rb, data))
    assert batch["obs"].shape == (BATCH, 4) and batch["priority_weight"].max() <= 1


def test_learner_loop_torchrl(benchmark, data, one_thread):
    rb = _torchrl_learner_buffer(data, ours=False)
    _info(benchmark, LEARNER, "torchrl", baseline=True)
    batch = benchmark(_learner_step(rb, data))
    assert batch["obs"].shape == (BATCH, 4) and batch["priority_weight"].max() <= 1
