"""Shared fixtures of the benchmark suites (pytest-benchmark).

Every suite under benchmarks/ follows one convention, which the renderer
(render_report.py) relies on: `benchmark.group` is a readable case name,
`benchmark.extra_info` holds "provider", "baseline": True on exactly one row
per group (the row ratios are taken against), "bytes" where a bandwidth floor
applies, and "N", "B" where relevant. `measure` below fills these in.

Options (also settable through the environment, so that `python -m
neuralmem_fast bench` and a bare `pytest benchmarks` agree):
  --bench-quick   / NEURALMEM_BENCH_QUICK=1   the short subset (small N + goal rows)
  --bench-device  / NEURALMEM_BENCH_DEVICE    "cpu" (default) or "cuda"
The seed tutorial is looked for at ../shared/seed/seed_tutorial.py relative
to the repository root, or at NEURALMEM_SEED_PATH; its rows skip when absent.
"""
import datetime
import importlib.util
import math
import os
import platform
import sys

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED_DEFAULT = os.path.join(REPO_ROOT, "..", "shared", "seed", "seed_tutorial.py")

# Above this memory size a sweep case is not run: the reference's fwd+bwd
# holds many copies of the memory (B=32, N=65536, 512 MiB of memory, peaked
# near 9 GB resident and took tens of seconds per call on a 2-core machine).
# B=1 at N=10^6 (244 MiB) stays in; B=32 stops at N=4096.
MAX_MEMORY_BYTES = 256 << 20


def pytest_addoption(parser):
    group = parser.getgroup("neuralmem benchmarks")
    group.addoption("--bench-quick", action="store_true", default=None,
                    help="run the short subset: small N plus the rows the issues set goals on")
    group.addoption("--bench-device", default=None, choices=("cpu", "cuda"),
                    help="device of the memory-op cases (default cpu)")


def _truthy(value):
    return str(value).lower() in ("1", "true", "yes", "on")


def is_quick(config):
    opt = config.getoption("--bench-quick", default=None)
    return bool(opt) if opt is not None else _truthy(os.environ.get("NEURALMEM_BENCH_QUICK", "0"))


def bench_device_of(config):
    dev = config.getoption("--bench-device", default=None) or os.environ.get("NEURALMEM_BENCH_DEVICE", "cpu")
    return torch.device(dev)


def pytest_configure(config):
    # Suites parametrize at collection time from these; exporting them keeps
    # a suite that reads only the environment consistent with the options.
    os.environ["NEURALMEM_BENCH_QUICK"] = "1" if is_quick(config) else "0"
    os.environ["NEURALMEM_BENCH_DEVICE"] = bench_device_of(config).type
    config._neuralmem_load_start = _loadavg()


@pytest.fixture(scope="session")
def quick(request):
    return is_quick(request.config)


@pytest.fixture(scope="session")
def bench_device(request):
    dev = bench_device_of(request.config)
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda but no CUDA device is present")
    return dev


def seed_path():
    return os.path.abspath(os.environ.get("NEURALMEM_SEED_PATH") or SEED_DEFAULT)


def load_seed_module():
    """The seed tutorial as a module, or None when its file is absent."""
    if "seed_tutorial" in sys.modules:
        return sys.modules["seed_tutorial"]
    path = seed_path()
    if not os.path.exists(path):
        return None
    import matplotlib

    matplotlib.use("Agg")  # the seed imports pyplot at module level
    spec = importlib.util.spec_from_file_location("seed_tutorial", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["seed_tutorial"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def seed_module():
    mod = load_seed_module()
    if mod is None:
        pytest.skip(f"the seed tutorial is not present at {seed_path()} (set NEURALMEM_SEED_PATH)")
    return mod


def _sync_wrapper(fn, device):
    if device.type != "cuda":
        return fn

    def timed():
        out = fn()
        # Kernels are asynchronous: the call is over only when the stream is.
        torch.cuda.synchronize(device)
        return out

    return timed


MAX_ROUNDS = 2000
MIN_ROUND_TIME = 20e-6  # below this a round loops the call, so timer overhead stays small


def plan_rounds(call_time, min_rounds, max_time, max_rounds=MAX_ROUNDS):
    """(rounds, iterations) that fill about max_time, from a measured time per call.

    pytest-benchmark's own calibration picks rounds from one fast sample; on a
    machine shared with other jobs a later slow spell then multiplies the run
    time. Planning from the median of the warm-up calls, with a cap on rounds,
    keeps a subset's duration predictable.
    """
    call_time = max(call_time, 1e-9)
    iterations = 1 if call_time >= MIN_ROUND_TIME else math.ceil(MIN_ROUND_TIME / call_time - 1e-9)
    rounds = int(round(max_time / (call_time * iterations)))
    return max(min_rounds, min(max_rounds, rounds)), iterations


def measure(benchmark, fn, *, group, provider, device, baseline=False, warmup=2, **info):
    """Warms `fn` up (compiles, caches, allocator) outside the timed loop, then times it.

    Any exception during warm-up means the provider cannot run this case
    (a kernel not registered yet, torch.compile failing): the row is skipped
    with the reason rather than failing the whole report.
    """
    import time

    timed = _sync_wrapper(fn, device)
    times = []
    try:
        timed()  # first call: compilation, allocation, lazy initialisation
        for _ in range(max(1, warmup)):
            t0 = time.perf_counter()
            timed()
            times.append(time.perf_counter() - t0)
    except (NotImplementedError, RuntimeError, TypeError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        pytest.skip(f"{provider} cannot run {group}: {type(exc).__name__}: {first[:200]}")
    benchmark.group = group
    extra = {"provider": provider, "device": device.type}
    if baseline:
        extra["baseline"] = True
    extra.update({k: v for k, v in info.items() if v is not None})
    benchmark.extra_info.update(extra)
    # --benchmark-min-rounds / --benchmark-max-time, as the fixture parsed them
    min_rounds = int(getattr(benchmark, "_min_rounds", 5))
    max_time = float(getattr(benchmark, "_max_time", 1.0))
    rounds, iterations = plan_rounds(sorted(times)[len(times) // 2], min_rounds, max_time)
    return benchmark.pedantic(timed, rounds=rounds, iterations=iterations, warmup_rounds=0)


def mem_available_bytes():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# --------------------------------------------------------------------------
# machine description, saved into the JSON for the report
# --------------------------------------------------------------------------
def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _triton_version():
    try:
        import triton
    except Exception:  # triton is optional: no version to record
        return None
    return getattr(triton, "__version__", None)


def pytest_benchmark_update_machine_info(config, machine_info):
    info = {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "torch_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "quick": is_quick(config),
        "bench_device": bench_device_of(config).type,
        "loadavg_start": getattr(config, "_neuralmem_load_start", None),
        "loadavg_end": _loadavg(),
    }
    try:
        import neuralmem_fast as nm

        info["extension"] = nm.has_extension()
        info["backends"] = {"cpu": nm.available_backends("cpu")}
        if torch.cuda.is_available():
            info["backends"]["cuda"] = nm.available_backends("cuda")
    except Exception as exc:  # the report still renders without the package
        info["extension"] = f"import failed: {exc}"
    machine_info["neuralmem"] = info
