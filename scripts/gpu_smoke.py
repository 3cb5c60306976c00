"""The Python part of the GPU smoke check (scripts/gpu_smoke.sh): a few minutes on one card.

    python scripts/gpu_smoke.py PART [--out DIR] [--dry-run]

PART is one of:
  preflight  fails unless a CUDA device is visible and the CUDA kernels are built
  tiny       every op, CUDA C++ and Triton, on tiny odd shapes that take the
             split and multi-tile paths, float32 and float16, with misaligned
             views (what gpu_smoke.sh runs under compute-sanitizer)
  parity     the split path at N ~ 3e5, D 64 and 300, against float64, and
             bit-for-bit repeatability of forward and backward; then, per
             backend, nn.reversible_read_write's gradients against plain autograd
  large      index cases past 2^31 elements ((H-1)*N and N*D >= 2^31)
  bandwidth  content_read at N = 16M against copy_ on the same tensor; writes
             bandwidth.json and bandwidth.md to --out
  sparse     the sparse access ops (neuralmem_sparse: cosine_topk, sparse_read and
             its backward, the LRU list) on CUDA against the float64 references and
             the CPU kernels, at odd shapes with several splits of N, K = k = 64
  all        parity, large, bandwidth and sparse (tiny runs under the sanitizer)

--dry-run prints the cases a part would run, without touching a GPU. The case
lists are plain functions (tests/test_gpu_smoke.py checks them on CPU).
Exits non-zero on the first failing case.
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

BACKENDS = ("cuda", "triton")
# The split planner's smallest split is 1024 slots (kMinChunk) and the Triton
# planner splits by SM count: these N take several splits on any card, and
# D 300 takes two column tiles of the CUDA kernels (256 columns each).
TINY_SHAPES = [  # (B, N, H, D, W)
    (1, 1, 1, 1, 1),
    (2, 7, 3, 3, 2),
    (1, 4099, 5, 33, 2),
    (2, 2053, 1, 300, 1),
    (1, 3001, 17, 64, 3),
]
TINY_DTYPES = ("float32", "float16")
PARITY_SHAPES = [(1, 300_007, 4, 64, 2), (1, 300_007, 2, 300, 1)]
# (kind, B, N, H, D, dtype): the index products that pass 2^31.
LARGE_CASES = [
    ("weights_hn", 1, (1 << 29) + 5, 5, 1, "float16"),  # (H-1)*N >= 2^31 in the (B,H,N) weights
    ("memory_nd", 1, (1 << 25) + 3, 1, 64, "float16"),  # N*D >= 2^31 in the memory
]
BANDWIDTH = dict(B=1, N=1 << 24, H=1, D=64, dtype="float32", reps=20)
# (B, N, H, D, K): one slot; odd sizes; several splits of N with K = k = 64 (the CUDA kernels' limit).
SPARSE_SHAPES = [(1, 1, 1, 1, 1), (2, 4099, 5, 33, 8), (1, 70_001, 4, 64, 64)]


# compute-sanitizer tools, and the backends each runs on: racecheck and
# synccheck check shared memory and barriers, which the CUDA C++ kernels
# manage themselves; memcheck covers both backends.
TOOLS = {"memcheck": BACKENDS, "racecheck": ("cuda",), "synccheck": ("cuda",)}


def cases(part, tool="memcheck"):
    """The cases of a part, as dicts (no torch, no GPU); tool picks the tiny cases' backends."""
    if part == "tiny":
        return [dict(part="tiny", backend=be, shape=s, dtype=dt, misaligned=mis)
                for be in TOOLS[tool] for s in TINY_SHAPES for dt in TINY_DTYPES for mis in (False, True)]
    if part == "parity":
        return [dict(part="parity", backend=be, shape=s, dtype="float32") for be in BACKENDS for s in PARITY_SHAPES]
    if part == "large":
        return [dict(part="large", backend=be, kind=k, shape=(B, N, H, D, 1), dtype=dt)
                for be in BACKENDS for k, B, N, H, D, dt in LARGE_CASES]
    if part == "bandwidth":
        b = BANDWIDTH
        return [dict(part="bandwidth", backend=be, shape=(b["B"], b["N"], b["H"], b["D"], 1), dtype=b["dtype"],
                     reps=b["reps"]) for be in BACKENDS]
    if part == "sparse":
        return [dict(part="sparse", backend="cuda", shape=sh, dtype=dt) for sh in SPARSE_SHAPES
                for dt in ("float32", "float16")]
    if part == "all":
        return cases("parity") + cases("large") + cases("bandwidth") + cases("sparse")
    if part == "preflight":
        return [dict(part="preflight")]
    raise ValueError(f"unknown part {part!r}")


def elements(case):
    """Largest element count of one tensor of a case (for the large cases: past 2^31)."""
    B, N, H, D, W = case["shape"]
    return max(B * N * D, B * H * N, B * W * N)


def describe(case):
    B, N, H, D, W = case.get("shape", (0,) * 5)
    if case.get("part") == "sparse":
        return f"sparse {case['backend']} B={B} N={N} H={H} D={D} K={W} {case['dtype']}"
    extra = " misaligned" if case.get("misaligned") else ""
    kind = f" {case['kind']}" if "kind" in case else ""
    dt = case.get("dtype", "")
    return f"{case['part']}{kind} {case.get('backend', '')} B={B} N={N} H={H} D={D} W={W} {dt}{extra}"


# ---------------------------------------------------------------------------
# the checks (GPU only)
# ---------------------------------------------------------------------------
def _torch():
    import torch

    import neuralmem_fast as nm

    return torch, nm


def preflight():
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("gpu-smoke: no CUDA device visible (torch.cuda.is_available() is False)")
    torch, nm = _torch()
    if not nm.has_cuda_kernels():
        raise SystemExit("gpu-smoke: neuralmem_fast._C was built without its CUDA kernels (has_cuda_kernels() is "
                         "False): build with nvcc first")
    print("preflight ok:", torch.cuda.get_device_name(0))


def _inputs(case, seed=0, device="cuda"):
    torch, _ = _torch()
    B, N, H, D, W = case["shape"]
    dt = getattr(torch, case["dtype"])
    g = torch.Generator(device="cpu").manual_seed(seed)

    def r(*s, scale=1.0):
        t = (torch.randn(*s, generator=g) * scale).to(dt)
        if case.get("misaligned"):  # one element off the allocation's 16-byte alignment
            base = torch.empty(t.numel() + 1, dtype=dt, device=device)
            out = base[1:].view(t.shape)
            out.copy_(t)
            return out
        return t.to(device)

    return dict(memory=r(B, N, D), keys=r(B, H, D), strengths=r(B, H).abs() * 3, grad=r(B, H, D),
                weights=torch.softmax(r(B, H, N).float(), -1).to(dt),
                wweights=torch.softmax(r(B, W, N).float(), -1).to(dt),
                erase=torch.sigmoid(r(B, W, D).float()).to(dt), add=r(B, W, D), wkeys=r(B, W, D),
                wstrengths=r(B, W).abs() * 3, usage=r(B, N).abs())


def run_ops(x, backend):
    """Every op once (forward, backward through autograd, in-place writes); returns the outputs in order."""
    torch, nm = _torch()
    outs = []
    m, k, s = (x[n].detach().clone().requires_grad_() for n in ("memory", "keys", "strengths"))
    reads = nm.content_read(m, k, s, backend=backend)
    outs.append(reads)
    outs += list(torch.autograd.grad(reads, (m, k, s), x["grad"]))
    w = nm.content_addressing(m, k, s, backend=backend)
    outs.append(w)
    outs += list(torch.autograd.grad(w, (m, k, s), x["weights"]))
    mm, ww = x["memory"].detach().clone().requires_grad_(), x["weights"].detach().clone().requires_grad_()
    r2 = nm.memory_read(mm, ww, backend=backend)
    outs.append(r2)
    outs += list(torch.autograd.grad(r2, (mm, ww), x["grad"]))
    args = [x[n].detach().clone().requires_grad_() for n in ("memory", "wweights", "erase", "add")]
    new = nm.memory_write(*args, backend=backend)
    outs.append(new)
    outs += list(torch.autograd.grad(new, args, x["memory"]))
    outs.append(nm.usage_update(x["usage"], x["wweights"], backend=backend))
    names = ("memory", "keys", "strengths", "wkeys", "wstrengths", "erase", "add")
    args = [x[n].detach().clone().requires_grad_() for n in names]
    rw = nm.content_read_write(*args, backend=backend)
    outs += list(rw)
    outs += list(torch.autograd.grad(rw, args, (x["grad"], x["memory"])))
    with torch.no_grad():
        m2 = x["memory"].clone()
        nm.memory_write_(m2, x["wweights"], x["erase"], x["add"], backend=backend)
        outs.append(m2)
        m3, u3 = x["memory"].clone(), x["usage"].clone()
        outs.append(nm.content_write_(m3, x["wkeys"], x["wstrengths"], x["erase"], x["add"], usage=u3,
                                      backend=backend))
        outs += [m3, u3]
        m4, u4 = x["memory"].clone(), x["usage"].clone()
        r4, l4 = nm.content_read_write_(m4, x["keys"], x["strengths"], x["wkeys"], x["wstrengths"], x["erase"],
                                        x["add"], usage=u4, backend=backend)
        outs += [r4, l4, m4, u4]
    if x["memory"].is_cuda:
        torch.cuda.synchronize()
    return [o.detach() for o in outs]


def check_sparse(case, device="cuda"):
    """The sparse ops on `device` against the float64 references (and the LRU against the CPU kernels)."""
    torch, _ = _torch()
    from neuralmem_fast.ops import sparse as sops

    B, N, H, D, K = case["shape"]
    dt = getattr(torch, case["dtype"])
    tol = dict(atol=2e-2, rtol=2e-2) if dt == torch.float16 else dict(atol=1e-4, rtol=1e-4)
    g = torch.Generator().manual_seed(0)
    mem = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    keys = torch.randn(B, H, D, generator=g, dtype=torch.float64)
    k = min(K, N)
    want_s, _ = sops.cosine_topk_ref(mem, keys, k)
    got_s, got_i = sops.cosine_topk(mem.to(dt).to(device), keys.to(dt).to(device), k)
    torch.testing.assert_close(got_s.double().cpu(), want_s, **tol)
    cos = torch.nn.functional.normalize(keys, dim=-1) @ torch.nn.functional.normalize(mem, dim=-1).transpose(1, 2)
    torch.testing.assert_close(cos.gather(2, got_i.cpu()), want_s, **tol)  # the slots hold those scores
    rows = torch.randn(B, H, K, D, generator=g, dtype=torch.float64)
    strengths = 3 * torch.rand(B, H, generator=g, dtype=torch.float64)
    gr, gw = torch.randn(B, H, D, generator=g, dtype=torch.float64), torch.randn(B, H, K, generator=g,
                                                                                dtype=torch.float64)
    ins = [t.detach().requires_grad_(True) for t in (rows, keys, strengths)]
    reads, w = sops.sparse_read_ref(*ins)
    want = [reads, w, *torch.autograd.grad((reads, w), ins, (gr, gw))]
    ins = [t.to(dt).to(device).requires_grad_(True) for t in (rows, keys, strengths)]
    reads, w = sops.sparse_read(*ins)
    got = [reads, w, *torch.autograd.grad((reads, w), ins, (gr.to(dt).to(device), gw.to(dt).to(device)))]
    for name, a, b in zip(("reads", "weights", "d rows", "d keys", "d strengths"), got, want):
        torch.testing.assert_close(a.double().cpu(), b, **tol, msg=lambda m, name=name: f"{describe(case)} {name}: {m}")
    links_cpu = sops.lru_init(B, N)
    touches = torch.randint(-1, N, (B, 3 * K), generator=g)
    sops.lru_touch_(links_cpu, touches)
    links = sops.lru_init(B, N, device)
    sops.lru_touch_(links, touches.to(device))
    if not torch.equal(links.cpu(), links_cpu):
        raise AssertionError(f"{describe(case)}: the LRU links differ from the CPU kernels'")
    skip = torch.rand(B, N, generator=g) < 0.3
    if not torch.equal(sops.lru_oldest(links, k, skip.to(device)).cpu(), sops.lru_oldest(links_cpu, k, skip)):
        raise AssertionError(f"{describe(case)}: lru_oldest differs from the CPU kernels'")
    if device == "cuda":
        torch.cuda.synchronize()


def check_tiny(case):
    torch, _ = _torch()
    outs = run_ops(_inputs(case), case["backend"])
    bad = [i for i, o in enumerate(outs) if o.is_floating_point() and not torch.isfinite(o.float()).all()]
    if bad:
        raise AssertionError(f"{describe(case)}: non-finite outputs at {bad}")


def check_parity(case):
    torch, nm = _torch()
    x = _inputs(case, seed=1)
    got1, got2 = run_ops(x, case["backend"]), run_ops(x, case["backend"])
    for i, (a, b) in enumerate(zip(got1, got2)):
        if not torch.equal(a, b):
            raise AssertionError(f"{describe(case)}: output {i} differs between two identical runs")
    m, k, s = (x[n].double() for n in ("memory", "keys", "strengths"))
    want = nm.content_read_ref(m, k, s)
    err = (got1[0].double() - want).abs().max().item()
    if err > 1e-4 * (1 + want.abs().max().item()):
        raise AssertionError(f"{describe(case)}: content_read off the float64 reference by {err:.3g}")
    w_want = nm.content_addressing_ref(m, k, s)
    err = (got1[4].double() - w_want).abs().max().item()
    if err > 1e-5:
        raise AssertionError(f"{describe(case)}: content_addressing off the float64 reference by {err:.3g}")
    print(f"  {describe(case)}: repeatable, content_read max error {err:.3g}")


def check_reversible(backend, device="cuda"):
    """nn.reversible_read_write through `backend`'s backward kernels (T=8 steps, W=2, float64) against
    plain autograd over the same steps: the rebuilt memories must give the same gradients."""
    torch, nm = _torch()
    from neuralmem_fast import ops
    from neuralmem_fast.nn import reversible_read_write

    g = torch.Generator(device="cpu").manual_seed(3)
    T, B, N, D, H, W = 8, 2, 4099, 64, 4, 2

    def r(*s, lo=None):
        x = torch.randn(*s, generator=g, dtype=torch.float64) if lo is None else \
            lo + 4 * torch.rand(*s, generator=g, dtype=torch.float64)
        return x.to(device)

    ins = [r(B, N, D), r(T, B, H, D), r(T, B, H, lo=1.0), r(T, B, W, D), r(T, B, W, lo=1.0),
           torch.rand(T, B, W, D, generator=g, dtype=torch.float64).to(device), r(T, B, W, D)]
    gr, gm = r(T, B, H, D), r(B, N, D)
    leaves = [x.clone().requires_grad_(True) for x in ins]
    reads, last = reversible_read_write(*leaves, backend=backend)
    got = torch.autograd.grad((reads * gr).sum() + (last * gm).sum(), leaves)
    leaves = [x.clone().requires_grad_(True) for x in ins]
    m, loss = leaves[0], 0
    for t in range(T):
        rk, rs, wk, ws, er, ad = (x[t] for x in leaves[1:])
        loss = loss + (ops.content_read(m, rk, rs, backend=backend) * gr[t]).sum()
        m = ops.memory_write(m, ops.content_addressing(m, wk, ws, backend=backend), er, ad, backend=backend)
    want = torch.autograd.grad(loss + (m * gm).sum(), leaves)
    err = max(((a - b).abs().max() / (1 + b.abs().max())).item() for a, b in zip(got, want))
    if not err <= 1e-9:
        raise AssertionError(f"reversible_read_write on {backend}: gradients off plain autograd by {err:.3g}")
    print(f"  reversible_read_write {backend}: gradients match plain autograd (max relative error {err:.3g})")


def check_large(case):
    """Only the last slots match the key: whatever they read or weigh must come from past 2^31 elements."""
    torch, nm = _torch()
    B, N, H, D, _ = case["shape"]
    dt = getattr(torch, case["dtype"])
    be = case["backend"]
    memory = torch.zeros(B, N, D, dtype=dt, device="cuda")
    memory[:, :, 0] = -1  # every slot points away from the keys ...
    memory[:, -3:, :] = 1  # ... but the last three
    keys = torch.ones(B, H, D, dtype=dt, device="cuda")
    strengths = torch.full((B, H), 40.0, dtype=dt, device="cuda")
    with torch.no_grad():
        w = nm.content_addressing(memory, keys, strengths, backend=be)
        tail = w[:, :, -3:].float().sum(-1)
        if not torch.allclose(tail, torch.ones_like(tail), atol=1e-2):
            raise AssertionError(f"{describe(case)}: weight of the last slots {tail.tolist()}, want ~1 per head")
        del w
        reads = nm.content_read(memory, keys, strengths, backend=be).float()
        if not torch.allclose(reads, torch.ones_like(reads), atol=1e-2):
            raise AssertionError(f"{describe(case)}: reads {reads[..., :4].tolist()}, want the last slots (ones)")
        ww = torch.zeros(B, 1, N, dtype=dt, device="cuda")
        ww[:, :, -1] = 1
        erase = torch.ones(B, 1, D, dtype=dt, device="cuda")
        add = torch.full((B, 1, D), 2.0, dtype=dt, device="cuda")
        nm.memory_write_(memory, ww, erase, add, backend=be)
        if not (memory[:, -1] == 2).all() or not (memory[:, -2] == 1).all():
            raise AssertionError(f"{describe(case)}: memory_write_ missed the last slot")
    torch.cuda.synchronize()
    print(f"  {describe(case)}: {elements(case)} elements ok")


def _median_ms(fn, reps):
    torch, _ = _torch()
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def check_bandwidth(case, out_dir):
    torch, nm = _torch()
    B, N, H, D, _ = case["shape"]
    dt = getattr(torch, case["dtype"])
    memory = torch.randn(B, N, D, dtype=dt, device="cuda")
    keys, strengths = torch.randn(B, H, D, dtype=dt, device="cuda"), torch.rand(B, H, dtype=dt, device="cuda")
    dst = torch.empty_like(memory)
    nbytes = memory.numel() * memory.element_size()
    with torch.no_grad():
        t_read = _median_ms(lambda: nm.content_read(memory, keys, strengths, backend=case["backend"]), case["reps"])
        t_copy = _median_ms(lambda: dst.copy_(memory), case["reps"])
    read_gbs = nbytes / t_read / 1e6
    copy_gbs = 2 * nbytes / t_copy / 1e6  # copy_ reads and writes every byte
    row = dict(case=describe(case), device=torch.cuda.get_device_name(0), bytes=nbytes, read_ms=t_read,
               copy_ms=t_copy, read_gbs=read_gbs, copy_gbs=copy_gbs, ratio=read_gbs / copy_gbs)
    print(f"  {describe(case)}: content_read {read_gbs:.0f} GB/s, copy_ {copy_gbs:.0f} GB/s, "
          f"ratio {row['ratio']:.2f} (goal >= 0.80)")
    return row


def write_bandwidth(rows, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "bandwidth.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(out_dir, "bandwidth.md"), "w") as f:
        f.write("| case | device | content_read GB/s | copy_ GB/s | ratio |\n|---|---|---|---|---|\n")
        for r in rows:
            f.write(f"| {r['case']} | {r['device']} | {r['read_gbs']:.0f} | {r['copy_gbs']:.0f} | {r['ratio']:.2f} |\n")


def run(part, out_dir, dry_run=False, tool="memcheck"):
    todo = cases(part, tool)
    # After the parity cases, the reversible backward through each backend's kernels.
    reversible = [c["backend"] for c in todo if c["part"] == "parity"]
    reversible = sorted(set(reversible), key=reversible.index)
    if dry_run:
        for c in todo:
            print("would run:", describe(c))
        for be in reversible:
            print("would run: reversible_read_write", be)
        return 0
    preflight()
    rows = []
    for c in todo:
        t0 = time.time()
        if c["part"] == "tiny":
            check_tiny(c)
        elif c["part"] == "parity":
            check_parity(c)
        elif c["part"] == "large":
            check_large(c)
        elif c["part"] == "bandwidth":
            rows.append(check_bandwidth(c, out_dir))
        elif c["part"] == "sparse":
            check_sparse(c)
        print(f"ok {describe(c)} ({time.time() - t0:.1f} s)", flush=True)
    for be in reversible:
        t0 = time.time()
        check_reversible(be)
        print(f"ok reversible_read_write {be} ({time.time() - t0:.1f} s)", flush=True)
    if rows:
        write_bandwidth(rows, out_dir)
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=("preflight", "tiny", "parity", "large", "bandwidth", "sparse", "all"))
    p.add_argument("--out", default="gpu-smoke")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--tool", choices=sorted(TOOLS), default="memcheck",
                   help="the compute-sanitizer tool the tiny part runs under (picks its backends)")
    a = p.parse_args(argv)
    return run(a.part, a.out, a.dry_run, a.tool)


if __name__ == "__main__":
    sys.exit(main())
