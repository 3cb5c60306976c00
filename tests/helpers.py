"""Shared test helpers: devices, the tolerance table, readable comparisons."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

SEED_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "seed", "seed_tutorial.py")

# One tolerance table for every comparison with the reference.
TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-8),
    torch.float32: dict(atol=2e-5, rtol=2e-4),
    torch.float16: dict(atol=3e-3, rtol=3e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}

DTYPE_ID = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


def assert_close(actual, expected, dtype=None, name="output", tol_scale=1.0):
    """torch.testing.assert_close with the table's tolerance and a named message."""
    tol = TOL[dtype or expected.dtype]
    torch.testing.assert_close(
        actual.to(expected.dtype), expected,
        atol=tol["atol"] * tol_scale, rtol=tol["rtol"] * tol_scale,
        msg=lambda m: f"{name}: {m}",
    )


def shape_id(**dims):
    """Readable ids: B3-N7-H4-D64-fp32."""
    parts = []
    for k, v in dims.items():
        parts.append(DTYPE_ID[v] if isinstance(v, torch.dtype) else f"{k}{v}")
    return "-".join(parts)


REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def load_script(relpath, name, on_path=False):
    """A script of the repository (`relpath` from its root, e.g. "benchmarks/render_report.py") as a module
    named `name`; with on_path, the script's folder is on sys.path while it runs (for its own imports)."""
    import importlib.util

    path = os.path.join(REPO, relpath)
    folder = os.path.dirname(path)
    if on_path:
        sys.path.insert(0, folder)
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        if on_path:
            sys.path.remove(folder)
    return mod


def assert_refuses_argument(main, argv, flag, capsys):
    """A script's main(argv) exits as argparse does on a bad argument (code 2), naming `flag` on stderr."""
    import pytest

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert flag in capsys.readouterr().err


def load_seed():
    """The seed tutorial's module when its file is present (as in CI), else skip."""
    import importlib.util
    import sys

    path = os.path.abspath(SEED_PATH)
    if not os.path.exists(path):
        pytest.skip("the seed tutorial file is not present")
    if "seed_tutorial" in sys.modules:
        return sys.modules["seed_tutorial"]
    import matplotlib

    matplotlib.use("Agg")
    spec = importlib.util.spec_from_file_location("seed_tutorial", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["seed_tutorial"] = mod
    spec.loader.exec_module(mod)
    return mod


def isa_supported(isa: str) -> bool:
    """Whether this processor can run the CPU kernels built for `isa` (default, avx2, avx512)."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        pass
    need = {"default": [], "avx2": ["avx2", "fma"], "avx512": ["avx512f", "avx512bw", "avx512vl", "avx512dq"]}[isa]
    return all(f" {n}" in flags for n in need)


def run_on_instruction_set(isa: str, script: str) -> None:
    """Runs `script` (python -c) in a fresh process whose CPU kernels are the
    `isa` build (NEURALMEM_CPU_CAPABILITY), skipping when this processor lacks
    it; the script must print "ok" last."""
    if not isa_supported(isa):
        pytest.skip(f"this processor lacks {isa}")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, NEURALMEM_CPU_CAPABILITY=isa, PYTHONPATH=root)
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-4000:]


def make_inputs(B, N, D, H, W, dtype=torch.float32, device="cpu", seed=0):
    """Controller-like values: softplus strengths, sigmoid erase, tanh add."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    t = dict(
        memory=rnd(B, N, D),
        keys=rnd(B, H, D),
        strengths=F.softplus(rnd(B, H)) * 3,
        weights=torch.softmax(rnd(B, H, N) * 2, dim=-1),
        wweights=torch.softmax(rnd(B, W, N) * 2, dim=-1),
        wkeys=rnd(B, W, D),
        wstrengths=F.softplus(rnd(B, W)) * 3,
        erase=torch.sigmoid(rnd(B, W, D)),
        add=torch.tanh(rnd(B, W, D)),
        usage=torch.rand(B, N, generator=g, dtype=torch.float64) * 3,
    )
    return {k: v.to(dtype=dtype, device=device) for k, v in t.items()}


def short_copy_run(core, steps=300):
    """Trains `core` on copy (lengths 1-3, 4 bits) for `steps` steps of batch 16 with Adam (lr 1e-2);
    returns its loss on 64 held-out sequences before and after."""
    from neuralmem_fast.apps.memory_tasks import copy_batch, sequence_loss

    opt = torch.optim.Adam(core.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    test = copy_batch(64, bits=4, min_len=1, max_len=3, generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        untrained = float(sequence_loss(core(test[0])[0], test[1], test[2]))
    for _ in range(steps):
        x, target, mask = copy_batch(16, bits=4, min_len=1, max_len=3, generator=gen)
        loss = sequence_loss(core(x)[0], target, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        trained = float(sequence_loss(core(test[0])[0], test[1], test[2]))
    return untrained, trained
