"""MemoryCore's whole sequence as one autograd node (nn/core_sequence.py) against the step-by-step path.

The step path (every step's ops under autograd, the access as `access_step`) is itself checked against the
DNC formulas in float64 (tests/test_dnc_access_step.py, tests/test_memory_core.py); here the one node must
give the same outputs, final state and gradients of every input and parameter, to float64 rounding.
"""
import pytest
import torch

from neuralmem_fast.nn import MemoryCore
from neuralmem_fast.nn import core_sequence as cs
from neuralmem_fast.nn.core_sequence import CoreSequence
from neuralmem_fast.ops.dnc import has_access_step_kernels

F64 = torch.float64
pytestmark = pytest.mark.skipif(not has_access_step_kernels(), reason="the native DNC ops are not built")


def _core(I=3, O=2, N=9, D=4, R=2, W=1, H=6, dtype=F64, **kw):
    torch.manual_seed(0)
    return MemoryCore(I, O, N, D, R, W, hidden_size=H, **kw).to(dtype)


def _state(core, B, random, dtype=F64):
    """The zero initial state, or a random one (memory, usages and weights in range), every tensor a leaf."""
    st = core.initial_state(B, dtype=dtype)
    if random:  # drawn in float64 whatever the dtype, so that both dtypes start alike
        g = torch.Generator().manual_seed(1)
        st = type(st)(*[(torch.rand(t.shape, generator=g, dtype=F64) * (1 if i >= 4 else 0.5)).to(dtype)
                        for i, t in enumerate(st)])
    return type(st)(*[t.clone().requires_grad_() for t in st])


def _weighted_sum(outs):
    """A loss over `outs` with fixed random weights (float64 draws, cast to each output's dtype)."""
    g = torch.Generator().manual_seed(2)
    return sum((t * torch.randn(t.shape, generator=g, dtype=F64).to(t.dtype)).sum() for t in outs)


def _both_paths(threads, run):
    """[run() with the one node, run() step by step], at `threads` torch threads; both settings restored."""
    old_threads, old = torch.get_num_threads(), CoreSequence.enabled
    try:
        torch.set_num_threads(threads)
        res = []
        for enabled in (True, False):
            CoreSequence.enabled = enabled
            res.append(run())
        return res
    finally:
        torch.set_num_threads(old_threads)
        CoreSequence.enabled = old


def _run(core, x, st, enabled, create_graph=False):
    """Outputs, final state, and the gradients of a loss that uses every output."""
    old = CoreSequence.enabled
    CoreSequence.enabled = enabled
    try:
        assert core.runs_as_one_node(x, st) == enabled
        core.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_()
        y, fin = core(xx, st)
        loss = _weighted_sum((y, *fin))
        leaves = [xx, *st, *core.parameters()]
        grads = torch.autograd.grad(loss, leaves, allow_unused=True, create_graph=create_graph)
    finally:
        CoreSequence.enabled = old
    return [y, *fin], list(grads), leaves


def _close(a, b, rtol, atol):
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b)):
        if u is None or v is None:
            assert u is None and v is None, i
        else:
            torch.testing.assert_close(u, v, rtol=rtol, atol=atol, msg=lambda m: f"entry {i}: {m}")


@pytest.mark.parametrize("shape", [dict(), dict(R=1, W=2, N=5), dict(R=3, W=2, N=17, D=3, H=4),
                                   dict(R=1, W=1, N=1, D=2, I=1, O=1)], ids=["R2W1", "R1W2", "R3W2", "N1"])
@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("random", [False, True], ids=["zero-state", "random-state"])
def test_one_node_equals_step_by_step_float64(shape, T, random):
    core = _core(**shape)
    x = torch.randn(3, T, core.input_size, dtype=F64, generator=torch.Generator().manual_seed(3))
    out_a, grads_a, _ = _run(core, x, _state(core, 3, random), True)
    out_b, grads_b, _ = _run(core, x, _state(core, 3, random), False)
    _close(out_a, out_b, 1e-10, 1e-12)
    # a zero memory's cosine has gradients near 1/eps: relative agreement
    _close(grads_a, grads_b, 1e-9, 1e-11)
    assert grads_a[7] is None  # the initial write weights enter only the usage, detached, as step by step


@pytest.mark.parametrize("used", [(0,), (4,), (1, 5), (2, 3, 6, 7)],
                         ids=["y", "memory", "h-usage", "c-reads-rw-ww"])
@pytest.mark.parametrize("threads", [1, 2])
def test_outputs_the_loss_does_not_use(used, threads):
    """Outputs the loss leaves out reach the node's backward as None (no zero-filled gradients): the gradients
    are those of the step path, whichever outputs are used, over one chunk and two."""
    core = _core()
    x = torch.randn(4, 3, core.input_size, dtype=F64, generator=torch.Generator().manual_seed(3))

    def run():
        st = _state(core, 4, True)
        assert core.runs_as_one_node(x, st) == CoreSequence.enabled
        xx = x.clone().requires_grad_()
        y, fin = core(xx, st)
        outs = (y, *fin)
        leaves = [xx, *st, *core.parameters()]
        grads = torch.autograd.grad(_weighted_sum([outs[i] for i in used]), leaves, allow_unused=True)
        # a leaf the used outputs do not depend on: None step by step, zeros from the one node
        return [torch.zeros_like(v) if u is None else u for u, v in zip(grads, leaves)]

    _close(*_both_paths(threads, run), 1e-9, 1e-11)


@pytest.mark.parametrize("state", ["none", "memory-detached"])
@pytest.mark.parametrize("threads", [1, 2])
def test_initial_memory_without_grad(state, threads):
    """An initial memory that does not require grad (state=None, or a caller's detached memory): the node's
    backward skips its gradient (the write addressing's keys and strengths get theirs without it); the
    gradients of x, the rest of the state and the parameters are the step path's."""
    core = _core()
    x = torch.randn(4, 3, core.input_size, dtype=F64, generator=torch.Generator().manual_seed(3))

    def run():
        st = None
        if state == "memory-detached":
            st = _state(core, 4, True)
            st = st._replace(memory=st.memory.detach())
        xx = x.clone().requires_grad_()
        y, fin = core(xx, st)
        leaves = [xx, *core.parameters()] + ([] if st is None else [t for t in st if t.requires_grad])
        return list(torch.autograd.grad(_weighted_sum((y, *fin)), leaves, allow_unused=True))

    _close(*_both_paths(threads, run), 1e-9, 1e-11)


@pytest.mark.parametrize("R,W", [(2, 1), (4, 1), (5, 1), (2, 2)])
def test_write_addressing_gradient_carried_into_the_previous_steps_backward(R, W):
    """The node's backward adds the write addressing's memory gradient of every step but the first inside
    the previous step's write_read backward (csrc/dnc/write_read.h). At N = 1,700 and width 64 the addressing
    kernel that leaves it as coefficients runs over several chunks of slots and a partial block; two write
    heads leave two heads of coefficients. One write head beside at most four read heads joins the read
    heads' sweep of each block (combine_rows' extra head: R = 2, 4); five read heads, or two write heads,
    keep a sweep of their own."""
    core = _core(N=1700, D=64, R=R, W=W, H=6)
    x = torch.randn(2, 3, core.input_size, dtype=F64, generator=torch.Generator().manual_seed(5))
    out_a, grads_a, _ = _run(core, x, _state(core, 2, True), True)
    out_b, grads_b, _ = _run(core, x, _state(core, 2, True), False)
    _close(out_a, out_b, 1e-10, 1e-12)
    _close(grads_a, grads_b, 1e-9, 1e-11)


def test_float32_matches_float64():
    c64, c32 = _core(), _core(dtype=torch.float32)
    x = torch.randn(2, 5, 3, dtype=F64, generator=torch.Generator().manual_seed(4))
    out_a, grads_a, _ = _run(c64, x, _state(c64, 2, True), True)
    out_b, grads_b, _ = _run(c32, x.float(), _state(c32, 2, True, torch.float32), True)
    _close([t.double() for t in out_b], out_a, 1e-4, 1e-5)
    _close([None if t is None else t.double() for t in grads_b], grads_a, 1e-3, 1e-4)


def test_float32_from_a_zero_memory_that_requires_grad():
    """From an all-zero memory that requires grad, the memory's own gradient is a near-cancelling sum of terms
    of order 1/eps (the README says so; float32 cannot hold it). Outputs, the final state and every other
    gradient must stay as accurate as from a random state. One step: from the second on, slots whose usages
    tie exactly in exact arithmetic are told apart by rounding, so the two dtypes may allocate different
    slots."""
    c64, c32 = _core(), _core(dtype=torch.float32)
    x = torch.randn(2, 1, 3, dtype=F64, generator=torch.Generator().manual_seed(6))
    out_a, grads_a, _ = _run(c64, x, _state(c64, 2, False), True)
    out_b, grads_b, _ = _run(c32, x.float(), _state(c32, 2, False, torch.float32), True)
    assert grads_a[4] is not None and grads_b[4] is not None  # the memory's: left out below
    _close([t.double() for t in out_b], out_a, 1e-4, 1e-5)
    keep = [i for i in range(len(grads_a)) if i != 4]
    _close([None if grads_b[i] is None else grads_b[i].double() for i in keep], [grads_a[i] for i in keep],
           1e-3, 1e-4)


@pytest.mark.parametrize("threads", [1, 2])
def test_float32_one_node_equals_step_by_step(threads):
    """float32, where the vectorised kernels take their vector paths (tails included: 4H = 80, R D = 48 read
    columns from input column 5 on, the interface's 105 columns), against the step-by-step path's ATen layers
    at one and two threads (chunks of the batch)."""
    f32 = torch.float32
    core = _core(I=5, O=3, N=24, D=16, R=3, W=1, H=20, dtype=f32)
    x = torch.randn(4, 3, 5, dtype=F64, generator=torch.Generator().manual_seed(5)).to(f32)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out_a, grads_a, _ = _run(core, x, _state(core, 4, True, dtype=f32), True)
        out_b, grads_b, _ = _run(core, x, _state(core, 4, True, dtype=f32), False)
    finally:
        torch.set_num_threads(old)
    _close(out_a, out_b, 2e-5, 2e-6)
    _close(grads_a, grads_b, 2e-4, 2e-5)


def test_gradcheck_one_step():
    """One step: over several, the write weights reach the next step's usage detached (DeepMind's rule, the
    step path's too), so finite differences of the whole sequence differ from its gradient by design; the
    sequences are checked against the step path above."""
    core = _core(N=5, D=3, R=2, W=1, H=4)
    st = _state(core, 2, True)
    x = torch.randn(2, 1, 3, dtype=F64, generator=torch.Generator().manual_seed(5), requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in
              (core.controller.weight_ih, core.controller.bias_ih, core.controller.weight_hh, core.controller.bias_hh,
               core.interface.weight, core.interface.bias, core.output.weight, core.output.bias)]
    n_lin, n_one, _ = cs._layout(core.access)
    sizes = (2, 1, 3, n_lin, n_one)

    def f(x, *t):
        return CoreSequence.apply(x, *t[:7], *t[7:], sizes, 1e-8)

    inputs = [x, *st[:7], *params]
    inputs[7] = inputs[7].detach()  # the initial write weights: detached by design (usage)
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)  # create_graph differentiates the same formulas eagerly


def test_create_graph_equals_step_by_step():
    """Second derivatives (a MAML-style outer step): the gradient's own gradient, both ways."""
    core = _core()
    x = torch.randn(2, 3, 3, dtype=F64, generator=torch.Generator().manual_seed(6))
    res = []
    for enabled in (True, False):
        _, grads, leaves = _run(core, x, _state(core, 2, True), enabled, create_graph=True)
        params = list(core.parameters())
        gp = grads[-len(params):]
        res.append(torch.autograd.grad(sum(g.square().sum() for g in gp), params, allow_unused=True))
    _close(res[0], res[1], 1e-9, 1e-11)


def test_no_grad_and_default_state():
    core = _core()
    x = torch.randn(2, 4, 3, dtype=F64)
    with torch.no_grad():
        CoreSequence.enabled = True
        a = core(x)
        CoreSequence.enabled = False
        b = core(x)
        CoreSequence.enabled = True
    _close([a[0], *a[1]], [b[0], *b[1]], 1e-12, 1e-13)


@pytest.mark.parametrize("threads", [1, 2])
def test_inputs_left_unchanged_and_in_place_writes_to_outputs_refused(threads):
    """At one thread (one chunk: the final state's tensors are the last step's saved ones) and at two."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        core = _core()
        st = _state(core, 2, True)
        before = [t.detach().clone() for t in st]
        x = torch.randn(2, 4, 3, dtype=F64)
        assert cs._splits(x, st.memory) == threads
        y, fin = core(x, st)
        assert fin.memory.grad_fn is not None and type(fin.memory.grad_fn).__name__ == "CoreSequenceBackward"
        (y.sum() + fin.memory.sum()).backward(retain_graph=True)
        for a, b in zip(st, before):
            assert torch.equal(a.detach(), b)
        for name in ("memory", "read_weights", "write_weights"):
            y, fin = core(x, st)
            with torch.no_grad():
                getattr(fin, name).mul_(2)  # saved for the backward: autograd must refuse it now
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                (y.sum() + getattr(fin, name).sum()).backward()
    finally:
        torch.set_num_threads(old)


def test_parameters_changed_before_backward_are_refused():
    core = _core()
    y, _ = core(torch.randn(2, 3, 3, dtype=F64))
    with torch.no_grad():
        core.interface.weight.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("kw", [dict(alloc_topk=4), dict(usage_grad=True), dict(backend="torch"), dict(read_topk=2),
                                dict(write_rule="previous_reads"), dict(allocation="lru", read_topk=2, write_topk=2), dict(checkpoint=True),
                                dict(sparse_k=2, index="exact", N=20)])
def test_other_configurations_run_step_by_step(kw):
    kw = dict(kw)
    usage_grad = kw.pop("usage_grad", None)
    core = _core(**kw)
    if usage_grad:
        core.access.usage_grad = True
    x = torch.randn(2, 3, 3, dtype=F64)
    st = core.initial_state(2)
    assert not core.runs_as_one_node(x, st)


def test_hooks_and_overrides_run_step_by_step():
    core = _core()
    x = torch.randn(2, 3, 3, dtype=F64)
    st = core.initial_state(2)
    assert core.runs_as_one_node(x, st)
    h = core.controller.register_forward_hook(lambda *a: None)
    assert not core.runs_as_one_node(x, st)
    h.remove()
    core.step = lambda *a: None
    assert not core.runs_as_one_node(x, st)
    del core.step
    core.access.forward = lambda iface, state, validate=True: (iface.read_keys, state)
    assert not core.runs_as_one_node(x, st)
    del core.access.forward
    assert core.runs_as_one_node(x, st)
    assert not core.runs_as_one_node(x, core.initial_state(2, dtype=torch.float32))  # the state's dtype is not x's


def test_strided_inputs_and_batch_of_one():
    """x every other step of a longer sequence, a memory stored (B, D, N) and transposed, B = 1."""
    core = _core()
    for B in (1, 2):
        x = torch.randn(B, 8, 3, dtype=F64, generator=torch.Generator().manual_seed(7))[:, ::2]
        st = _state(core, B, True)
        mem = st.memory.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
        st = st._replace(memory=mem)
        assert not x.is_contiguous() and not st.memory.is_contiguous()
        out_a, grads_a, _ = _run(core, x, st, True)
        out_b, grads_b, _ = _run(core, x, st, False)
        _close(out_a, out_b, 1e-10, 1e-12)
        _close(grads_a, grads_b, 1e-9, 1e-11)


_ISA_SCRIPT = """
import torch
from tests.test_core_sequence import _close, _core, _run, _state
from neuralmem_fast.nn import core_sequence as cs
assert torch.ops.neuralmem.cpu_capability() == "{isa}", torch.ops.neuralmem.cpu_capability()
# Width 64 and 70 slots: write_read's blocks of 64 slots (one whole, one partial); hidden 10 and 3 + 2
# oneplus columns: the lane tails of the LSTM and interface kernels.
for big in (False, True):
    core = _core(I=3, O=2, N=70, D=64, R=3, W=2, H=10)
    if big:  # oneplus inputs above softplus's threshold 20: its linear branch and derivative 1
        n_lin, n_one, _ = cs._layout(core.access)
        with torch.no_grad():
            core.interface.bias[n_lin:n_lin + n_one] += 25.0
    # B = 11: the per-step matmuls' row blocks (8 rows with AVX-512, 4 with AVX2) and a partial one
    B = 11 if big else 2
    x = torch.randn(B, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    out_a, grads_a, _ = _run(core, x, _state(core, B, True), True)
    out_b, grads_b, _ = _run(core, x, _state(core, B, True), False)
    _close(out_a, out_b, 1e-10, 1e-12)
    _close(grads_a, grads_b, 1e-9, 1e-11)
print("ok")
"""


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_small_matmul_against_atens_addmm(dtype):
    """The node's per-step matmuls (the kernel table's small_matmul where the batch has at most 32 rows) against
    ATen's addmm for all of them, the rest alike: the same outputs and gradients to rounding, at widths with
    vector tails (4H = 100, the interface's 3 D + 5 W D + ... columns) and 8-row blocks with a partial one
    (B = 13). In float32 the two must differ somewhere, or the kernel did not run (where the instruction set
    has one: not in the baseline table)."""
    from neuralmem_fast import _ext

    core = _core(I=5, O=3, N=20, D=12, R=3, W=1, H=25, dtype=dtype)
    x = torch.randn(13, 5, 5, dtype=F64, generator=torch.Generator().manual_seed(4)).to(dtype)
    st = _state(core, 13, True, dtype=dtype)
    old = _ext._C.core_sequence_use_small_matmul(False)
    try:
        out_b, grads_b, _ = _run(core, x, st, True)
        _ext._C.core_sequence_use_small_matmul(True)
        out_a, grads_a, _ = _run(core, x, st, True)
    finally:
        _ext._C.core_sequence_use_small_matmul(old)
    tol = (1e-12, 1e-13) if dtype == F64 else (2e-5, 2e-6)
    _close(out_a, out_b, *tol)
    _close(grads_a, grads_b, tol[0] * 10, tol[1] * 10)
    if dtype == torch.float32 and torch.ops.neuralmem.cpu_capability() != "default":
        assert any(not torch.equal(u, v) for u, v in zip(out_a + grads_a, out_b + grads_b) if u is not None)


def test_small_matmul_not_taken_past_32_rows():
    """One chunk of 33 memories (one thread): the per-step matmuls are ATen's either way, to the bit."""
    from neuralmem_fast import _ext

    core = _core(I=5, O=3, N=10, D=12, R=3, W=1, H=25, dtype=torch.float32)
    x = torch.randn(33, 3, 5, generator=torch.Generator().manual_seed(5))
    st = _state(core, 33, True, dtype=torch.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    old = _ext._C.core_sequence_use_small_matmul(False)
    try:
        assert cs._splits(x, st.memory) == 1
        out_b, grads_b, _ = _run(core, x, st, True)
        _ext._C.core_sequence_use_small_matmul(True)
        out_a, grads_a, _ = _run(core, x, st, True)
    finally:
        _ext._C.core_sequence_use_small_matmul(old)
        torch.set_num_threads(threads)
    for u, v in zip(out_a + grads_a, out_b + grads_b):
        assert (u is None and v is None) or torch.equal(u, v)


@pytest.mark.parametrize("isa", ["default", "avx2", "avx512"])
def test_one_node_on_every_instruction_set(isa):
    """The node's kernels as built for each instruction set (a fresh process each; skipped where this
    processor lacks it) against the step path in float64."""
    from tests.helpers import run_on_instruction_set

    run_on_instruction_set(isa, _ISA_SCRIPT.format(isa=isa))


def _raw_inputs(core, x, st):
    a, lstm = core.access, core.controller
    n_lin, n_one, _ = cs._layout(a)
    t = [x, *st, lstm.weight_ih, lstm.bias_ih, lstm.weight_hh, lstm.bias_hh, core.interface.weight,
         core.interface.bias, core.output.weight, core.output.bias]
    return [v.detach() for v in t], (a.num_reads, a.num_writes, a.word_size, n_lin, n_one)


@pytest.mark.parametrize("B,splits", [(5, 2), (5, 3), (4, 4), (3, 1)])
def test_batch_chunks_equal_each_chunk_run_alone(B, splits):
    """splits > 1 runs the sequence as that many chunks of the batch, one task each on torch's threads:
    every chunk's outputs, final state, saved tensors and input gradients are bitwise those of the chunk run
    alone, and the weights' gradients are the chunks' summed in chunk order."""
    from neuralmem_fast import _ext
    from neuralmem_fast.config import DEFAULT_EPS
    from neuralmem_fast.ops.dnc import ALLOC_EPS

    core = _core(N=11, D=4, R=2, W=1, H=6)
    x = torch.randn(B, 4, core.input_size, dtype=F64, generator=torch.Generator().manual_seed(8))
    inputs, (R, W, D, n_lin, n_one) = _raw_inputs(core, x, _state(core, B, True))
    fwd, bwd = _ext._C.core_sequence_forward, _ext._C.core_sequence_backward
    out = fwd(inputs, R, W, D, n_lin, n_one, DEFAULT_EPS, ALLOC_EPS, splits)
    g = torch.Generator().manual_seed(9)
    grads = [torch.randn(t.shape, generator=g, dtype=F64) for t in out[:8]]
    got = bwd(grads, inputs[0], inputs[8], inputs[12], out[8:], R, W, D, DEFAULT_EPS, ALLOC_EPS, splits)
    per = (len(out) - 8) // splits
    assert per * splits == len(out) - 8
    bounds = [s * B // splits for s in range(splits + 1)]
    weight_sum = None
    for s in range(splits):
        b0, b1 = bounds[s], bounds[s + 1]
        part = [t[b0:b1] for t in inputs[:8]] + inputs[8:]
        alone = fwd(part, R, W, D, n_lin, n_one, DEFAULT_EPS, ALLOC_EPS)
        for u, v in zip(alone[:8], out[:8]):
            assert torch.equal(u, v[b0:b1])
        for u, v in zip(alone[8:], out[8 + s * per:8 + (s + 1) * per]):
            assert torch.equal(u, v)
        g_alone = bwd([t[b0:b1] for t in grads], part[0], inputs[8], inputs[12], alone[8:], R, W, D,
                      DEFAULT_EPS, ALLOC_EPS)
        for u, v in zip(g_alone[:7], got[:7]):
            assert torch.equal(u, v[b0:b1])
        weight_sum = [t.clone() for t in g_alone[7:]] if weight_sum is None else [
            a.add_(b) for a, b in zip(weight_sum, g_alone[7:])]
    for u, v in zip(weight_sum, got[7:]):
        assert torch.equal(u, v)
    with pytest.raises(RuntimeError, match="splits"):
        fwd(inputs, R, W, D, n_lin, n_one, DEFAULT_EPS, ALLOC_EPS, B + 1)
    with pytest.raises(RuntimeError, match="splits"):
        bwd(grads, inputs[0], inputs[8], inputs[12], out[8:], R, W, D, DEFAULT_EPS, ALLOC_EPS, 0)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_one_node_at_every_thread_count_equals_step_by_step(threads):
    """MemoryCore's node splits the batch over torch's threads (a chunk each where every thread gets a
    memory): against the step path in float64 at one, two and three threads, five memories."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # a chunk per thread where every thread gets a memory and the memory copies are small, else one
        mem = lambda b, n: torch.empty(b, n, 4, dtype=F64)  # noqa: E731
        x4 = lambda b: torch.empty(b, 4, 3, dtype=F64)  # noqa: E731
        assert [cs._splits(x4(b), mem(b, 9)) for b in (1, 2, 5)] == {1: [1, 1, 1], 2: [1, 2, 2],
                                                                     3: [1, 1, 3]}[threads]
        big = cs._CHUNK_BYTES // (4 * 5 * 4 * 8) + 1  # slots that take the 4 copies of 5 memories past it
        assert cs._splits(x4(5), mem(5, big)) == 1 and cs._splits(x4(5), mem(5, big - 1)) == threads
        core = _core()
        x = torch.randn(5, 4, core.input_size, dtype=F64, generator=torch.Generator().manual_seed(10))
        out_a, grads_a, _ = _run(core, x, _state(core, 5, True), True)
        out_b, grads_b, _ = _run(core, x, _state(core, 5, True), False)
    finally:
        torch.set_num_threads(old)
    _close(out_a, out_b, 1e-10, 1e-12)
    _close(grads_a, grads_b, 1e-9, 1e-11)


@pytest.mark.parametrize("splits", [1, 2])
def test_saved_token_gives_the_same_bits_and_is_refused_when_copied(splits):
    """pack=True hands the per-step tensors back as one token that owns them: the backward from the token
    is bitwise the backward from the tensors, also where it frees them as it goes (release=True); a token so
    emptied, and a copy of the token, which owns nothing, are refused by name."""
    from neuralmem_fast import _ext
    from neuralmem_fast.config import DEFAULT_EPS
    from neuralmem_fast.ops.dnc import ALLOC_EPS

    core = _core(N=11, D=4, R=2, W=1, H=6)
    x = torch.randn(4, 3, core.input_size, dtype=F64, generator=torch.Generator().manual_seed(8))
    inputs, (R, W, D, n_lin, n_one) = _raw_inputs(core, x, _state(core, 4, True))
    fwd, bwd = _ext._C.core_sequence_forward, _ext._C.core_sequence_backward
    plain = fwd(inputs, R, W, D, n_lin, n_one, DEFAULT_EPS, ALLOC_EPS, splits, False)
    packed = fwd(inputs, R, W, D, n_lin, n_one, DEFAULT_EPS, ALLOC_EPS, splits, True)
    assert len(plain) == 8 + splits * (3 + 26 * 3) and len(packed) == 9
    assert packed[8].dtype == torch.uint8 and packed[8].numel() == 0
    for u, v in zip(plain[:8], packed[:8]):
        assert torch.equal(u, v)
    g = torch.Generator().manual_seed(9)
    grads = [torch.randn(t.shape, generator=g, dtype=F64) for t in plain[:8]]
    a = bwd(grads, inputs[0], inputs[8], inputs[12], plain[8:], R, W, D, DEFAULT_EPS, ALLOC_EPS, splits)
    b = bwd(grads, inputs[0], inputs[8], inputs[12], packed[8:], R, W, D, DEFAULT_EPS, ALLOC_EPS, splits)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    # release=True (no backward to follow): the same bits, each step's tensors freed as the loop passes
    # them; the emptied token then refuses by name, where it would otherwise give wrong gradients.
    c = bwd(grads, inputs[0], inputs[8], inputs[12], packed[8:], R, W, D, DEFAULT_EPS, ALLOC_EPS, splits, True)
    for u, v in zip(a, c):
        assert torch.equal(u, v)
    for release in (False, True):
        with pytest.raises(RuntimeError, match="freed by an earlier backward without retain_graph"):
            bwd(grads, inputs[0], inputs[8], inputs[12], packed[8:], R, W, D, DEFAULT_EPS, ALLOC_EPS, splits,
                release)
    for copy in (packed[8].clone(), torch.empty(0, dtype=torch.uint8)):
        with pytest.raises(RuntimeError, match="not the token of a forward's saved tensors"):
            bwd(grads, inputs[0], inputs[8], inputs[12], [copy], R, W, D, DEFAULT_EPS, ALLOC_EPS, splits)


@pytest.mark.parametrize("threads", [1, 2])
def test_saved_token_freed_after_backward_and_kept_by_retain_graph(threads):
    """The token's tensors live exactly as long as autograd keeps the token: freed by a backward without
    retain_graph, kept by one with it (a second backward gives the same gradients), freed with the graph
    when it is dropped unused. With one chunk (one thread) the final state's tensors are the last step's
    saved ones: the token must not hold the node's outputs, or node and token would hold each other."""
    import gc

    from neuralmem_fast import _ext

    live = _ext._C.core_sequence_live_saved_sets
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    gc.collect()
    gc.disable()  # only references, no collector, may free the tokens below
    try:
        base = live()
        core = _core()
        st = _state(core, 2, True)
        x = torch.randn(2, 4, 3, dtype=F64)
        assert cs._splits(x, st.memory) == threads
        y, fin = core(x, st)
        assert live() == base + 1
        (y.sum() + fin.memory.sum()).backward()
        assert live() == base
        y, fin = core(x, st)
        first = torch.autograd.grad(y.sum(), st.memory, retain_graph=True)[0]
        assert live() == base + 1
        second = torch.autograd.grad(y.sum(), st.memory)[0]
        assert torch.equal(first, second) and live() == base
        y, fin = core(x, st)
        assert live() == base + 1
        del y, fin
        assert live() == base
        for _ in range(3):  # a training loop: nothing left behind per step
            y, fin = core(x, st)
            (y.pow(2).mean() + fin.memory.sum() + fin.read_weights.sum() + fin.write_weights.sum()).backward()
        del y, fin
        assert live() == base
        with torch.no_grad():
            core(x, st)
        assert live() == base
    finally:
        gc.enable()
        torch.set_num_threads(old)


def test_saved_tensor_hooks_see_every_tensor_the_node_keeps():
    """Under saved-tensor hooks (save_on_cpu, the non-reentrant checkpoint, a user's) the node saves its
    per-step tensors one by one, as without the token: a hook that copies each of them gives the same
    gradients, and it sees every tensor (rh, the weights rearranged, 26 per step)."""
    from neuralmem_fast import _ext

    core = _core()
    x = torch.randn(2, 4, 3, dtype=F64)
    packed = []
    base = _ext._C.core_sequence_live_saved_sets()  # this test holds no graph: only a new token would count
    y, fin = core(x, _state(core, 2, True))
    ref = torch.autograd.grad(y.sum() + fin.memory.sum(), list(core.parameters()))
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t.clone(), lambda t: t):
        y, fin = core(x, _state(core, 2, True))
        assert _ext._C.core_sequence_live_saved_sets() == base
    got = torch.autograd.grad(y.sum() + fin.memory.sum(), list(core.parameters()))
    assert len(packed) >= 16 + 7 + 3 + 26 * 4
    for u, v in zip(ref, got):
        assert torch.equal(u, v)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("given_state", [False, True], ids=["state-none", "state-given"])
def test_node_refuses_non_finite_x_and_leaves_the_state(threads, given_state):
    """MemoryCore.forward leaves x's finiteness to the node's C++ forward, chunk by chunk: a NaN or an inf
    in any row (here the last chunk's at two threads) raises the same ValueError as step by step, and the
    caller's state is unchanged."""
    core = _core()
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for bad in (float("nan"), float("inf"), -float("inf")):
            x = torch.randn(4, 3, core.input_size, dtype=F64)
            x[3, 2, 1] = bad
            st = _state(core, 4, True) if given_state else None
            before = None if st is None else [t.detach().clone() for t in st]
            for enabled in (True, False):
                CoreSequence.enabled = enabled
                try:
                    assert core.runs_as_one_node(x, st or core.initial_state(4)) == enabled
                    with pytest.raises(ValueError, match="x contains NaN or inf"):
                        core(x, st)
                finally:
                    CoreSequence.enabled = True
                if st is not None:
                    assert all(torch.equal(t, b) for t, b in zip(st, before))
    finally:
        torch.set_num_threads(old)


def test_zero_initial_state_kept_between_calls():
    """forward(x) without a state keeps its zeros between calls (the one-node path only reads them): the same
    outputs and gradients as an explicit initial_state, the kept tensors still zero after a backward, and
    fresh tensors under inference mode, for memories past the bound and for the step-by-step path."""
    from neuralmem_fast.nn import memory_core

    core = _core()
    x = torch.randn(3, 4, core.input_size, dtype=F64, generator=torch.Generator().manual_seed(6))
    res = []
    for st in (None, None, core.initial_state(3, dtype=F64)):
        core.zero_grad(set_to_none=True)
        y, fin = core(x, st)
        _weighted_sum((y, *fin)).backward()
        res.append([y.detach(), *[t.detach() for t in fin], *[p.grad for p in core.parameters()]])
    _close(res[0], res[1], 0, 0)
    _close(res[0], res[2], 0, 0)
    key, kept = core._zero_cache
    assert key == (3, F64, x.device) and all(not t.requires_grad and not t.any() for t in kept)
    assert core._zero_state(3, F64, x.device) is kept
    with torch.inference_mode():
        assert core._zero_state(3, F64, x.device) is not kept
    old = memory_core._ZERO_STATE_BYTES
    memory_core._ZERO_STATE_BYTES = 3 * core.access.memory_size * core.access.word_size * 8 - 1
    try:
        assert core._zero_state(3, F64, x.device) is not kept
    finally:
        memory_core._ZERO_STATE_BYTES = old
    CoreSequence.enabled = False
    try:  # step by step: the access gets tensors of its own, and the kept ones stay zero
        y_b, _ = core(x)
    finally:
        CoreSequence.enabled = True
    torch.testing.assert_close(y_b, res[0][0], rtol=1e-10, atol=1e-12)
    assert core._zero_cache[1] is kept and all(not t.any() for t in kept)


def test_kept_zero_state_left_out_of_pickles_and_copies():
    """The kept zero state is a cache: torch.save of the whole module and deepcopy leave it out, and a core
    pickled without the attribute (before it existed) still runs."""
    import copy
    import io

    core = _core()
    x = torch.randn(2, 3, core.input_size, dtype=F64)
    y0, _ = core(x)
    assert core._zero_cache is not None
    buf = io.BytesIO()
    torch.save(core, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for other in (loaded, copy.deepcopy(core)):
        assert other._zero_cache is None
        torch.testing.assert_close(other(x)[0], y0, rtol=0, atol=0)
    del loaded.__dict__["_zero_cache"]
    torch.testing.assert_close(loaded(x)[0], y0, rtol=0, atol=0)
    assert loaded._zero_cache is not None
