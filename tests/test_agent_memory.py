"""The agent's memory carries information: allocation writes, the seed_compat
content writes, the reads-zero ablation, the episodic memory, the digits ablation's plumbing."""
import json
import os

import numpy as np
import pytest
import torch

from neuralmem_fast.apps import demo
from neuralmem_fast.apps.experiments import ABLATION_VARIANTS, ablation_agent, gem_metrics, run_digits_experiment
from neuralmem_fast.config import MemoryConfig
from neuralmem_fast.models import FastAgent, make_agent
from neuralmem_fast.models.episodic import EpisodicAgent
from neuralmem_fast.nn import NeuralMemoryBank
from neuralmem_fast.nn.access import allocation


def _spread(memory):
    """Largest difference between slots, over the dimensions (0: identical slots)."""
    return demo.slot_spread(memory)


def _writes(bank, n, gen, heads=None):
    D = bank.memory_dim
    shape = (D,) if heads is None else (heads, D)
    for _ in range(n):
        bank.write(torch.randn(*shape, generator=gen), torch.tanh(torch.randn(*shape, generator=gen)),
                   torch.rand(*shape, generator=gen), torch.tensor(2.0) if heads is None else torch.full((heads,), 2.0))


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_allocation_writes_fill_distinct_slots_content_writes_stay_identical(backend):
    cfg = MemoryConfig(memory_size=8, memory_dim=4, num_read_heads=2)
    alloc, content = (NeuralMemoryBank(cfg, backend=backend, write_mode=m) for m in ("allocation", "content"))
    for bank in (alloc, content):
        _writes(bank, 3, torch.Generator().manual_seed(0))
    # content addressing from the zero memory: every slot got the same writes
    assert _spread(content.memory) < 1e-6 and content.memory.abs().max() > 0
    # allocation: the writes went to three distinct slots (the least used), the rest untouched
    written = alloc.memory.abs().sum(1) > 0
    assert written.sum() == 3 and _spread(alloc.memory) > 0.1
    assert torch.equal(alloc.memory[~written], torch.zeros(5, 4))
    rows = alloc.memory[written]
    assert torch.cdist(rows, rows).add(torch.eye(3)).min() > 1e-3  # pairwise distinct
    # a read now depends on its key
    keys = rows[:2].unsqueeze(1).expand(2, 2, 4).contiguous()
    r = alloc.read(keys, torch.full((2, 2), 20.0))
    assert (r[0] - r[1]).abs().max() > 1e-2


def test_allocation_write_is_the_dnc_formula():
    """One write: M * (1 - a e) + a v with a = allocation(usage), usage decayed then raised by a;
    several heads take distinct slots (write_allocation_weights)."""
    cfg = MemoryConfig(memory_size=6, memory_dim=3, num_read_heads=1)
    bank = NeuralMemoryBank(cfg, backend="torch", write_mode="allocation")
    g = torch.Generator().manual_seed(1)
    bank.memory.copy_(torch.randn(6, 3, generator=g))
    bank.usage.copy_(torch.tensor([0.9, 0.2, 0.5, 0.05, 0.7, 0.3]))
    m0, u0 = bank.memory.clone(), bank.usage.clone()
    v, e = torch.randn(3, generator=g), torch.rand(3, generator=g)
    bank.write(torch.randn(3, generator=g), v, e, torch.tensor(1.0))
    a = allocation(u0[None])[0]
    a = torch.where(a >= 1e-3, a, torch.zeros_like(a))  # the bank's alloc_floor
    assert a.argmax() == 3 and (a > 0).sum() > 1  # the least-used slot first, the DNC's spread after it
    torch.testing.assert_close(bank.memory, m0 * (1 - a[:, None] * e) + a[:, None] * v)
    torch.testing.assert_close(bank.usage, 0.99 * u0 + a)
    # two heads at once: two different slots
    bank2 = NeuralMemoryBank(cfg, backend="torch", write_mode="allocation")
    bank2.write(torch.randn(2, 3), torch.ones(2, 3), torch.ones(2, 3), torch.ones(2))
    assert int((bank2.usage > 0.5).sum()) == 2 and _spread(bank2.memory) == pytest.approx(1.0, abs=1e-5)


def test_allocation_write_differentiable_gradcheck():
    """differentiable=True: a later read's gradient reaches the written vectors (float64)."""
    cfg = MemoryConfig(memory_size=5, memory_dim=3, num_read_heads=2)
    keys = torch.randn(2, 3, dtype=torch.float64)
    strengths = torch.tensor([3.0, 5.0], dtype=torch.float64)

    def f(v1, v2, e):
        bank = NeuralMemoryBank(cfg, backend="torch", differentiable=True, write_mode="allocation").double()
        bank.write(torch.randn(3, dtype=torch.float64), v1, e, torch.tensor(1.0, dtype=torch.float64))
        bank.write(torch.randn(3, dtype=torch.float64), v2, e, torch.tensor(1.0, dtype=torch.float64))
        return bank.read(keys, strengths)

    args = [torch.randn(3, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    args.append(torch.rand(3, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(f, args)


def test_write_mode_none_reads_zero_and_bad_mode():
    cfg = MemoryConfig(memory_size=8, memory_dim=4, num_read_heads=2)
    bank = NeuralMemoryBank(cfg, backend="torch", write_mode="none")
    _writes(bank, 3, torch.Generator().manual_seed(0))
    assert torch.equal(bank.memory, torch.zeros(8, 4)) and torch.equal(bank.usage, torch.zeros(8))
    assert torch.equal(bank.read(torch.randn(2, 4), torch.ones(2)), torch.zeros(8))
    with pytest.raises(ValueError, match="write_vector"):  # writes are still checked
        bank.write(torch.randn(4), torch.randn(3), torch.randn(4), 1.0)
    with pytest.raises(ValueError, match="write_mode"):
        NeuralMemoryBank(cfg, write_mode="uniform")


@pytest.mark.parametrize("kind", ["batched", "sequential"])
def test_agent_slots_differ_by_default_and_stay_identical_with_seed_compat(kind):
    cfg = MemoryConfig(memory_size=16, memory_dim=8, num_read_heads=2)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(12, generator=g), torch.randn(12, generator=g)) for _ in range(24)]
    spreads = {}
    for compat in (False, True):
        torch.manual_seed(0)
        agent = make_agent(kind, input_dim=12, hidden_dim=16, config=cfg, seed_compat=compat)
        assert agent.memory_bank.write_mode == ("content" if compat else "allocation")
        for x, y in data:
            agent.train_step(x, y)
        spreads[compat] = _spread(agent.memory_bank.memory)
        assert agent.memory_bank.memory.abs().max() > 1e-3  # something was written
    assert spreads[True] < 1e-6, "the tutorial's writes keep every slot identical"
    assert spreads[False] > 1e-2, "allocation writes make the slots differ"
    with pytest.raises(ValueError, match="seed_compat"):
        FastAgent(seed_compat=True, write_mode="allocation")


def test_episodic_memory_recalls_stored_targets():
    torch.manual_seed(0)
    xs = torch.randn(6, 12)
    ys = torch.eye(6, 12)
    for mode in ("allocation", "content"):
        ep = EpisodicAgent(make_agent("batched", input_dim=12, hidden_dim=8,
                                      config=MemoryConfig(memory_size=8, memory_dim=4, num_read_heads=1)),
                           input_dim=12, target_dim=6, memory_size=16, write_mode=mode)
        for x, y in zip(xs, ys):
            ep.train_step(x, y)
        rec = ep.recall(xs)
        if mode == "allocation":
            assert (rec.argmax(1) == torch.arange(6)).all() and rec.diagonal().min() > 0.9
        else:  # one repeated slot: the same read whatever the query
            assert (rec - rec[0]).abs().max() < 1e-6
        out = ep.predict(xs)
        torch.testing.assert_close(out[:, :6] - rec, ep.agent.predict(xs)[:, :6])


def test_digits_ablation_plumbing(tmp_path):
    pytest.importorskip("sklearn")
    variants = ("memory", "zero_reads", "episodic")
    res = run_digits_experiment(str(tmp_path), seeds=(0, 1), benchmarks=("split",), train_per_task=10,
                                test_per_task=8, hidden_dim=8, verbose=False, ablation=True, variants=variants,
                                variant_factory=lambda v: ablation_agent(
                                    v, "batched", 8, config=MemoryConfig(memory_size=8, memory_dim=4,
                                                                         num_read_heads=1), episodic_size=64))
    assert os.path.getsize(tmp_path / "digits_ablation.png") > 0
    saved = json.loads((tmp_path / "digits_ablation.json").read_text())
    assert set(saved["conditions"]) == {f"split/{r}/{v}" for r in ("no_replay", "replay") for v in variants}
    assert list(saved["config"]["variants"]) == list(variants) and saved["config"]["episodic_size"] == 64
    for c in saved["conditions"].values():
        assert np.array(c["R_runs"]).shape == (2, 5, 5)
        accs = [gem_metrics(R)["ACC"] for R in c["R_runs"]]
        bwts = [gem_metrics(R)["BWT"] for R in c["R_runs"]]
        assert c["ACC"]["mean"] == pytest.approx(np.mean(accs)) and c["ACC"]["std"] == pytest.approx(np.std(accs, ddof=1))
        assert c["BWT"]["mean"] == pytest.approx(np.mean(bwts))
    for r in ("no_replay", "replay"):
        z = saved["conditions"][f"split/{r}/zero_reads"]
        # a memory that is always zero: zeroing it at test time changes nothing
        assert z["ACC_memory_zeroed"]["runs"] == z["ACC"]["runs"]
        assert len(saved["conditions"][f"split/{r}/episodic"]["ACC_memory_zeroed"]["runs"]) == 2
    assert res["conditions"] == saved["conditions"]
    with pytest.raises(ValueError, match="variants"):
        run_digits_experiment(str(tmp_path), ablation=True, variants=("bogus",))
    with pytest.raises(ValueError, match="variant"):
        ablation_agent("bogus")
    assert set(ABLATION_VARIANTS) >= {"memory", "zero_reads", "uniform_writes", "episodic"}


def test_ablation_agents_use_their_write_modes():
    cfg = MemoryConfig(memory_size=8, memory_dim=4, num_read_heads=1)
    modes = {v: ablation_agent(v, hidden_dim=4, config=cfg, episodic_size=8) for v in ABLATION_VARIANTS}
    assert modes["memory"].memory_bank.write_mode == "allocation"
    assert modes["zero_reads"].memory_bank.write_mode == "none"
    assert modes["uniform_writes"].memory_bank.write_mode == "content"
    assert modes["episodic"].memory_bank.write_mode == "allocation"
    assert modes["episodic"].agent.memory_bank.write_mode == "allocation"
    assert modes["episodic_uniform"].memory_bank.write_mode == "content"


def test_demo_cli_write_mode_and_ablation_flags(tmp_path):
    for bad in (["--ablation"], ["--dataset", "digits", "--ablation", "--write-mode", "content"],
                ["--reference", "--write-mode", "allocation"], ["--dataset", "digits", "--episodic-size", "8"],
                ["--dataset", "digits", "--ablation", "--variants", "bogus"],
                ["--dataset", "digits", "--ablation", "--episodic-size", "0"]):
        with pytest.raises(SystemExit):
            demo.parse_args(bad)
    spreads = {}
    threads = torch.get_num_threads()
    for mode in ("allocation", "content"):
        out = tmp_path / mode
        argv = ["--quick", "--tasks", "2", "--adapt-steps", "0", "--no-progress", "--write-mode", mode,
                "--out", str(out)] + (["--no-plot"] if mode == "content" else [])
        assert demo.main(argv + ["--threads", str(threads + 1)]) == 0
        m = json.loads((out / "metrics.json").read_text())
        # --threads held for the run, and the caller's count came back
        assert m["torch_threads"] == threads + 1 and torch.get_num_threads() == threads
        assert m["write_mode"] == mode
        spreads[mode] = m["memory_slot_spread"]
    assert os.path.getsize(tmp_path / "allocation" / "neural_memory_results.png") > 0
    assert spreads["content"] < 1e-6 < 1e-2 < spreads["allocation"]
