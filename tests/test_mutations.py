"""Behaviours that the broad suite's shapes and values do not reach.

Each test here was written against a plausible bug planted by hand in the
code (docs/mutation_testing.md lists them): the bug left every other test
green, and the test below fails on it. They check, against float64 formulas
of their own or the `*_ref` references:

- the CPU kernels' chunk combines (large N: several chunks of slots per
  memory) with strengths large enough that the combine's shift matters,
  with several memories (B > 1);
- row widths that are not the vector width (D = 17, 65), more than four
  heads (head groups), several write heads;
- F.normalize's clamped branch for a key whose norm is below eps but not 0;
- the least-used slot's ties (lowest index, as torch.argmin), also where
  half precision rounds two different usages to one value;
- half-precision gradients at N spanning several blocks of rows;
- the same bits whatever the thread count, for every op;
- the fused agent step's accumulating backward (replay) and the public
  wrappers' rejection of keys of another width.
"""
import pytest
import torch
import torch.nn.functional as F

import neuralmem_fast as nm
from neuralmem_fast.config import MemoryConfig
from neuralmem_fast.models.controller import FastMemoryController, _fused_backward, _fused_forward
from tests.helpers import assert_close, make_inputs, shape_id

pytestmark = pytest.mark.skipif(not nm.has_extension(), reason="native extension not built")

BACKEND = "cpu"


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _vjp(fn, inputs, seed=1):
    """fn(*inputs) and the gradients of <fn(*inputs), G> for a fixed random G."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    return out, torch.autograd.grad((out * G).sum(), leaves)


def _check_op(fast, ref, inputs, names, dtype, tol_scale=1.0):
    """Output and gradients of a fast op against its reference run in float64
    on the same (rounded) values."""
    out, grads = _vjp(fast, inputs)
    ref_out, ref_grads = _vjp(ref, [t.double() for t in inputs])
    assert out.dtype == dtype and out.shape == ref_out.shape
    assert_close(out.double(), ref_out, dtype, name=f"{names[0]} output", tol_scale=tol_scale)
    for n, a, b in zip(names[1:], grads, ref_grads):
        assert_close(a.double(), b, dtype, name=f"{names[0]} grad {n}", tol_scale=tol_scale)


def _check_every_op(B, N, D, H, W, dtype, tol_scale=1.0):
    """Every CPU op, forward and backward, against the float64 references."""
    t = make_inputs(B, N, D, H, W, dtype)
    m, k, s = t["memory"], t["keys"], t["strengths"]
    _check_op(lambda a, b, c: nm.content_addressing(a, b, c, backend=BACKEND), nm.content_addressing_ref,
              [m, k, s], ["content_addressing", "memory", "keys", "strengths"], dtype, tol_scale)
    _check_op(lambda a, b, c: nm.content_read(a, b, c, backend=BACKEND), nm.content_read_ref,
              [m, k, s], ["content_read", "memory", "keys", "strengths"], dtype, tol_scale)
    _check_op(lambda a, w: nm.memory_read(a, w, backend=BACKEND), nm.memory_read_ref,
              [m, t["weights"]], ["memory_read", "memory", "weights"], dtype, tol_scale)
    _check_op(lambda a, w, e, d: nm.memory_write(a, w, e, d, backend=BACKEND), nm.memory_write_ref,
              [m, t["wweights"], t["erase"], t["add"]], ["memory_write", "memory", "weights", "erase", "add"],
              dtype, tol_scale)
    _check_op(lambda u, w: nm.usage_update(u, w, 0.9, backend=BACKEND), lambda u, w: nm.usage_update_ref(u, w, 0.9),
              [t["usage"], t["wweights"]], ["usage_update", "usage", "weights"], dtype, tol_scale)

    # The in-place steps: the write addresses the memory before it.
    m64 = m.double()
    w64 = nm.content_addressing_ref(m64, t["wkeys"].double(), t["wstrengths"].double())
    mem_ref = nm.memory_write_ref(m64, w64, t["erase"].double(), t["add"].double())
    usage_ref = nm.usage_update_ref(t["usage"].double(), w64, 0.9)
    reads_ref = nm.content_read_ref(m64, k.double(), s.double())
    mem, usage = m.clone(), t["usage"].clone()
    least = nm.content_write_(mem, t["wkeys"], t["wstrengths"], t["erase"], t["add"], usage=usage, decay=0.9,
                              backend=BACKEND)
    assert_close(mem.double(), mem_ref, dtype, name="content_write_ memory", tol_scale=tol_scale)
    assert_close(usage.double(), usage_ref, dtype, name="content_write_ usage", tol_scale=tol_scale)
    assert torch.equal(least, torch.argmin(usage, dim=1)), (least, torch.argmin(usage, dim=1))
    mem, usage = m.clone(), t["usage"].clone()
    reads, least = nm.content_read_write_(mem, k, s, t["wkeys"], t["wstrengths"], t["erase"], t["add"],
                                          usage=usage, decay=0.9, backend=BACKEND)
    assert_close(reads.double(), reads_ref, dtype, name="content_read_write_ reads", tol_scale=tol_scale)
    assert_close(mem.double(), mem_ref, dtype, name="content_read_write_ memory", tol_scale=tol_scale)
    assert_close(usage.double(), usage_ref, dtype, name="content_read_write_ usage", tol_scale=tol_scale)
    assert torch.equal(least, torch.argmin(usage, dim=1)), (least, torch.argmin(usage, dim=1))


def _ids(shapes, dtype=None):
    return [shape_id(B=b, N=n, H=h, D=d, W=w, **({} if dtype is None else dict(dtype=dtype)))
            for b, n, d, h, w in shapes]


# --------------------------------------------------------------------------
# shapes off the common path: several chunks and memories, odd widths, head groups
# --------------------------------------------------------------------------
# (B, N, D, H, W). At D = 64 the CPU kernels split N = 2048 into 2 to 11
# chunks per memory depending on the op (memory_read included, which N = 1000
# keeps in one chunk), and B = 2 puts two memories' partials side by side.
# W = 1 takes the CPU write backward's register path (its chunk sums kept in registers).
MULTI_CHUNK = [(2, 2048, 64, 4, 2), (2, 2048, 64, 4, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=lambda d: shape_id(dtype=d))
@pytest.mark.parametrize("shape", MULTI_CHUNK, ids=_ids(MULTI_CHUNK))
def test_every_op_combines_chunks_of_every_memory(shape, dtype):
    _check_every_op(*shape, dtype)


# D = 17 and 65: one or four full vectors and a one-element tail (on every
# instruction set), and 65 is next to the D = 64 register path.
ODD_WIDTHS = [(2, 300, 17, 3, 2), (2, 300, 65, 3, 2), (1, 40, 1, 2, 1)]


@pytest.mark.parametrize("shape", ODD_WIDTHS, ids=_ids(ODD_WIDTHS, torch.float32))
def test_every_op_at_row_widths_off_the_vector_width(shape):
    _check_every_op(*shape, torch.float32)


# H > 4: the kernels take heads in groups of up to four (4 + 1, 4 + 2, 4 + 4),
# at D = 64 (the register path) and D = 17; W = 3 write heads with them.
HEAD_GROUPS = [(2, 300, 64, 5, 3), (2, 300, 64, 6, 1), (2, 300, 17, 8, 2)]


@pytest.mark.parametrize("shape", HEAD_GROUPS, ids=_ids(HEAD_GROUPS, torch.float32))
def test_every_op_with_more_than_four_heads(shape):
    _check_every_op(*shape, torch.float32)


# --------------------------------------------------------------------------
# the chunk combine's shift: large strengths, the best slot in any chunk
# --------------------------------------------------------------------------
def _sharp_case(position, dtype, B=1, N=4096, D=64, H=4, strength=1e4):
    """Each head's key is a copy of one slot (cos = 1): with strength 1e4
    that slot's logit exceeds every other chunk's by thousands, far beyond
    exp's range, so a combine that shifts by anything but the global max
    overflows. `position` places the slots in the first chunk of slots, in
    the middle, or at the end of the memory."""
    t = make_inputs(B, N, D, H, 1, torch.float64, seed=2)
    start = {"first-chunk": 3, "middle": N // 2, "end": N - H}[position]
    slots = [start + h for h in range(H)]
    keys = torch.stack([t["memory"][:, n] * (1.0 + h) for h, n in enumerate(slots)], dim=1)
    strengths = torch.full((B, H), strength, dtype=torch.float64)
    return t["memory"].to(dtype), keys.to(dtype), strengths.to(dtype), slots


POSITIONS = ["first-chunk", "middle", "end"]
SHARP_DTYPES = [torch.float32, torch.float64]


def _sharp_id(position, dtype):
    return f"B1-N4096-H4-D64-{shape_id(dtype=dtype)}-best-at-{position}"


SHARP_CASES = [(p, d) for d in SHARP_DTYPES for p in POSITIONS]


@pytest.mark.parametrize("position,dtype", SHARP_CASES, ids=[_sharp_id(p, d) for p, d in SHARP_CASES])
def test_content_read_at_large_n_and_strength_follows_the_best_slot(position, dtype):
    m, k, s, slots = _sharp_case(position, dtype)
    reads, lse = nm.content_read(m, k, s, backend=BACKEND, return_lse=True)
    m64, k64, s64 = m.double(), k.double(), s.double()
    ref = nm.content_read_ref(m64, k64, s64)
    # The reference puts (all but e^-thousands of) the weight on the copied slot.
    torch.testing.assert_close(ref[0], m64[0, slots], rtol=1e-12, atol=1e-12)
    assert torch.isfinite(reads).all(), f"{(~torch.isfinite(reads)).sum().item()} of {reads.numel()} reads not finite"
    assert_close(reads.double(), ref, dtype, name="reads")
    lse_ref = torch.logsumexp(nm.ops.logits_ref(m64, k64, s64), dim=-1)
    assert_close(lse.double(), lse_ref, dtype, name="lse")
    # The backward recomputes the weights from lse: finite and right too.
    _check_op(lambda a, b, c: nm.content_read(a, b, c, backend=BACKEND), nm.content_read_ref, [m, k, s],
              ["content_read", "memory", "keys", "strengths"], dtype)


@pytest.mark.parametrize("position,dtype", SHARP_CASES, ids=[_sharp_id(p, d) for p, d in SHARP_CASES])
def test_addressing_and_write_at_large_n_and_strength_follow_the_best_slot(position, dtype):
    m, k, s, slots = _sharp_case(position, dtype)
    w = nm.content_addressing(m, k, s, backend=BACKEND)
    w_ref = nm.content_addressing_ref(m.double(), k.double(), s.double())
    assert torch.isfinite(w).all()
    assert_close(w.double(), w_ref, dtype, name="weights")
    assert torch.equal(w.argmax(dim=-1)[0], torch.tensor(slots))
    # content_write_ (its own softmax pass) and the fused read-then-write.
    g = torch.Generator().manual_seed(5)
    erase = torch.rand(1, 1, m.shape[2], generator=g, dtype=torch.float64).to(dtype)
    add = torch.randn(1, 1, m.shape[2], generator=g, dtype=torch.float64).to(dtype)
    wk, ws = k[:, :1], s[:, :1]
    expected = nm.memory_write_ref(m.double(), nm.content_addressing_ref(m.double(), wk.double(), ws.double()),
                                   erase.double(), add.double())
    mem = m.clone()
    nm.content_write_(mem, wk, ws, erase, add, backend=BACKEND)
    assert_close(mem.double(), expected, dtype, name="content_write_ memory")
    mem = m.clone()
    nm.content_read_write_(mem, k, s, wk, ws, erase, add, backend=BACKEND)
    assert_close(mem.double(), expected, dtype, name="content_read_write_ memory")


# --------------------------------------------------------------------------
# F.normalize's clamp: keys whose norm is below eps but not zero
# --------------------------------------------------------------------------
EPS_CASES = [(1e-12, 1e-14, torch.float64), (1e-3, 5e-4, torch.float64), (1e-3, 5e-4, torch.float32)]


@pytest.mark.parametrize("N", [7, 1000], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("eps,norm,dtype", EPS_CASES,
                         ids=[f"B2-H3-D5-eps{e:g}-norm{n:g}-{shape_id(dtype=d)}" for e, n, d in EPS_CASES])
def test_keys_below_eps_take_the_clamped_gradient(eps, norm, dtype, N):
    """A key of norm 0 < |k| <= eps is k / eps in F.normalize, so its gradient
    is dq / eps (no projection). A key of norm exactly 0 takes the same branch
    (tested elsewhere); this one must not take the |k| > eps formula."""
    t = make_inputs(2, N, 5, 3, 1, torch.float64, seed=4)
    k = t["keys"].clone()
    k[0, 1] = k[0, 1] / k[0, 1].norm() * norm
    k[1, 2] = k[1, 2] / k[1, 2].norm() * (norm / 7)
    inputs = [t["memory"].to(dtype), k.to(dtype), t["strengths"].to(dtype)]
    for fast, ref in ((nm.content_read, nm.content_read_ref), (nm.content_addressing, nm.content_addressing_ref)):
        _check_op(lambda a, b, c: fast(a, b, c, eps=eps, backend=BACKEND), lambda a, b, c: ref(a, b, c, eps=eps),
                  inputs, [fast.__name__, "memory", "keys", "strengths"], dtype)


# --------------------------------------------------------------------------
# the least-used slot: ties to the lowest index, as torch.argmin
# --------------------------------------------------------------------------
@pytest.mark.parametrize("N,D,W", [(7, 3, 1), (4096, 64, 1), (4096, 64, 2)],
                         ids=["B2-N7-D3-W1-fp32", "B2-N4096-D64-W1-fp32", "B2-N4096-D64-W2-fp32"])
def test_least_used_slot_of_a_fresh_memory_is_slot_zero(N, D, W):
    """A fresh (all-zero) memory is addressed uniformly, so after each write
    every slot has the same usage: the least-used slot is 0, step after step."""
    g = torch.Generator().manual_seed(6)
    B = 2
    for fused in (False, True):
        mem, usage = torch.zeros(B, N, D), torch.zeros(B, N)
        ref_mem, ref_usage = mem.double(), usage.double()
        for step in range(3):
            keys = torch.randn(B, W, D, generator=g)
            strengths, erase = torch.rand(B, W, generator=g) * 5, torch.rand(B, W, D, generator=g)
            add = torch.randn(B, W, D, generator=g)
            w = nm.content_addressing_ref(ref_mem, keys.double(), strengths.double())
            ref_mem = nm.memory_write_ref(ref_mem, w, erase.double(), add.double())
            ref_usage = nm.usage_update_ref(ref_usage, w)
            if fused:
                rk, rs = torch.randn(B, 2, D, generator=g), torch.rand(B, 2, generator=g)
                _, least = nm.content_read_write_(mem, rk, rs, keys, strengths, erase, add, usage=usage,
                                                  backend=BACKEND)
            else:
                least = nm.content_write_(mem, keys, strengths, erase, add, usage=usage, backend=BACKEND)
            assert_close(usage.double(), ref_usage, torch.float32, name=f"usage after write {step}")
            assert torch.equal(torch.argmin(ref_usage, dim=1), torch.zeros(B, dtype=torch.long))
            assert least.tolist() == [0] * B, f"write {step} ({'read_write' if fused else 'write'}): {least}"


_IDENTICAL_ROWS_SCRIPT = """
import itertools, torch, neuralmem_fast as nm
from neuralmem_fast.ops import dnc, sparse
g, bad = torch.Generator().manual_seed(0), []
for dtype, N, H, D in itertools.product((torch.float32, torch.float64), (1, 5, 7, 13, 65, 4099), (1, 2, 3, 4, 5),
                                        (3, 64, 67)):
    B, one = 2, lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    mem = one(B, 1, D).expand(B, N, D).contiguous()
    keys, st = one(B, H, D), torch.rand(B, H, generator=g, dtype=dtype) * 30
    erase, add = torch.rand(B, 1, D, generator=g, dtype=dtype), one(B, 1, D)
    w = nm.content_addressing(mem, keys, st, backend="cpu")
    if not (w == w[..., :1]).all():
        bad.append(("content_addressing", dtype, N, H, D))
    if N >= H:
        new, rw, _ = dnc.write_read(mem, torch.full((B, 1, N), 1.0 / N, dtype=dtype), erase, add, keys, st)
        if not ((rw == rw[..., :1]).all() and (new == new[:, :1]).all()):
            bad.append(("write_read", dtype, N, H, D))
    k = min(N, 6)
    sc, idx = sparse.cosine_topk(mem, keys, k, backend="cpu")
    if not (torch.equal(idx, torch.arange(k).expand(B, H, k)) and (sc == sc[..., :1]).all()):
        bad.append(("cosine_topk", dtype, N, H, D))
    m, u = mem.clone(), torch.zeros(B, N, dtype=dtype)
    least = nm.content_write_(m, keys[:, :1], st[:, :1], erase, add, usage=u, backend="cpu")
    if not ((u == u[:, :1]).all() and (m == m[:, :1]).all() and least.tolist() == [0] * B):
        bad.append(("content_write_", dtype, N, H, D))
    m, u = mem.clone(), torch.zeros(B, N, dtype=dtype)
    _, least = nm.content_read_write_(m, keys, st, keys[:, :1], st[:, :1], erase, add, usage=u, backend="cpu")
    if not ((u == u[:, :1]).all() and (m == m[:, :1]).all() and least.tolist() == [0] * B):
        bad.append(("content_read_write_", dtype, N, H, D))
assert not bad, bad[:20]
print("ok")
"""


@pytest.mark.parametrize("isa", ["default", "avx2", "avx512"])
def test_identical_rows_get_identical_weights_on_every_instruction_set(isa):
    """Identical rows must get bit-identical weights, usage and writes wherever they sit: the dots of a
    block's rows are summed four rows at a time, and the last (N mod 4) rows once went through another
    horizontal sum (AVX2: another order of the additions), so slot 4 of N = 7 scored apart from slot 0 and
    the least-used slot of a fresh memory moved off 0. The exact top-K must list identical rows in slot
    order. A fresh process per instruction set."""
    from tests.helpers import run_on_instruction_set

    run_on_instruction_set(isa, _IDENTICAL_ROWS_SCRIPT)


@pytest.mark.parametrize("N,D", [(16, 3), (4096, 64)], ids=["B2-N16-D3-W1-fp32", "B2-N4096-D64-W1-fp32"])
def test_least_used_slot_ties_go_to_the_lowest_index(N, D):
    """Zero strengths address every slot alike (w = 1/N exactly), so slots of
    equal usage stay equal: memory 0 has ties inside one chunk and across
    chunks, memory 1 only in later chunks (at N = 4096)."""
    B = 2
    g = torch.Generator().manual_seed(7)
    usage0 = 1.0 + torch.rand(B, N, generator=g)
    ties = [[2, 5, N // 2, N - 1], [N // 2 + 1, N // 2 + 3, N - 2]]
    for b, idx in enumerate(ties):
        usage0[b, idx] = 0.25
    memory = torch.randn(B, N, D, generator=g)
    keys, strengths = torch.randn(B, 1, D, generator=g), torch.zeros(B, 1)
    erase, add = torch.rand(B, 1, D, generator=g), torch.randn(B, 1, D, generator=g)
    w = nm.content_addressing_ref(memory.double(), keys.double(), strengths.double())
    ref_usage = nm.usage_update_ref(usage0.double(), w)
    expected = [min(idx) for idx in ties]
    assert torch.argmin(ref_usage, dim=1).tolist() == expected
    for op in ("content_write_", "content_read_write_"):
        mem, usage = memory.clone(), usage0.clone()
        if op == "content_write_":
            least = nm.content_write_(mem, keys, strengths, erase, add, usage=usage, backend=BACKEND)
        else:
            _, least = nm.content_read_write_(mem, keys, strengths + 1, keys, strengths, erase, add, usage=usage,
                                              backend=BACKEND)
        for b, idx in enumerate(ties):
            assert (usage[b, idx] == usage[b, idx[0]]).all(), "the planted ties must survive the update"
        assert least.tolist() == expected, f"{op}: least {least.tolist()}, expected {expected}"


def _rounding_tie(dtype, N, decay=0.99):
    """Two neighbouring usages x < y of dtype whose updates decay*u + 1/N
    (float32 arithmetic, as the kernel's) differ before rounding and round to
    one value of dtype, both well inside its rounding interval (so that a
    fused multiply-add or not cannot change the rounding)."""
    w = torch.tensor(1.0 / N, dtype=torch.float32)
    d = torch.tensor(decay, dtype=torch.float32)
    up = torch.tensor(1.0, dtype=dtype)
    x = torch.tensor(0.02, dtype=dtype)
    for _ in range(4096):
        y = torch.nextafter(x, up)
        nx, ny = d * x.float() + w, d * y.float() + w
        r = nx.to(dtype)
        if nx < ny and ny.to(dtype) == r:
            lo = (torch.nextafter(r, -up).float() + r.float()) / 2  # r's rounding interval
            hi = (torch.nextafter(r, up).float() + r.float()) / 2
            margin = (hi - lo) / 8
            if nx - lo > margin and hi - ny > margin:
                return x, y
        x = y
    raise AssertionError("no rounding tie found")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: f"B1-N16-D3-W1-{shape_id(dtype=d)}")
def test_half_least_used_slot_is_argmin_of_the_stored_usage(dtype):
    """In half precision two different usages can round to one stored value;
    the least-used slot is then the lower index of the two, as torch.argmin
    of the usage the kernel stored (not of the unrounded sums)."""
    N, D = 16, 3
    x, y = _rounding_tie(dtype, N)
    usage0 = torch.ones(1, N, dtype=dtype)
    usage0[0, 4], usage0[0, 11] = y, x  # the lower index holds the larger usage
    memory = torch.zeros(1, N, D, dtype=dtype)  # fresh memory: uniform weights 1/N
    keys, strengths = torch.randn(1, 1, D).to(dtype), torch.ones(1, 1, dtype=dtype)
    erase, add = torch.rand(1, 1, D).to(dtype), torch.randn(1, 1, D).to(dtype)
    w = nm.content_addressing_ref(memory.float(), keys.float(), strengths.float())
    ref_usage = nm.usage_update_ref(usage0.float(), w).to(dtype)
    assert ref_usage[0, 4] == ref_usage[0, 11] and torch.argmin(ref_usage, dim=1).item() == 4
    for op in ("content_write_", "content_read_write_"):
        mem, usage = memory.clone(), usage0.clone()
        if op == "content_write_":
            least = nm.content_write_(mem, keys, strengths, erase, add, usage=usage, backend=BACKEND)
        else:
            _, least = nm.content_read_write_(mem, keys, strengths, keys, strengths, erase, add, usage=usage,
                                              backend=BACKEND)
        assert torch.equal(usage, ref_usage), (usage, ref_usage)
        assert least.item() == 4, f"{op}: least {least.item()}, expected 4 (usage {usage[0, 4]} at 4 and 11)"


# --------------------------------------------------------------------------
# half precision: gradients at N spanning several blocks of rows
# --------------------------------------------------------------------------
HALF_SHAPES = [(2, 300, 64, 4, 2), (2, 600, 17, 3, 1)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: shape_id(dtype=d))
@pytest.mark.parametrize("shape", HALF_SHAPES, ids=_ids(HALF_SHAPES))
def test_half_gradients_across_blocks_of_rows(shape, dtype):
    """Half inputs are widened block by block (64 rows at D = 64, 240 at
    D = 17) and their gradients narrowed back: at these N a memory spans
    several blocks and chunks. Against the float32 reference of the same
    rounded values, as the half backward test at N = 7."""
    B, N, D, H, W = shape
    t = make_inputs(B, N, D, H, W, dtype)
    cases = [
        (lambda m, k, s: nm.content_read(m, k, s, backend=BACKEND), nm.content_read_ref,
         ("memory", "keys", "strengths")),
        (lambda m, k, s: nm.content_addressing(m, k, s, backend=BACKEND), nm.content_addressing_ref,
         ("memory", "keys", "strengths")),
        (lambda m, w: nm.memory_read(m, w, backend=BACKEND), nm.memory_read_ref, ("memory", "weights")),
        (lambda m, w, e, a: nm.memory_write(m, w, e, a, backend=BACKEND), nm.memory_write_ref,
         ("memory", "wweights", "erase", "add")),
    ]
    for fast, ref, names in cases:
        out, grads = _vjp(fast, [t[n] for n in names])
        ref_out, ref_grads = _vjp(ref, [t[n].float() for n in names])
        assert out.dtype == dtype
        assert_close(out.float(), ref_out, dtype, name=f"{names} output")
        for name, a, b in zip(names, grads, ref_grads):
            assert a.dtype == dtype
            assert_close(a.float(), b, dtype, name=f"grad {name}", tol_scale=4)


# --------------------------------------------------------------------------
# threads: the same bits on any thread count
# --------------------------------------------------------------------------
def _every_op_outputs(t):
    """{name: tensor} of every op's outputs and gradients on the inputs t."""
    outs = {}
    m, k, s = t["memory"], t["keys"], t["strengths"]
    for op, fn, names in (
        ("content_addressing", nm.content_addressing, ("memory", "keys", "strengths")),
        ("content_read", nm.content_read, ("memory", "keys", "strengths")),
        ("memory_read", nm.memory_read, ("memory", "weights")),
        ("memory_write", nm.memory_write, ("memory", "wweights", "erase", "add")),
        ("usage_update", lambda u, w, backend: nm.usage_update(u, w, 0.9, backend=backend), ("usage", "wweights")),
    ):
        out, grads = _vjp(lambda *a: fn(*a, backend=BACKEND), [t[n] for n in names])
        outs[op] = out
        outs.update({f"{op} grad {n}": g for n, g in zip(names, grads)})
    mem, usage = m.clone(), t["usage"].clone()
    least = nm.content_write_(mem, t["wkeys"], t["wstrengths"], t["erase"], t["add"], usage=usage, backend=BACKEND)
    outs.update({"content_write_ memory": mem, "content_write_ usage": usage, "content_write_ least": least})
    mem, usage = m.clone(), t["usage"].clone()
    reads, least = nm.content_read_write_(mem, k, s, t["wkeys"], t["wstrengths"], t["erase"], t["add"],
                                          usage=usage, backend=BACKEND)
    outs.update({"content_read_write_ reads": reads, "content_read_write_ memory": mem,
                 "content_read_write_ usage": usage, "content_read_write_ least": least})
    return outs


@pytest.mark.parametrize("shape", [(2, 3000, 64, 4, 2)], ids=_ids([(2, 3000, 64, 4, 2)], torch.float32))
def test_every_op_gives_the_same_bits_on_any_thread_count(shape):
    """Chunks depend on the shape only, so that at::parallel_for's split
    cannot change a bit (the contract of the CPU kernels), for every op."""
    t = make_inputs(*shape, torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _every_op_outputs(t)
        for n in (2, 3):
            torch.set_num_threads(n)
            many = _every_op_outputs(t)
            for name, a in one.items():
                b = many[name]
                assert torch.equal(a, b), f"{name} differs between 1 and {n} threads: {(a - b).abs().max()}"
    finally:
        torch.set_num_threads(threads)
    # ... and those bits are right.
    _check_op(lambda a, w, e, d: nm.memory_write(a, w, e, d, backend=BACKEND), nm.memory_write_ref,
              [t["memory"], t["wweights"], t["erase"], t["add"]], ["memory_write", "memory", "weights", "erase",
                                                                   "add"], torch.float32)


# --------------------------------------------------------------------------
# the fused agent step's backward: accumulate (replay rows) and overwrite
# --------------------------------------------------------------------------
def _controller_loss_ref(P, dims, X, Y, lw, memory3, eps):
    """The controller step's weighted MSE in plain torch (hidden = None, no
    write), the read through content_read_ref."""
    W_ih, b_ih, b_hh, W_h, b_h, W_o, b_o = P
    Hd, H, D, o_s = dims
    M = X.shape[0]
    i, f, g, o = (X @ W_ih.t() + b_ih + b_hh).chunk(4, dim=1)
    c = torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    heads = h @ W_h.t() + b_h
    keys = heads[:, :H * D].reshape(1, M * H, D)
    strengths = F.softplus(heads[:, o_s:o_s + H]).reshape(1, M * H)
    reads = nm.content_read_ref(memory3, keys, strengths, eps)
    pred = torch.cat([h, reads.reshape(M, H * D)], dim=1) @ W_o.t() + b_o
    return (lw * (pred - Y).pow(2).mean(dim=1)).sum()


@pytest.mark.parametrize("M", [1, 3], ids=lambda m: f"M{m}-N16-H3-D8-fp64")
def test_fused_backward_accumulates_every_parameter_gradient(M):
    """acc=True (the sequential agent's replay rows) adds the step's gradient
    to every parameter's .grad; acc=False overwrites the rows that receive a
    gradient and leaves the others (forget gate, write heads) as they were."""
    torch.manual_seed(8)
    cfg = MemoryConfig(memory_size=16, memory_dim=8, num_read_heads=3)
    ctrl = FastMemoryController(12, 20, cfg).double()
    P, dims = ctrl.fused_params()
    memory3 = torch.randn(1, 16, 8, dtype=torch.float64)
    X, Y = torch.randn(M, 12, dtype=torch.float64), torch.randn(M, 12, dtype=torch.float64)
    lw = torch.rand(M, dtype=torch.float64) + 0.5
    eps = 1e-12
    leaves = [p.detach().clone().requires_grad_(True) for p in P]
    ref = torch.autograd.grad(_controller_loss_ref(leaves, dims, X, Y, lw, memory3, eps), leaves)
    names = ["weight_ih", "bias_ih", "bias_hh", "heads.weight", "heads.bias", "output.weight", "output.bias"]
    # The rows that the read strengths' head feeds must get a gradient here.
    Hd, H, D, o_s = dims
    assert ref[3][o_s:o_s + H].abs().min() > 0

    with torch.no_grad():
        pred, cache, _ = _fused_forward(P, dims, X, memory3, torch.ops.neuralmem, eps)
        dpred = (pred - Y) * (lw * (2.0 / Y.shape[1])).unsqueeze(1)
        start = [torch.randn_like(p) for p in P]
        grads = [s.clone() for s in start]
        _fused_backward(P, dims, cache, dpred, grads, torch.ops.neuralmem, eps, acc=True)
        _fused_backward(P, dims, cache, dpred, grads, torch.ops.neuralmem, eps, acc=True)
        for n, g, s, r in zip(names, grads, start, ref):
            torch.testing.assert_close(g, s + 2 * r, atol=1e-12, rtol=1e-10,
                                       msg=lambda m: f"acc=True, twice: grad {n}: {m}")
        grads = [s.clone() for s in start]
        _fused_backward(P, dims, cache, dpred, grads, torch.ops.neuralmem, eps, acc=False)
    # acc=False: the gradient where the step gives one; the write heads' rows
    # of the heads layer as they were. (The forget gate's rows are not checked:
    # zero or as they were are both "no gradient".)
    checked = {"weight_ih": [slice(0, Hd), slice(2 * Hd, 4 * Hd)], "bias_ih": [slice(0, Hd), slice(2 * Hd, 4 * Hd)],
               "bias_hh": [slice(0, Hd), slice(2 * Hd, 4 * Hd)],
               "heads.weight": [slice(0, H * D), slice(o_s, o_s + H)], "heads.bias": [slice(0, H * D), slice(o_s, o_s + H)]}
    for n, g, s, r in zip(names, grads, start, ref):
        for rows in checked.get(n, [slice(None)]):
            torch.testing.assert_close(g[rows], r[rows], atol=1e-12, rtol=1e-10,
                                       msg=lambda m: f"acc=False: grad {n} rows {rows}: {m}")
        if n.startswith("heads."):
            for rows in (slice(H * D, o_s), slice(o_s + H, None)):
                assert torch.equal(g[rows], s[rows]), f"acc=False changed the write heads' rows {rows} of {n}"


# --------------------------------------------------------------------------
# the public wrappers' fast validation: keys of another width
# --------------------------------------------------------------------------
TRITON = pytest.param("triton", marks=pytest.mark.skipif(not nm.has_triton(), reason="Triton cannot run here"))


@pytest.mark.parametrize("backend", ["torch", "cpu", TRITON, "auto"])
@pytest.mark.parametrize("Dk", [4, 6], ids=lambda d: f"B2-N9-D5-keysD{d}")
def test_keys_of_another_width_are_rejected_naming_the_argument(Dk, backend):
    """keys (B, H, Dk) with Dk != D raise a ValueError that names the keys
    and the expected shape, on every backend, before anything is written
    (the Triton ops do not check shapes themselves: they would read past
    the keys)."""
    t = make_inputs(2, 9, 5, 3, 1, torch.float32)
    m, u = t["memory"], t["usage"].float()
    bad = torch.randn(2, 3, Dk)
    ws, e, a = t["wstrengths"], t["erase"], t["add"]
    calls = [
        ("keys", lambda mem: nm.content_read(mem, bad, t["strengths"], backend=backend)),
        ("keys", lambda mem: nm.content_write_(mem, bad[:, :1], ws, e, a, usage=u.clone(), backend=backend)),
        ("read_keys", lambda mem: nm.content_read_write_(mem, bad, t["strengths"], t["wkeys"], ws, e, a,
                                                         usage=u.clone(), backend=backend)),
        ("write_keys", lambda mem: nm.content_read_write_(mem, t["keys"], t["strengths"], bad[:, :1], ws, e, a,
                                                          usage=u.clone(), backend=backend)),
    ]
    for name, call in calls:
        mem = m.clone()
        with pytest.raises(ValueError, match=rf"{name} must have shape \(B, [HW], D\)"):
            call(mem)
        assert torch.equal(mem, m), f"{name}: the memory changed before the error"
