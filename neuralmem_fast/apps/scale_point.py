"""One point of the large-memory sweep, measured in a process of its own.

`run_point(spec)` builds the memory and the step a spec names (provider,
mode, B, N, D, H, W, dtype), warms up, times the step and reads the peak
memory above a baseline taken after the warm-up; `run_point_isolated` runs it
in a fresh Python process (so that one point's allocations and page cache
never inflate the next one's peak) and returns its JSON record. The sweep
(apps/scale.py) plans the points and reports them.
"""
import gc
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time

import torch

MODES = ("fwd", "fwdbwd", "train", "read_bwd", "seq", "seq_rev", "seq_full", "sparse_seq")
MODE_DOC = {
    "fwd": "read-then-write forward, in place",
    "fwdbwd": "content_read + content_addressing + memory_write, forward+backward (the separate ops)",
    "train": "content_read_write, forward+backward (the training step: the read and the content write in one op)",
    "read_bwd": "content_read forward+backward",
    "seq": "T read-then-write steps trained through, checkpointed segments (nn.checkpointed_scan)",
    "seq_rev": "T read-then-write steps trained through, each memory rebuilt by reversing the write "
               "(nn.reversible_read_write)",
    "seq_full": "T read-then-write steps trained through, plain autograd (every step's memory kept)",
    "sparse_seq": "T steps of the sparse access (K=8 per head, index 'auto') trained through, on the point's memory",
}
# Candidates per read head of the "sparse_seq" mode.
SPARSE_K = 8
# Steps of the "seq" modes unless the spec says otherwise.
SEQ_STEPS = 64
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GIB = float(2 ** 30)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEED_CANDIDATES = (
    os.path.join(REPO_ROOT, "shared", "seed", "seed_tutorial.py"),
    os.path.join(REPO_ROOT, "..", "shared", "seed", "seed_tutorial.py"),
)
# The goals, checked on the points at N = GOAL_N.
GOAL_N = 10 ** 7
GOAL_FWD_RATIO = 4.0
GOAL_PEAK_RATIO = 2.2
# Slots of the warm-up step that runs before each point's baseline.
WARMUP_N = 16
_POINT_TAG = "@@scale-point "



# --------------------------------------------------------------------------
# memory accounting
# --------------------------------------------------------------------------
def _loadavg():
    """The 1-minute load average: on a shared machine it says how much the timings can be trusted."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def _proc_status_bytes(field):
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.M)
    except OSError:
        return None
    return int(m.group(1)) * 1024 if m else None


class HostMemory:
    """Resident-set accounting of this process (Linux /proc; getrusage elsewhere)."""

    kind = ("process RSS high-water mark (VmHWM) above the baseline: the RSS just before the point's inputs, "
            f"after a warm-up step at N={WARMUP_N}")

    def current(self):
        rss = _proc_status_bytes("VmRSS")
        return 0 if rss is None else rss

    def settle(self):
        """Returns freed heap to the system, so that the baseline RSS holds only live data."""
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass

    def reset_peak(self):
        """Resets VmHWM to the current RSS; False where the kernel does not allow it."""
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def peak(self):
        hwm = _proc_status_bytes("VmHWM")
        if hwm is not None:
            return hwm
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kb * (1 if sys.platform == "darwin" else 1024)


class CudaMemory:
    kind = ("torch.cuda.max_memory_allocated above the baseline: memory_allocated just before the point's "
            f"inputs, after a warm-up step at N={WARMUP_N}")

    def __init__(self, device):
        self.device = device

    def current(self):
        return torch.cuda.memory_allocated(self.device)

    def settle(self):
        pass

    def reset_peak(self):
        torch.cuda.reset_peak_memory_stats(self.device)
        return True

    def peak(self):
        return torch.cuda.max_memory_allocated(self.device)


# --------------------------------------------------------------------------
# one point
# --------------------------------------------------------------------------
def find_seed(path=None):
    """The seed tutorial's file: `path` if given, else next to the repository."""
    if path:
        return os.path.abspath(path) if os.path.exists(path) else None
    for cand in SEED_CANDIDATES:
        if os.path.exists(cand):
            return os.path.abspath(cand)
    return None


def _load_seed(path):
    import importlib.util

    if "seed_tutorial" in sys.modules:
        return sys.modules["seed_tutorial"]
    import matplotlib

    matplotlib.use("Agg")  # the seed imports pyplot at module level
    spec = importlib.util.spec_from_file_location("seed_tutorial", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["seed_tutorial"] = mod
    spec.loader.exec_module(mod)
    return mod


def _make_step(spec, memory, usage, t):
    """The step closure of one point; it owns `memory` from here on."""
    from .. import ops

    be, mode = spec["provider"], spec["mode"]
    rk, rs, wk, ws, er, ad, gr = t
    if be == "seed":
        seed = _load_seed(spec["seed_path"])
        D, H, W = memory.shape[2], rk.shape[1], wk.shape[1]
        bank = seed.NeuralMemoryBank(seed.MemoryConfig(memory_size=1, memory_dim=D, num_read_heads=H,
                                                       num_write_heads=W))
        # The seed's bank is one memory; its write replaces self.memory each step.
        bank.memory, bank.usage, bank.memory_size = memory[0], usage[0], memory.shape[1]

        def step():
            with torch.no_grad():
                bank.read(rk[0], rs[0])
                bank.write(wk[0, 0], ad[0, 0], er[0, 0], ws[0])
            return None

        return step, (lambda: bank.memory), (lambda: bank.usage.unsqueeze(0))

    if mode == "fwd":
        def step():
            # One call: on the CPU the read pass also gathers the write's
            # softmax statistics (two passes over the memory, not three);
            # elsewhere it runs content_read then content_write_.
            _, least = ops.content_read_write_(memory, rk, rs, wk, ws, er, ad, usage=usage, backend=be)
            return least

        return step, (lambda: memory), (lambda: usage)

    if mode in ("seq", "seq_rev", "seq_full"):
        return _make_seq_step(spec, memory, usage, t)
    if mode == "sparse_seq":
        return _make_sparse_seq_step(spec, memory, usage, t)

    memory.requires_grad_(True)
    grads_of = [memory, rk, rs]
    if mode in ("fwdbwd", "train"):
        grads_of += [wk, ws, er, ad]
    for x in grads_of[1:]:
        x.requires_grad_(True)

    def step():
        for x in grads_of:
            x.grad = None  # free the previous step's gradients before this one allocates
        if mode == "train":
            reads, new = ops.content_read_write(memory, rk, rs, wk, ws, er, ad, backend=be)
        else:
            reads = ops.content_read(memory, rk, rs, backend=be)
            if mode == "read_bwd":
                reads.backward(gr)
                return None
            w = ops.content_addressing(memory, wk, ws, backend=be)
            new = ops.memory_write(memory, w, er, ad, backend=be)
        # new.sum()'s gradient is a broadcast scalar: the loss adds nothing of size N.
        ((reads * gr).sum().float() + new.sum().float()).backward()
        return None

    step.grads_of = grads_of
    return step, (lambda: memory), (lambda: usage)


def _make_seq_step(spec, memory, usage, t):
    """T steps of content_read_write (a read, then a content write), trained through as one
    sequence: nn.checkpointed_scan ("seq": checkpointed segments; "seq_full":
    plain autograd) or nn.reversible_read_write ("seq_rev"); backward from the
    reads and the last memory."""
    from .. import ops
    from ..nn.reversible import reversible_read_write
    from ..nn.scan import checkpointed_scan

    be, T, mode = spec["provider"], int(spec.get("T") or SEQ_STEPS), spec["mode"]
    rk, rs, wk, ws, er, ad, gr = t
    # Per-step inputs: the point's small inputs, perturbed per step so that every step addresses differently.
    g = torch.Generator(device=memory.device).manual_seed(1)
    xs = tuple((x.unsqueeze(0) + 0.1 * torch.randn((T, *x.shape), generator=g, device=x.device,
                                                      dtype=x.dtype)).requires_grad_(True)
               for x in (rk, rs, wk, ws, er, ad))
    memory.requires_grad_(True)
    grads_of = [memory, *xs]

    def one(x, state):
        reads, new = ops.content_read_write(state[0], *x, backend=be)
        return reads, (new,)

    def step():
        for x in grads_of:
            x.grad = None
        if mode == "seq_rev":
            reads, last = reversible_read_write(memory, *xs, backend=be)
        else:
            reads, (last,) = checkpointed_scan(one, (memory,), xs, segment=spec.get("segment"),
                                               checkpoint_segments=mode == "seq")
        ((reads * gr).sum().float() + last.sum().float()).backward()
        return None

    step.grads_of = grads_of
    return step, (lambda: memory), (lambda: usage)


def _make_sparse_seq_step(spec, memory, usage, t):
    """T steps of MemoryAccess(sparse_k=SPARSE_K) on the point's memory (a full, long-lived memory: its
    index lists all N rows), trained through; the memory is the state's buffer, updated in place."""
    from ..nn import AccessInterface, MemoryAccess

    be, T = spec["provider"], int(spec.get("T") or SEQ_STEPS)
    rk, rs, wk, ws, er, ad, gr = t
    B, N, D = memory.shape
    H, W = rk.shape[1], wk.shape[1]
    acc = MemoryAccess(N, D, H, W, backend=be, sparse_k=SPARSE_K, index="auto")
    state = acc.sparse.initial_state(B, memory=memory)   # the point's memory, not a second one
    g = torch.Generator(device=memory.device).manual_seed(1)
    noise = lambda x: (x.unsqueeze(0) + 0.1 * torch.randn((T, *x.shape), generator=g, device=x.device,  # noqa: E731
                                                          dtype=x.dtype)).requires_grad_(True)
    keys, erase, add = noise(rk), noise(er).detach().clamp(0, 1).requires_grad_(True), noise(ad)
    half = lambda *shape: torch.full(shape, 0.5, dtype=memory.dtype, device=memory.device)  # noqa: E731
    grads_of = [keys, erase, add]

    def step():
        for x in grads_of:
            x.grad = None
        st, loss = state.detach(), 0
        for i in range(T):
            iface = AccessInterface(keys[i], rs, wk, ws, erase[i], add[i], half(B, H), half(B, W), half(B, W))
            reads, st = acc(iface, st, validate=False)
            loss = loss + (reads * gr).sum()
        loss.backward()
        return None

    step.grads_of = grads_of
    return step, (lambda: memory), (lambda: usage)


def _finite(x):
    return x if x is None or math.isfinite(x) else None


def run_point(spec):
    """Runs one (provider, B, N, mode) point in this process; returns its record."""
    threads = torch.get_num_threads()
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    try:
        return _run_point(spec)
    finally:
        torch.set_num_threads(threads)  # in process, the caller's setting must survive the point


def _inputs(B, N, D, H, W, device, g):
    """The memory and the small inputs of a step, float32: (memory, [rk, rs, wk, ws, er, ad, gr])."""
    memory = torch.randn(B, N, D, generator=g, device=device)
    rk = torch.randn(B, H, D, generator=g, device=device)
    rs = 1 + 9 * torch.rand(B, H, generator=g, device=device)
    wk = torch.randn(B, W, D, generator=g, device=device)
    ws = 1 + 9 * torch.rand(B, W, generator=g, device=device)
    er = torch.rand(B, W, D, generator=g, device=device)
    ad = 2 * torch.rand(B, W, D, generator=g, device=device) - 1
    gr = torch.randn(B, H, D, generator=g, device=device)
    return memory, [rk, rs, wk, ws, er, ad, gr]


def _warm_up(spec, device, dtype):
    """Two steps of the point's provider and mode at N = WARMUP_N (and the
    calls the setup makes), so that what the process pays once (lazy imports,
    thread pools, the autograd engine, first kernel calls, the seed's module)
    is paid before the baseline instead of inside the point's peak."""
    from .. import ops

    B, D, H, W = (int(spec[k]) for k in ("B", "D", "H", "W"))
    g = torch.Generator(device=device).manual_seed(0)
    n = WARMUP_N if spec["mode"] != "sparse_seq" else 4 * (H * SPARSE_K + 1)  # the sparse access's least N
    memory, small = _inputs(B, n, D, H, W, device, g)
    memory.sum()
    if dtype != torch.float32:
        if spec["provider"] != "seed":
            ops.content_read(memory, small[0], small[1], backend=spec["provider"])
        memory, small = memory.to(dtype), [x.to(dtype) for x in small]
    usage = torch.zeros(B, n, dtype=dtype, device=device)
    step, _, _ = _make_step(spec, memory, usage, small)
    for _ in range(2):
        out = step()
    if out is not None:
        out.tolist()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_point(spec):
    from .. import ops

    device = torch.device(spec["device"])
    dtype = DTYPES[spec["dtype"]]
    acct = CudaMemory(device) if device.type == "cuda" else HostMemory()
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    B, N, D, H, W = (int(spec[k]) for k in ("B", "N", "D", "H", "W"))
    be, mode = spec["provider"], spec["mode"]
    rec = dict(spec)
    rec.update(memory_bytes=B * N * D * torch.empty((), dtype=dtype).element_size(),
               memory_kind=acct.kind, threads=torch.get_num_threads())

    gc.collect()
    acct.settle()
    before_warm_up = acct.current()
    _warm_up(spec, device, dtype)
    gc.collect()
    acct.settle()
    # The baseline: this process, warm, just before the point's inputs.
    base = acct.current()
    rec["baseline_bytes"] = base
    rec["warmup_bytes"] = base - before_warm_up
    acct.reset_peak()
    g = torch.Generator(device=device).manual_seed(int(spec.get("rng_seed", 0)))
    memory, small = _inputs(B, N, D, H, W, device, g)

    if dtype != torch.float32:
        want_err = spec.get("measure_error", True) and be != "seed" and mode == "fwd"
        ref = ops.content_read(memory, small[0], small[1], backend=be) if want_err else None
        memory = memory.to(dtype)  # the float32 original is freed here
        small = [x.to(dtype) for x in small]
        if ref is not None:
            got = ops.content_read(memory, small[0], small[1], backend=be).float()
            err = (got - ref).abs().max().item()
            rec["read_err_max_abs"] = _finite(err)
            rec["read_err_rel"] = _finite(err / max(ref.abs().max().item(), 1e-30))
            del ref, got
    usage = torch.zeros(B, N, dtype=dtype, device=device)

    # The floor: one streaming pass over this very tensor.
    # The floor: one streaming pass over this very tensor. Its best pass
    # is the floor (a lower bound by definition; on a shared machine the
    # median of a microsecond op mostly measures preemption).
    floors, spent = [], 0.0
    for i in range(200):
        sync()
        t0 = time.perf_counter()
        memory.sum()
        sync()
        if i:
            floors.append(time.perf_counter() - t0)
            spent += floors[-1]
        # Small N: many passes, so that one of them runs unpreempted.
        if len(floors) >= 5 and spent > 0.05:
            break
    rec["floor_s"] = min(floors)
    rec["floor_median_s"] = statistics.median(floors)

    step, current_memory, current_usage = _make_step(spec, memory, usage, small)
    del memory
    gc.collect()
    # The setup (random init, the float32 reference read) has its own peak;
    # the budget must foresee it even though the steps are measured without it.
    rec["setup_peak_bytes"] = acct.peak() - base
    rec["peak_reset"] = acct.reset_peak()

    def timed():
        sync()
        t0 = time.perf_counter()
        out = step()
        sync()
        return time.perf_counter() - t0, out

    budget = float(spec["time_budget"])
    warm, out = timed()
    times, least = [], []
    if warm > budget:
        times = [warm]  # one step is all the budget allows: report it, warm-up or not
        rec["note"] = "warm-up step over the time budget; timed once"
    else:
        spent = 0.0
        for _ in range(max(1, int(spec.get("repeat", 3)))):
            t, out = timed()
            times.append(t)
            spent += t
            if out is not None and spec.get("allocate"):
                least.append(out.tolist())
            if spent > budget:
                break
    rec["peak_bytes"] = acct.peak() - base
    rec["loadavg_1min"] = _loadavg()
    rec["times_s"] = times
    rec["step_s"] = statistics.median(times)
    rec["step_min_s"] = min(times)
    # Best against best: both sides equally shielded from preemption.
    rec["ratio_to_floor"] = rec["step_min_s"] / rec["floor_s"] if rec["floor_s"] > 0 else None
    rec["ratio_median"] = rec["step_s"] / rec["floor_median_s"] if rec["floor_median_s"] > 0 else None
    rec["peak_ratio"] = rec["peak_bytes"] / rec["memory_bytes"]
    rec["peak_bytes_per_slot"] = rec["peak_bytes"] / (B * N)
    # Every path holds the memory; a smaller peak means the baseline moved
    # (allocator noise that only tiny sizes can see).
    rec["peak_reliable"] = rec["peak_bytes"] >= rec["memory_bytes"]

    if least:
        rec["least_used"] = least
        u = current_usage()
        last = torch.as_tensor(least[-1], device=u.device)
        # Ties are legal: the answer must hold the minimum, not be a particular index.
        rec["least_used_is_min"] = bool(
            (u.gather(1, last.view(-1, 1)).squeeze(1) == u.min(dim=1).values).all())
    if getattr(step, "grads_of", None):
        rec["grads_finite"] = all(bool(torch.isfinite(x.grad).all()) for x in step.grads_of if x.grad is not None)
    mem = current_memory()
    rec["memory_finite"] = bool(torch.isfinite(mem.detach()).all())
    return rec


def _worker_main():
    """Entry of the per-point subprocess: spec as argv[1], record on stdout."""
    spec = json.loads(sys.argv[1])
    try:
        rec = run_point(spec)
    except Exception as exc:  # noqa: BLE001 - the parent records any failure as a drop
        rec = dict(spec, error=f"{type(exc).__name__}: {exc}")
    print(_POINT_TAG + json.dumps(rec), flush=True)


def run_point_isolated(spec, timeout):
    """run_point in a fresh interpreter; the same package as this one is imported."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONWARNINGS", "ignore::RuntimeWarning")
    cmd = [sys.executable, "-c", "from neuralmem_fast.apps.scale_point import _worker_main; _worker_main()", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return dict(spec, error=f"killed after {timeout:.0f} s (hard limit of the point)")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_POINT_TAG):
            return json.loads(line[len(_POINT_TAG):])
    why = f"exit status {proc.returncode}"
    if proc.returncode in (-9, 137):
        why += " (killed: out of memory?)"
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return dict(spec, error=why + (": " + " | ".join(tail) if tail else ""))
