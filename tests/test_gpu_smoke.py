"""The GPU smoke check (make gpu-smoke) and the GPU check's fail-fast, as far as a machine without a GPU can check them.

The scripts parse, the Python part imports, its case lists reach what they
claim (split and multi-tile paths, misaligned views, indices past 2^31, the
16M-slot bandwidth probe), its op sequence runs on CPU against the
reference, and both scripts refuse to run without a card.
"""
import os
import subprocess
import sys

import pytest
import torch

import neuralmem_fast as nm
from tests.helpers import REPO, load_script


def _smoke():
    return load_script("scripts/gpu_smoke.py", "gpu_smoke")


@pytest.mark.parametrize("script", ["gpu_smoke.sh", "gpu_check.sh"])
def test_scripts_parse(script):
    res = subprocess.run(["bash", "-n", os.path.join(REPO, "scripts", script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_makefile_targets():
    text = open(os.path.join(REPO, "Makefile")).read()
    assert "gpu-smoke:" in text and "scripts/gpu_smoke.sh" in text and "gpu-check:" in text


def test_case_lists():
    s = _smoke()
    tiny = s.cases("tiny")
    assert {c["backend"] for c in tiny} == {"cuda", "triton"}
    assert {c["dtype"] for c in tiny} == {"float32", "float16"}
    assert {c["misaligned"] for c in tiny} == {True, False}
    # several CUDA splits (kMinChunk = 1024 slots each) and two column tiles (256 columns each)
    assert any(c["shape"][1] >= 2 * 1024 for c in tiny)
    assert any(c["shape"][3] > 256 for c in tiny)
    assert any(c["shape"][2] > 4 for c in tiny)  # more heads than one CUDA head group
    assert {c["backend"] for c in s.cases("tiny", "racecheck")} == {"cuda"}
    parity = s.cases("parity")
    assert {c["shape"][3] for c in parity} == {64, 300} and all(c["shape"][1] >= 300_000 for c in parity)
    large = s.cases("large")
    assert all(s.elements(c) >= 2**31 for c in large)
    hn = [c for c in large if c["kind"] == "weights_hn"]
    assert hn and all((c["shape"][2] - 1) * c["shape"][1] >= 2**31 for c in hn)
    nd = [c for c in large if c["kind"] == "memory_nd"]
    assert nd and all(c["shape"][1] * c["shape"][3] >= 2**31 for c in nd)
    bw = s.cases("bandwidth")
    assert bw and all(c["shape"][1] == 1 << 24 for c in bw)
    sp = s.cases("sparse")
    assert any(c["shape"][4] == 64 and c["shape"][1] > 65536 for c in sp)  # k at the CUDA limit, several splits
    assert len(s.cases("all")) == len(parity) + len(large) + len(bw) + len(sp)
    with pytest.raises(ValueError):
        s.cases("nope")


@pytest.mark.skipif(not nm.has_extension(), reason="needs the native extension")
@pytest.mark.parametrize("misaligned", [False, True])
def test_op_sequence_runs_on_cpu(misaligned):
    """The smoke's op sequence, on CPU tensors: the native CPU kernels against the reference."""
    s = _smoke()
    case = dict(part="tiny", shape=(2, 37, 5, 33, 2), dtype="float32", misaligned=misaligned)
    x = s._inputs(case, device="cpu")
    got, want = s.run_ops(x, "cpu"), s.run_ops(x, "torch")
    assert len(got) == len(want) == 34
    for i, (a, b) in enumerate(zip(got, want)):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m: f"output {i}: {m}")
        else:
            assert torch.equal(a, b), i


@pytest.mark.skipif(not nm.has_extension(), reason="needs the native extension")
def test_sparse_check_runs_on_cpu():
    """The smoke's sparse check, on CPU tensors (the CPU kernels against the references)."""
    s = _smoke()
    s.check_sparse(dict(part="sparse", backend="cpu", shape=(2, 301, 3, 17, 8), dtype="float32"), device="cpu")


@pytest.mark.skipif(not nm.has_extension(), reason="needs the native extension")
def test_reversible_check_runs_on_cpu():
    """The smoke's reversible check, on CPU tensors through the CPU kernels."""
    _smoke().check_reversible("cpu", device="cpu")


def test_dry_run_lists_every_part(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    res = subprocess.run(["bash", os.path.join(REPO, "scripts", "gpu_smoke.sh"), str(tmp_path), "--dry-run"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    for part in ("preflight", "sanitize-memcheck", "sanitize-racecheck", "sanitize-synccheck", "parity", "large",
                 "bandwidth", "sparse"):
        assert f"[{part}" in res.stdout, part
    assert "would run: large weights_hn cuda" in res.stdout
    assert "would run: reversible_read_write cuda" in res.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a card")
@pytest.mark.parametrize("script", ["gpu_smoke.sh", "gpu_check.sh"])
def test_refuses_without_a_card(tmp_path, script):
    env = dict(os.environ, PYTHON=sys.executable)
    res = subprocess.run(["bash", os.path.join(REPO, "scripts", script), str(tmp_path)], capture_output=True,
                         text=True, env=env, timeout=300)
    assert res.returncode == 1
    assert "no CUDA device" in res.stdout + res.stderr
