"""Memory-op throughput: every backend side by side with its peers.

Rows (providers) of each case:
  every backend of neuralmem_fast.available_backends(device) ("cpu", "cuda",
  "triton", ... as they land; "torch", the pure-PyTorch reference, is the
  baseline row), "torch.compile" of the reference, the seed's own
  NeuralMemoryBank (one memory, so B=1 only, on the ops it has), and, once per
  large size, the bandwidth floor `memory.sum()` (one streaming pass).

Cases: each op forward ("fwd": no input requires grad) and forward+backward
("fwd+bwd": every floating input requires grad; gradients via
torch.autograd.grad, so nothing accumulates between rounds), N in {128, 4096,
65536, 10^6}, B in {1, 32} up to 256 MiB of memory (so B=32 stops at N=4096),
D=64, H=4 read heads, W=1 write head. "step" is
one memory step as the controller runs it: fwd = content_read of 4 heads then
the in-place content_write_ with usage, as one content_read_write_ call (the
seed's bank: its read then its write); fwd+bwd = content_read, the write
head's addressing and the out-of-place memory_write, differentiated through.
A B=1 N=10^7 step (issue 9) runs in the full suite when a native backend and
the memory are there.

"bytes" is what any implementation must move: one pass over the memory per
read of it, a read and a write-back per update of it, and the (H or W, N)
weights where an op takes or returns them; a backward that produces the
memory's gradient adds a read of the memory and a write of its gradient.
"""
import functools

import pytest
import torch

import neuralmem_fast as nm
from neuralmem_fast import ops as nmops

from conftest import MAX_MEMORY_BYTES, bench_device_of, is_quick, measure, mem_available_bytes

D, H, W = 64, 4, 1
SIZES_N = (128, 4096, 65536, 1_000_000)
SIZES_B = (1, 32)
QUICK_SIZES = {1: (128, 4096), 32: (128,)}  # (B -> N) of the quick subset, besides the goal rows
LARGE_N = 65536  # from here on rows report bytes and bandwidth against the floor
SCALE_N = 10_000_000

# op -> modes, and whether the seed's bank has a counterpart
OPS = {
    "content_addressing": ("fwd", "fwd+bwd"),
    "memory_read": ("fwd", "fwd+bwd"),
    "content_read": ("fwd", "fwd+bwd"),
    "memory_write": ("fwd", "fwd+bwd"),
    "memory_write_": ("fwd",),
    "content_write_": ("fwd",),
    "usage_update": ("fwd", "fwd+bwd"),
    "step": ("fwd", "fwd+bwd"),
}
SEED_OPS = {("content_addressing", "fwd"), ("content_addressing", "fwd+bwd"), ("content_read", "fwd"),
            ("content_read", "fwd+bwd"), ("content_write_", "fwd"), ("step", "fwd")}
# torch.compile costs seconds per shape on this kind of machine: the quick
# subset keeps it only where the issues set goals or where it matters most.
QUICK_COMPILE_OPS = {"content_read", "step"}

# The rows issue 3 sets goals on: always run, quick or not.
GOAL_CASES = {
    ("step", "fwd", 1, 128),
    ("content_read", "fwd", 1, 1_000_000),
    ("memory_write_", "fwd", 1, 1_000_000),
    ("step", "fwd+bwd", 32, 128),
}


READ_OPS = ("content_addressing", "memory_read", "content_read")


def group_name(op, mode, B, N, device):
    heads = f"H{H} W{W}" if op == "step" else (f"H{H}" if op in READ_OPS else f"W{W}")
    name = f"{op} {mode} B{B} N{N} D{D} {heads}"
    return name if device.type == "cpu" else f"{name} [{device.type}]"


def floor_group_name(B, N, device):
    name = f"floor memory.sum() B{B} N{N} D{D}"
    return name if device.type == "cpu" else f"{name} [{device.type}]"


def op_bytes(op, mode, B, N, itemsize=4):
    mem = B * N * D * itemsize
    vec = B * N * itemsize
    fwd = {
        "content_addressing": mem + H * vec,
        "memory_read": mem + H * vec,
        "content_read": mem,
        "memory_write": 2 * mem + W * vec,
        "memory_write_": 2 * mem + W * vec,
        "content_write_": 2 * mem + 2 * vec,
        "usage_update": (2 + W) * vec,
        "step": 2 * mem + 2 * vec,
    }[op]
    if mode == "fwd":
        return fwd
    extra = {"usage_update": (2 + W) * vec, "step": 3 * mem}.get(op, 2 * mem)
    return fwd + extra


# --------------------------------------------------------------------------
# providers
# --------------------------------------------------------------------------
def native_backends(device):
    out = [b for b in nm.available_backends(device) if b != "torch"]
    if device.type == "cpu":
        # Triton on CPU tensors is its interpreter: a test path, not a provider.
        out = [b for b in out if b != "triton"]
    return out


def providers_for(op, mode, B, device, quick):
    provs = native_backends(device) + ["torch"]
    if not quick or op in QUICK_COMPILE_OPS:
        provs.append("torch.compile")
    if B == 1 and (op, mode) in SEED_OPS:
        provs.append("seed")
    return provs


def _fits(B, N):
    return B * N * D * 4 <= MAX_MEMORY_BYTES


def ops_cases(device, quick):
    cases = []
    for op, modes in OPS.items():
        for mode in modes:
            for B in SIZES_B:
                sizes_n = QUICK_SIZES[B] if quick else SIZES_N
                for N in sorted(set(sizes_n) | {n for (o, m, b, n) in GOAL_CASES if (o, m, b) == (op, mode, B)}):
                    if not _fits(B, N):
                        continue
                    for prov in providers_for(op, mode, B, device, quick):
                        cases.append((op, mode, B, N, prov))
    return cases


def floor_cases(quick):
    if quick:
        return [(1, 1_000_000)]
    return [(B, N) for B in SIZES_B for N in SIZES_N if N >= LARGE_N and _fits(B, N)]


def pytest_generate_tests(metafunc):
    device = bench_device_of(metafunc.config)
    quick = is_quick(metafunc.config)
    if "op_case" in metafunc.fixturenames:
        cases = ops_cases(device, quick)
        ids = [f"{op}-{mode}-B{B}-N{N}-{prov}" for op, mode, B, N, prov in cases]
        metafunc.parametrize("op_case", cases, ids=ids)
    if "floor_case" in metafunc.fixturenames:
        cases = floor_cases(quick)
        metafunc.parametrize("floor_case", cases, ids=[f"B{B}-N{N}" for B, N in cases])
    if "scale_bwd_case" in metafunc.fixturenames:
        cases = [] if quick else native_backends(device)
        metafunc.parametrize("scale_bwd_case", cases, ids=cases)
    if "scale_case" in metafunc.fixturenames:
        # Only our kernels fit this size in reasonable time; without one there is nothing to compare.
        nat = [] if quick else native_backends(device)
        cases = [(prov,) for prov in nat] + ([("floor: memory.sum()",)] if nat else [])
        metafunc.parametrize("scale_case", cases, ids=[c[0] for c in cases])


# --------------------------------------------------------------------------
# inputs and the timed callables
# --------------------------------------------------------------------------
def make_inputs(B, N, device, requires_grad):
    g = torch.Generator().manual_seed(0)

    def t(*shape, f=None):
        x = torch.randn(*shape, generator=g)
        x = f(x) if f is not None else x
        return x.to(device).requires_grad_(requires_grad)

    softmax = functools.partial(torch.softmax, dim=-1)
    return dict(
        memory=t(B, N, D),
        keys=t(B, H, D),
        strengths=t(B, H, f=lambda x: torch.nn.functional.softplus(x) + 1.0),
        weights=t(B, H, N, f=softmax),
        wkeys=t(B, W, D),
        wstrengths=t(B, W, f=lambda x: torch.nn.functional.softplus(x) + 1.0),
        wweights=t(B, W, N, f=softmax),
        erase=t(B, W, D, f=torch.sigmoid),
        add=t(B, W, D, f=torch.tanh),
        usage=torch.rand(B, N, generator=g).to(device).requires_grad_(requires_grad),
    )


# Differentiated inputs of each op (fwd+bwd), in the order of its arguments.
GRAD_INPUTS = {
    "content_addressing": ("memory", "keys", "strengths"),
    "memory_read": ("memory", "weights"),
    "content_read": ("memory", "keys", "strengths"),
    "memory_write": ("memory", "wweights", "erase", "add"),
    "usage_update": ("usage", "wweights"),
    "step": ("memory", "keys", "strengths", "wkeys", "wstrengths", "erase", "add"),
}


def _op_fn(op, mode, be):
    """The op as f(inputs) -> outputs for a backend of the public API."""
    kw = dict(backend=be)
    if op == "content_addressing":
        return lambda x: nm.content_addressing(x["memory"], x["keys"], x["strengths"], **kw)
    if op == "memory_read":
        return lambda x: nm.memory_read(x["memory"], x["weights"], **kw)
    if op == "content_read":
        return lambda x: nm.content_read(x["memory"], x["keys"], x["strengths"], **kw)
    if op == "memory_write":
        return lambda x: nm.memory_write(x["memory"], x["wweights"], x["erase"], x["add"], **kw)
    if op == "memory_write_":
        return lambda x: nm.memory_write_(x["memory"], x["wweights"], x["erase"], x["add"], **kw)
    if op == "content_write_":
        return lambda x: nm.content_write_(x["memory"], x["wkeys"], x["wstrengths"], x["erase"], x["add"],
                                           usage=x["usage"], **kw)
    if op == "usage_update":
        return lambda x: nm.usage_update(x["usage"], x["wweights"], **kw)
    if op == "step" and mode == "fwd":
        def step_fwd(x):
            reads, _ = nm.content_read_write_(x["memory"], x["keys"], x["strengths"], x["wkeys"], x["wstrengths"],
                                              x["erase"], x["add"], usage=x["usage"], **kw)
            return reads
        return step_fwd
    if op == "step":
        def step_fwd_bwd(x):
            reads = nm.content_read(x["memory"], x["keys"], x["strengths"], **kw)
            w = nm.content_addressing(x["memory"], x["wkeys"], x["wstrengths"], **kw)
            return reads, nm.memory_write(x["memory"], w, x["erase"], x["add"], **kw)
        return step_fwd_bwd
    raise KeyError(op)


# The reference of each op, written over the *_ref functions only, for
# torch.compile: the public op's Python (validation, backend choice) is not
# what the peer is.
def _ref_step_fwd(m, k, s, wk, ws, e, a, u):
    reads = nmops.content_read_ref(m, k, s)
    w = nmops.content_addressing_ref(m, wk, ws)
    m.copy_(nmops.memory_write_ref(m, w, e, a))
    u.copy_(nmops.usage_update_ref(u, w))
    return reads


def _ref_step_fwd_bwd(m, k, s, wk, ws, e, a):
    reads = nmops.content_read_ref(m, k, s)
    w = nmops.content_addressing_ref(m, wk, ws)
    return reads, nmops.memory_write_ref(m, w, e, a)


def _ref_write_(m, w, e, a):
    m.copy_(nmops.memory_write_ref(m, w, e, a))


def _ref_content_write_(m, wk, ws, e, a, u):
    w = nmops.content_addressing_ref(m, wk, ws)
    m.copy_(nmops.memory_write_ref(m, w, e, a))
    u.copy_(nmops.usage_update_ref(u, w))


REF_ARGS = {
    "content_addressing": (nmops.content_addressing_ref, ("memory", "keys", "strengths")),
    "memory_read": (nmops.memory_read_ref, ("memory", "weights")),
    "content_read": (nmops.content_read_ref, ("memory", "keys", "strengths")),
    "memory_write": (nmops.memory_write_ref, ("memory", "wweights", "erase", "add")),
    "memory_write_": (_ref_write_, ("memory", "wweights", "erase", "add")),
    "content_write_": (_ref_content_write_, ("memory", "wkeys", "wstrengths", "erase", "add", "usage")),
    "usage_update": (nmops.usage_update_ref, ("usage", "wweights")),
    ("step", "fwd"): (_ref_step_fwd, ("memory", "keys", "strengths", "wkeys", "wstrengths", "erase", "add", "usage")),
    ("step", "fwd+bwd"): (_ref_step_fwd_bwd, ("memory", "keys", "strengths", "wkeys", "wstrengths", "erase", "add")),
}

_COMPILED = {}


def _configure_dynamo():
    # Each shape compiles its own static graph (the fastest the peer can be);
    # the default recompile limit would silently fall back to eager after 8.
    import torch._dynamo as dynamo

    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(dynamo.config, name):
            setattr(dynamo.config, name, 512)
    if hasattr(dynamo.config, "accumulated_cache_size_limit"):
        dynamo.config.accumulated_cache_size_limit = 4096
    if hasattr(dynamo.config, "accumulated_recompile_limit"):
        dynamo.config.accumulated_recompile_limit = 4096


def _compiled_fn(op, mode):
    fn, names = REF_ARGS.get((op, mode)) or REF_ARGS[op]
    key = (op, mode)
    if key not in _COMPILED:
        _configure_dynamo()
        _COMPILED[key] = torch.compile(fn, dynamic=False)
    cfn = _COMPILED[key]
    return lambda x: cfn(*(x[n] for n in names))


def _seed_fn(op, mode, seed, x, device):
    """The seed's own bank on the same (single) memory."""
    cfg = seed.MemoryConfig(memory_size=x["memory"].shape[1], memory_dim=D, num_read_heads=H, num_write_heads=W)
    bank = seed.NeuralMemoryBank(cfg).to(device)
    # The same memory as every other row; a fwd+bwd row differentiates
    # through it, which the seed's bank allows until its first write.
    bank.memory = x["memory"][0]
    bank.usage = x["usage"][0].detach().clone()

    if op == "content_addressing":
        # As the seed's read does: one key per call.
        return lambda x: torch.stack([bank.content_addressing(x["keys"][0, i], x["strengths"][0, i])
                                      for i in range(H)])
    if op == "content_read":
        return lambda x: bank.read(x["keys"][0], x["strengths"][0])
    if op == "content_write_":
        return lambda x: bank.write(x["wkeys"][0, 0], x["add"][0, 0], x["erase"][0, 0], x["wstrengths"][0])
    if op == "step":
        def step(x):
            reads = bank.read(x["keys"][0], x["strengths"][0])
            bank.write(x["wkeys"][0, 0], x["add"][0, 0], x["erase"][0, 0], x["wstrengths"][0])
            return reads
        return step
    raise KeyError(op)


def _with_backward(f, x, names):
    """fwd+bwd: the forward and the gradients of every differentiated input."""
    inputs = [x[n] for n in names]
    probe = f(x)
    outs = probe if isinstance(probe, tuple) else (probe,)
    # Fixed random cotangents, so that no gradient is trivially structured.
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(o.shape, generator=gen).to(o.device, o.dtype) for o in outs]

    def run():
        out = f(x)
        out = out if isinstance(out, tuple) else (out,)
        return torch.autograd.grad(out, inputs, grads, allow_unused=True)

    return run


def test_op(benchmark, op_case, bench_device, request):
    op, mode, B, N, prov = op_case
    device = bench_device
    x = make_inputs(B, N, device, requires_grad=(mode == "fwd+bwd"))
    if prov == "seed":
        f = _seed_fn(op, mode, request.getfixturevalue("seed_module"), x, device)
    elif prov == "torch.compile":
        f = _compiled_fn(op, mode)
    else:
        f = _op_fn(op, mode, prov)
    if mode == "fwd+bwd":
        try:
            fn = _with_backward(f, x, GRAD_INPUTS[op])
        except (NotImplementedError, RuntimeError, TypeError) as exc:
            pytest.skip(f"{prov} cannot run {op} {mode}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    else:
        def fn():
            with torch.no_grad():
                return f(x)

    info = dict(op=op, mode=mode, B=B, N=N, D=D, H=H if op in READ_OPS + ("step",) else None,
                W=W if op not in READ_OPS else None, dtype="float32")
    if N >= LARGE_N:
        info["bytes"] = op_bytes(op, mode, B, N)
    slow = N >= 1_000_000 and prov in ("seed", "torch", "torch.compile")
    measure(benchmark, fn, group=group_name(op, mode, B, N, device), provider=prov, device=device,
            baseline=(prov == "torch"), warmup=1 if slow else 3, **info)


def test_floor(benchmark, floor_case, bench_device):
    """One streaming pass over the memory: the bandwidth floor of every large-N row."""
    B, N = floor_case
    memory = torch.randn(B, N, D, device=bench_device)
    measure(benchmark, memory.sum, group=floor_group_name(B, N, bench_device), provider="floor: memory.sum()",
            device=bench_device, baseline=True, floor=True, op="floor", mode="fwd", B=B, N=N, D=D,
            dtype="float32", bytes=B * N * D * 4)


def test_step_scale(benchmark, scale_case, bench_device):
    """Issue 9: one read-then-write step at N=10^7 (B=1), against the floor of the same memory."""
    (prov,) = scale_case
    nbytes = SCALE_N * D * 4
    avail = mem_available_bytes()
    if avail is not None and avail < 4 * nbytes:
        pytest.skip(f"N={SCALE_N} needs about {4 * nbytes >> 30} GiB free, {avail >> 30} GiB available")
    if prov.startswith("floor"):
        memory = torch.randn(1, SCALE_N, D, device=bench_device)
        measure(benchmark, memory.sum, group=floor_group_name(1, SCALE_N, bench_device), provider=prov,
                device=bench_device, baseline=True, floor=True, op="floor", mode="fwd", B=1, N=SCALE_N, D=D,
                dtype="float32", bytes=nbytes, warmup=1)
        return
    x = make_inputs(1, SCALE_N, bench_device, requires_grad=False)
    f = _op_fn("step", "fwd", prov)

    def fn():
        with torch.no_grad():
            return f(x)

    # No reference fits here; the first native backend anchors the ratios.
    first = native_backends(bench_device)[0]
    measure(benchmark, fn, group=group_name("step", "fwd", 1, SCALE_N, bench_device), provider=prov,
            device=bench_device, baseline=(prov == first), op="step", mode="fwd", B=1, N=SCALE_N, D=D, H=H, W=W,
            dtype="float32", bytes=op_bytes("step", "fwd", 1, SCALE_N), warmup=1)


def _rss_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/self/status")


def peak_rss_during(fn):
    """(result, peak resident bytes above the level before the call), from VmHWM after resetting it.

    Writing 5 to /proc/self/clear_refs resets the high-water mark (Linux);
    the CPU allocator returns large blocks to the system, so the mark is the
    peak of what the call held. None where this is not available.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _rss_bytes("VmRSS")
    except OSError:
        return fn(), None
    out = fn()
    return out, _rss_bytes("VmHWM") - before


def test_content_read_scale_bwd(benchmark, scale_bwd_case, bench_device):
    """Issue 9: content_read forward+backward at N=10^7: its time and its peak memory against the memory's size."""
    prov = scale_bwd_case
    nbytes = SCALE_N * D * 4
    avail = mem_available_bytes()
    if avail is not None and avail < 4 * nbytes:
        pytest.skip(f"N={SCALE_N} needs about {4 * nbytes >> 30} GiB free, {avail >> 30} GiB available")
    g = torch.Generator().manual_seed(0)
    x = dict(memory=torch.randn(1, SCALE_N, D, generator=g).to(bench_device).requires_grad_(True),
             keys=torch.randn(1, H, D, generator=g).to(bench_device).requires_grad_(True),
             strengths=(torch.rand(1, H, generator=g) * 4 + 1).to(bench_device).requires_grad_(True))
    try:
        fn = _with_backward(_op_fn("content_read", "fwd+bwd", prov), x, GRAD_INPUTS["content_read"])
    except (NotImplementedError, RuntimeError) as exc:
        pytest.skip(f"{prov} cannot run content_read fwd+bwd: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    peak = None
    if bench_device.type == "cpu":
        grads, peak = peak_rss_during(fn)  # the grads stay alive until the mark is read, as a caller's would
        del grads
    else:
        torch.cuda.reset_peak_memory_stats(bench_device)
        base = torch.cuda.memory_allocated(bench_device)
        grads = fn()
        torch.cuda.synchronize(bench_device)
        peak = torch.cuda.max_memory_allocated(bench_device) - base
        del grads
    first = native_backends(bench_device)[0]
    measure(benchmark, fn, group=group_name("content_read", "fwd+bwd", 1, SCALE_N, bench_device), provider=prov,
            device=bench_device, baseline=(prov == first), op="content_read", mode="fwd+bwd", B=1, N=SCALE_N, D=D,
            H=H, dtype="float32", bytes=op_bytes("content_read", "fwd+bwd", 1, SCALE_N), memory_bytes=nbytes,
            peak_bytes=None if peak is None else peak + nbytes, warmup=1)
