"""The large-memory sweep across torch.distributed ranks (`scale --distributed`).

Run under torchrun, one process per rank:

    torchrun --nproc_per_node=2 -m neuralmem_fast scale --distributed --threads 1
    torchrun --nproc_per_node=1 -m neuralmem_fast scale --distributed --threads 2   # the one-process baseline

For each N the logical memory of N slots is split across the ranks
(ShardedMemory) and rank 0 records, per step: the median time of a read
(forward), of a read's forward+backward, and of an in-place write; the bytes
this rank sent through the memory's collectives in each of those steps
(counted, not estimated); and the latency of one all-reduce of the read's
partials, measured in the same run. Results go to
<out>/scale_distributed_w<world>.json and a plot of bytes and time per step
against N.
"""
import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

from ..nn import ShardedMemory


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m neuralmem_fast scale --distributed",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--min-n", type=float, default=1e3, help="smallest N (slots of the whole memory)")
    p.add_argument("--max-n", type=float, default=1e7, help="largest N")
    p.add_argument("--batch", type=int, default=1, help="B, memories")
    p.add_argument("--dim", type=int, default=64, help="D, slot width")
    p.add_argument("--heads", type=int, default=4, help="H, read heads")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per point (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per rank")
    p.add_argument("--backend", default="auto", help="local kernels: auto|cpu|cuda|triton|torch")
    p.add_argument("--out", default="results", help="output folder (rank 0 writes)")
    p.add_argument("--no-plot", action="store_true")
    return p.parse_args(argv)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, reps, device, group):
    times = []
    for _ in range(reps):
        dist.barrier(group=group)
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    # Every rank waits for the slowest: report the max over ranks of the median.
    med = torch.tensor([statistics.median(times)], dtype=torch.float64)
    dist.all_reduce(med, op=dist.ReduceOp.MAX, group=group)
    return float(med.item())


def _init():
    if dist.is_initialized():
        return False
    if "RANK" not in os.environ:
        raise SystemExit("scale --distributed runs under torchrun, e.g. "
                         "`torchrun --nproc_per_node=2 -m neuralmem_fast scale --distributed`")
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return True


def run(args):
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world = dist.get_rank(), dist.get_world_size()
    B, D, H = args.batch, args.dim, args.heads
    sizes, n = [], int(args.min_n)
    while n <= int(args.max_n):
        sizes.append(n)
        n *= 10
    rows = []
    progress = None
    if rank == 0:
        try:
            from tqdm import tqdm

            # disable=None: no bar when stderr is not a terminal (a log would keep every frame).
            progress = tqdm(total=len(sizes), desc=f"sharded sweep, world {world}", disable=None)
        except ImportError:
            progress = None
    for n in sizes:
        sm = ShardedMemory(B, n, D, dtype=torch.float32, device=device, backend=args.backend)
        gen = torch.Generator(device="cpu").manual_seed(1000 + rank)
        sm.memory.copy_(torch.randn(sm.memory.shape, generator=gen))
        group = sm.group
        keys = torch.randn(B, H, D, device=device)
        strengths = torch.rand(B, H, device=device) * 10
        wk, ws = torch.randn(B, 1, D, device=device), torch.rand(B, 1, device=device) * 10
        erase, add = torch.rand(B, 1, D, device=device) * 1e-3, torch.randn(B, 1, D, device=device) * 1e-3

        def read():
            with torch.no_grad():
                sm.read(keys, strengths)

        k_req = keys.clone().requires_grad_(True)
        s_req = strengths.clone().requires_grad_(True)
        m_req = sm.memory.detach().requires_grad_(True)

        def read_fwd_bwd():
            m_req.grad = None
            sm.read(k_req, s_req, memory=m_req).sum().backward()

        def write():
            sm.write_(wk, ws, erase, add)

        partial = torch.zeros(B, H, D + 1, device=device)

        def allreduce():
            dist.all_reduce(partial, group=group)

        row = {"N": n, "world": world, "threads": torch.get_num_threads(), "B": B, "D": D, "H": H,
               "backend": sm.backend, "memory_bytes_per_rank": sm.memory.numel() * sm.memory.element_size()}
        for name, fn in (("read", read), ("read_fwd_bwd", read_fwd_bwd), ("write", write),
                         ("allreduce", allreduce)):
            fn()  # warm-up
            sm.comm.reset()
            fn()
            row[f"{name}_comm_bytes"] = sm.comm.bytes
            row[f"{name}_s"] = _timed(fn, args.reps, device, group)
        rows.append(row)
        del sm
        if progress is not None:
            progress.update(1)
    if progress is not None:
        progress.close()
    if rank == 0:
        _report(rows, args, world)
    return rows


def _report(rows, args, world):
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"scale_distributed_w{world}.json")
    with open(path, "w") as f:
        json.dump({"world": world, "rows": rows}, f, indent=2)
    print(f"{'N':>10} {'read ms':>9} {'fwd+bwd ms':>11} {'write ms':>9} {'allreduce ms':>13} "
          f"{'read B/step':>12} {'bwd B/step':>11}")
    for r in rows:
        print(f"{r['N']:>10} {r['read_s'] * 1e3:>9.3f} {r['read_fwd_bwd_s'] * 1e3:>11.3f} "
              f"{r['write_s'] * 1e3:>9.3f} {r['allreduce_s'] * 1e3:>13.3f} {r['read_comm_bytes']:>12} "
              f"{r['read_fwd_bwd_comm_bytes']:>11}")
    print(f"wrote {path}")
    if args.no_plot:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["N"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("read", "read"), ("read_fwd_bwd", "read fwd+bwd"), ("write", "write")):
        axes[0].loglog(ns, [r[f"{key}_s"] for r in rows], marker="o", label=label)
        axes[1].semilogx(ns, [r[f"{key}_comm_bytes"] for r in rows], marker="o", label=label)
    axes[0].set_xlabel("N (slots, whole memory)")
    axes[0].set_ylabel("seconds per step")
    axes[0].set_title(f"time per step, {world} rank(s)")
    axes[1].set_xlabel("N (slots, whole memory)")
    axes[1].set_ylabel("bytes sent per rank per step")
    axes[1].set_title("communication per step (flat in N)")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    png = os.path.join(args.out, f"scale_distributed_w{world}.png")
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")


def main(argv=None):
    args = _parse(argv)
    started = _init()
    try:
        run(args)
    finally:
        if started:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
