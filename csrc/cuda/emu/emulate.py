"""Runs the CUDA kernels' source on the CPU, in an emulation of the CUDA
execution model, and compares every op with its reference.

    python csrc/cuda/emu/emulate.py [read|write|all|sparse] [--quick] [--build-dir DIR]

For machines without a GPU: nvcc proves that the kernels compile, this proves
that their logic (indexing, lane geometry, shuffles, split merges, head groups,
column tiles, misaligned rows, the fused and split content_write_) computes
the right numbers. The .cu sources are rewritten mechanically (launch syntax,
stream and device guard, registration under the test namespace
neuralmem_emu on CPU), built with the host compiler against emu.h, and
called on CPU tensors. The minimum split is lowered to 16 slots and the SM
count to 2 so that small memories take the multi-split path too.

It is slow (every CUDA thread is an OS thread): minutes for the whole check.
It cannot see GPU timing, the GPU memory model or misaligned vector loads.
"""
import argparse
import itertools
import os
import re
import sys

import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
HERE = os.path.dirname(os.path.abspath(__file__))


def make_sources(root, out):
    os.makedirs(out, exist_ok=True)
    c = open(f"{root}/csrc/cuda/common.cuh").read()
    for inc in ("#include <c10/cuda/CUDAException.h>", "#include <c10/cuda/CUDAGuard.h>",
                "#include <c10/cuda/CUDAStream.h>", "#include <cuda_runtime.h>"):
        assert inc in c, inc; c = c.replace(inc, "")
    c = c.replace("#pragma once", '#pragma once\n#include "emu.h"')
    x = "C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device));"
    assert x in c; c = c.replace(x, "v = 2;")
    x = "constexpr int64_t kMinChunk = 1024;"
    assert x in c; c = c.replace(x, "constexpr int64_t kMinChunk = 16;")
    c = c.replace(".is_cuda()", ".defined()")
    open(f"{out}/common.cuh", "w").write(c)
    launch = re.compile(r"([A-Za-z_][\w:]*(?:<[^;()]*?>)?)<<<(.*?)>>>\(")
    for f, ext in (("read_kernels", ".cu"), ("write_kernels", ".cu"), ("read_backward", ".cuh")):
        s = open(f"{root}/csrc/cuda/{f}{ext}").read()
        s = s.replace("c10::cuda::CUDAGuard", "emu::Guard").replace("c10::cuda::getCurrentCUDAStream()", "emu::Stream()")
        s = s.replace("C10_CUDA_KERNEL_LAUNCH_CHECK();", ";").replace(".is_cuda()", ".defined()")
        s = s.replace("TORCH_LIBRARY_IMPL(neuralmem, CUDA, m)", "TORCH_LIBRARY_IMPL(neuralmem_emu, CPU, m)")
        s = s.replace('findSchemaOrThrow("neuralmem::', 'findSchemaOrThrow("neuralmem_emu::')
        x = "extern __shared__ __align__(16) unsigned char smem_raw[];"
        if x in s: s = s.replace(x, "unsigned char* smem_raw = emu::dyn_smem();")
        s, n = launch.subn(lambda m: f"emu::L({m.group(2)}).run({m.group(1)}, ", s)
        assert (n > 0 or ext == ".cuh") and "<<<" not in s, f"{f}: {n} launches rewritten, some left"
        open(f"{out}/{f}{'.cpp' if ext == '.cu' else ext}", "w").write(s)
    make_sparse_sources(root, out, launch)
    o = open(f"{root}/csrc/ops.cpp").read()
    blk = re.search(r"TORCH_LIBRARY\(neuralmem, m\) \{.*?\n\}", o, re.S).group(0)
    open(f"{out}/schemas.cpp", "w").write("#include <torch/library.h>\n" + blk.replace("TORCH_LIBRARY(neuralmem,", "TORCH_LIBRARY(neuralmem_emu,"))


SPARSE_PRELUDE = """#include "emu.h"
using std::exp;
using std::isnan;
using std::sqrt;
inline void __syncwarp(unsigned = 0xffffffffu) { emu::g_block->warps[threadIdx.x / 32]->arrive_and_wait(); }
template <class T>
T __shfl_sync(unsigned, T v, int src) {
  auto* B = emu::g_block;
  const unsigned t = threadIdx.x, w = t / 32;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  B->warps[w]->arrive_and_wait();
  B->slots[t] = bits;
  B->warps[w]->arrive_and_wait();
  const uint64_t ob = B->slots[w * 32 + src];
  T r;
  std::memcpy(&r, &ob, sizeof(T));
  return r;
}
"""


def make_sparse_sources(root, out, launch):
    """sparse_kernels.cu under neuralmem_sparse_emu; 8 SMs and 16-slot splits so small memories split."""
    s = open(f"{root}/csrc/cuda/sparse_kernels.cu").read()
    for inc in ("#include <c10/cuda/CUDAException.h>", "#include <c10/cuda/CUDAGuard.h>",
                "#include <c10/cuda/CUDAStream.h>", "#include <cuda_runtime.h>"):
        assert inc in s, inc; s = s.replace(inc, "")
    s = SPARSE_PRELUDE + s
    for a, b in (("c10::cuda::CUDAGuard", "emu::Guard"), ("c10::cuda::getCurrentCUDAStream()", "emu::Stream()"),
                 ("C10_CUDA_KERNEL_LAUNCH_CHECK();", ";"), (".is_cuda()", ".defined()"),
                 ("C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, t.device().index()));",
                  "v = 8;"), ("std::max<int64_t>(1024, k)", "std::max<int64_t>(16, k)"),
                 ("TORCH_LIBRARY_IMPL(neuralmem_sparse, CUDA, m)", "TORCH_LIBRARY_IMPL(neuralmem_sparse_emu, CPU, m)")):
        assert a in s, a; s = s.replace(a, b)
    s, n = launch.subn(lambda m: f"emu::L({m.group(2)}).run({m.group(1)}, ", s)
    assert n == 6 and "<<<" not in s, f"sparse_kernels: {n} launches rewritten"
    open(f"{out}/sparse_kernels.cpp", "w").write(s)
    o = open(f"{root}/csrc/sparse/sparse_ops.cpp").read()
    blk = re.search(r"TORCH_LIBRARY\(neuralmem_sparse, m\) \{.*?\n\}", o, re.S).group(0)
    open(f"{out}/sparse_schemas.cpp", "w").write(
        "#include <torch/library.h>\n" + blk.replace("TORCH_LIBRARY(neuralmem_sparse,", "TORCH_LIBRARY(neuralmem_sparse_emu,"))


def build(build_dir, sparse=False):
    from torch.utils.cpp_extension import load

    src = os.path.join(build_dir, "src")
    make_sources(ROOT, src)
    with open(os.path.join(HERE, "emu.h")) as f, open(os.path.join(src, "emu.h"), "w") as g:
        g.write(f.read())
    out = os.path.join(build_dir, "out")
    os.makedirs(out, exist_ok=True)
    names = ("sparse_schemas.cpp", "sparse_kernels.cpp") if sparse else ("schemas.cpp", "read_kernels.cpp",
                                                                            "write_kernels.cpp")
    load(name="nm_emu_sparse" if sparse else "nm_emu", sources=[os.path.join(src, n) for n in names],
         extra_include_paths=[src, os.path.join(ROOT, "csrc")], extra_cflags=["-O1", "-std=c++20", "-pthread", "-w"], extra_ldflags=["-pthread"],
         is_python_module=False, build_directory=out, verbose=False)


SHAPES = [(2, 7, 64, 4), (1, 100, 3, 1), (1, 40, 1, 6), (2, 20, 300, 5), (1, 70, 16, 2), (3, 33, 8, 3)]
# --quick (the CI test): one shape that takes every path, in every dtype: two
# splits (the emulated planner's 16-slot minimum), two head groups (H > 4),
# two column tiles (D > 256), misaligned float32 rows (D % 4 == 0).
QUICK = [(1, 40, 300, 5)]


def check(only, shapes=SHAPES, save=None, against=None):
    """Compares every op with its reference. save: a path to write every output to (torch.save);
    against: such a file, whose outputs this run must equal bit for bit (a kernel change that
    should not change the arithmetic, such as an unrolled loop, is checked this way)."""
    E = torch.ops.neuralmem_emu
    fails = []
    outputs = {}
    before = torch.load(against) if against else None
    TOL = {torch.float64: (1e-9, 1e-7), torch.float32: (2e-5, 2e-4), torch.float16: (3e-3, 3e-3), torch.bfloat16: (2e-2, 2e-2)}
    compared = set()

    def close(name, got, want, dt, scale=1.0):
        compared.add(name.rsplit(" ", 1)[0])
        outputs[name] = got.detach().clone()
        if before is not None and not (name in before and before[name].dtype == got.dtype
                                       and torch.equal(before[name], got)):
            fails.append(name + " (not bit for bit)"); print("FAIL bitwise", name)
        atol, rtol = TOL[dt]
        if name.startswith(("read_bwd dm", "addr_bwd dm")) and dt in (torch.float32, torch.float64):
            # The zero slot's gradient is ~1/eps (1e12) per term and cancels: its
            # elements are checked against the slot's scale, the rest as usual.
            z = want[0, 0].abs().max().item()
            err = (got[0, 0].to(want.dtype) - want[0, 0]).abs().max().item()
            if not err <= rtol * scale * z:
                fails.append(name + " (zero slot)"); print("FAIL zero slot", name, err, z)
            got = got.clone(); got[0, 0] = want[0, 0]
        try:
            torch.testing.assert_close(got.to(want.dtype), want, atol=atol * scale, rtol=rtol * scale)
        except AssertionError as e:
            fails.append(name); print("FAIL", name, str(e).splitlines()[:4])

    def misalign(t):
        base = torch.empty(t.numel() + 1, dtype=t.dtype); o = base[1:].view(t.shape); o.copy_(t); return o

    dts = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
    for (B, N, D, H), dt in itertools.product(shapes, dts):
        torch.manual_seed(B * 1000 + N + D + H)
        tag = f"B{B}-N{N}-D{D}-H{H}-{dt}"
        m = torch.randn(B, N, D, dtype=torch.float64); k = torch.randn(B, H, D, dtype=torch.float64)
        s = torch.rand(B, H, dtype=torch.float64) * 5
        if dt in (torch.float32, torch.float64): m[0, 0] = 0  # a zero slot (its exact gradient ~1e12 overflows half)
        mm, kk, ss = m.to(dt), k.to(dt), s.to(dt)
        if dt == torch.float32 and D % 4 == 0: mm, kk = misalign(mm), misalign(kk)
        eps = 1e-12
        if only in ("all", "read"):
            # forward
            w_ref = ops.content_addressing_ref(mm, kk, ss, eps)
            close("addr " + tag, E.content_addressing(mm, kk, ss, eps), w_ref, dt)
            reads, lse = E.content_read(mm, kk, ss, eps)
            close("read " + tag, reads, ops.content_read_ref(mm, kk, ss, eps), dt)
            kn = torch.nn.functional.normalize(kk.double(), dim=-1, eps=eps); mn = torch.nn.functional.normalize(mm.double(), dim=-1, eps=eps)
            lse_ref = torch.logsumexp(ss.double().unsqueeze(-1) * kn @ mn.transpose(-1, -2), -1)
            close("lse " + tag, lse.double(), lse_ref, torch.float32 if dt != torch.float64 else dt, 10)
            close("mread " + tag, E.memory_read(mm, w_ref), ops.memory_read_ref(mm, w_ref), dt, 2)
            # backward (reference: float64 autograd)
            md, kd, sd = (t.double().requires_grad_() for t in (mm, kk, ss))
            g = torch.randn(B, H, D, dtype=torch.float64)
            r = ops.content_read_ref(md, kd, sd, eps); gm, gk, gs = torch.autograd.grad(r, (md, kd, sd), g)
            dm, dk, db = E.content_read_backward(g.to(dt), reads, lse, mm, kk, ss, eps)
            sc = 1 if dt in (torch.float64, torch.float32) else 5
            close("read_bwd dm " + tag, dm.double(), gm, dt, sc); close("read_bwd dk " + tag, dk.double(), gk, dt, sc); close("read_bwd db " + tag, db.double(), gs, dt, sc)
            gw = torch.randn(B, H, N, dtype=torch.float64)
            w = ops.content_addressing_ref(md, kd, sd, eps); gm, gk, gs = torch.autograd.grad(w, (md, kd, sd), gw)
            dm, dk, db = E.content_addressing_backward(gw.to(dt), w.detach().to(dt), mm, kk, ss, eps)
            close("addr_bwd dm " + tag, dm.double(), gm, dt, sc); close("addr_bwd dk " + tag, dk.double(), gk, dt, sc); close("addr_bwd db " + tag, db.double(), gs, dt, sc)
            wd = w_ref.double().requires_grad_()
            md2 = mm.double().requires_grad_()
            gm, gw2 = torch.autograd.grad(ops.memory_read_ref(md2, wd), (md2, wd), g)
            dm, dw = E.memory_read_backward(g.to(dt), mm, w_ref)
            close("mread_bwd dm " + tag, dm.double(), gm, dt, sc); close("mread_bwd dw " + tag, dw.double(), gw2, dt, sc)
        if only in ("all", "write"):
            W = H
            w = torch.softmax(torch.randn(B, W, N, dtype=torch.float64), -1).to(dt)
            e = torch.rand(B, W, D, dtype=torch.float64).to(dt); a = torch.randn(B, W, D, dtype=torch.float64).to(dt)
            u = torch.rand(B, N, dtype=torch.float64).to(dt)
            ref = ops.memory_write_ref(mm, w, e, a)
            close("write " + tag, E.memory_write(mm, w, e, a), ref, dt)
            m2 = mm.clone(); E.memory_write_(m2, w, e, a); close("write_ " + tag, m2, ref, dt)
            close("usage " + tag, E.usage_update(u, w, 0.9), ops.usage_update_ref(u, w, 0.9), dt)
            args = [t.double().requires_grad_() for t in (mm, w, e, a)]
            go = torch.randn(B, N, D, dtype=torch.float64)
            want = torch.autograd.grad(ops.memory_write_ref(*args), args, go)
            got = E.memory_write_backward(go.to(dt), mm, w, e, a)
            sc = 1 if dt in (torch.float64, torch.float32) else 5
            for nm_, x, y in zip("m w e a".split(), got, want): close(f"write_bwd d{nm_} " + tag, x.double(), y, dt, sc)
            # content_write_
            ks = torch.randn(B, W, D, dtype=torch.float64).to(dt); st = (torch.rand(B, W, dtype=torch.float64) * 5).to(dt)
            wr = ops.content_addressing_ref(mm, ks, st, eps)
            new_ref = ops.memory_write_ref(mm, wr, e, a); u_ref = ops.usage_update_ref(u, wr, 0.95)
            m3, u3 = mm.clone(), u.clone()
            least = E.content_write_(m3, u3, ks, st, e, a, eps, 0.95)
            close("cwrite mem " + tag, m3, new_ref, dt); close("cwrite usage " + tag, u3, u_ref, dt)
            if not torch.equal(least, torch.argmin(u3, 1)):
                fails.append("cwrite least " + tag); print("FAIL least", tag, least, torch.argmin(u3, 1))
            m4 = mm.clone(); l4 = E.content_write_(m4, None, ks, st, e, a, eps, 0.95)
            if l4.numel() != 0 or not torch.equal(m4, m3): fails.append("cwrite nousage " + tag); print("FAIL nousage", tag)
            # content_read_write_: the read and the write both see the memory before the write
            m5, u5 = mm.clone(), u.clone()
            r5, lse5, least5 = E.content_read_write_(m5, u5, kk, ss, ks, st, e, a, eps, 0.95)
            close("rw reads " + tag, r5, ops.content_read_ref(mm, kk, ss, eps), dt)
            close("rw mem " + tag, m5, new_ref, dt); close("rw usage " + tag, u5, u_ref, dt)
            if not torch.equal(least5, torch.argmin(u5, 1)):
                fails.append("rw least " + tag); print("FAIL rw least", tag, least5, torch.argmin(u5, 1))
        print("done", tag, flush=True)
    print("compared:", ", ".join(sorted(compared)))
    if save:
        torch.save(outputs, save)
    if before is not None:
        print(f"bit for bit against {against}: {len(outputs)} outputs compared")
    print("FAILURES:", len(fails))
    for f in fails:
        print(" ", f)
    return len(fails)


def check_sparse(quick=False):
    """The sparse ops (neuralmem_sparse_emu) against the references of neuralmem_fast.ops.sparse."""
    from neuralmem_fast.ops import sparse as sp

    E = torch.ops.neuralmem_sparse_emu
    TOL = {torch.float64: (1e-9, 1e-7), torch.float32: (2e-5, 2e-4), torch.float16: (3e-3, 3e-3),
           torch.bfloat16: (2e-2, 2e-2)}
    fails, compared, eps = [], set(), 1e-12

    def close(name, got, want, dt, scale=1.0):
        compared.add(name.split(" ")[0])
        atol, rtol = TOL[dt]
        try:
            torch.testing.assert_close(got.to(want.dtype), want, atol=atol * scale, rtol=rtol * scale, equal_nan=True)
        except AssertionError as e:
            fails.append(name); print("FAIL", name, str(e).splitlines()[:4])

    def same(name, got, want):
        compared.add(name.split(" ")[0])
        if not torch.equal(got, want):
            fails.append(name); print("FAIL", name, got.tolist()[:2], want.tolist()[:2])

    # (B, H, K, D) of sparse_read: K = 64 (two softmax candidates per lane), D > 128 (strided columns)
    read_shapes = [(2, 3, 5, 13), (1, 2, 64, 150)] if not quick else [(1, 1, 64, 150)]
    # (B, N, D, H, k): two head groups (H > 4), splits (16-slot minimum, 8 SMs: up to 16 per group), k = 64
    topk_shapes = [(2, 300, 20, 5, 7), (1, 100, 33, 2, 64), (1, 40, 8, 1, 1)]
    if quick:
        topk_shapes = [(1, 120, 20, 5, 6), (1, 64, 8, 1, 64)]
    for dt in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        tag = str(dt).split(".")[1]
        for B, H, K, D in read_shapes:
            g = torch.Generator().manual_seed(B + H + K + D)
            rows = torch.randn(B, H, K, D, generator=g, dtype=torch.float64)
            keys = torch.randn(B, H, D, generator=g, dtype=torch.float64)
            s = torch.rand(B, H, generator=g, dtype=torch.float64) * 5
            if dt in (torch.float32, torch.float64):
                rows[0, 0, 1] = 0  # a zero row, and one of norm < eps (the clamp's derivative, 1/eps)
                rows[0, 0, 2] *= 1e-14
            r, k, st = rows.to(dt), keys.to(dt), s.to(dt)
            reads, w = E.sparse_read(r, k, st, eps)
            rr, wr = sp.sparse_read_ref(r, k, st, eps)
            close(f"sparse_read {tag} {B,H,K,D}", reads, rr, dt)
            close(f"sparse_read_weights {tag} {B,H,K,D}", w, wr, dt)
            ins = [t.double().requires_grad_() for t in (r, k, st)]
            gr, gw = torch.randn(B, H, D, dtype=torch.float64), torch.randn(B, H, K, dtype=torch.float64)
            want = torch.autograd.grad(sp.sparse_read_ref(*ins, eps), ins, (gr, gw))
            got = E.sparse_read_backward(gr.to(dt), gw.to(dt), w, r, k, st, eps)
            sc = 1 if dt in (torch.float32, torch.float64) else 5
            for nm_, x, y in zip(("grad_rows", "grad_keys", "grad_strengths"), got, want):
                close(f"sparse_read_backward_{nm_} {tag} {B,H,K,D}", x.double(), y, dt, sc)
        for B, N, D, H, kk in topk_shapes:
            g = torch.Generator().manual_seed(B + N + D + H + kk)
            memory = torch.randn(B, N, D, generator=g, dtype=torch.float64)
            memory[0, 3] = 0; memory[0, 17] = 0  # equal scores: slot order
            keys = torch.randn(B, H, D, generator=g, dtype=torch.float64)
            m, k = memory.to(dt), keys.to(dt)
            sc_, ix = E.cosine_topk(m, k, kk, eps)
            vals, ref_ix = sp.cosine_topk_ref(m, k, kk, eps)
            close(f"cosine_topk {tag} {B,N,D,H,kk}", sc_, vals, dt)
            if dt == torch.float64:
                same(f"cosine_topk_indices {tag} {B,N,D,H,kk}", ix, ref_ix)
            else:
                cos = torch.nn.functional.normalize(k.double(), dim=-1, eps=eps) @ \
                      torch.nn.functional.normalize(m.double(), dim=-1, eps=eps).transpose(-1, -2)
                close(f"cosine_topk_chosen {tag} {B,N,D,H,kk}", cos.gather(-1, ix).to(dt), vals, dt)
        nan_m = torch.randn(1, 50, 6, dtype=torch.float64).to(dt); nan_m[0, 30, 2] = float("nan")
        nk = torch.randn(1, 2, 6, dtype=torch.float64).to(dt)
        same(f"cosine_topk_nan {tag}", E.cosine_topk(nan_m, nk, 3, eps)[1], sp.cosine_topk_ref(nan_m, nk, 3, eps)[1])
        print("sparse ok", tag, flush=True)
    gen = torch.Generator().manual_seed(0)
    B, N = 3, 9
    links, ref = sp.lru_init(B, N), sp.lru_init(B, N)
    for step in range(8):
        idx = torch.randint(-1, N, (B, 2 + step % 4), generator=gen); idx[:, 1] = idx[:, 0]
        E.lru_touch_(links, idx); sp.lru_touch_ref_(ref, idx)
        same(f"lru_touch {step}", links, ref)
        skip = torch.rand(B, N, generator=gen) < 0.3
        for count in (0, 3, N + 2):
            same(f"lru_oldest {step} {count}", E.lru_oldest(links, count, skip), sp.lru_oldest_ref(ref, count, skip))
            same(f"lru_oldest_noskip {step} {count}", E.lru_oldest(links, count, None), sp.lru_oldest_ref(ref, count))
    print("compared:", ", ".join(sorted(compared)))
    print("FAILURES:", len(fails))
    for f in fails:
        print(" ", f)
    return len(fails)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("only", nargs="?", default="all", choices=("all", "read", "write", "sparse"),
                   help="all = the dense ops (read and write); sparse = the neuralmem_sparse ops, on their own")
    p.add_argument("--build-dir", default=os.path.join(ROOT, "build", "emu"))
    p.add_argument("--quick", action="store_true", help="one shape (every op, dtype and path) instead of six")
    p.add_argument("--save", help="write every output of the dense ops to this file (torch.save)")
    p.add_argument("--against", help="a file written by --save: every output must equal it bit for bit")
    args = p.parse_args()
    sys.path.insert(0, ROOT)
    build(args.build_dir, sparse=args.only == "sparse")
    if args.only == "sparse":
        return 1 if check_sparse(args.quick) else 0
    global ops
    from neuralmem_fast import ops
    return 1 if check(args.only, QUICK if args.quick else SHAPES, args.save, args.against) else 0


if __name__ == "__main__":
    sys.exit(main())
