"""The DNC access's write-then-read op (`neuralmem_dnc::write_read`) against the three ops it replaces, the
access step as one autograd node (`ops.dnc.access_step`) against the ops one by one, and MemoryCore's whole
sequence as one node (nn/core_sequence.py) against one node per step.

    python benchmarks/dnc_write_read.py [--n 128,1024] [--repeat 50] [--steps 7] [--json out.json]

One torch thread, float32, the pytorch-dnc setting of MemoryCore's benchmark
(B=16, D=64, R=4 read heads, W=1 write head). Two parts, each alternating
its sides within one process so that they see the same machine load:

  ops    write_read's forward and its backward (the gradients of all three
         outputs given) against memory_write + content_addressing +
         memory_read and their three backwards plus the two adds of the new
         memory's gradients; medians of --repeat calls, and each in passes of
         one memory.sum() over the same (B, N, D) memory, timed in the same
         loop.
         Also the write addressing's backward with its memory gradient added
         to another: in place (`addressing_backward_add_`, as access_step's
         backward runs it), into a new tensor (`addressing_backward_add`),
         and as content_addressing_backward and an add.
  step   MemoryCore's training step (B=16, T=22, forward, backward, Adam)
         with the whole sequence as one node (nn/core_sequence.py, the
         default), with MemoryAccess running each step as one node
         (`access_step`), the same node with the write addressing's gradient added
         into a new tensor (`addressing_backward_add`) instead of in place,
         calling write_read after the other ops one by one, and calling the
         three ops instead; medians of --steps rounds.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import neuralmem_fast.nn.access as access_mod  # noqa: E402
from neuralmem_fast.nn import MemoryCore  # noqa: E402
from neuralmem_fast.nn.core_sequence import CoreSequence  # noqa: E402
from neuralmem_fast.ops import dnc  # noqa: E402

B, D, R, W, T = 16, 64, 4, 1, 22
EPS = 1e-12


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_ops(N, repeat):
    g = torch.Generator().manual_seed(0)
    m = torch.randn(B, N, D, generator=g)
    ww = torch.softmax(torch.randn(B, W, N, generator=g), -1)
    e, a = torch.rand(B, W, D, generator=g), torch.randn(B, W, D, generator=g)
    k, s = torch.randn(B, R, D, generator=g), 1 + torch.rand(B, R, generator=g)
    x = (m, ww, e, a, k, s)
    lib, mem = torch.ops.neuralmem_dnc, torch.ops.neuralmem
    new, rw, _ = lib.write_read(*x, EPS)
    gm, grw, grd = torch.randn(B, N, D, generator=g), torch.randn(B, R, N, generator=g), torch.randn(B, R, D, generator=g)

    def three_bwd():
        dm_read, dw = mem.memory_read_backward(grd, new, rw)
        dm_addr, _, _ = mem.content_addressing_backward(grw + dw, rw, new, k, s, EPS)
        return mem.memory_write_backward(gm + dm_read + dm_addr, m, ww, e, a)

    # The write addressing's backward: its memory gradient added to another by the native op, against
    # content_addressing_backward and autograd's add.
    wk, ws = torch.randn(B, W, D, generator=g), 1 + torch.rand(B, W, generator=g)
    c = mem.content_addressing(m, wk, ws, EPS)
    dc = torch.randn(B, W, N, generator=g)
    gm_inplace = gm.clone()  # summed into at every call (the timing does not depend on its values)

    cases = {
        "pass": lambda: m.sum(),
        "addr_add_inplace": lambda: lib.addressing_backward_add_(gm_inplace, dc, c, m, wk, ws, EPS),
        "addr_add": lambda: lib.addressing_backward_add(gm, dc, c, m, wk, ws, EPS),
        "addr_then_add": lambda: gm + mem.content_addressing_backward(dc, c, m, wk, ws, EPS)[0],
        "fwd": lambda: lib.write_read(*x, EPS),
        "fwd_three": lambda: dnc.write_read_unfused(*x),
        "bwd": lambda: lib.write_read_backward(gm, grw, grd, *x, new, rw, EPS),
        "bwd_three": three_bwd,
    }
    times = {name: [] for name in cases}
    for i in range(repeat + 1):
        for name, fn in cases.items():
            dt = _timed(fn)
            if i:  # the first round warms up
                times[name].append(dt)
    med = {name: statistics.median(v) for name, v in times.items()}
    return {"N": N, **{f"{k}_ms": v * 1e3 for k, v in med.items()},
            **{f"{k}_passes": med[k] / med["pass"]
               for k in ("fwd", "fwd_three", "bwd", "bwd_three", "addr_add_inplace", "addr_add", "addr_then_add")}}


def bench_step(N, steps):
    torch.manual_seed(0)
    net = MemoryCore(10, 10, N, D, R, W, hidden_size=64)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    x = torch.rand(B, T, 10, generator=torch.Generator().manual_seed(0))

    def step():
        loss = net(x)[0].pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    native, one_node = access_mod.write_read, access_mod.has_access_step_kernels
    no_node = lambda: False  # noqa: E731
    # (name, write_read, whether the node runs, whether its last op adds in place, the sequence as one node)
    sides = (("sequence", native, one_node, True, True), ("access_step", native, one_node, True, False),
             ("access_step_copy", native, one_node, False, False), ("write_read", native, no_node, True, False),
             ("three_ops", dnc.write_read_unfused, no_node, True, False))
    times = {name: [] for name, *_ in sides}
    try:
        for i in range(steps + 1):
            for name, fn, node, in_place, seq in sides:
                access_mod.write_read, access_mod.has_access_step_kernels = fn, node
                dnc._AccessStep.add_in_place = in_place
                CoreSequence.enabled = seq
                dt = _timed(step)
                if i:
                    times[name].append(dt)
    finally:
        access_mod.write_read, access_mod.has_access_step_kernels = native, one_node
        dnc._AccessStep.add_in_place = True
        CoreSequence.enabled = True
    q, a, a2, b, c = (statistics.median(times[k]) for k in ("sequence", "access_step", "access_step_copy",
                                                             "write_read", "three_ops"))
    return {"N": N, "step_sequence_ms": q * 1e3, "speedup_sequence": a / q, "step_access_step_ms": a * 1e3, "step_access_step_copy_ms": a2 * 1e3,
            "step_write_read_ms": b * 1e3, "step_three_ops_ms": c * 1e3, "speedup": c / b, "speedup_node": b / a,
            "speedup_node_vs_three": c / a, "speedup_in_place": a2 / a}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", default="128,1024", help="memory sizes, comma-separated")
    p.add_argument("--repeat", type=int, default=50, help="op calls per side")
    p.add_argument("--steps", type=int, default=7, help="MemoryCore step pairs")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.repeat < 1 or args.steps < 1:
        p.error("--repeat and --steps must be at least 1")
    if not dnc.has_write_read_kernel():
        sys.exit("the native extension is not built (make build): write_read has no CPU kernel")
    torch.set_num_threads(1)
    sizes = [int(float(v)) for v in args.n.split(",")]
    rows = []
    print("| N | fwd | three ops fwd | bwd | three ops bwd | fwd passes | bwd passes | addressing bwd + add, "
          "in place (passes) | into a new tensor (passes) | separate (passes) | step, one node | step, one node, "
          "add into a new tensor | step, write_read | step, three ops | write_read vs three ops | one node vs "
          "write_read | in place vs a new tensor | step, sequence as one node | sequence vs one node per step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for N in sizes:
        r = {**bench_ops(N, args.repeat), **bench_step(N, args.steps)}
        rows.append(r)
        print(f"| {N:,} | {r['fwd_ms']:.3f} ms | {r['fwd_three_ms']:.3f} ms | {r['bwd_ms']:.3f} ms | "
              f"{r['bwd_three_ms']:.3f} ms | {r['fwd_passes']:.1f} | {r['bwd_passes']:.1f} | "
              f"{r['addr_add_inplace_ms']:.3f} ms ({r['addr_add_inplace_passes']:.1f}) | "
              f"{r['addr_add_ms']:.3f} ms ({r['addr_add_passes']:.1f}) | "
              f"{r['addr_then_add_ms']:.3f} ms ({r['addr_then_add_passes']:.1f}) | {r['step_access_step_ms']:.1f} ms | "
              f"{r['step_access_step_copy_ms']:.1f} ms | {r['step_write_read_ms']:.1f} ms | "
              f"{r['step_three_ops_ms']:.1f} ms | {r['speedup']:.2f}x | {r['speedup_node']:.2f}x | "
              f"{r['speedup_in_place']:.3f}x | {r['step_sequence_ms']:.1f} ms | {r['speedup_sequence']:.2f}x |",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
