"""The DNC usage and write-weights op (`neuralmem_dnc::write_weights`) with and without subnormal arithmetic.

    python benchmarks/dnc_write_weights.py [--n 128,1024] [--repeat 200]

One torch thread, float32, B=16, R=4 read heads, W=1 write head. The usage is
drawn three ways: all zero (a fresh memory), uniform in [0, 1), and full (every
slot in [0.6, 1), a long-lived memory). The allocation multiplies the sorted
usages; in a full memory that product passes below the smallest normal float
part-way through the slots. The op then takes it as 0 (csrc/dnc/dnc_ops.cpp,
`allocation`), so its time should not change when the CPU flushes subnormals
(`torch.set_flush_denormal(True)`), which this script alternates with the
default, call by call, in one process. Medians in microseconds.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from neuralmem_fast.ops import dnc  # noqa: E402

B, R, W = 16, 4, 1


def bench(N, usage, repeat):
    g = torch.Generator().manual_seed(0)
    u = {"zero": torch.zeros(B, N), "uniform": torch.rand(B, N, generator=g),
         "full": 0.6 + 0.4 * torch.rand(B, N, generator=g)}[usage]
    sm = lambda *s: torch.softmax(torch.randn(*s, generator=g), -1)  # noqa: E731
    x = (u, sm(B, W, N), 0.1 * torch.rand(B, R, generator=g), sm(B, R, N), sm(B, W, N),
         torch.rand(B, W, generator=g), torch.rand(B, W, generator=g))
    lib = torch.ops.neuralmem_dnc
    _, _, hu, order = lib.write_weights(*x, dnc.ALLOC_EPS)
    gu, gw = torch.randn(B, N, generator=g), torch.randn(B, W, N, generator=g)
    calls = {"fwd": lambda: lib.write_weights(*x, dnc.ALLOC_EPS),
             "bwd": lambda: lib.write_weights_backward(gu, gw, *x, hu, order, dnc.ALLOC_EPS)}
    times = {}
    try:
        for i in range(repeat + 1):
            for ftz in (False, True):
                torch.set_flush_denormal(ftz)
                for name, fn in calls.items():
                    t0 = time.perf_counter()
                    fn()
                    if i:  # the first round warms up
                        times.setdefault((name, ftz), []).append(time.perf_counter() - t0)
    finally:
        torch.set_flush_denormal(False)
    return {k: statistics.median(v) * 1e6 for k, v in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", default="128,1024")
    p.add_argument("--repeat", type=int, default=200)
    a = p.parse_args()
    if not dnc.has_dnc_kernels():
        sys.exit("the native extension is not built (make build)")
    torch.set_num_threads(1)
    print("| N | usage | forward | forward, subnormals flushed | backward | backward, subnormals flushed |")
    print("|---|---|---|---|---|---|")
    for N in (int(n) for n in a.n.split(",")):
        for usage in ("zero", "uniform", "full"):
            m = bench(N, usage, a.repeat)
            print(f"| {N:,} | {usage} | {m['fwd', False]:.1f} us | {m['fwd', True]:.1f} us "
                  f"| {m['bwd', False]:.1f} us | {m['bwd', True]:.1f} us |")


if __name__ == "__main__":
    main()
