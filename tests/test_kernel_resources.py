"""Resource budgets of the GPU kernels, read off their compiled code without a GPU.

Triton: every kernel variant the ops launch on an H200 (the planners' real
choices of blocks, warps and splits over a representative set of shapes and
dtypes, ops/triton/variants.py: 179 variants, or all 389 with
NEURALMEM_KERNEL_RESOURCES_ALL=1) is compiled for sm_90 with Triton's
bundled ptxas; its TTIR must hold no 32-bit product of two runtime values (an
address offset such as offs_h[:, None] * N wraps once it passes 2^31), and
its cubin's registers, spill stores and shared memory are read back with
cuobjdump. CUDA C++: the same figures for every kernel of the built
extension's sm_90 cubins (cuobjdump on the .so).

Fails when a float32/float16/bfloat16 kernel spills, or when a kernel's
registers and shared memory allow fewer resident blocks per SM than its
launch plan assumes (Triton: planning.programs_per_sm; CUDA: the minimum of
its __launch_bounds__). Float64 may spill; the table says where. Writes
benchmarks/kernel_resources.md, with an estimate of the bytes each
streaming kernel keeps in flight per SM.
"""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
REPORT = os.path.join(REPO, "benchmarks", "kernel_resources.md")
SECTIONS = {}  # filled by the tests, written by the last one

# sm_90 (H100/H200) limits
REGS_PER_SM, MAX_THREADS, MAX_BLOCKS, SMEM_PER_SM, SMEM_RESERVED = 65536, 2048, 32, 228 * 1024, 1024


def blocks_per_sm(regs, threads, shared):
    """Resident blocks per SM from registers (allocated per warp in units of 256), threads and shared memory."""
    warps = -(-threads // 32)
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = (REGS_PER_SM // per_warp) // warps
    by_smem = SMEM_PER_SM // (shared + SMEM_RESERVED)
    return min(by_regs, MAX_THREADS // threads, MAX_BLOCKS, by_smem)


def _cuobjdump():
    from neuralmem_fast.ops.triton.compile_check import cuobjdump_path

    return cuobjdump_path()


def _triton_ok():
    try:
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401

        from neuralmem_fast.ops.triton import _triton

        return _triton.AVAILABLE
    except Exception:
        return False


# --------------------------------------------------------------------------
# Triton
# --------------------------------------------------------------------------
# Triton variants whose spills are left open, by (kernel, dtype, constexprs
# that select it): the most spill stores allowed (as KNOWN_SPILLS below does for CUDA).
# None is open: the tl.dot path's content_read backward at 16 heads spilled
# 3 stores under Triton's default pipelining and none at num_stages=1, which
# its launch now asks for (content_addressing's backward spills 1 at
# num_stages=1 and none by default, so it keeps the default).
TRITON_KNOWN_SPILLS = {}


@pytest.fixture(scope="module")
def triton_records(tmp_path_factory):
    if not _triton_ok() or _cuobjdump() is None:
        pytest.skip("triton with its NVIDIA backend (ptxas, cuobjdump) is not installed")
    out = tmp_path_factory.mktemp("variants") / "variants.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    full = ["--full"] if os.environ.get("NEURALMEM_KERNEL_RESOURCES_ALL") == "1" else []
    res = subprocess.run([sys.executable, "-m", "neuralmem_fast.ops.triton.variants", str(out)] + full, cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=3000)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(out.read_text())


def _tag(r):
    c = r["consts"]
    keys = [k for k in ("BH", "BN", "BD", "BW", "BX", "USE_DOT", "SINGLE", "READ", "EXACT") if k in c]
    stages = [f"num_stages={r['num_stages']}"] if r.get("num_stages") is not None else []
    return " ".join([f"{k}={c[k]}" for k in keys] + stages)


def _is64(dtype):
    return "fp64" in dtype or "float64" in dtype or dtype == "double"


def test_triton_offsets_are_64bit(triton_records):
    bad = sorted({f"{r['name']} ({_tag(r)}): {', '.join(sorted(set(r['narrow'])))}"
                  for r in triton_records if r["narrow"]})
    assert not bad, "32-bit products of runtime values (cast the index to tl.int64 first):\n" + "\n".join(bad)


def test_triton_no_spills_and_occupancy(triton_records):
    from neuralmem_fast.ops.triton import planning

    assert len(triton_records) >= 40, f"only {len(triton_records)} variants compiled"
    rows, bad = [], []
    for r in triton_records:
        threads = 32 * r["num_warps"]
        fit = blocks_per_sm(r["regs"], threads, r["shared"])
        plan = planning.programs_per_sm(r["num_warps"])
        known = next((v for k, v in TRITON_KNOWN_SPILLS.items()
                      if k[0] == r["name"] and k[1] == r["dtype"] and all(c in _tag(r) for c in k[2:])), None)
        r["known"] = known is not None
        if known is not None and r["spill_stores"] > known:
            bad.append(f"{r['name']} {r['dtype']} ({_tag(r)}): {r['spill_stores']} spill stores, more than the "
                       f"{known} TRITON_KNOWN_SPILLS records")
        elif known is None and r["spill_stores"] > 0 and not _is64(r["dtype"]):
            bad.append(f"{r['name']} {r['dtype']} ({_tag(r)}): {r['spill_stores']} spill stores, "
                       f"{r['stack']} B stack")
        if fit < plan:
            bad.append(f"{r['name']} {r['dtype']} ({_tag(r)}): {r['regs']} registers, {r['shared']} B shared "
                       f"fit {fit} programs per SM, the plan assumes {plan}")
        flight = _triton_in_flight(r, min(fit, plan))
        if (r["name"] in _PREFETCH_NEXT and r["dtype"] == "*fp32" and list(r["shape"]) == STREAMING_SHAPE
                and flight < GOAL_IN_FLIGHT):
            bad.append(f"{r['name']} {r['dtype']} ({_tag(r)}): {flight / 1024:.0f} KB in flight per SM at "
                       f"{STREAMING_SHAPE}, under the {GOAL_IN_FLIGHT // 1024} KB goal")
        rows.append((r, fit, plan))
    SECTIONS["triton"] = _triton_table(rows)
    assert not bad, "\n".join(bad)


# Loads one iteration of a streaming loop issues per program: the memory tile
# (BN x BD) plus, where read, a (BH x BN) tile of weights.
_STREAMING = {"_read_fused_fwd_kernel", "_address_fwd_kernel", "_content_bwd_kernel", "_read_fwd_kernel",
              "_write_fwd_kernel", "_write_bwd_kernel", "_content_write_kernel", "_bwd_stats_kernel",
              "_read_bwd_kernel"}
_ELEM = {"*fp16": 2, "*bf16": 2, "*fp32": 4, "*fp64": 8}


# Loads in flight per SM that content_read's forward and content_write_ must
# reach (CUDA: every dtype, at D <= 256; Triton: float32 at the streaming
# shape, one head, D = 64, N = 2^24, where the memory tile is widest), about
# what HBM3e needs per SM: bandwidth x latency / SMs.
GOAL_IN_FLIGHT = 32 * 1024
STREAMING_SHAPE = [1, 1 << 24, 1, 64, 1]

# Kernels whose main loop issues the next tile's loads before it uses this
# one (content_read's forward, content_write_): two tiles in flight.
_PREFETCH_NEXT = {"_read_fused_fwd_kernel", "_content_write_kernel"}


def _triton_in_flight(r, resident):
    c = r["consts"]
    if r["name"] not in _STREAMING or "BN" not in c or "BD" not in c:
        return None
    tiles = 2 if r["name"] in _PREFETCH_NEXT else 1
    return int(c["BN"]) * int(c["BD"]) * _ELEM.get(r["dtype"], 4) * tiles * resident


def _triton_table(rows):
    lines = ["| kernel | dtype | shapes (B,N,H,D,W) | blocks | warps | regs | spill stores | stack B | shared B | "
             "programs/SM fit | plan | KB in flight/SM |", "|" + "---|" * 12]
    seen = {}
    for r, fit, plan in rows:
        key = (r["name"], r["dtype"], _tag(r), r["num_warps"])
        if key in seen:
            seen[key][2].append(tuple(r["shape"]))
            continue
        seen[key] = (r, (fit, plan), [tuple(r["shape"])])
    for (name, dtype, tag, warps), (r, (fit, plan), shapes) in sorted(seen.items()):
        flight = _triton_in_flight(r, min(fit, plan))
        note = " (float64: allowed)" if r["spill_stores"] and _is64(dtype) else ""
        note = " (**open**: TRITON_KNOWN_SPILLS)" if r["spill_stores"] and r.get("known") else note
        shape_s = "; ".join(",".join(map(str, s)) for s in sorted(set(shapes))[:3])
        lines.append(f"| {name} | {dtype.lstrip('*')} | {shape_s} | {tag} | {warps} | {r['regs']} | "
                     f"{r['spill_stores']}{note} | {r['stack']} | {r['shared']} | {fit} | {plan} | "
                     f"{'' if flight is None else f'{flight / 1024:.0f}'} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# CUDA C++
# --------------------------------------------------------------------------
def _extension_path():
    import neuralmem_fast as nm

    if not (nm.has_extension() and nm.has_cuda_kernels()):
        return None
    from neuralmem_fast import _C

    return _C.__file__


_MANGLED = re.compile(r"\d+([a-z_]*_kernel)I(d|f|N3c104HalfE|N3c108BFloat16E)")
_DTYPE = {"d": "float64", "f": "float32", "N3c104HalfE": "float16", "N3c108BFloat16E": "bfloat16"}


def launch_bounds(src_dir):
    """{kernel name: (threads, min blocks or None)} from the __launch_bounds__ of csrc/cuda."""
    common = open(os.path.join(src_dir, "common.cuh")).read()
    consts = {k: int(v) for k, v in re.findall(r"constexpr int (\w+) = (\d+);", common)}
    out = {}
    for f in sorted(os.listdir(src_dir)):
        if not f.endswith((".cu", ".cuh")):
            continue
        text = open(os.path.join(src_dir, f)).read()
        for threads, second, name in re.findall(r"__launch_bounds__\((\w+)(?:,\s*([^)]*\)))?\)\s*(\w+)\(", text):
            t = int(threads) if threads.isdigit() else consts[threads]
            out[name] = (t, second.strip() or None)
    return out


def min_blocks(expr, dtype):
    """The figure of min_blocks<T>(weight) in common.cuh, for a kernel's dtype."""
    if expr is None:
        return None
    weight = re.search(r"\((k\w+)\)", expr).group(1)
    if weight == "kLight":
        return 4
    return 3 if weight == "kHeavy" and dtype != "float64" else 2


# Streaming kernels whose one-tile rows (D <= 256) are loaded kUnrollBytes
# per lane at a time before the first is used (common.cuh); the others load
# one tile (kCPL elements) per lane at a time.
_CUDA_UNROLLED = ("fwd_kernel", "content_write_kernel")


def _cuda_unroll_bytes():
    common = open(os.path.join(REPO, "csrc", "cuda", "common.cuh")).read()
    return int(re.search(r"constexpr int kUnrollBytes = (\d+);", common).group(1))


def _cuda_in_flight(name, dtype, threads, resident, src_dir):
    """Streaming kernels: the bytes a lane loads before it uses them (kUnrollBytes where the loop is unrolled,
    else its kCPL columns of one row), times lanes, times resident blocks."""
    if name not in ("fwd_kernel", "bwd_kernel", "write_bwd_kernel", "content_write_kernel"):
        return None
    common = open(os.path.join(src_dir, "common.cuh")).read()
    cpl = int(re.search(r"constexpr int kCPL = (\d+);", common).group(1))
    elem = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}[dtype]
    per_lane = _cuda_unroll_bytes() if name in _CUDA_UNROLLED else cpl * elem
    return threads * per_lane * resident


# Spills left open, by mangled-name fragment: the most spill stores allowed
# (the test fails if they grow, and once they are gone, until the entry is
# removed). None are left: bwd_kernel<float, false> (the float32
# content_read backward, q, g and dq of four heads in registers) spilled 15
# stores at the 255-register limit until its key norms and softmax scales
# moved to shared memory.
KNOWN_SPILLS = {}


def test_cuda_resources():
    from neuralmem_fast.ops.triton.compile_check import parse_res_usage, parse_sass_spills

    so = _extension_path()
    tool = _cuobjdump()
    if so is None or tool is None:
        pytest.skip("the extension was built without its CUDA kernels, or cuobjdump is missing")
    res = subprocess.run([tool, "-res-usage", "-arch", "sm_90", so], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "REG:" in res.stdout, res.stderr[-2000:] or "no sm_90 cubin in the extension"
    usage = parse_res_usage(res.stdout)
    sass = subprocess.run([tool, "-sass", "-arch", "sm_90", so], capture_output=True, text=True, timeout=600)
    spills = parse_sass_spills(sass.stdout)
    src = os.path.join(REPO, "csrc", "cuda")
    bounds = launch_bounds(src)
    demangle = shutil.which("c++filt")
    rows, bad = [], []
    for mangled, r in sorted(usage.items()):
        m = _MANGLED.search(mangled)
        if not m or m.group(1) not in bounds:
            continue
        name, dtype = m.group(1), _DTYPE[m.group(2)]
        threads, expr = bounds[name]
        want = min_blocks(expr, dtype)
        fit = blocks_per_sm(r["regs"], threads, r["shared"])
        st = spills.get(mangled, 0)
        known = next((v for k, v in KNOWN_SPILLS.items() if k in mangled), None)
        if known is not None and st != known:
            bad.append(f"{mangled} ({dtype}): {st} spill stores where KNOWN_SPILLS records {known}: update it")
        elif known is None and (st or r["stack"]) and dtype != "float64":
            bad.append(f"{mangled} ({dtype}): {st} spill stores, {r['stack']} B stack")
        if want is not None and fit < want:
            bad.append(f"{mangled} ({dtype}): {r['regs']} registers fit {fit} blocks per SM, built for {want}")
        full = mangled
        if demangle:
            full = subprocess.run([demangle, mangled], capture_output=True, text=True).stdout.strip()
            full = re.sub(r"neuralmem::cuda::(\(anonymous namespace\)::)?", "", full).split("(")[0]
        flight = _cuda_in_flight(name, dtype, threads, fit, src)
        if name in _CUDA_UNROLLED and flight < GOAL_IN_FLIGHT:
            bad.append(f"{mangled} ({dtype}): {flight / 1024:.0f} KB in flight per SM, under the "
                       f"{GOAL_IN_FLIGHT // 1024} KB goal")
        rows.append((full, dtype, threads, r, st, fit, want, flight, known is not None))
    assert rows, "no neuralmem kernel found in the extension's sm_90 cubins"
    lines = ["| kernel | dtype | threads | regs | spill stores | stack B | shared B | blocks/SM fit | "
             "built for (min) | KB in flight/SM |", "|" + "---|" * 10]
    for full, dtype, threads, r, st, fit, want, flight, known in rows:
        note = " (float64: allowed)" if (st or r["stack"]) and dtype == "float64" else ""
        note = " (**open**: KNOWN_SPILLS)" if known else note
        lines.append(f"| {full} | {dtype} | {threads} | {r['regs']} | {st}{note} | {r['stack']} | {r['shared']} | "
                     f"{fit} | {'' if want is None else want} | {'' if flight is None else f'{flight / 1024:.0f}'} |")
    SECTIONS["cuda"] = "\n".join(lines)
    assert not bad, "\n".join(bad)


def test_write_report():
    """Writes benchmarks/kernel_resources.md from the tables the tests above built (runs last in this file)."""
    if not SECTIONS:
        pytest.skip("no table was built (Triton's NVIDIA backend and the CUDA build are both missing)")
    from neuralmem_fast.ops.triton import planning

    text = [
        "# Kernel resources (sm_90, read off the compiled code; no GPU involved)",
        "",
        "Written by `pytest tests/test_kernel_resources.py`. Registers, spill stores (STL instructions in the "
        "SASS), stack and shared memory per kernel, as `cuobjdump -res-usage` and `cuobjdump -sass` read them "
        "from the sm_90 cubins; blocks/SM fit: resident blocks per SM that registers, threads and shared memory "
        "allow on an H100/H200 (64K registers, 2048 threads, 228 KB shared memory), the figure "
        "`cudaOccupancyMaxActiveBlocksPerMultiprocessor` returns at run time. "
        "KB in flight/SM: an estimate of the memory loads one SM keeps outstanding in a streaming loop, "
        "resident blocks x the bytes one block's iteration loads (Triton: the BN x BD memory tile, two of them "
        "where the loop loads the next tile before it uses this one: content_read's forward and content_write_; "
        "CUDA: kThreads lanes x kCPL columns each; for content_read's forward (`fwd_kernel`, every mode) and "
        f"`content_write_kernel`, whose loops load {_cuda_unroll_bytes()} bytes of rows per lane before they use "
        "the first (4 rows of float, 8 of half, 2 of double, at D <= 256), kThreads x that). The goal is 32 KB "
        "for those two ops (CUDA: every dtype; Triton: float32 at one head, D = 64, N = 2^24), about what "
        "HBM3e needs per SM (bandwidth x latency / SMs); it is an estimate from the code, not a measurement "
        "on a card.",
        "",
        "Float64 kernels may spill (their accumulators are twice as wide); the tables mark it. Half and "
        "bfloat16 kernels keep half the bytes in flight of their float32 twins at the same tile.",
        "",
    ]
    if "triton" in SECTIONS:
        text += ["## Triton: every variant the ops launch on an H200 (132 SMs)", "",
                 f"Plan: {planning.WARPS_PER_SM} resident warps per SM (programs_per_sm = "
                 f"{planning.WARPS_PER_SM} / num_warps), registers capped at {planning.MAX_REGS} (maxnreg). "
                 "Shapes: ops/triton/variants.py.", "", SECTIONS["triton"], ""]
    if "cuda" in SECTIONS:
        text += ["## CUDA C++: the extension's sm_90 kernels", "",
                 "built for (min): the minimum blocks per SM of the kernel's `__launch_bounds__` "
                 "(min_blocks in csrc/cuda/common.cuh); the split planner sizes its grid with the kernel's "
                 "real occupancy (`occupancy<kernel>()`). Empty: a grid-stride kernel with no minimum.", "",
                 SECTIONS["cuda"], ""]
    with open(REPORT, "w") as f:
        f.write("\n".join(text))
    with open(REPORT) as f:
        assert f.read().count("| kernel |") == len(SECTIONS)
