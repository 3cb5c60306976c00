"""MemoryCore's training step against the `dnc` package's, interleaved round by round (issue 17).

    python benchmarks/memory_core_paired.py [--n 128,1024] [--rounds 31,7] [--threads 1] [--warm 0]
                                            [--optimizer adam|adam-fused] [--json OUT.json]

test_bench_memory_core.py (pytest-benchmark) times each provider in a block of rounds of its own, so on a
machine shared with other tenants a burst of load can fall on one provider and miss the other: in one such
run the same-size LSTM took 1.7x its usual time and MemoryCore's median at N = 1,024 1.6x. Here each round
times one step of every provider in turn: the `dnc` package, MemoryCore and the same-size LSTM, with the
setting, models and step function of test_bench_memory_core.py (B=16, T=22, R=4, D=64, an LSTM of 64
units; forward, a mean squared loss, backward, Adam), one torch thread. A round's ratio is the package's
step over MemoryCore's, both timed within seconds of each other; the report gives every provider's median
step, the median of the rounds' ratios and their range. Needs the `dnc` package (pytorch-dnc).

--threads sets torch's intra-op threads for every provider alike (1 by default, as in every run in
benchmarks/REPORT.md until the report says otherwise; 0 keeps torch's own default, one a core).

--warm K runs K untimed steps of a provider right before its timed step, in every round (0 by default, as
in every run until the report says otherwise). The timed step then follows one of its own, not the previous
provider's: at N = 1,024 MemoryCore's step right after the package's took up to 2x its usual time in some
rounds, with tens of ms of system time and no page faults of its own, while its next step took the usual time.

--optimizer adam-fused gives every provider torch's Adam with fused=True (one kernel for all parameters)
instead of torch's Adam as constructed by default ("adam", as in every run until the report says otherwise),
which on the CPU loops over the parameters with several small ops each: about 0.7 ms of MemoryCore's step at
N = 128 against 0.17 ms fused.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from test_bench_memory_core import OPTIMIZERS, has_dnc_package, make_train_step  # noqa: E402

PROVIDERS = ("dnc package", "MemoryCore", "LSTM (same size)")


def timed(step):
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def run(N, rounds, B=16, warm=0, optimizer="adam"):
    steps = {p: make_train_step(p, N, B, optimizer) for p in PROVIDERS}
    for p, step in steps.items():
        for _ in range(1 if (p == "dnc package" and N >= 1024) else 2):
            step()
    times = {p: [] for p in PROVIDERS}
    for r in range(rounds):
        for p in PROVIDERS:
            for _ in range(warm):
                steps[p]()
            times[p].append(timed(steps[p]))
        print(f"N={N} round {r + 1}/{rounds}: " + ", ".join(f"{p} {times[p][-1] * 1e3:.1f} ms" for p in PROVIDERS),
              file=sys.stderr, flush=True)
    ratios = [a / b for a, b in zip(times["dnc package"], times["MemoryCore"])]
    return {
        "N": N, "B": B, "rounds": rounds, "warm": warm, "optimizer": optimizer,
        "median_s": {p: statistics.median(t) for p, t in times.items()},
        "times_s": times,
        "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
        "ratio_of_medians": statistics.median(times["dnc package"]) / statistics.median(times["MemoryCore"]),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", default="128,1024", help="memory sizes, comma-separated")
    ap.add_argument("--rounds", default="31,7", help="rounds per memory size, comma-separated")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads for every provider (default 1; 0: torch's default)")
    ap.add_argument("--warm", type=int, default=0,
                    help="untimed steps of each provider right before its timed step, every round (default 0)")
    ap.add_argument("--optimizer", default="adam", choices=OPTIMIZERS,
                    help="every provider's optimizer: torch's Adam as constructed by default, or fused=True")
    ap.add_argument("--json", default=None, help="write the timings and ratios here")
    a = ap.parse_args(argv)
    ns = [int(v) for v in a.n.split(",")]
    rounds = [int(v) for v in a.rounds.split(",")]
    if len(rounds) == 1:
        rounds = rounds * len(ns)
    if len(rounds) != len(ns):
        ap.error(f"--rounds: give one count or one per memory size ({len(ns)}), got {a.rounds!r}")
    if a.threads < 0:
        ap.error(f"--threads: expected 0 (torch's default) or a positive count, got {a.threads}")
    if a.warm < 0:
        ap.error(f"--warm: expected 0 or a positive count of untimed steps, got {a.warm}")
    if not has_dnc_package():
        sys.exit("memory_core_paired.py: the dnc package (pytorch-dnc) is not installed or does not import")
    if a.threads:
        torch.set_num_threads(a.threads)
    results = [run(n, r, warm=a.warm, optimizer=a.optimizer) for n, r in zip(ns, rounds)]
    print("| N | rounds | dnc package | MemoryCore | LSTM (same size) | ratio: median of rounds (range) | ratio of medians |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        m = r["median_s"]
        print(f"| {r['N']:,} | {r['rounds']} | {m['dnc package'] * 1e3:.1f} ms | {m['MemoryCore'] * 1e3:.1f} ms | "
              f"{m['LSTM (same size)'] * 1e3:.2f} ms | {r['ratio_median']:.1f}x ({r['ratio_min']:.1f}x-"
              f"{r['ratio_max']:.1f}x) | {r['ratio_of_medians']:.1f}x |")
    if a.json:
        meta = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        with open(a.json, "w") as f:
            json.dump({"machine": meta, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
