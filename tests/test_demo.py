"""The demo end to end on a tiny configuration, its options and its metrics."""
import json
import math

import pytest
import torch

from neuralmem_fast import cli, demo


@pytest.fixture(autouse=True)
def _restore_threads():
    # the demo sets torch's intra-op threads (--threads, default 1)
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_demo_writes_figure_and_metrics(tmp_path):
    out = tmp_path / "results"
    assert demo.main(["--quick", "--no-progress", "--out", str(out), "--seed", "1"]) == 0
    png = out / "neural_memory_results.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    m = json.loads((out / "metrics.json").read_text())
    T = demo.QUICK["tasks"]
    assert m["agent"] == "reference" and m["settings"]["tasks"] == T and m["settings"]["seed"] == 1
    assert set(m["runs"]) == {"with_replay", "without_replay"}
    for name, r in m["runs"].items():
        E = r["error_matrix"]
        assert len(E) == T and all(len(row) == T for row in E), name
        assert all(math.isfinite(e) and e >= 0 for row in E for e in row), name
        assert r["average_final_error"] == pytest.approx(sum(E[-1]) / T)
        assert len(r["forgetting"]) == T and r["forgetting"][-1] is None
        assert r["forgetting"][0] == pytest.approx(E[-1][0] - min(E[t][0] for t in range(T - 1)))
        assert len(r["adapted_error"]) == T and all(math.isfinite(e) for e in r["adapted_error"])
        assert r["error_after_learning"] == [E[t][t] for t in range(T)]
        assert r["wall_time_s"] > 0 and len(r["train_loss"]) == T
    # the seed's results dict, 'without_memory' filled this time
    res = m["results"]
    assert res["tasks"] == list(range(1, T + 1))
    assert res["with_memory"] == m["runs"]["with_replay"]["error_after_learning"]
    assert res["without_memory"] == m["runs"]["without_replay"]["error_after_learning"]
    # both runs start from the same seed: the first task is learned identically
    assert m["runs"]["with_replay"]["error_matrix"][0] == m["runs"]["without_replay"]["error_matrix"][0]
    assert m["runs"]["with_replay"]["error_matrix"][-1] != m["runs"]["without_replay"]["error_matrix"][-1]


def test_cli_dispatches_demo_reference_without_plot(tmp_path):
    argv = ["demo", "--quick", "--reference", "--no-plot", "--no-progress", "--tasks", "2", "--adapt-steps", "0",
            "--seed-compat", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    assert not (tmp_path / "neural_memory_results.png").exists()
    m = json.loads((tmp_path / "metrics.json").read_text())
    r = m["runs"]["with_replay"]
    assert m["settings"]["tasks"] == 2 and m["settings"]["seed_compat"] is True
    assert r["adapted_error"] is None
    # under seed_compat only the tasks seen so far are evaluated, as in the seed
    assert r["error_matrix"][0][1] is None and r["error_matrix"][1][1] is not None


def test_parse_args_defaults_quick_and_overrides():
    a = demo.parse_args([])
    assert (a.tasks, a.epochs, a.samples, a.test_samples, a.memory_size, a.hidden) == (4, 20, 50, 20, 128, 128)
    assert a.agent == "reference" and a.out == "results" and not a.no_plot
    q = demo.parse_args(["--quick", "--epochs", "3"])
    assert q.epochs == 3 and q.tasks == demo.QUICK["tasks"] and q.memory_size == demo.QUICK["memory_size"]
    assert demo.parse_args(["--reference"]).agent == "reference"
    with pytest.raises(SystemExit):
        demo.parse_args(["--tasks", "0"])
    with pytest.raises(SystemExit):
        demo.parse_args(["--samples", "5", "--adapt-shots", "6"])


def test_make_agent_is_the_single_factory():
    from neuralmem_fast import reference

    cfg = reference.MemoryConfig(memory_size=4, memory_dim=2, num_read_heads=1)
    agent = demo.make_agent("reference", cfg, hidden_dim=3, input_dim=5)
    assert isinstance(agent, reference.ContinualLearningAgent)
    assert agent.memory_bank.memory.shape == (4, 2) and agent.controller.hidden_dim == 3
    with pytest.raises(ValueError, match="unknown agent"):
        demo.make_agent("nope", cfg, 3)


def test_metrics_hand_checked():
    E = [[0.1, 0.9, 0.8],
         [0.3, 0.2, 0.7],
         [0.5, 0.1, 0.4]]
    assert demo.average_final_error(E) == pytest.approx(1.0 / 3)
    f = demo.forgetting(E)
    # task 1: 0.5 - min(0.1, 0.3); task 2: 0.1 - 0.2 (it improved); task 3: nothing after it
    assert f[0] == pytest.approx(0.4) and f[1] == pytest.approx(-0.1) and f[2] is None
