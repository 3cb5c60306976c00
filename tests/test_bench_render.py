"""The report renderer on a small synthetic pytest-benchmark JSON: ratios, floors, goals, plot."""
import json
import os
import re

import pytest

from tests.helpers import load_script


@pytest.fixture(scope="module")
def rr():
    return load_script("benchmarks/render_report.py", "render_report_under_test")


def _bench(group, provider, median, source="benchmarks/test_bench_ops.py", baseline=False, **info):
    extra = {"provider": provider, **info}
    if baseline:
        extra["baseline"] = True
    return {
        "group": group, "name": f"test[{group}-{provider}]", "fullname": f"{source}::test[{group}-{provider}]",
        "params": None, "extra_info": extra,
        "stats": {"median": median, "iqr": median * 0.1, "stddev": median * 0.05, "rounds": 7,
                  "iterations": 1, "mean": median, "min": median, "max": median},
    }


MB = 1_000_000 * 64 * 4


def synthetic():
    op = lambda o, m, B, N: dict(op=o, mode=m, B=B, N=N, D=64, device="cpu")
    g_step = "step fwd B1 N128 D64 H4 W1"
    g_read = "content_read fwd B1 N1000000 D64 H4"
    g_write = "memory_write_ fwd B1 N1000000 D64 W1"
    g_bwd = "step fwd+bwd B32 N128 D64 H4 W1"
    g_floor = "floor memory.sum() B1 N1000000 D64"
    g_read_small = "content_read fwd B1 N4096 D64 H4"
    rows = [
        _bench(g_step, "torch", 100e-6, baseline=True, **op("step", "fwd", 1, 128)),
        _bench(g_step, "seed", 230e-6, **op("step", "fwd", 1, 128)),
        _bench(g_step, "cpu", 20e-6, **op("step", "fwd", 1, 128)),             # 11.5x the seed: met
        _bench(g_read, "torch", 0.2, baseline=True, bytes=MB, **op("content_read", "fwd", 1, 1_000_000)),
        _bench(g_read, "seed", 0.9, bytes=MB, **op("content_read", "fwd", 1, 1_000_000)),
        _bench(g_read, "cpu", 0.04, bytes=MB, **op("content_read", "fwd", 1, 1_000_000)),  # 22.5x: not met
        _bench(g_write, "torch", 0.5, baseline=True, bytes=2 * MB, **op("memory_write_", "fwd", 1, 1_000_000)),
        _bench(g_write, "cpu", 0.06, bytes=2 * MB, **op("memory_write_", "fwd", 1, 1_000_000)),  # 2x floor: met
        _bench(g_floor, "floor: memory.sum()", 0.03, baseline=True, floor=True, bytes=MB,
               **op("floor", "fwd", 1, 1_000_000)),
        _bench(g_bwd, "torch", 3e-3, baseline=True, **op("step", "fwd+bwd", 32, 128)),
        _bench(g_bwd, "cpu", 1.5e-3, **op("step", "fwd+bwd", 32, 128)),          # 2x: not met
        _bench(g_bwd, "torch.compile", 1e-3, **op("step", "fwd+bwd", 32, 128)),  # a peer, never a candidate
        _bench(g_read_small, "torch", 1e-3, baseline=True, **op("content_read", "fwd", 1, 4096)),
        _bench(g_read_small, "cpu", 2e-4, **op("content_read", "fwd", 1, 4096)),
        # issue 9: a step at N=10^7 against its floor, and content_read fwd+bwd with its peak memory
        _bench("step fwd B1 N10000000 D64 H4 W1", "cpu", 1.0, baseline=True, bytes=20 * MB,
               **op("step", "fwd", 1, 10_000_000)),
        _bench("floor memory.sum() B1 N10000000 D64", "floor: memory.sum()", 0.2, baseline=True, floor=True,
               bytes=10 * MB, **op("floor", "fwd", 1, 10_000_000)),              # 5x the floor: not met
        _bench("content_read fwd+bwd B1 N10000000 D64 H4", "cpu", 2.0, baseline=True, bytes=30 * MB,
               memory_bytes=10 * MB, peak_bytes=21 * MB, **op("content_read", "fwd+bwd", 1, 10_000_000)),
        # a replay suite that follows the convention, names of its own
        _bench("replay sample capacity1000000 batch256", "neuralmem_fast", 20e-6,
               source="benchmarks/test_bench_replay.py", baseline=True, capacity=1_000_000, batch=256),
        _bench("replay sample capacity1000000 batch256", "torchrl", 330e-6,
               source="benchmarks/test_bench_replay.py", capacity=1_000_000, batch=256),
        _bench("replay sample capacity1000000 batch256", "seed", 38e-3,
               source="benchmarks/test_bench_replay.py", capacity=1_000_000, batch=256),
        # update+sample (the judge of updates against cpprb) and TorchRL's learner loop (issue 19)
        _bench("replay update_priorities+sample C1000000 B256", "neuralmem_fast", 20e-6,
               source="benchmarks/test_bench_replay.py", N=1_000_000, B=256),
        _bench("replay update_priorities+sample C1000000 B256", "cpprb", 150e-6,
               source="benchmarks/test_bench_replay.py", N=1_000_000, B=256),
        _bench("replay TorchRL learner sample+update_tensordict_priority C1000000 B256", "neuralmem_fast sampler",
               400e-6, source="benchmarks/test_bench_replay.py", N=1_000_000, B=256),
        _bench("replay TorchRL learner sample+update_tensordict_priority C1000000 B256", "torchrl", 500e-6,
               source="benchmarks/test_bench_replay.py", baseline=True, N=1_000_000, B=256),
    ]
    return {
        "machine_info": {"python_implementation": "CPython", "python_version": "3.11",
                         "neuralmem": {"cpu_model": "Test CPU 9000", "cores": 2, "torch": "9.9.9",
                                       "cuda_device": None, "date": "2026-01-01 00:00 UTC",
                                       "loadavg_start": [0.1, 0.1, 0.1], "loadavg_end": [0.2, 0.1, 0.1]}},
        "benchmarks": rows, "datetime": "2026-01-01T00:00:00", "version": "5.3.1",
    }


@pytest.fixture(scope="module")
def report(rr, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    path = out / "bench.json"
    path.write_text(json.dumps(synthetic()))
    assert rr.main([str(path), "--out", str(out)]) == 0
    return out, (out / "REPORT.md").read_text()


def _goal_line(text, fragment, provider):
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 6 and fragment in cells[1] and cells[3] == provider:
            return cells
    raise AssertionError(f"no goal row with {fragment!r} for {provider!r} in:\n{text}")


def test_machine_section(report):
    _, text = report
    for s in ("Test CPU 9000", "| cores | 2", "9.9.9", "| GPU | none |", "2026-01-01 00:00 UTC"):
        assert s in text, s


def test_issue3_goals_are_computed_from_rows(report):
    _, text = report
    step = _goal_line(text, "one step", "cpu")
    assert step[4] == "11.5x faster" and step[5] == "**met**", step
    read = _goal_line(text, "vs the seed's read", "cpu")
    assert read[4] == "22.5x faster" and read[5] == "not met", read
    floor_read = _goal_line(text, "content_read, N=10^6, B=1, vs the floor", "cpu")
    assert floor_read[4] == "1.33x the time" and floor_read[5] == "**met**", floor_read
    write = _goal_line(text, "memory_write_, N=10^6", "cpu")
    assert write[4] == "2x the time" and write[5] == "**met**", write
    bwd = _goal_line(text, "forward+backward", "cpu")
    assert bwd[4] == "2x faster" and bwd[5] == "not met", bwd
    # torch.compile is a peer: it never stands in for our kernels in a goal
    assert not any("torch.compile" in line and "#3" in line for line in text.splitlines())


def test_issue9_goals(report):
    _, text = report
    step = _goal_line(text, "N=10^7, B=1, forward in place", "cpu")
    assert step[4] == "5x the time" and step[5] == "not met", step
    peak = _goal_line(text, "peak memory", "cpu")
    assert peak[4] == "2.1x the memory" and peak[5] == "**met**", peak


def test_replay_goals_found_generically(report):
    _, text = report
    tr = _goal_line(text, "replay sample, capacity 10^6, batch 256, vs torchrl", "neuralmem_fast")
    assert tr[4] == "16.5x faster" and tr[5] == "**met**", tr
    cp = _goal_line(text, "vs cpprb", "neuralmem_fast")
    assert cp[4] == "—" and cp[5].startswith("not measured"), cp
    seed = _goal_line(text, "ExperienceReplay.sample", "neuralmem_fast")
    assert seed[4] == "1900x faster" and seed[5] == "**met**", seed


def test_update_is_judged_with_sample_against_cpprb_and_the_torchrl_learner_loop_is_a_goal(report):
    _, text = report
    step = _goal_line(text, "replay update_priorities+sample, capacity 10^6, batch 256, vs cpprb", "neuralmem_fast")
    assert step[4] == "7.5x faster" and step[5] == "**met**", step
    assert "replay update_priorities, capacity 10^6, batch 256, vs cpprb" not in text
    loop = _goal_line(text, "TorchRL learner loop", "neuralmem_fast sampler")
    assert loop[4] == "1.25x faster" and loop[5] == "not met", loop


def test_group_tables_ratio_and_floor_fraction(report):
    _, text = report
    section = text.split("#### content_read fwd B1 N1000000 D64 H4")[1].split("####")[0]
    cpu = next(line for line in section.splitlines() if line.startswith("| cpu "))
    cells = [c.strip() for c in cpu.strip("|").split("|")]
    # speedup vs torch 0.2/0.04 = 5x; bandwidth 256 MB/0.04 s = 6.4 GB/s; of floor 0.03/0.04 = 0.75
    assert cells[5] == "5x", cells
    assert cells[6] == "256 MB" and cells[7] == "6.4" and cells[8] == "0.75", cells
    assert "| **torch** |" in section and "(baseline)" in section
    # small-N groups carry no bandwidth columns
    small = text.split("#### content_read fwd B1 N4096 D64 H4")[1].split("####")[0]
    assert "of floor" not in small and re.search(r"\| cpu \| 200 µs .*\| 5x \|", small)


def test_plot_written(report):
    out, text = report
    png = out / "ops_vs_n.png"
    assert png.exists() and png.stat().st_size > 1000
    assert "![time against N](ops_vs_n.png)" in text


def test_busy_machine_is_flagged(rr, report):
    _, text = report
    assert "Provisional" not in text  # load 0.1 on 2 cores: idle
    busy = synthetic()
    busy["machine_info"]["neuralmem"]["loadavg_start"] = [6.0, 4.0, 2.0]
    assert "machine was busy" in rr.busy_note(busy)


def test_missing_rows_are_not_measured(rr):
    rows = rr.load_rows({"benchmarks": []})
    for goal in rr.issue3_goals(rows):
        ((prov, value, status),) = goal.evaluate()
        assert value is None and status.startswith("not measured")


def test_round_planning_fills_max_time_and_is_capped():
    conf = load_script("benchmarks/conftest.py", "bench_conftest_under_test")
    # slow call: the minimum rounds win over max_time
    assert conf.plan_rounds(2.0, min_rounds=3, max_time=0.1) == (3, 1)
    # 10 ms call, 0.5 s budget: 50 rounds of one call
    assert conf.plan_rounds(0.01, min_rounds=3, max_time=0.5) == (50, 1)
    # 5 us call: looped to reach 20 us per round, rounds capped
    rounds, iterations = conf.plan_rounds(5e-6, min_rounds=3, max_time=1.0)
    assert iterations == 4 and rounds == conf.MAX_ROUNDS


def test_scale_sweep_is_tabulated_with_its_goals(rr, tmp_path):
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps(synthetic()))
    point = dict(provider="cpu", B=1, N=10_000_000, mode="fwd", status="ok", step_s=0.2, ratio_to_floor=3.5,
                 peak_ratio=1.05)
    scale = {"config": {"dim": 64, "heads": 4, "write_heads": 1}, "points": [point], "dropped": [],
             "goals": {"N": 10_000_000, "fwd_step_over_floor": {
                 "target": "<= 4x one memory.sum() pass", "results": {"cpu B1": {"value": 3.5, "met": True}}}}}
    sj = tmp_path / "scale.json"
    sj.write_text(json.dumps(scale))
    assert rr.main([str(bench), "--out", str(tmp_path), "--scale", str(sj)]) == 0
    text = (tmp_path / "REPORT.md").read_text()
    section = text.split("## Large-memory sweep")[1].split("## Results")[0]
    assert "cpu B1 3.5x (**met**)" in section
    assert "| 1 | 1e+07 | cpu | fwd | 200 ms | 3.5x | 1.05x |" in section


def test_hand_measured_sections_are_appended_in_name_order(rr, tmp_path):
    folder = tmp_path / "sections"
    folder.mkdir()
    (folder / "b.md").write_text("## Second\n\nrow b\n")
    (folder / "a.md").write_text("## First\n\nrow a\n")
    (folder / "notes.txt").write_text("not a section")
    lines = rr.extra_sections(str(folder))
    text = "\n".join(lines)
    assert text.index("## First") < text.index("## Second")
    assert "not a section" not in text
    assert rr.extra_sections(str(tmp_path / "absent")) == []


def test_rendered_report_keeps_the_sections_folder(report):
    _, text = report
    for name in sorted(os.listdir(os.path.join(os.path.dirname(__file__), "..", "benchmarks", "sections"))):
        if name.endswith(".md"):
            heading = open(os.path.join(os.path.dirname(__file__), "..", "benchmarks", "sections", name)).readline()
            assert heading.strip() in text
