"""The sparse access ops against plain PyTorch, in one run: medians and ratios.

    python benchmarks/sparse_ops.py [--device cpu|cuda] [--threads T] [--reps R] [--max-n N] [--cpu-time]

cosine_topk at B=8, H=4, D=64, k=8 for N = 10^4, 10^5, 10^6 (float32): the
native op, PyTorch's normalize + matmul + topk (the reference's arithmetic with
topk instead of a full sort), and the read-bandwidth floor measured as
memory.sum() over the same tensor; GB/s is the memory's bytes over the time.
sparse_read forward + backward at B=8, H=4, K=8, D=64: the native op (with its
registered gradient) against sparse_read_ref under autograd.
"""
import argparse
import statistics
import time

import torch

from neuralmem_fast.ops import sparse as sp


CLOCK = time.perf_counter


def median_time(fn, reps, sync):
    fn()
    sync()
    ts = []
    for _ in range(reps):
        t = CLOCK()
        fn()
        sync()
        ts.append(CLOCK() - t)
    return statistics.median(ts)


def torch_topk(memory, keys, k, eps=1e-12):
    kn = torch.nn.functional.normalize(keys, dim=-1, eps=eps)
    mn = torch.nn.functional.normalize(memory, dim=-1, eps=eps)
    return torch.topk(torch.matmul(kn, mn.transpose(-1, -2)), k, dim=-1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--max-n", type=float, default=1e6)
    p.add_argument("--cpu-time", action="store_true",
                   help="time with the process's CPU time instead of the wall clock (on a loaded machine, with "
                        "--threads 1: the time the op ran, not the time it waited for a core)")
    a = p.parse_args()
    global CLOCK
    if a.cpu_time:
        CLOCK = time.process_time
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    print(f"device={dev} threads={torch.get_num_threads()} native={sp.has_sparse_kernels(dev.type)} reps={a.reps} "
          f"clock={'process CPU time' if a.cpu_time else 'wall'}")
    B, H, D, k = 8, 4, 64, 8
    print(f"\ncosine_topk B={B} H={H} D={D} k={k} float32 (median ms; GB/s = memory bytes / time)")
    print(f"{'N':>8} {'native':>10} {'GB/s':>7} {'torch':>10} {'GB/s':>7} {'torch/native':>12} {'sum() floor':>12} "
          f"{'GB/s':>7} {'native/floor':>12}")
    N = 10_000
    while N <= a.max_n:
        g = torch.Generator(device=dev).manual_seed(0)
        memory = torch.randn(B, N, D, device=dev, generator=g)
        keys = torch.randn(B, H, D, device=dev, generator=g)
        nbytes = memory.numel() * memory.element_size()
        got = sp.cosine_topk(memory, keys, k)
        want = torch_topk(memory, keys, k)
        torch.testing.assert_close(got[0], want.values, atol=1e-5, rtol=1e-4)
        t_nat = median_time(lambda: sp.cosine_topk(memory, keys, k), a.reps, sync)
        t_ref = median_time(lambda: torch_topk(memory, keys, k), a.reps, sync)
        t_sum = median_time(lambda: memory.sum(), a.reps, sync)
        gbs = lambda t: nbytes / t / 1e9
        print(f"{N:>8} {t_nat * 1e3:>10.2f} {gbs(t_nat):>7.1f} {t_ref * 1e3:>10.2f} {gbs(t_ref):>7.1f} "
              f"{t_ref / t_nat:>12.2f} {t_sum * 1e3:>12.2f} {gbs(t_sum):>7.1f} {t_sum / t_nat:>12.2f}")
        del memory, want, got
        N *= 10

    K = 8
    print(f"\nsparse_read forward+backward B={B} H={H} K={K} D={D} (median us)")
    print(f"{'dtype':>8} {'native':>10} {'ref':>10} {'ref/native':>10}")
    for dt in (torch.float32, torch.float64):
        rows = torch.randn(B, H, K, D, device=dev, dtype=dt, requires_grad=True)
        keys = torch.randn(B, H, D, device=dev, dtype=dt, requires_grad=True)
        s = (torch.rand(B, H, device=dev, dtype=dt) * 5).requires_grad_()
        gr, gw = torch.randn(B, H, D, device=dev, dtype=dt), torch.randn(B, H, K, device=dev, dtype=dt)

        def step(fn):
            r, w = fn(rows, keys, s)
            torch.autograd.grad((r, w), (rows, keys, s), (gr, gw))

        t_nat = median_time(lambda: step(sp.sparse_read), a.reps * 20, sync)
        t_ref = median_time(lambda: step(sp.sparse_read_ref), a.reps * 20, sync)
        print(f"{str(dt).split('.')[1]:>8} {t_nat * 1e6:>10.1f} {t_ref * 1e6:>10.1f} {t_ref / t_nat:>10.2f}")


if __name__ == "__main__":
    main()
