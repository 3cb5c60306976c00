"""write_read's backward as MemoryCore's sequence node calls it, against the same call on inputs that stay in
cache: how much of its time inside a training step the memory system, not the kernel, costs (issue 17).

    python benchmarks/write_read_chain.py [--n 128] [--b 8] [--rounds 60] [--processes 1] [--json out.json]

One chunk of the node at the dnc package's setting: B = 8 memories (a chunk of the batch of 16 at two threads)
of N slots of width 64, 4 read heads, 1 write head, T = 22 steps, float32, one torch thread. Each round runs
write_read's forward over the 22 steps, keeping every step's memory as the node does (fresh tensors), then
the backward from the last step to the first, the memory's gradient passed from each step to the one before.
Three modes, medians of the per-call times over the rounds (the first five rounds left out):

  chain        the backward over the kept steps, as in the node;
  chain+flush  the same after a 12 MiB write between the forward and the backward, about what the rest of a
               training step touches between them;
  reuse        the same call 22 times on one step's inputs and no incoming memory gradient, which stay in
               L1 and L2: the kernel's own time.

--processes 2 runs two copies at once, one a core, as the node's two chunks run at two threads; the report
gives each copy's medians.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from neuralmem_fast import _ext  # noqa: E402

MODES = ("chain", "chain+flush", "reuse")


def measure(N, B, rounds, D=64, R=4, T=22, eps=1e-6, skip=5):
    C = _ext._C
    g = torch.Generator().manual_seed(0)

    def step_inputs():
        ww = torch.softmax(torch.randn(B, 1, N, generator=g), -1)
        return (ww, torch.rand(B, 1, D, generator=g), torch.randn(B, 1, D, generator=g),
                torch.randn(B, R, D, generator=g), torch.rand(B, R, generator=g) * 5 + 1)

    steps = [step_inputs() for _ in range(T)]
    g_reads = [torch.randn(B, R, D, generator=g) for _ in range(T)]
    pend = (torch.randn(B, N, generator=g), torch.randn(B, 1, N, generator=g), torch.randn(B, 1, D, generator=g))
    flush = torch.empty(3 << 20)  # 12 MiB of float32

    def forward():
        memory, kept = torch.randn(B, N, D, generator=g) * 0.1, []
        for t in range(T):
            new, rw, _, dots = C.write_read_keep(memory, *steps[t], eps)
            kept.append((memory, new, rw, dots))
            memory = new
        return kept

    def call(g_mem, t, memory, new, rw, dots):
        t0 = time.perf_counter()
        dm = C.write_read_backward_pending(g_mem, None, g_reads[t], memory, *steps[t], new, rw, eps, *pend, dots)[0]
        return dm, time.perf_counter() - t0

    per = {m: [] for m in MODES}
    for r in range(rounds):
        for mode in MODES:
            kept = forward()
            if mode == "chain+flush":
                flush.fill_(float(r))
            times, g_mem = [], None
            for t in range(T - 1, -1, -1):
                if mode == "reuse":
                    _, dt = call(None, T // 2, *kept[T // 2])
                else:
                    g_mem, dt = call(g_mem, t, *kept[t])
                times.append(dt)
            if r >= skip:
                per[mode].extend(times)
    return {m: statistics.median(v) * 1e6 for m, v in per.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=128, help="slots per memory (default 128)")
    ap.add_argument("--b", type=int, default=8, help="memories, a chunk of the batch (default 8)")
    ap.add_argument("--rounds", type=int, default=60, help="rounds of forward and backward per mode (default 60)")
    ap.add_argument("--processes", type=int, default=1, choices=(1, 2), help="copies run at once (default 1)")
    ap.add_argument("--json", help="write the medians here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    for flag, v in (("--n", a.n), ("--b", a.b)):
        if v < 1:
            ap.error(f"{flag} must be at least 1, got {v}")
    if a.rounds <= 5:
        ap.error(f"--rounds must be more than 5 (the first five are left out), got {a.rounds}")
    torch.set_num_threads(1)
    if a.worker:
        print(json.dumps(measure(a.n, a.b, a.rounds)))
        return
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--n", str(a.n), "--b", str(a.b),
           "--rounds", str(a.rounds)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(a.processes)]
    results = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode != 0:
            sys.exit(f"write_read_chain: a worker failed with exit code {p.returncode}")
        results.append(json.loads(out))
    print(f"write_read backward, B = {a.b}, N = {a.n}, D = 64, R = 4, T = 22, float32, one thread a process, "
          f"{a.processes} process(es) at once; median µs a call")
    print("| process | " + " | ".join(MODES) + " |")
    print("|---|" + "---|" * len(MODES))
    for i, res in enumerate(results):
        print(f"| {i} | " + " | ".join(f"{res[m]:.1f}" for m in MODES) + " |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"N": a.n, "B": a.b, "rounds": a.rounds, "processes": a.processes, "torch": torch.__version__,
                       "median_us": results}, f, indent=1)


if __name__ == "__main__":
    main()
