"""`python -m neuralmem_fast scale`: the large-memory sweep.

What it measures. For N = 10^3, 10^4, ... up to --max-n slots (D=64, H=4 read
heads, W=1 write head, B in --batch), for every backend that runs here (the
native kernels found by `available_backends`, the pure-PyTorch reference
"torch", and the seed's own `NeuralMemoryBank` when its file is present), one
"point" per (provider, B, N, mode):

  fwd       one read-then-write step, forward, in place, no autograd:
            content_read_write_, i.e. content_read + content_write_
            (erase-add write with the fused usage update; its least-used
            slot is the allocation answer) in two passes over the memory
  fwdbwd    one training step: content_read with gradients for memory, keys
            and strengths, plus a differentiable content-addressed
            memory_write (content_addressing, then memory_write), then backward
  train     the same training step with the fused content_write
  read_bwd  content_read forward + backward alone (grads for memory, keys,
            strengths): the path whose peak memory should be memory + grad
  seq       --steps T (default 64) of the train step trained through as one
            sequence, by nn.checkpointed_scan (segments of ceil(sqrt(T))
            steps recomputed in the backward); one "step" is the whole sequence
  seq_rev   the same sequence through nn.reversible_read_write: no memory
            kept per step, each one rebuilt in the backward by reversing the
            write from the saved write weights (T*W*N values)
  seq_full  the same sequence with plain autograd (every step's memory kept):
            the time seq is compared with, where the T copies fit
  sparse_seq  --steps T of the sparse access (MemoryAccess(sparse_k=8), index
            "auto") on the point's full memory, trained through: O(K D) per
            step and O(T K D) kept, plus the index's search over the N rows

Each point records the median step time, the one-pass bandwidth floor
(`memory.sum()` on the same tensor, in the same process) and their ratio, and
the peak memory attributable to the point, with its ratio to the memory
tensor's size: the high-water mark above the process's baseline, measured
just before the point's inputs are created (everything allocated from there
to the end of the steps). Before that baseline, one step of the same
provider and mode runs at N = WARMUP_N, so that the process's one-time costs
(lazy imports, thread pools, the autograd engine, first calls into the
kernels, the seed's module: about 90 MB on CPU) sit in the baseline and not
in the point; at N = 10^3 they once made the peak read 350x a 256 kB memory.
Both are recorded (`baseline_bytes`, `warmup_bytes`).

Why subprocesses on CPU. PyTorch's CPU allocator is not instrumented, so the
peak is the process's resident high-water mark (VmHWM). A fresh process per
point keeps earlier points' allocations, caches and fragmentation out of the
number; the high-water mark is reset (/proc/self/clear_refs) at the baseline
and again after the inputs are built, so only the memory itself and what the
steps allocate count. On a GPU the caching allocator's own peak counter is
exact, so points run in process there.

Budgets. Every (provider, B, mode) is a track; a track drops out (and the
output says where and why) when a point's step takes longer than
--time-budget, when its peak passes --mem-budget, when it fails, or before a
point whose peak, extrapolated linearly from the previous N (every path is
O(N)), would pass --mem-budget: on a shared machine the sweep must never be
the process that runs it out of memory.

Half storage. --dtype bf16/fp16 keeps memory (and the small inputs) in half
precision; the ops compute in float32. The fwd point then also reads the
memory in float32 before casting it, and reports the largest absolute
difference of the half-precision reads from those float32 reads (same data,
same backend).

`--distributed` hands the remaining arguments to
neuralmem_fast.apps.scale_distributed.main (the sharded sweep, run under torchrun).
"""
import argparse
import gc
import importlib
import json
import math
import os
import platform
import re
import sys
import time

import torch

from .scale_point import (DTYPES, GIB, GOAL_FWD_RATIO, GOAL_N, GOAL_PEAK_RATIO, MODES, CudaMemory, HostMemory,
                          _loadavg, find_seed, run_point, run_point_isolated)


# --------------------------------------------------------------------------
# the sweep
# --------------------------------------------------------------------------
def _machine(device):
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        info["cpu"] = m.group(1).strip() if m else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    total = _meminfo("MemTotal")
    if total:
        info["ram_gib"] = round(total / GIB, 1)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_mem_gib"] = round(props.total_memory / GIB, 1)
    return info


def _meminfo(field):
    try:
        with open("/proc/meminfo") as f:
            m = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.M)
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


def _pow10_range(lo, hi):
    k, out = max(0, math.ceil(math.log10(lo) - 1e-9)), []
    while 10 ** k <= hi * (1 + 1e-9):
        out.append(10 ** k)
        k += 1
    return out


def _default_max_n(device, D, dtype):
    if device.type != "cuda":
        return 10 ** 7
    total = torch.cuda.get_device_properties(device).total_memory
    esize = torch.empty((), dtype=dtype).element_size()
    n = 10 ** 3
    # Up to what fits the card: the backward holds the memory and its gradient.
    while GOAL_PEAK_RATIO * (10 * n) * D * esize <= 0.9 * total:
        n *= 10
    return n


def _default_mem_budget(device):
    if device.type == "cuda":
        return 0.9 * torch.cuda.get_device_properties(device).total_memory / GIB
    avail = _meminfo("MemAvailable")
    # Half of what is free now: the machine may be shared, and an OOM kill would hit others too.
    return 0.5 * avail / GIB if avail else 8.0


def _fmt_n(n):
    e = int(round(math.log10(n)))
    return f"1e{e}" if 10 ** e == n else str(n)


def _fmt_bytes(b):
    return f"{b / GIB:.2f} GiB" if b >= 0.1 * GIB else f"{b / 2**20:.1f} MiB"


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m neuralmem_fast scale",
        description="Sweep the memory size N in powers of ten and measure step time, the one-pass "
                    "bandwidth floor and peak memory per backend (results: scale.json + scale.png).")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--min-n", type=float, default=1e3, help="smallest N (default 1e3)")
    p.add_argument("--max-n", type=float, default=None,
                   help="largest N (default 1e7 on CPU; on a GPU the largest power of ten that fits the card)")
    p.add_argument("--batch", default="1,8", help="comma-separated B values (default 1,8)")
    p.add_argument("--dim", type=int, default=64, help="slot width D (default 64)")
    p.add_argument("--heads", type=int, default=4, help="read heads H (default 4)")
    p.add_argument("--write-heads", type=int, default=1, help="write heads W (default 1)")
    p.add_argument("--modes", default="fwd,fwdbwd,train,read_bwd",
                   help=f"comma-separated subset of {','.join(MODES)} (default fwd,fwdbwd,train,read_bwd)")
    p.add_argument("--steps", type=int, default=64, help="sequence length T of the seq modes (default 64)")
    p.add_argument("--backends", default=None,
                   help="comma-separated providers (default: every available backend of the device, the "
                        "'torch' reference, and 'seed' when the seed file is found)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                   help="memory storage dtype; bf16/fp16 also report the read error against float32")
    p.add_argument("--allocate", action="store_true",
                   help="record the least-used slot content_write_ returns each step (and check it)")
    p.add_argument("--time-budget", type=float, default=30.0,
                   help="seconds per step; a track whose step passes it drops out (default 30)")
    p.add_argument("--mem-budget", type=float, default=None,
                   help="GiB of peak memory per point (above the process's baseline); a track that passes it, "
                        "or is predicted to, drops "
                        "out (default: half the free RAM on CPU, 90%% of the card on a GPU)")
    p.add_argument("--repeat", type=int, default=3, help="timed steps per point after one warm-up (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per point (default: torch's)")
    p.add_argument("--isolate", choices=("auto", "subprocess", "inprocess"), default="auto",
                   help="a fresh process per point (default on CPU: honest RSS peaks) or all in this one")
    p.add_argument("--seed-path", default=None, help="the seed tutorial's .py (default: found next to the repo)")
    p.add_argument("--no-seed", action="store_true", help="leave the seed's own bank out")
    p.add_argument("--out", default="results", help="output folder (default results/)")
    p.add_argument("--no-plot", action="store_true", help="skip scale.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--distributed", action="store_true",
                   help="run the sharded sweep (neuralmem_fast.apps.scale_distributed) with the other arguments")
    return p


def _providers(args, device):
    from ..ops import available_backends

    avail = available_backends(device)
    seed_path = None if args.no_seed else find_seed(args.seed_path)
    if args.backends:
        wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
        for b in wanted:
            if b == "seed":
                if not find_seed(args.seed_path):
                    raise SystemExit("--backends seed: the seed tutorial file was not found (give --seed-path)")
                seed_path = find_seed(args.seed_path)
            elif b not in avail:
                raise SystemExit(f"--backends: {b!r} is not available for {device.type} here (available: "
                                 f"{', '.join(avail)}{', seed' if seed_path else ''})")
        return wanted, seed_path
    # The Triton interpreter on CPU is a test vehicle, not a contender.
    out = [b for b in avail if not (b == "triton" and device.type == "cpu")]
    if seed_path:
        out.append("seed")
    return out, seed_path


def _plan(providers, batches, ns, modes):
    pts = []
    for B in batches:
        for N in ns:
            for be in providers:
                for mode in modes:
                    if be == "seed" and (mode != "fwd" or B != 1):
                        continue  # the seed has one memory and no differentiable memory path
                    pts.append((B, N, be, mode))
    return pts


def sweep(args, device, log=print):
    """Runs the planned points with the budgets; returns the JSON-able result."""
    from tqdm import tqdm

    dtype = DTYPES[args.dtype]
    batches = [int(b) for b in str(args.batch).split(",") if b.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"--modes: unknown mode {m!r}; expected a subset of {','.join(MODES)}")
    max_n = int(args.max_n) if args.max_n else _default_max_n(device, args.dim, dtype)
    ns = _pow10_range(int(args.min_n), max_n)
    if not ns:
        raise SystemExit(f"--min-n/--max-n: no power of ten in [{args.min_n:g}, {max_n:g}]")
    mem_budget = args.mem_budget if args.mem_budget is not None else _default_mem_budget(device)
    isolate = args.isolate if args.isolate != "auto" else ("inprocess" if device.type == "cuda" else "subprocess")
    providers, seed_path = _providers(args, device)
    plan = _plan(providers, batches, ns, modes)
    esize = torch.empty((), dtype=dtype).element_size()

    config = dict(device=str(device), dtype=args.dtype, D=args.dim, H=args.heads, W=args.write_heads,
                  batches=batches, Ns=ns, modes=modes, providers=providers, seed_path=seed_path,
                  time_budget_s=args.time_budget, mem_budget_gib=round(mem_budget, 3), repeat=args.repeat,
                  allocate=args.allocate, isolate=isolate, threads=args.threads,
                  memory_accounting=(CudaMemory.kind if device.type == "cuda" else HostMemory.kind),
                  machine=_machine(device), started=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  loadavg_1min_at_start=_loadavg())
    log(f"scale sweep on {device} ({config['machine'].get('gpu') or config['machine'].get('cpu')}), "
        f"dtype {args.dtype}, D={args.dim} H={args.heads} W={args.write_heads}, B in {batches}, "
        f"N in {', '.join(_fmt_n(n) for n in ns)}")
    log(f"providers: {', '.join(providers)}; budgets: {args.time_budget:g} s per step, "
        f"{mem_budget:.2f} GiB peak per point; points {isolate}")

    points, dropped, last = [], [], {}
    dead = {}

    def drop(track, N, reason):
        dead[track] = reason
        be, B, mode = track
        dropped.append(dict(provider=be, B=B, mode=mode, N=N, reason=reason))
        log(f"dropped: {be} B={B} {mode} from N={_fmt_n(N)}: {reason}")

    # disable=None: no bar when stderr is not a terminal (a log would keep every frame).
    bar = tqdm(plan, desc="scale", unit="pt", file=sys.stderr, disable=True if args.no_progress else None,
               dynamic_ncols=True)
    for B, N, be, mode in bar:
        track = (be, B, mode)
        if track in dead:
            continue
        bar.set_postfix_str(f"B{B} N{_fmt_n(N)} {be} {mode}")
        mem_bytes = B * N * args.dim * esize
        predicted = _predict_peak(last.get(track, []), N, mem_bytes)
        if predicted > mem_budget * GIB:
            what = "the memory tensor alone" if predicted == mem_bytes else "predicted peak"
            drop(track, N, f"{what} {_fmt_bytes(predicted)} > --mem-budget {mem_budget:.2f} GiB")
            continue
        spec = dict(provider=be, B=B, N=N, D=args.dim, H=args.heads, W=args.write_heads, mode=mode,
                    dtype=args.dtype, device=str(device), repeat=args.repeat, time_budget=args.time_budget,
                    allocate=args.allocate, seed_path=seed_path, threads=args.threads, rng_seed=0,
                    T=args.steps)
        if isolate == "subprocess":
            # Setup (random init, the float32 reference read) scales with the memory too.
            hard = 120 + 30 * mem_bytes / GIB * (4 / esize) + 4 * args.time_budget
            rec = run_point_isolated(spec, hard)
        else:
            try:
                rec = run_point(spec)
            except Exception as exc:  # noqa: BLE001 - a failing backend drops out, the sweep goes on
                rec = dict(spec, error=f"{type(exc).__name__}: {exc}")
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rec["isolate"] = isolate
        points.append(rec)
        if rec.get("error"):
            rec["status"] = "failed"
            drop(track, N, "failed: " + _short(rec["error"]))
            continue
        last.setdefault(track, []).append(rec)
        rec["status"] = "ok"
        if rec["step_s"] > args.time_budget:
            rec["status"] = "over_time_budget"
            drop(track, N * 10, f"step {rec['step_s']:.3g} s at N={_fmt_n(N)} > --time-budget {args.time_budget:g} s")
        elif rec["peak_bytes"] > mem_budget * GIB:
            rec["status"] = "over_mem_budget"
            drop(track, N * 10, f"peak {_fmt_bytes(rec['peak_bytes'])} at N={_fmt_n(N)} > --mem-budget "
                                f"{mem_budget:.2f} GiB")
    bar.close()
    # Tracks that were never dropped ran to the end of the sweep.
    return dict(config=config, points=points, dropped=dropped, floor=_floors(points),
                goals=_goals(points, dropped, args.dtype))


def _short(msg, limit=160):
    """First line of an error, cut: PyTorch's dispatcher errors run to pages."""
    line = msg.strip().splitlines()[0] if msg.strip() else msg
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _predict_peak(prev, N, mem_bytes):
    """Peak of the next point from the track's last two: every path is O(N).

    An affine fit separates the fixed cost (threads, allocator, caches) from
    the per-slot cost; with one point the whole peak is scaled, which errs high.
    """
    prev = [p for p in prev if p.get("peak_reliable", True)]
    if not prev:
        return mem_bytes
    def need(p):
        return max(p["peak_bytes"], p.get("setup_peak_bytes") or 0)

    p2 = prev[-1]
    guess = need(p2) * N / p2["N"]
    if len(prev) >= 2:
        p1 = prev[-2]
        slope = (need(p2) - need(p1)) / (p2["N"] - p1["N"])
        if slope > 0:
            guess = need(p2) + slope * (N - p2["N"])
    return max(guess, mem_bytes)


def _floors(points):
    by = {}
    for p in points:
        if p.get("floor_s"):
            by.setdefault((p["B"], p["N"]), []).append(p["floor_s"])
    return [dict(B=B, N=N, floor_s=min(v), samples=len(v)) for (B, N), v in sorted(by.items())]


def _goals(points, dropped, dtype):
    def at(mode, key, target):
        res = {}
        for p in points:
            if p["mode"] == mode and p["N"] == GOAL_N and p.get("status") != "failed" and p.get(key) is not None:
                res[f"{p['provider']} B{p['B']}"] = dict(value=round(p[key], 3), met=bool(p[key] <= target))
        for d in dropped:
            if d["mode"] == mode and d["N"] <= GOAL_N and f"{d['provider']} B{d['B']}" not in res:
                res[f"{d['provider']} B{d['B']}"] = dict(value=None, met=None, reason="dropped: " + d["reason"])
        return res

    return {
        "N": GOAL_N,
        "dtype": dtype,
        "fwd_step_over_floor": dict(target=f"<= {GOAL_FWD_RATIO:g}x one memory.sum() pass",
                                    results=at("fwd", "ratio_to_floor", GOAL_FWD_RATIO)),
        "read_bwd_peak_over_memory": dict(target=f"<= {GOAL_PEAK_RATIO:g}x the memory tensor",
                                          results=at("read_bwd", "peak_ratio", GOAL_PEAK_RATIO)),
    }


# --------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------
def table(result):
    rows = ["  B        N provider mode     step med   step min    floor  min/floor  peak above baseline  "
            "/ memory  note"]
    for p in result["points"]:
        if p.get("error"):
            rows.append(f"{p['B']:3d} {_fmt_n(p['N']):>8} {p['provider']:8s} {p['mode']:8s}  failed: "
                        f"{p['error'][:80]}")
            continue
        note = []
        if p.get("read_err_max_abs") is not None:
            note.append(f"read err {p['read_err_max_abs']:.2e} (rel {p['read_err_rel']:.1e})")
        if "least_used_is_min" in p:
            note.append(f"least-used ok={p['least_used_is_min']}")
        if p.get("peak_reliable") is False:
            note.append("peak below memory size: RSS noise")
        if p.get("status") not in (None, "ok"):
            note.append(p["status"])
        ratio = p.get("ratio_to_floor")
        rows.append(f"{p['B']:3d} {_fmt_n(p['N']):>8} {p['provider']:8s} {p['mode']:8s} {p['step_s']:9.4g} "
                    f"{p['step_min_s']:10.4g} {p['floor_s']:9.3g} {ratio if ratio is not None else float('nan'):10.1f}x "
                    f"{_fmt_bytes(p['peak_bytes']):>20} {p['peak_ratio']:8.2f}x  {'; '.join(note)}")
    for d in result["dropped"]:
        rows.append(f"dropped: {d['provider']} B={d['B']} {d['mode']} from N={_fmt_n(d['N'])}: {d['reason']}")
    accounting = result.get("config", {}).get("memory_accounting")
    if accounting:
        rows.append(f"peak above baseline: {accounting}")
    g = result["goals"]
    for key in ("fwd_step_over_floor", "read_bwd_peak_over_memory"):
        res = g[key]["results"]
        if not res:
            rows.append(f"goal {key} at N={_fmt_n(g['N'])} ({g[key]['target']}): not in this sweep")
        for name, r in res.items():
            val = f"{r['value']}x met={r['met']}" if r["value"] is not None else r["reason"]
            rows.append(f"goal {key} at N={_fmt_n(g['N'])} ({g[key]['target']}): {name}: {val}")
    return "\n".join(rows)


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result["config"]
    batches = cfg["batches"]
    colors = {"torch": "C0", "cpu": "C1", "cuda": "C2", "triton": "C3", "seed": "C4"}
    styles = {"fwd": "-", "fwdbwd": "--", "train": (0, (5, 1)), "read_bwd": ":", "seq": "-.",
              "seq_rev": (0, (3, 1)), "seq_full": (0, (1, 3)), "sparse_seq": (0, (3, 1, 1, 1))}
    esize = torch.empty((), dtype=DTYPES[cfg["dtype"]]).element_size()
    fig, axes = plt.subplots(len(batches), 2, figsize=(13, 4.8 * len(batches)), squeeze=False)
    for row, B in enumerate(batches):
        ax_t, ax_m = axes[row]
        tracks = {}
        for p in result["points"]:
            if p["B"] == B and not p.get("error"):
                tracks.setdefault((p["provider"], p["mode"]), []).append(p)
        for (be, mode), pts in sorted(tracks.items()):
            pts.sort(key=lambda p: p["N"])
            n = [p["N"] for p in pts]
            # A drop past the last N of the sweep cut nothing off: not worth a label.
            gone = [d for d in result["dropped"]
                    if (d["provider"], d["B"], d["mode"]) == (be, B, mode) and d["N"] in cfg["Ns"]]
            label = f"{be} {mode}" + (f" (dropped from {_fmt_n(gone[0]['N'])})" if gone else "")
            kw = dict(color=colors.get(be, "C7"), linestyle=styles.get(mode, "-"), marker="o", ms=4)
            ax_t.plot(n, [p["step_min_s"] for p in pts], label=label, **kw)
            good = [p for p in pts if p["peak_bytes"] > 0]  # log axis; tiny sizes can read below baseline
            ax_m.plot([p["N"] for p in good], [p["peak_bytes"] / GIB for p in good], label=label, **kw)
        fl = [f for f in result["floor"] if f["B"] == B]
        if fl:
            ax_t.plot([f["N"] for f in fl], [f["floor_s"] for f in fl], color="k", lw=2.5, ls="--",
                      label="floor: one memory.sum() pass (best pass)")
        ns = cfg["Ns"]
        ax_m.plot(ns, [B * n * cfg["D"] * esize / GIB for n in ns], color="k", lw=2.5, ls="--",
                  label="memory tensor")
        ax_m.plot(ns, [GOAL_PEAK_RATIO * B * n * cfg["D"] * esize / GIB for n in ns], color="0.5", lw=1.5, ls=":",
                  label=f"{GOAL_PEAK_RATIO:g}x memory tensor")
        ax_m.axhline(cfg["mem_budget_gib"], color="r", lw=1, alpha=0.5, label="--mem-budget")
        ax_t.axhline(cfg["time_budget_s"], color="r", lw=1, alpha=0.5, label="--time-budget")
        for ax, ylabel in ((ax_t, "time per step, best of the timed steps (s)"),
                           (ax_m, "peak memory above the baseline (GiB)")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("memory slots N")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        dev = cfg["machine"].get("gpu") or cfg["machine"].get("cpu", "")
        ax_t.set_title(f"time, B={B}, D={cfg['D']} H={cfg['H']} W={cfg['W']} {cfg['dtype']} ({dev})", fontsize=9)
        ax_m.set_title(f"peak memory above the process's baseline before the point (after a warm-up step), B={B}",
                       fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _distributed(argv):
    try:
        mod = importlib.import_module("neuralmem_fast.apps.scale_distributed")
    except ModuleNotFoundError as exc:
        if exc.name != "neuralmem_fast.apps.scale_distributed":
            raise
        raise RuntimeError(
            "scale --distributed needs the module neuralmem_fast.apps.scale_distributed (the sweep of memory "
            "sharded across torch.distributed ranks, launched with torchrun); this installation does not "
            "include it. Run the sweep without --distributed.") from None
    return mod.main(argv)


def _portable(obj):
    """The result with file paths made relative to the working folder (no machine paths in shared JSON)."""
    if isinstance(obj, dict):
        return {k: (os.path.relpath(v) if k == "seed_path" and isinstance(v, str) and os.path.isabs(v)
                    else _portable(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_portable(v) for v in obj]
    return obj


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--distributed" in argv:
        return _distributed([a for a in argv if a != "--distributed"])
    args = build_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    from tqdm import tqdm

    result = sweep(args, device, log=lambda s: tqdm.write(s, file=sys.stderr))
    os.makedirs(args.out, exist_ok=True)
    jpath = os.path.join(args.out, "scale.json")
    with open(jpath, "w") as f:
        json.dump(_portable(result), f, indent=1)
    print(table(result))
    print(f"wrote {jpath}")
    if not args.no_plot:
        ppath = os.path.join(args.out, "scale.png")
        plot(result, ppath)
        print(f"wrote {ppath}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
