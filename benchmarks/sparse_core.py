"""MemoryCore's training step against N: sparse access (exact top-K or the faiss index) and dense.

    python benchmarks/sparse_core.py                       # the issue's table (B=8, D=64, R=4, K=8)
    python benchmarks/sparse_core.py --n 1e4,1e5 --models sparse-exact,dense --steps 16

One training step is a forward through T steps of MemoryCore (LSTM controller of 64 units, one write
head) on random inputs, a loss on every output, and the backward through all T steps. Each point runs in
its own process, one intra-op thread: its time (median of --repeat steps after one warm-up) and its peak
resident memory above the process's baseline, taken just before the memory is allocated (VmHWM reset via
/proc/self/clear_refs, as the scale sweep does), with its ratio to the memory tensor's bytes.

Memory contents (--init):
  zero    the tasks' case: every sequence starts from an empty memory. The dense core allocates it per
          sequence; the sparse core reuses its buffer and zeroes the rows the last sequence wrote.
  random  a long-lived memory full of random rows: the sparse core continues from it step after step,
          its index holding all N rows (the index's search is then the cost that grows with N).
The index's share of the sparse step (search + update time over step time) is reported.

Writes a JSON of the points (--out) and a markdown section (benchmarks/sections/sparse_core.md).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _point(spec):
    import torch

    torch.set_num_threads(1)
    from neuralmem_fast.apps.scale_point import HostMemory
    from neuralmem_fast.nn import MemoryCore

    B, N, D, R, K, T = (spec[k] for k in ("B", "N", "D", "R", "K", "T"))
    model, init = spec["model"], spec["init"]
    torch.manual_seed(0)
    kw = {} if model == "dense" else dict(sparse_k=K, index=model.split("-", 1)[1])
    core = MemoryCore(10, 8, N, D, R, hidden_size=64, **kw)
    x = torch.randn(B, T, 10)
    tgt = torch.rand(B, T, 8)
    # warm the process's one-time costs (imports, thread pools, first kernel calls) at a small N
    small = MemoryCore(10, 8, 1024, D, R, hidden_size=64, **kw)
    y, _ = small(x[:, :2])
    y.sum().backward()
    del small, y
    acct = HostMemory()
    acct.settle()
    acct.reset_peak()
    base = acct.current()
    t0 = time.perf_counter()
    state = None
    if model != "dense":
        state = core.initial_state(B)
        if init == "random":
            state.access.memory.normal_()  # in place: a randn temporary would be a second memory
            state.access.index.rebuild()
    build_s = time.perf_counter() - t0
    opt = torch.optim.Adam(core.parameters(), 1e-3)

    def step():
        st = state
        if model != "dense" and init == "zero":
            st = None  # the core's own buffer, reset in O(rows written)
        elif st is not None:
            st = st._replace(access=st.access.detach())
        t = time.perf_counter()
        y, _ = core(x, st)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(y, tgt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return time.perf_counter() - t

    if model != "dense" and init == "zero":
        core._sparse_cache = state  # start from the buffer just built, not a second one
    times, spent = [], 0.0
    for i in range(spec["repeat"] + 1):
        idx = None if model == "dense" else (core._sparse_cache or state).access.index
        s0 = (idx.stats["search_s"] + idx.stats["update_s"]) if idx is not None else 0.0
        dt = step()
        if idx is not None:
            idx_share = ((idx.stats["search_s"] + idx.stats["update_s"]) - s0) / dt
        if i == 0 and dt > spec["budget"]:
            times = [dt]
            break
        if i:
            times.append(dt)
            spent += dt
            if spent > spec["budget"]:
                break
    mem_bytes = B * N * D * 4
    peak = acct.peak() - base
    out = dict(spec, step_s=statistics.median(times), times_s=times, build_s=build_s, peak_bytes=peak,
               memory_bytes=mem_bytes, peak_ratio=peak / mem_bytes)
    if model != "dense":
        out["index_share"] = idx_share
        out["index"] = type((core._sparse_cache or state).access.index).__name__
    return out


def _run(spec, timeout):
    cmd = [sys.executable, os.path.abspath(__file__), "--point", json.dumps(spec)]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return dict(spec, error=f"over {timeout} s")
    if res.returncode != 0:
        return dict(spec, error=(res.stderr.strip().splitlines() or ["failed"])[-1][:300])
    return json.loads(res.stdout.strip().splitlines()[-1])


def _fmt_bytes(b):
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


def _markdown(points, args):
    lines = [f"B={args.batch}, D={args.dim}, R={args.reads}, K={args.k}, T={args.steps}, one thread; "
             f"`python benchmarks/sparse_core.py {' '.join(sys.argv[1:])}`".rstrip(), "",
             "| N | model | memory | step (s) | dense step / this | this / same model at smallest N | peak above baseline | peak / memory "
             "| index share |", "|---|---|---|---|---|---|---|---|---|"]
    by = {(p["model"], p["init"], p["N"]): p for p in points}
    nmin = min(p["N"] for p in points)
    for p in points:
        if "error" in p:
            lines.append(f"| {p['N']:.0e} | {p['model']} | {p['init']} | {p['error']} | | | | | |")
            continue
        d = by.get(("dense", "zero", p["N"]))
        vs = f"{d['step_s'] / p['step_s']:.1f}x" if d and "step_s" in d and p["model"] != "dense" else ""
        first = by.get((p["model"], p["init"], nmin))
        grow = f"{p['step_s'] / first['step_s']:.2f}x" if first and "step_s" in first else ""
        share = f"{100 * p['index_share']:.0f}%" if "index_share" in p else ""
        lines.append(f"| {p['N']:.0e} | {p['model']} | {p['init']} | {p['step_s']:.3f} | {vs} | {grow} | "
                     f"{_fmt_bytes(p['peak_bytes'])} | {p['peak_ratio']:.2f} | {share} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--point", help=argparse.SUPPRESS)
    p.add_argument("--n", default="1e4,1e5,1e6")
    p.add_argument("--models", default="sparse-exact,sparse-faiss,dense")
    p.add_argument("--init", default="zero", help="comma-separated: zero, random")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--reads", type=int, default=4)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--steps", type=int, default=16, help="T, steps per training sequence")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--budget", type=float, default=60.0, help="seconds of timed steps per point")
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--out", default=os.path.join(ROOT, "results", "sparse_core.json"))
    p.add_argument("--section", default=os.path.join(HERE, "sections", "sparse_core.md"))
    args = p.parse_args(argv)
    if args.point:
        print(json.dumps(_point(json.loads(args.point))))
        return 0
    points = []
    for init in args.init.split(","):
        for n in [int(float(v)) for v in args.n.split(",")]:
            for model in args.models.split(","):
                if model == "dense" and init != "zero":
                    continue
                spec = dict(model=model, init=init, N=n, B=args.batch, D=args.dim, R=args.reads, K=args.k,
                            T=args.steps, repeat=args.repeat, budget=args.budget)
                r = _run(spec, args.timeout)
                points.append(r)
                print(json.dumps({k: v for k, v in r.items() if k != "times_s"}), flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(points, f, indent=1)
    md = _markdown(points, args)
    os.makedirs(os.path.dirname(args.section), exist_ok=True)
    with open(args.section, "w") as f:
        f.write("## Sparse access: MemoryCore's training step against N\n\n" + md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
