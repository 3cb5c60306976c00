"""The GPU backend table of backend="auto": built from a bench JSON, read by resolve().

No GPU is needed: the bench JSON is synthetic (the layout pytest-benchmark
writes, with the extra_info of benchmarks/test_bench_ops.py), and device
availability and card names are monkeypatched.
"""
import datetime
import json
import os

import pytest
import torch

from neuralmem_fast.apps import autotune, bench, cli
from neuralmem_fast.ops import dispatch as backends
from neuralmem_fast.ops import registry

CARD = "Synthetic GPU A"
US = 1e-6
CUDA = torch.device("cuda")


def row(op, mode, N, B, provider, median_us, device="cuda", device_key=True, **extra):
    """A row as benchmarks/conftest.py's measure() saves it; device_key=False leaves only the group's suffix."""
    group = f"{op} {mode} B{B} N{N} D64" + (f" [{device}]" if device != "cpu" else "")
    info = dict(provider=provider, op=op, mode=mode, N=N, B=B, D=64, dtype="float32", **extra)
    if device_key:
        info["device"] = device
    stats = None if median_us is None else {"median": median_us * US, "iqr": 0.0, "rounds": 5}
    return {"group": group, "name": f"test_op[{op}-{mode}-B{B}-N{N}-{provider}]",
            "fullname": f"benchmarks/test_bench_ops.py::test_op[{op}-{mode}-B{B}-N{N}-{provider}]",
            "extra_info": info, "stats": stats}


def synthetic_rows():
    rows = []
    # content_read, forward+backward: triton wins up to N=4096, cuda above.
    # At N=4096 triton wins B=1 (10 vs 12) and loses B=32 (100 vs 90): by the
    # geometric mean triton (31.6) beats cuda (32.9), by the sum it would not.
    fb = {128: [(1, 5, 8), (32, 20, 30)], 4096: [(1, 10, 12), (32, 100, 90)],
          65536: [(1, 200, 150)], 1_000_000: [(1, 3000, 2000)], 10_000_000: [(1, 30000, 20000)]}
    for N, cases in fb.items():
        for B, tri, cu in cases:
            rows += [row("content_read", "fwd+bwd", N, B, "triton", tri), row("content_read", "fwd+bwd", N, B, "cuda", cu)]
    # content_read forward alone: cuda everywhere; must not decide where fwd+bwd rows exist.
    for N in (128, 4096, 65536, 1_000_000):
        rows += [row("content_read", "fwd", N, 1, "triton", 50), row("content_read", "fwd", N, 1, "cuda", 1)]
    # memory_write_ (forward only; rows without a "device" key, the group's
    # suffix says cuda): triton wins where it ran; at N=10^6 its row is missing.
    for N in (128, 4096, 65536):
        rows += [row("memory_write_", "fwd", N, 1, "triton", 1, device_key=False),
                 row("memory_write_", "fwd", N, 1, "cuda", 2, device_key=False)]
    rows += [row("memory_write_", "fwd", 1_000_000, 1, "cuda", 500, device_key=False)]
    # usage_update: three runs.
    for N, tri, cu in ((128, 3, 2), (4096, 3, 4), (65536, 30, 20)):
        rows += [row("usage_update", "fwd+bwd", N, 1, "triton", tri), row("usage_update", "fwd+bwd", N, 1, "cuda", cu)]
    # content_addressing: at N=128 the backends measured different batch
    # sizes (nothing to compare: undecided); at N=4096 cuda wins.
    rows += [row("content_addressing", "fwd", 128, 1, "cuda", 5), row("content_addressing", "fwd", 128, 32, "triton", 1),
             row("content_addressing", "fwd", 4096, 1, "cuda", 5), row("content_addressing", "fwd", 4096, 1, "triton", 6)]
    # Rows that must not count: peers (faster than both), the floor, the
    # step (not an op resolve() is asked about), CPU rows, a skipped row.
    rows += [row("content_read", "fwd+bwd", 128, 1, "torch", 0.1, baseline=True),
             row("content_read", "fwd+bwd", 65536, 1, "torch.compile", 0.1),
             row("floor", "fwd", 65536, 1, "floor: memory.sum()", 0.1, floor=True),
             row("step", "fwd", 128, 1, "triton", 0.1), row("step", "fwd", 128, 1, "cuda", 9),
             row("content_read", "fwd+bwd", 65536, 1, "triton", 0.1, device="cpu"),
             row("memory_write_", "fwd", 1_000_000, 1, "triton", None)]
    return rows


def bench_json(rows, card=CARD):
    return {"machine_info": {"neuralmem": {"cuda_device": card, "torch": "2.99.0+test", "date": "2026-01-02 03:04 UTC",
                                           "quick": False, "bench_device": "cuda"}},
            "datetime": "2026-01-02T03:04:05", "version": "5.1.0", "benchmarks": rows}


EXPECTED = {
    "cuda": {
        "content_read": [[4096, "triton"], [None, "cuda"]],
        "memory_write_": [[65536, "triton"], [None, "cuda"]],
        "usage_update": [[128, "cuda"], [4096, "triton"], [None, "cuda"]],
        "content_addressing": [[None, "cuda"]],
    }
}
ENV = {"torch": "2.99.0+env", "triton": "9.9.9", "cuda": "13.0", "card": None}
NOW = datetime.datetime(2026, 1, 3, 4, 5, tzinfo=datetime.timezone.utc)


@pytest.fixture
def built():
    return autotune.build_table(bench_json(synthetic_rows()), source="run/bench.json", env=ENV, now=NOW)


@pytest.fixture
def table_file(monkeypatch, tmp_path):
    """backends reads (and an install writes) a table in tmp_path, never the package's."""
    path = tmp_path / "installed" / "autotune_table.json"
    monkeypatch.setenv("NEURALMEM_AUTOTUNE_TABLE", str(path))
    monkeypatch.setattr(backends, "PACKAGE_TABLE_PATH", str(tmp_path / "package" / "autotune_table.json"))
    backends.reload_table()
    yield path
    backends.reload_table()


def use_table(monkeypatch, table, avail=("cuda", "triton", "torch")):
    monkeypatch.setattr(backends, "_table", lambda: table)
    real = backends.available_backends
    monkeypatch.setattr(backends, "available_backends",
                        lambda device="cpu": list(avail) if torch.device(device).type == "cuda" else real(device))


# --------------------------------------------------------------------------
# building the table
# --------------------------------------------------------------------------
def test_table_from_synthetic_bench(built):
    assert {k: v for k, v in built.items() if k != "_meta"} == EXPECTED


def test_meta_records_card_versions_and_medians(built):
    meta = built["_meta"]
    assert meta["card"] == CARD
    assert meta["torch"] == "2.99.0+test"  # the bench run's own record wins over the builder's environment
    assert meta["triton"] == "9.9.9"  # not in the bench JSON: the builder's
    assert meta["built_with"] == {"torch": "2.99.0+env", "triton": "9.9.9", "cuda": "13.0"}
    assert meta["measured"] == "2026-01-02 03:04 UTC" and meta["built"] == "2026-01-03 04:05 UTC"
    assert meta["bench_json"] == "bench.json" and meta["schema"] == autotune.SCHEMA
    by_n = {d["N"]: d for d in meta["decisions"]["cuda"]["content_read"]}
    assert sorted(by_n) == [128, 4096, 65536, 1_000_000, 10_000_000]
    d = by_n[4096]
    assert d["mode"] == "fwd+bwd" and d["choice"] == "triton" and d["B"] == [1, 32]
    assert d["median_s"]["cuda"] == pytest.approx({"1": 12 * US, "32": 90 * US})
    assert d["median_s"]["triton"] == pytest.approx({"1": 10 * US, "32": 100 * US})
    assert d["score_s"]["triton"] == pytest.approx(1000 ** 0.5 * US)
    assert by_n[128]["fwd_alone_would_choose"] == "cuda"
    assert "fwd_alone_would_choose" not in by_n[65536]  # cuda either way
    skipped = meta["decisions"]["cuda"]["content_addressing"][0]
    assert skipped["N"] == 128 and "share no batch size" in skipped["skipped"]
    write = {d["N"]: d for d in meta["decisions"]["cuda"]["memory_write_"]}
    assert write[1_000_000]["median_s"] == {"cuda": {"1": pytest.approx(500 * US)}}


def test_table_is_json_and_round_trips(built, tmp_path):
    path = autotune.write_table(built, str(tmp_path / "t.json"))
    assert json.loads(open(path).read()) == json.loads(json.dumps(built))


@pytest.mark.parametrize("decisions, runs", [
    ([(128, "cuda")], [[None, "cuda"]]),
    ([(4096, "cuda"), (128, "cuda"), (65536, "cuda")], [[None, "cuda"]]),
    ([(128, "triton"), (4096, "triton"), (65536, "cuda"), (10**6, "cuda")], [[4096, "triton"], [None, "cuda"]]),
    ([(10**6, "triton"), (128, "cuda"), (4096, "triton")], [[128, "cuda"], [None, "triton"]]),
    ([(1, "cuda"), (2, "triton"), (3, "cuda"), (4, "triton")], [[1, "cuda"], [2, "triton"], [3, "cuda"], [None, "triton"]]),
    ([], []),
], ids=["one", "one-run-unsorted", "two-runs", "unsorted-two-runs", "alternating", "empty"])
def test_compress(decisions, runs):
    assert autotune.compress(decisions) == runs


def test_duplicate_rows_take_the_median_of_their_medians():
    rows = [row("memory_read", "fwd", 128, 1, "cuda", t) for t in (1, 2, 9)]
    rows += [row("memory_read", "fwd", 128, 1, "triton", t) for t in (3, 3)]
    t = autotune.build_table(bench_json(rows), env=ENV)
    assert t["cuda"]["memory_read"] == [[None, "cuda"]]  # cuda's median 2 < triton's 3; its mean (4) would not be
    assert t["_meta"]["decisions"]["cuda"]["memory_read"][0]["median_s"]["cuda"]["1"] == pytest.approx(2 * US)


def test_ties_go_to_cuda():
    rows = [row("memory_read", "fwd", 128, 1, "triton", 5), row("memory_read", "fwd", 128, 1, "cuda", 5)]
    assert autotune.build_table(bench_json(rows), env=ENV)["cuda"]["memory_read"] == [[None, "cuda"]]


@pytest.mark.parametrize("rows", [
    [],
    [row("content_read", "fwd", 128, 1, "cpu", 1, device="cpu"), row("content_read", "fwd", 128, 1, "torch", 2, device="cpu")],
    [row("content_read", "fwd", 128, 1, "torch", 1), row("step", "fwd", 128, 1, "cuda", 1)],
], ids=["no-rows", "cpu-run", "gpu-run-without-candidates"])
def test_no_gpu_rows_is_a_clear_error(rows):
    with pytest.raises(autotune.TableError, match=r"^results/cpu-bench\.json: no GPU rows"):
        autotune.build_table(bench_json(rows), source="results/cpu-bench.json", env=ENV)


def test_malformed_row_names_the_source():
    bad = row("content_read", "fwd", 128, 1, "cuda", 1)
    bad["extra_info"]["N"] = "many"
    with pytest.raises(autotune.TableError, match=r"^x\.json: a benchmark row is malformed"):
        autotune.build_table(bench_json([bad]), source="x.json", env=ENV)


def test_not_a_bench_object_names_the_source():
    with pytest.raises(autotune.TableError, match=r"^x\.json: not a pytest-benchmark JSON object"):
        autotune.build_table([1, 2], source="x.json")


# --------------------------------------------------------------------------
# resolve() following the table
# --------------------------------------------------------------------------
@pytest.mark.parametrize("op, n, expected", [
    ("content_read", 1, "triton"), ("content_read", 128, "triton"), ("content_read", 4096, "triton"),
    ("content_read", 4097, "cuda"), ("content_read", 10**9, "cuda"),
    ("memory_write_", 65536, "triton"), ("memory_write_", 65537, "cuda"),
    ("usage_update", 128, "cuda"), ("usage_update", 129, "triton"), ("usage_update", 4097, "cuda"),
    ("memory_read", 128, "cuda"),  # no entry: the default
], ids=lambda v: str(v))
def test_resolve_follows_the_table(monkeypatch, built, op, n, expected):
    use_table(monkeypatch, built)
    assert backends.resolve("auto", op, CUDA, n) == expected


@pytest.mark.parametrize("avail, op, n, expected", [
    (("cuda", "torch"), "content_read", 128, "cuda"),       # triton missing
    (("triton", "torch"), "content_read", 10**6, "triton"),  # CUDA kernels not built
    (("torch",), "content_read", 128, "torch"),
    (("torch",), "content_read", 10**6, "torch"),
], ids=["no-triton", "no-cuda-kernels", "nothing-small", "nothing-large"])
def test_resolve_falls_back_when_the_table_names_a_missing_backend(monkeypatch, built, avail, op, n, expected):
    use_table(monkeypatch, built, avail)
    assert backends.resolve("auto", op, CUDA, n) == expected


def test_table_does_not_apply_to_cpu_tensors(monkeypatch, built):
    use_table(monkeypatch, built)
    assert backends.resolve("auto", "content_read", torch.device("cpu"), 128) in ("cpu", "torch")
    assert backends.resolve("auto", "content_read", torch.device("cpu"), 128) != "triton"


def test_explicit_backend_ignores_the_table(monkeypatch, built):
    use_table(monkeypatch, built)
    assert backends.resolve("cuda", "content_read", CUDA, 128) == "cuda"


def test_auto_choice_reports_the_card(monkeypatch, built):
    use_table(monkeypatch, built)
    monkeypatch.setattr(backends, "_device_name", lambda device: CARD)
    c = backends.auto_choice("content_read", "cuda", 128)
    assert (c["backend"], c["source"], c["table_card"], c["same_card"]) == ("triton", "table", CARD, True)
    assert "this card" in c["reason"]

    monkeypatch.setattr(backends, "_device_name", lambda device: "Synthetic GPU B")
    c = backends.auto_choice("content_read", "cuda", 128)
    assert (c["backend"], c["source"], c["same_card"]) == ("triton", "table", False)  # still followed
    assert "another card" in c["reason"] and CARD in c["reason"] and "Synthetic GPU B" in c["reason"]

    c = backends.auto_choice("memory_read", "cuda", 128)
    assert (c["backend"], c["source"], c["table_backend"]) == ("cuda", "default", None)
    assert "no entry for memory_read" in c["reason"]


def test_auto_choice_says_when_it_falls_back(monkeypatch, built):
    use_table(monkeypatch, built, avail=("cuda", "torch"))
    c = backends.auto_choice("content_read", "cuda", 128)
    assert (c["backend"], c["source"], c["table_backend"]) == ("cuda", "default", "triton")
    assert "cannot run here" in c["reason"]


def test_auto_choice_without_a_table(table_file):
    c = backends.auto_choice("content_read", "cuda", 128)
    assert c["source"] == "default" and c["table_backend"] is None and "no table" in c["reason"]


def test_installed_table_is_read_back(table_file, built):
    autotune.install_table(built)
    assert json.loads(table_file.read_text())["cuda"] == EXPECTED["cuda"]
    assert backends._from_table("content_read", "cuda", 4097) == "cuda"
    assert backends._from_table("content_read", "cuda", 100) == "triton"
    assert backends.table_meta()["card"] == CARD


# --------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------
def write_bench(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def strip_built(table):
    table = json.loads(json.dumps(table))
    table["_meta"].pop("built")
    return table


def test_cli_writes_the_table_beside_the_json(tmp_path, table_file, capsys):
    src = write_bench(tmp_path / "run" / "bench.json", bench_json(synthetic_rows()))
    assert cli.main(["autotune", str(src)]) == 0
    out = tmp_path / "run" / "autotune_table.json"
    written = json.loads(out.read_text())
    assert {k: v for k, v in written.items() if k != "_meta"} == EXPECTED
    assert strip_built(written) == strip_built(autotune.build_table(bench_json(synthetic_rows()), source=str(src)))
    assert not table_file.exists()  # not installed without --install
    text = capsys.readouterr().out
    assert CARD in text and "triton for N <= 4096, cuda for N > 4096" in text


def test_cli_install(tmp_path, table_file):
    src = write_bench(tmp_path / "bench.json", bench_json(synthetic_rows()))
    out = tmp_path / "elsewhere" / "table.json"
    assert cli.main(["autotune", str(src), "--out", str(out), "--install", "--bench-command", "make gpu-check"]) == 0
    assert json.loads(out.read_text())["_meta"]["bench_command"] == "make gpu-check"
    assert json.loads(table_file.read_text())["cuda"] == EXPECTED["cuda"]
    assert backends._from_table("memory_write_", "cuda", 10**6) == "cuda"


def test_cli_show(tmp_path, capsys, built):
    path = autotune.write_table(built, str(tmp_path / "t.json"))
    assert cli.main(["autotune", "--show", "--table", path]) == 0
    text = capsys.readouterr().out
    assert f"measured on {CARD}" in text
    assert "usage_update" in text and "cuda for N <= 128, triton for 128 < N <= 4096, cuda for N > 4096" in text


@pytest.mark.parametrize("content, message", [
    (json.dumps(bench_json([row("content_read", "fwd", 128, 1, "cpu", 1, device="cpu")])), "no GPU rows"),
    ("{not json", "not valid JSON"),
    (None, "cannot read"),
], ids=["cpu-only", "not-json", "missing"])
def test_cli_bad_input_names_the_file(tmp_path, capsys, content, message):
    src = tmp_path / "some-bench.json"
    if content is not None:
        src.write_text(content)
    assert cli.main(["autotune", str(src)]) == 2
    err = capsys.readouterr().err
    assert str(src) in err and message in err
    assert not (tmp_path / "autotune_table.json").exists()


@pytest.fixture
def fake_gpu_bench(monkeypatch):
    """bench.main with a visible 'GPU' whose pytest run writes the synthetic JSON; returns the commands run."""
    class Calls(list):
        pass

    calls = Calls()

    def fake_call(cmd, cwd=None, env=None):
        calls.append(cmd)
        rc = getattr(fake_call, "rc", 0)
        path = next(a.split("=", 1)[1] for a in cmd if a.startswith("--benchmark-json="))
        with open(path, "w") as f:
            json.dump(bench_json(synthetic_rows()), f)
        return rc

    class Renderer:
        @staticmethod
        def main(argv):
            calls.append(["render"] + argv)

    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench.subprocess, "call", fake_call)
    monkeypatch.setattr(bench, "_load_renderer", lambda: Renderer)
    calls.fake_call = fake_call
    return calls


def test_bench_gpu_writes_and_installs_the_table(tmp_path, table_file, fake_gpu_bench):
    out = tmp_path / "gpu-results"
    assert bench.main(["--gpu", "--out", str(out)]) == 0
    assert "--bench-device=cuda" in fake_gpu_bench[0]
    written = json.loads((out / "autotune_table.json").read_text())
    assert written["cuda"] == EXPECTED["cuda"]
    assert written["_meta"]["bench_command"] == f"python -m neuralmem_fast bench --gpu --out {out}"
    assert not table_file.exists()

    assert bench.main(["--gpu", "--write-table", "--out", str(out)]) == 0
    assert json.loads(table_file.read_text())["cuda"] == EXPECTED["cuda"]


def test_bench_failed_run_keeps_but_does_not_install_the_table(tmp_path, table_file, fake_gpu_bench, capsys):
    fake_gpu_bench.fake_call.rc = 1
    out = tmp_path / "gpu-results"
    assert bench.main(["--gpu", "--write-table", "--out", str(out)]) == 1
    assert (out / "autotune_table.json").exists()
    assert not table_file.exists()
    assert "not installed" in capsys.readouterr().err


def test_bench_write_table_needs_gpu(tmp_path, capsys):
    assert bench.main(["--write-table", "--out", str(tmp_path)]) == 2
    assert "--write-table needs --gpu" in capsys.readouterr().err


def test_package_table_if_present_is_well_formed():
    """A checked-in table must be one resolve() can read, with the card it was measured on."""
    path = backends.PACKAGE_TABLE_PATH
    if not os.path.exists(path):
        pytest.skip("no table checked in yet (written by `python -m neuralmem_fast bench --gpu --write-table`)")
    table = json.loads(open(path).read())
    assert table["_meta"]["card"] not in (None, "", "unknown")
    for dev, ops in table.items():
        if dev.startswith("_"):
            continue
        for op, runs in ops.items():
            assert op in registry.public_ops(), op
            assert runs and runs[-1][0] is None, (op, runs)
            ns = [n for n, _ in runs[:-1]]
            assert ns == sorted(set(ns)), (op, runs)
            assert all(b in backends.BACKENDS and b != "auto" for _, b in runs), (op, runs)


def test_bench_says_what_it_needs_when_the_suites_are_not_there(tmp_path, capsys, monkeypatch):
    """An installed package has no benchmarks/: the runner says so and how to point it at a copy."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench, "PACKAGE_ROOT", str(tmp_path / "site-packages" / "neuralmem_fast"))
    monkeypatch.delenv("NEURALMEM_BENCH_DIR", raising=False)
    assert bench.main(["--quick"]) == 2
    err = capsys.readouterr().err
    assert "were not found" in err and "--suites" in err
    assert bench.find_suites(os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks")) is not None


def test_the_user_table_comes_before_the_package_table(tmp_path, monkeypatch, built):
    user, package = tmp_path / "user.json", tmp_path / "package.json"
    monkeypatch.setenv("NEURALMEM_AUTOTUNE_TABLE", str(user))
    monkeypatch.setattr(backends, "PACKAGE_TABLE_PATH", str(package))
    autotune.write_table({"cuda": {"content_read": [[None, "triton"]]}, "_meta": {"card": "package card"}},
                         str(package))
    backends.reload_table()
    try:
        assert backends.table_meta()["card"] == "package card"
        assert autotune.install_table(built) == str(user)
        assert backends.table_meta()["card"] == CARD
        assert backends.table_path_in_use() == str(user)
    finally:
        monkeypatch.undo()
        backends.reload_table()
