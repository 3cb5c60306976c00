"""The training path through the memory, op by op, against one memory.sum() pass.

    python benchmarks/train_step.py --n 1e5,1e6 --repeat 11 [--threads 1] [--json out.json]

B=1, D=64, H=4 read heads, W=1 write head, float32, cpu backend; gradients
set to None before every step, as a training loop does. Every repeat times
the floor (one `memory.sum()` pass over the same tensor) and then each case
once, so that the floor and the cases see the same machine load; the table
gives per case the median time, the ratio of medians to the floor's median,
the spread (max/min over repeats), and the page faults and system time of the
median repeat (what a fresh (N, D) buffer costs shows up there). Cases:

  read_fb          content_read forward + backward, memory gradient wanted
  read_fb_const    the same with a memory that needs no gradient (the mask)
  addr_write_fb    content_addressing + memory_write forward + backward
  content_write_fb the fused content_write forward + backward
  step_separate    the training step: content_read, content_addressing + memory_write
  step_fused       the training step: content_read, content_write
  step_read_write  the training step in one op: content_read_write
"""
import argparse
import json
import os
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from neuralmem_fast import ops  # noqa: E402

B, D, H, W = 1, 64, 4, 1


def _inputs(N, seed=0):
    g = torch.Generator().manual_seed(seed)
    memory = torch.randn(B, N, D, generator=g)
    small = dict(rk=torch.randn(B, H, D, generator=g), rs=1 + 9 * torch.rand(B, H, generator=g),
                 wk=torch.randn(B, W, D, generator=g), ws=1 + 9 * torch.rand(B, W, generator=g),
                 er=torch.rand(B, W, D, generator=g), ad=2 * torch.rand(B, W, D, generator=g) - 1)
    gr = torch.randn(B, H, D, generator=g)
    return memory, small, gr


def cases(memory, s, gr):
    mem_c = memory.detach()
    m = memory.requires_grad_(True)
    for x in s.values():
        x.requires_grad_(True)
    leaves = [m, *s.values()]

    def zero():
        for x in leaves:
            x.grad = None

    def read_fb():
        zero()
        ops.content_read(m, s["rk"], s["rs"], backend="cpu").backward(gr)

    def read_fb_const():
        zero()
        ops.content_read(mem_c, s["rk"], s["rs"], backend="cpu").backward(gr)

    def addr_write_fb():
        zero()
        w = ops.content_addressing(m, s["wk"], s["ws"], backend="cpu")
        ops.memory_write(m, w, s["er"], s["ad"], backend="cpu").sum().backward()

    def content_write_fb():
        zero()
        ops.content_write(m, s["wk"], s["ws"], s["er"], s["ad"], backend="cpu").sum().backward()

    def step_separate():
        zero()
        reads = ops.content_read(m, s["rk"], s["rs"], backend="cpu")
        w = ops.content_addressing(m, s["wk"], s["ws"], backend="cpu")
        new = ops.memory_write(m, w, s["er"], s["ad"], backend="cpu")
        ((reads * gr).sum() + new.sum()).backward()

    def step_fused():
        zero()
        reads = ops.content_read(m, s["rk"], s["rs"], backend="cpu")
        new = ops.content_write(m, s["wk"], s["ws"], s["er"], s["ad"], backend="cpu")
        ((reads * gr).sum() + new.sum()).backward()

    def step_read_write():
        zero()
        reads, new = ops.content_read_write(m, s["rk"], s["rs"], s["wk"], s["ws"], s["er"], s["ad"], backend="cpu")
        ((reads * gr).sum() + new.sum()).backward()

    return dict(floor=lambda: memory.sum(), read_fb=read_fb, read_fb_const=read_fb_const,
                addr_write_fb=addr_write_fb, content_write_fb=content_write_fb, step_separate=step_separate,
                step_fused=step_fused, step_read_write=step_read_write)


def _usage():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_minflt, r.ru_stime


def measure(N, repeat, only=None):
    memory, s, gr = _inputs(N)
    fns = cases(memory, s, gr)
    if only:
        fns = {k: v for k, v in fns.items() if k == "floor" or k in only}
    for f in fns.values():  # warm-up: pools, thread pool, first calls
        f()
        f()
    rec = {k: [] for k in fns}
    for _ in range(repeat):
        for name, f in fns.items():
            f0, s0 = _usage()
            t0 = time.perf_counter()
            f()
            t = time.perf_counter() - t0
            f1, s1 = _usage()
            rec[name].append((t, f1 - f0, s1 - s0))
    out = {}
    floor = statistics.median(t for t, _, _ in rec["floor"])
    for name, rows in rec.items():
        ts = sorted(rows)
        mid = ts[len(ts) // 2]
        out[name] = dict(median_s=mid[0], ratio=mid[0] / floor, spread=ts[-1][0] / ts[0][0],
                         faults=mid[1], sys_s=mid[2], times_s=[t for t, _, _ in rows])
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", default="1e5,1e6", help="comma-separated memory sizes N")
    p.add_argument("--repeat", type=int, default=11)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cases", default=None, help="comma-separated subset of the cases")
    p.add_argument("--json", default=None, help="write the records here")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    only = set(a.cases.split(",")) if a.cases else None
    allrec = {}
    for n in (int(float(x)) for x in a.n.split(",")):
        res = measure(n, a.repeat, only)
        allrec[n] = res
        print(f"N={n:.0e} threads={torch.get_num_threads()} load={os.getloadavg()[0]:.1f} "
              f"floor median {res['floor']['median_s'] * 1e3:.2f} ms")
        for name, r in res.items():
            print(f"  {name:17s} {r['median_s'] * 1e3:9.2f} ms  {r['ratio']:6.1f}x floor  spread {r['spread']:5.2f}"
                  f"  faults {r['faults']:6d}  sys {r['sys_s'] * 1e3:6.1f} ms")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(allrec, f, indent=1)


if __name__ == "__main__":
    main()
