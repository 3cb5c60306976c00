"""`python -m neuralmem_fast bench`: run the benchmark suites, then render the report.

    python -m neuralmem_fast bench [--quick] [--gpu] [--out DIR] [-k EXPR] [-- PYTEST_ARGS...]

Runs pytest-benchmark on the suites of benchmarks/ (found in the source
checkout, or given with --suites DIR: they are not installed with the
package), saves its JSON as DIR/bench.json and
renders DIR/REPORT.md and DIR/ops_vs_n.png with benchmarks/render_report.py.

--quick   small N plus the rows the issues set goals on, few rounds: minutes on a 2-core CPU
--gpu     the CUDA device cases, timed with CUDA events (each timed call also synchronises);
          also writes DIR/autotune_table.json, the per-op, per-N choice between the
          CUDA C++ and Triton kernels that backend="auto" follows (neuralmem_fast.apps.autotune)
--write-table   with --gpu: also install that table as the user's table (read first by backend="auto")
"""
import argparse
import importlib.util
import os
import shlex
import subprocess
import sys
import time

import torch

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def find_suites(explicit=None):
    """The benchmarks/ folder of suites: `explicit` (--suites), $NEURALMEM_BENCH_DIR,
    the source checkout the package was imported from, or ./benchmarks; None when
    none holds the suites (an installed wheel does not ship them)."""
    cands = [explicit, os.environ.get("NEURALMEM_BENCH_DIR"),
             os.path.join(os.path.dirname(PACKAGE_ROOT), "benchmarks"), os.path.join(os.getcwd(), "benchmarks")]
    for c in cands:
        if c and os.path.isfile(os.path.join(c, "render_report.py")) and os.path.isfile(os.path.join(c, "conftest.py")):
            return os.path.abspath(c)
    return None


BENCH_DIR = find_suites() or os.path.join(os.path.dirname(PACKAGE_ROOT), "benchmarks")
REPO_ROOT = os.path.dirname(BENCH_DIR)


class _CudaEventClock:
    """A pytest-benchmark timer read from CUDA events on the current stream.

    Each reading records an event and waits for it, so a reading is taken
    only once all work queued before it has run; the value is the elapsed
    time since the first event, in seconds.
    """

    def __init__(self):
        self._origin = None

    def __call__(self):
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        ev.synchronize()
        if self._origin is None:
            self._origin = ev
            return 0.0
        return self._origin.elapsed_time(ev) / 1e3


cuda_event_clock = _CudaEventClock()


def _load_renderer():
    path = os.path.join(BENCH_DIR, "render_report.py")
    spec = importlib.util.spec_from_file_location("neuralmem_render_report", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def pytest_command(args, json_path):
    cmd = [sys.executable, "-m", "pytest", BENCH_DIR, "-q", "-ra", "-p", "no:cacheprovider",
           "--benchmark-only", f"--benchmark-json={json_path}", "--benchmark-sort=name",
           "--benchmark-columns=median,iqr,rounds",
           # Warm-up (bounded by the max time, per case, for every provider
           # alike): the first calls after a case's set-up run on a cold cache
           # and a CPU still raising its clock, and were up to 30% slower.
           "--benchmark-warmup=on", "--benchmark-warmup-iterations=1000"]
    if args.quick:
        # Enough rounds for a median and an IQR, few enough that the subset
        # stays within minutes while slow peers (the seed at N=10^6) run.
        cmd += ["--bench-quick", "--benchmark-min-rounds=3", "--benchmark-max-time=0.1"]
    else:
        cmd += ["--benchmark-min-rounds=5", "--benchmark-max-time=0.5"]
    if args.gpu:
        cmd += ["--bench-device=cuda", "--benchmark-timer=neuralmem_fast.apps.bench.cuda_event_clock"]
    if args.k:
        cmd += ["-k", args.k]
    return cmd + list(args.pytest_args)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m neuralmem_fast bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the short subset (small N plus the goal rows)")
    ap.add_argument("--gpu", action="store_true", help="run the CUDA device cases, timed with CUDA events")
    ap.add_argument("--out", default=None, help="folder for bench.json, REPORT.md and the plot (default: the suites' folder)")
    ap.add_argument("--suites", default=None, help="the benchmarks/ folder to run (default: the source checkout's)")
    ap.add_argument("-k", default=None, help="pytest -k expression selecting cases")
    ap.add_argument("--provisional", default=None, help="a note printed at the top of the report")
    ap.add_argument("--scale", default=None,
                    help="a scale.json (from `python -m neuralmem_fast scale`) to tabulate in the report "
                         "(default: results/scale.json when it exists)")
    ap.add_argument("--write-table", action="store_true",
                    help="with --gpu: install the measured backend table as the user's table, the first that "
                         "backend='auto' reads (neuralmem_fast.ops.dispatch.user_table_path())")
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)

    global BENCH_DIR, REPO_ROOT
    suites = find_suites(args.suites)
    if suites is None:
        print("bench: the benchmark suites (a benchmarks/ folder with conftest.py and render_report.py) were not "
              "found: they ship with the source, not the installed package. Run from a source checkout, or pass "
              "--suites DIR (or set NEURALMEM_BENCH_DIR) to a copy of its benchmarks/ folder", file=sys.stderr)
        return 2
    BENCH_DIR, REPO_ROOT = suites, os.path.dirname(suites)
    if args.out is None:
        args.out = BENCH_DIR
    if args.write_table and not args.gpu:
        print("bench: --write-table needs --gpu (the table is measured on the GPU)", file=sys.stderr)
        return 2
    if args.gpu and not torch.cuda.is_available():
        print("bench: --gpu needs a CUDA device, and none is visible to torch", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.abspath(os.path.join(args.out, "bench.json"))
    cmd = pytest_command(args, json_path)
    env = dict(os.environ)
    # The suites import the package from this checkout, built in place.
    env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    print("bench:", " ".join(cmd), flush=True)
    start = time.perf_counter()
    rc = subprocess.call(cmd, cwd=REPO_ROOT, env=env)
    wall = time.perf_counter() - start
    print(f"bench: pytest finished in {wall:.0f} s (exit status {rc})", flush=True)
    if not os.path.exists(json_path):
        print("bench: no JSON was written; nothing to render", file=sys.stderr)
        return rc or 1
    table_rc = 0
    if args.gpu:
        install = args.write_table and rc in (0, 5)
        if args.write_table and not install:
            # A crashed run leaves rows out; its table is kept in --out for a look, not installed.
            print(f"bench: pytest failed (exit status {rc}): the table is not installed", file=sys.stderr)
        table_rc = write_autotune_table(json_path, args.out, install,
                                        "python -m neuralmem_fast bench " + shlex.join(argv))
    renderer = _load_renderer()
    out = ["--out", args.out] + (["--provisional", args.provisional] if args.provisional else [])
    scale = args.scale or (os.path.join("results", "scale.json") if os.path.exists(os.path.join("results", "scale.json"))
                           else None)
    if scale:
        out += ["--scale", scale]
    renderer.main([json_path] + out)
    # pytest exit status 5 means every case was deselected or skipped: the
    # report says so, which is not a crash.
    return (0 if rc in (0, 5) else rc) or table_rc


def write_autotune_table(json_path, out_dir, install, command):
    """DIR/autotune_table.json from the GPU rows just measured; 0, or 1 when it was asked to install and could not."""
    from . import autotune

    try:
        table, paths = autotune.table_from_bench(json_path, os.path.join(out_dir, autotune.TABLE_NAME),
                                                 install=install, bench_command=command)
    except autotune.TableError as exc:
        print(f"bench: no backend table: {exc}", file=sys.stderr)
        return 1 if install else 0
    print(autotune.format_table(table), flush=True)
    for p in paths:
        print(f"bench: wrote {p}", flush=True)
    return 0
