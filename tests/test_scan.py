"""checkpointed_scan: T steps of a memory trained through, in bounded memory.

Gradients after T=16 steps equal those of plain autograd over the reference
ops (float64, 1e-10), with and without checkpointing; bad input raises.
"""
from typing import NamedTuple

import pytest
import torch

import neuralmem_fast as nm
from neuralmem_fast import ops
from neuralmem_fast.nn import NeuralMemoryBank, checkpointed_scan, default_segment
from neuralmem_fast.ops.reference import content_addressing_ref, content_read_ref, memory_write_ref

B, N, D, H, W, T = 2, 11, 5, 3, 1, 16
DT = torch.float64


class State(NamedTuple):
    memory: torch.Tensor


def _backends():
    return ["torch"] + (["cpu"] if nm.has_extension() else [])


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    memory = torch.randn(B, N, D, dtype=DT, generator=g)
    xs = (torch.randn(T, B, H, D, dtype=DT, generator=g),          # read keys
          1 + 4 * torch.rand(T, B, H, dtype=DT, generator=g),       # read strengths
          torch.randn(T, B, W, D, dtype=DT, generator=g),           # write keys
          1 + 4 * torch.rand(T, B, W, dtype=DT, generator=g),       # write strengths
          torch.rand(T, B, W, D, dtype=DT, generator=g),            # erase
          torch.randn(T, B, W, D, dtype=DT, generator=g))           # add
    r = torch.randn(T, B, H, D, dtype=DT, generator=g)
    f = torch.randn(B, N, D, dtype=DT, generator=g)
    return memory, xs, r, f


def _step(backend):
    def step(x, state):
        rk, rs, wk, ws, er, ad = x
        m = state.memory
        reads = ops.content_read(m, rk, rs, backend=backend)
        w = ops.content_addressing(m, wk, ws, backend=backend)
        return reads, State(ops.memory_write(m, w, er, ad, backend=backend))
    return step


def _reference_grads(memory, xs, r, f):
    m0 = memory.clone().requires_grad_(True)
    xg = [x.clone().requires_grad_(True) for x in xs]
    m, loss = m0, 0
    for t in range(T):
        rk, rs, wk, ws, er, ad = (x[t] for x in xg)
        loss = loss + (content_read_ref(m, rk, rs) * r[t]).sum()
        m = memory_write_ref(m, content_addressing_ref(m, wk, ws), er, ad)
    loss = loss + (m * f).sum()
    return torch.autograd.grad(loss, [m0, *xg])


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("segment,ckpt", [(None, True), (3, True), (16, True), (1, True), (None, False)])
def test_gradients_equal_plain_autograd_over_the_reference(backend, segment, ckpt):
    memory, xs, r, f = _inputs()
    want = _reference_grads(memory, xs, r, f)
    m0 = memory.clone().requires_grad_(True)
    xg = tuple(x.clone().requires_grad_(True) for x in xs)
    before = m0.detach().clone()
    reads, final = checkpointed_scan(_step(backend), State(m0), xg, segment=segment, checkpoint_segments=ckpt)
    assert isinstance(final, State) and reads.shape == (T, B, H, D)
    loss = (reads * r).sum() + (final.memory * f).sum()
    got = torch.autograd.grad(loss, [m0, *xg])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-10)
    assert torch.equal(m0.detach(), before), "the backward modified the caller's memory"


def test_parameters_closed_over_get_gradients():
    memory, xs, r, f = _inputs(1)
    lin = torch.nn.Linear(D, D).double()
    ref_lin = torch.nn.Linear(D, D).double()
    ref_lin.load_state_dict(lin.state_dict())

    def make(layer):
        def step(x, state):
            rk, rs, wk, ws, er, ad = x
            m = state.memory
            reads = content_read_ref(m, layer(rk), rs)
            return reads, State(memory_write_ref(m, content_addressing_ref(m, wk, ws), er, ad))
        return step

    got_r, got_m = checkpointed_scan(make(lin), State(memory), xs, segment=4)
    g1 = torch.autograd.grad((got_r * r).sum() + (got_m.memory * f).sum(), list(lin.parameters()))
    want_r, want_m = checkpointed_scan(make(ref_lin), State(memory), xs, checkpoint_segments=False)
    g2 = torch.autograd.grad((want_r * r).sum() + (want_m.memory * f).sum(), list(ref_lin.parameters()))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_list_inputs_tuple_state_and_no_output():
    memory, xs, r, f = _inputs(2)
    steps = [tuple(x[t] for x in xs) for t in range(T)]

    def step(x, state):
        (m,) = state
        _, _, wk, ws, er, ad = x
        return None, (memory_write_ref(m, content_addressing_ref(m, wk, ws), er, ad),)

    m0 = memory.clone().requires_grad_(True)
    ys, (final,) = checkpointed_scan(step, (m0,), steps, segment=5)
    assert ys is None
    ys2, (final2,) = checkpointed_scan(step, (m0,), steps, checkpoint_segments=False)
    torch.testing.assert_close(final, final2, rtol=0, atol=0)


def test_default_segment():
    assert [default_segment(t) for t in (1, 2, 16, 17, 64)] == [1, 2, 4, 5, 8]
    with pytest.raises(ValueError, match="at least 1"):
        default_segment(0)


# ------------------------------------------------------------------ bad input
def test_empty_sequence_raises():
    memory, xs, _, _ = _inputs()
    with pytest.raises(ValueError, match="T must be at least 1"):
        checkpointed_scan(_step("torch"), State(memory), tuple(x[:0] for x in xs))
    with pytest.raises(ValueError, match="T must be at least 1"):
        checkpointed_scan(_step("torch"), State(memory), [])


def test_mismatched_per_step_shapes_raise():
    memory, xs, _, _ = _inputs()
    with pytest.raises(ValueError, match="T=16 steps.*xs\\[2\\]"):
        checkpointed_scan(_step("torch"), State(memory), (*xs[:2], xs[2][:5], *xs[3:]))
    steps = [tuple(x[t] for x in xs) for t in range(4)]
    steps[2] = (steps[2][0][:, :2],) + steps[2][1:]
    with pytest.raises(ValueError, match="one shape: xs\\[2\\]"):
        checkpointed_scan(_step("torch"), State(memory), steps)

    def growing(x, state):
        return None, State(torch.cat([state.memory, state.memory[:, :1]], dim=1))

    with pytest.raises(ValueError, match="step 0 returned a state of shapes"):
        checkpointed_scan(growing, State(memory), xs)
    with pytest.raises(ValueError, match="segment must be a positive int"):
        checkpointed_scan(_step("torch"), State(memory), xs, segment=0)
    with pytest.raises(TypeError, match="state must be a tensor"):
        checkpointed_scan(_step("torch"), {"memory": memory}, xs)


def test_non_finite_saved_state_raises():
    memory, xs, _, _ = _inputs()
    bad = memory.clone()
    bad[1, 3, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite values .* state.memory of the state at step 0"):
        checkpointed_scan(_step("torch"), State(bad.requires_grad_(True)), xs, segment=4)

    def blows_up(x, state):
        t = x[0].detach()
        m = state.memory * 1.0
        if bool((t == xs[0][5]).all()):
            m = m + float("inf")
        return None, State(m)

    with pytest.raises(ValueError, match="at step 8"):
        checkpointed_scan(blows_up, State(memory.clone().requires_grad_(True)), xs, segment=4)


@pytest.mark.parametrize("ckpt", [True, False])
def test_backward_twice_without_retain_graph_raises(ckpt):
    memory, xs, r, f = _inputs()
    m0 = memory.clone().requires_grad_(True)
    reads, final = checkpointed_scan(_step("torch"), State(m0), xs, segment=4, checkpoint_segments=ckpt)
    loss = (reads * r).sum() + (final.memory * f).sum()
    loss.backward()
    with pytest.raises(RuntimeError, match="second time|already been freed|retain_graph"):
        loss.backward()


# ------------------------------------------------------------ the drop-in bank
@pytest.mark.parametrize("write_mode", ["content", "allocation", "none"])
@pytest.mark.parametrize("backend", _backends())
def test_bank_sequence_equals_its_steps(backend, write_mode):
    from neuralmem_fast.config import MemoryConfig

    memory, xs, r, f = _inputs(3)
    rk, rs, wk, ws, er, ad = xs
    cfg = MemoryConfig(memory_size=N, memory_dim=D, num_read_heads=H)

    def bank():
        b = NeuralMemoryBank(cfg, backend=backend, batch_size=B, differentiable=True, write_mode=write_mode).double()
        b.memory = memory.clone().requires_grad_(True)
        return b

    b1 = bank()
    m1 = b1.memory
    reads = b1.sequence(rk, rs, wk[:, :, 0], ad[:, :, 0], er[:, :, 0], ws, segment=4)
    loss1 = (reads * r.reshape(T, B, -1)).sum() + (b1.memory * f).sum()
    g1 = torch.autograd.grad(loss1, m1)[0]

    b2 = bank()
    m2 = b2.memory
    loss2 = 0
    for t in range(T):
        loss2 = loss2 + (b2.read(rk[t], rs[t]) * r[t].reshape(B, -1)).sum()
        b2.write(wk[t, :, 0], ad[t, :, 0], er[t, :, 0], ws[t])
    loss2 = loss2 + (b2.memory * f).sum()
    g2 = torch.autograd.grad(loss2, m2)[0]
    torch.testing.assert_close(g1, g2, rtol=0, atol=1e-10)
    torch.testing.assert_close(b1.usage, b2.usage, rtol=0, atol=1e-12)
    assert b1.memory_in_graph


def test_bank_sequence_needs_differentiable():
    from neuralmem_fast.config import MemoryConfig

    b = NeuralMemoryBank(MemoryConfig(memory_size=N, memory_dim=D, num_read_heads=H), backend="torch")
    with pytest.raises(RuntimeError, match="differentiable=True"):
        b.sequence(*(torch.zeros(2, H, D),) * 6)
