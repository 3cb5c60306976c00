"""MemoryCore's training step at several sequence lengths, alternated in one process: what one more time step
costs, and whether a late step costs more than an early one (issue 17).

    python benchmarks/memory_core_length.py [--lengths 2,6,11,16,22] [--n 128] [--threads 2] [--rounds 12]
                                            [--block 25] [--json out.json]

The dnc package's setting of benchmarks/test_bench_memory_core.py (batch 16, 4 read heads, slot width 64,
an LSTM of 64 units; forward, a mean squared loss, backward, torch's Adam) with sequences of each length in
turn: a round runs a block of steps at every length, and a length's time is the median over the rounds
(the first round left out) of its blocks' medians (the first five steps of a block left out). The marginal
cost between two lengths is the difference of their times over the difference of their lengths.

The sequence node keeps every step's memory for the backward (B N D floats a step), so a longer sequence
holds more bytes beyond the caches; if that slowed its steps, the marginal cost would rise with the length.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
from test_bench_memory_core import SETTING, make_model  # noqa: E402


def measure(lengths, N=128, rounds=12, block=25, B=16, skip=5):
    """{length: median step time in seconds} for MemoryCore's training step at each sequence length. One model
    and optimizer serve every length (not one make_train_step each), so that only the length changes."""
    net, fwd = make_model("MemoryCore", N)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    xs = {T: torch.rand(B, T, SETTING["io"], generator=torch.Generator().manual_seed(0)) for T in lengths}
    per = {T: [] for T in lengths}
    for r in range(rounds):
        for T in lengths:
            times = []
            for _ in range(block):
                t0 = time.perf_counter()
                y = fwd(xs[T])
                loss = y.pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                times.append(time.perf_counter() - t0)
            if r >= 1:
                per[T].append(statistics.median(times[skip:] if block > skip else times))
    return {T: statistics.median(v) for T, v in per.items()}


def marginals(times):
    """[(T0, T1, seconds per added time step)] between consecutive lengths."""
    ls = sorted(times)
    return [(a, b, (times[b] - times[a]) / (b - a)) for a, b in zip(ls, ls[1:])]


def parse_lengths(text):
    try:
        ls = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lengths must be integers separated by commas, got {text!r}")
    if len(set(ls)) < 2 or min(ls) < 1:
        raise argparse.ArgumentTypeError(f"--lengths needs at least two different lengths of at least 1, got {text!r}")
    return sorted(set(ls))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=parse_lengths, default=[2, 6, 11, 16, 22],
                    help="sequence lengths, comma-separated (default 2,6,11,16,22)")
    ap.add_argument("--n", type=int, default=128, help="slots per memory (default 128)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--rounds", type=int, default=12, help="rounds over the lengths; the first is left out (default 12)")
    ap.add_argument("--block", type=int, default=25, help="steps per length and round (default 25)")
    ap.add_argument("--json", help="write the times here")
    a = ap.parse_args(argv)
    for flag, v, least in (("--n", a.n, 1), ("--threads", a.threads, 1), ("--rounds", a.rounds, 2),
                           ("--block", a.block, 1)):
        if v < least:
            ap.error(f"{flag} must be at least {least}, got {v}")
    torch.set_num_threads(a.threads)
    times = measure(a.lengths, N=a.n, rounds=a.rounds, block=a.block)
    print(f"MemoryCore training step, B = 16, N = {a.n}, {a.threads} thread(s), {a.rounds - 1} rounds of "
          f"{a.block} steps a length; medians")
    print("| length | step (ms) | per added time step from the previous length (µs) |")
    print("|---|---|---|")
    inc = {b: m for _, b, m in marginals(times)}
    for T in sorted(times):
        print(f"| {T} | {times[T] * 1e3:.3f} | " + (f"{inc[T] * 1e6:.0f}" if T in inc else "") + " |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"N": a.n, "threads": a.threads, "rounds": a.rounds, "block": a.block,
                       "torch": torch.__version__, "step_s": {str(T): v for T, v in times.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
