"""The demo end to end on a tiny configuration, its options and its metrics."""
import json
import math

import pytest
import torch

from neuralmem_fast.apps import cli, demo


@pytest.fixture(autouse=True)
def _restore_threads():
    # the demo sets torch's intra-op threads (--threads, default 1)
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_demo_writes_figure_and_metrics(tmp_path):
    """The default: the fast agent with batched replay."""
    out = tmp_path / "results"
    assert demo.main(["--quick", "--no-progress", "--out", str(out), "--seed", "1"]) == 0
    png = out / "neural_memory_results.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    m = json.loads((out / "metrics.json").read_text())
    T = demo.QUICK["tasks"]
    assert m["agent"] == "batched" and m["dataset"] == "synthetic" and m["settings"]["tasks"] == T and m["settings"]["seed"] == 1
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


def test_compare_reference_records_both_training_times(tmp_path):
    """The sequential fast agent and the reference on the same work."""
    argv = ["--quick", "--agent", "sequential", "--compare-reference", "--no-plot", "--no-progress", "--tasks", "2",
            "--adapt-steps", "2", "--out", str(tmp_path)]
    assert demo.main(argv) == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    c = m["comparison"]
    assert m["agent"] == c["agent"] == "sequential" and set(m["reference_runs"]) == set(m["runs"])
    assert c["train_time_s"] == pytest.approx(sum(r["train_time_s"] for r in m["runs"].values()))
    assert c["reference_train_time_s"] == pytest.approx(
        sum(r["train_time_s"] for r in m["reference_runs"].values()))
    assert c["train_speedup"] == pytest.approx(c["reference_train_time_s"] / c["train_time_s"])
    for name in m["runs"]:
        ours, ref = m["runs"][name], m["reference_runs"][name]
        assert len(ref["error_matrix"]) == len(ours["error_matrix"]) == 2
        assert c["average_final_error"][name] == {"sequential": ours["average_final_error"],
                                                  "reference": ref["average_final_error"]}
        assert len(ours["adapted_error"]) == 2 and all(math.isfinite(e) for e in ours["adapted_error"])
        # same seed, same init, same data: the first task is learned alike (no replay yet)
        for a, b in zip(ours["error_matrix"][0], ref["error_matrix"][0]):
            assert a == pytest.approx(b, rel=1e-3, abs=1e-4)


def test_cli_demo_digits_tiny(tmp_path):
    pytest.importorskip("sklearn")
    argv = ["demo", "--dataset", "digits", "--quick", "--seeds", "0", "1", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    png = tmp_path / "digits_continual.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    m = json.loads((tmp_path / "digits_metrics.json").read_text())
    assert m["config"]["seeds"] == [0, 1] and m["config"]["train_per_task"] == 12 and m["config"]["epochs"] == 1
    assert m["config"]["replay"] == "batched"
    assert set(m["conditions"]) == {"split/no_replay", "split/replay", "permuted/no_replay", "permuted/replay"}
    for c in m["conditions"].values():
        assert len(c["R_runs"]) == 2 and 0.0 <= c["ACC"]["mean"] <= 1.0


def test_parse_args_defaults_quick_and_overrides():
    a = demo.parse_args([])
    assert (a.tasks, a.epochs, a.samples, a.test_samples, a.memory_size, a.hidden) == (4, 20, 50, 20, 128, 128)
    assert a.agent == "batched" and a.dataset == "synthetic" and a.out == "results" and not a.no_plot
    assert not a.compare_reference
    assert demo.parse_args(["--agent", "sequential"]).agent == "sequential"
    d = demo.parse_args(["--dataset", "digits"])
    assert (d.seeds, d.train_per_task, d.test_per_task, d.epochs) == ([0, 1, 2], 300, None, 1)
    assert demo.parse_args(["--dataset", "digits", "--epochs", "3", "--train-per-task", "0"]).epochs == 3
    assert demo.parse_args(["--dataset", "digits", "--train-per-task", "0"]).train_per_task is None
    for bad in (["--seed-compat"], ["--reference", "--compare-reference"], ["--dataset", "digits", "--reference"],
                ["--seeds", "1"], ["--reference", "--agent", "batched"]):
        with pytest.raises(SystemExit):
            demo.parse_args(bad)
    q = demo.parse_args(["--quick", "--epochs", "3"])
    assert q.epochs == 3 and q.tasks == demo.QUICK["tasks"] and q.memory_size == demo.QUICK["memory_size"]
    assert demo.parse_args(["--reference"]).agent == "reference"
    with pytest.raises(SystemExit):
        demo.parse_args(["--tasks", "0"])
    with pytest.raises(SystemExit):
        demo.parse_args(["--samples", "5", "--adapt-shots", "6"])


def test_build_agent_is_the_single_factory():
    from neuralmem_fast.models import tutorial_reference as reference

    cfg = reference.MemoryConfig(memory_size=4, memory_dim=2, num_read_heads=1)
    agent = demo.build_agent("reference", cfg, hidden_dim=3, input_dim=5)
    assert isinstance(agent, reference.ContinualLearningAgent)
    assert agent.memory_bank.memory.shape == (4, 2) and agent.controller.hidden_dim == 3
    from neuralmem_fast.models import agent as fast

    for kind in ("batched", "sequential"):
        a = demo.build_agent(kind, cfg, hidden_dim=3, input_dim=5)
        assert isinstance(a, fast.FastAgent) and a.replay == kind
        assert a.memory_bank.memory.shape == (4, 2) and a.controller.hidden_dim == 3
    with pytest.raises(ValueError, match="seed_compat"):
        demo.build_agent("batched", cfg, 3, seed_compat=True)
    with pytest.raises(ValueError, match="unknown agent"):
        demo.build_agent("nope", cfg, 3)


def test_metrics_hand_checked():
    E = [[0.1, 0.9, 0.8],
         [0.3, 0.2, 0.7],
         [0.5, 0.1, 0.4]]
    assert demo.average_final_error(E) == pytest.approx(1.0 / 3)
    f = demo.forgetting(E)
    # task 1: 0.5 - min(0.1, 0.3); task 2: 0.1 - 0.2 (it improved); task 3: nothing after it
    assert f[0] == pytest.approx(0.4) and f[1] == pytest.approx(-0.1) and f[2] is None


def test_demo_log_into_a_pipe_holds_no_progress_frames(tmp_path):
    """`python -m neuralmem_fast demo > log 2>&1`: a log, not a stream of redrawn bars."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(demo.__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "neuralmem_fast", "demo", "--quick", "--no-plot", "--tasks", "2",
                           "--adapt-steps", "0", "--out", str(tmp_path)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=str(tmp_path), timeout=300)
    log = proc.stdout.decode()
    assert proc.returncode == 0, log[-3000:]
    assert "\r" not in log, "progress-bar frames in a piped log: " + repr(log[:500])
    assert "Learning Task 2/2" in log and "average final error" in log  # the log itself is all there
    assert "step/s" not in log


def test_first_eta_leaves_out_the_warm_up(tmp_path, monkeypatch, capsys):
    """On a terminal the bar's rate starts after the first step, whose agent
    construction and one-time warm-up once made the first ETA read 72 s for a
    4 s run. A fake clock makes the warm-up 60 s and every step 1 ms."""
    import io
    import re
    import sys

    import tqdm.std

    clock = [1000.0]
    monkeypatch.setattr(tqdm.std, "time", lambda: clock[0])
    monkeypatch.setattr(tqdm.std.tqdm, "monitor_interval", 0)  # no background refreshes on the real clock
    real_make_agent = demo.build_agent

    def slow_first_then_fast(*args, **kwargs):
        agent = real_make_agent(*args, **kwargs)
        clock[0] += 60.0  # building the agent, first calls, lazy imports
        step = agent.train_step

        def timed_step(*a, **k):
            clock[0] += 0.001
            return step(*a, **k)

        agent.train_step = timed_step
        return agent

    monkeypatch.setattr(demo, "build_agent", slow_first_then_fast)

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    assert demo.main(["--quick", "--no-plot", "--tasks", "2", "--adapt-steps", "0", "--out", str(tmp_path)]) == 0
    frames = [f for f in re.split(r"[\r\n]", term.getvalue()) if "/48 [" in f]
    assert frames, "no progress bar on a terminal: " + repr(term.getvalue()[:300])

    def seconds(hms):
        s = 0
        for part in hms.split(":"):
            s = 60 * s + int(part)
        return s

    etas = []
    for f in frames:
        m = re.search(r"(\d+)/48 \[([\d:]+)<([\d:]+)", f)
        if m:
            etas.append((int(m.group(1)), seconds(m.group(3))))
    assert etas, frames
    # 48 steps of 1 ms: no estimate may exceed a second (the warm-up put the first at 47 x 60 s).
    assert all(eta <= 1 for _, eta in etas), etas
