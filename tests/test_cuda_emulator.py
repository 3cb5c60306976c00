"""The CUDA kernels' source, run on the CPU in an emulation of the CUDA execution model (csrc/cuda/emu).

No GPU needed: emulate.py rewrites the .cu sources mechanically, builds them
with the host compiler against emu.h (one OS thread per CUDA thread) and
compares every op, content_read_write_ included, with its reference in
float64, float32 (misaligned rows), float16 and bfloat16. --quick takes one
shape that still reaches the split path, head groups and two column tiles.
"""
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="needs a C++20 compiler")
def test_cuda_kernels_in_the_emulator():
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, os.path.join(REPO, "csrc", "cuda", "emu", "emulate.py"), "all", "--quick",
                          "--build-dir", os.path.join(REPO, "build", "emu")], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=1200)
    out = res.stdout + res.stderr[-3000:]
    assert res.returncode == 0, out[-6000:]
    assert "FAILURES: 0" in res.stdout, out[-6000:]
    # every op was compared, in every dtype
    compared = set(res.stdout.split("compared:")[1].splitlines()[0].strip().split(", "))
    want = {"addr", "read", "lse", "mread", "read_bwd dm", "read_bwd dk", "read_bwd db", "addr_bwd dm", "addr_bwd dk",
            "addr_bwd db", "mread_bwd dm", "mread_bwd dw", "write", "write_", "usage", "write_bwd dm", "write_bwd dw",
            "write_bwd de", "write_bwd da", "cwrite mem", "cwrite usage", "rw reads", "rw mem", "rw usage"}
    assert want <= compared, sorted(want - compared)
    assert res.stdout.count("done ") == 4, res.stdout[-2000:]
