"""reversible_read_write: T read-then-write steps trained through by undoing each write.

Gradients after T=16 steps equal those of plain autograd over the reference
ops (float64, 1e-10); writes that erase rows to zero are survived by saving
those rows; bad input raises; the caller's tensors are never modified.
"""
import pytest
import torch

import neuralmem_fast as nm
from neuralmem_fast import ops
from neuralmem_fast.nn import NeuralMemoryBank, reversible_read_write
from neuralmem_fast.nn import reversible as rev
from neuralmem_fast.ops.reference import content_addressing_ref, content_read_ref, memory_write_ref

B, N, D, H, T = 2, 13, 5, 3, 16
DT = torch.float64


def _backends():
    return ["torch"] + (["cpu"] if nm.has_extension() else [])


def _inputs(W=1, seed=0, T=T, strength=4.0, erase=None, dtype=DT, n=N):
    g = torch.Generator().manual_seed(seed)
    memory = torch.randn(B, n, D, dtype=dtype, generator=g)
    xs = [torch.randn(T, B, H, D, dtype=dtype, generator=g),              # read keys
          1 + strength * torch.rand(T, B, H, dtype=dtype, generator=g),   # read strengths
          torch.randn(T, B, W, D, dtype=dtype, generator=g),              # write keys
          1 + strength * torch.rand(T, B, W, dtype=dtype, generator=g),   # write strengths
          torch.rand(T, B, W, D, dtype=dtype, generator=g),               # erase
          torch.randn(T, B, W, D, dtype=dtype, generator=g)]              # add
    if erase is not None:
        xs[4] = torch.full_like(xs[4], erase)
    r = torch.randn(T, B, H, D, dtype=dtype, generator=g)
    f = torch.randn(B, n, D, dtype=dtype, generator=g)
    return memory, xs, r, f


def _plain_grads(memory, xs, r, f, backend=None):
    """Plain autograd over every step: the reference ops, or the `backend`'s ops."""
    leaves = [memory.clone().requires_grad_(True)] + [x.clone().requires_grad_(True) for x in xs]
    m, loss = leaves[0], 0
    for t in range(xs[0].shape[0]):
        rk, rs, wk, ws, er, ad = (x[t] for x in leaves[1:])
        if backend is None:
            loss = loss + (content_read_ref(m, rk, rs) * r[t]).sum()
            m = memory_write_ref(m, content_addressing_ref(m, wk, ws), er, ad)
        else:
            loss = loss + (ops.content_read(m, rk, rs, backend=backend) * r[t]).sum()
            m = ops.memory_write(m, ops.content_addressing(m, wk, ws, backend=backend), er, ad, backend=backend)
    loss = loss + (m * f).sum()
    return torch.autograd.grad(loss, leaves)


def _reversed_grads(memory, xs, r, f, backend, **kw):
    leaves = [memory.clone().requires_grad_(True)] + [x.clone().requires_grad_(True) for x in xs]
    reads, last = reversible_read_write(*leaves, backend=backend, **kw)
    loss = (reads * r).sum() + (last * f).sum()
    return torch.autograd.grad(loss, leaves)


def _assert_grads_close(got, want, atol):
    names = ("memory", "read_keys", "read_strengths", "write_keys", "write_strengths", "erase", "add")
    for name, a, b in zip(names, got, want):
        scale = max(1.0, b.abs().max().item())
        assert (a - b).abs().max().item() <= atol * scale, f"{name}: {(a - b).abs().max().item():.3e}"


# ------------------------------------------------------------------ gradients
@pytest.mark.parametrize("W", [1, 2])
@pytest.mark.parametrize("backend", _backends())
def test_gradients_equal_plain_autograd_over_the_reference(backend, W):
    memory, xs, r, f = _inputs(W)
    _assert_grads_close(_reversed_grads(memory, xs, r, f, backend), _plain_grads(memory, xs, r, f), 1e-10)


@pytest.mark.parametrize("backend", _backends())
def test_outputs_equal_the_steps(backend):
    memory, xs, _, _ = _inputs(2)
    reads, last = reversible_read_write(memory, *xs, backend=backend)
    m = memory
    for t in range(T):
        torch.testing.assert_close(reads[t], ops.content_read(m, xs[0][t], xs[1][t], backend=backend),
                                   rtol=0, atol=1e-12)
        m = ops.memory_write(m, ops.content_addressing(m, xs[2][t], xs[3][t], backend=backend), xs[4][t],
                             xs[5][t], backend=backend)
    torch.testing.assert_close(last, m, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", _backends())
def test_sharp_full_erase_saves_rows_and_keeps_gradients(backend, monkeypatch):
    """Strength 300 and erase 1: a write takes a row almost to zero, which
    no division can undo; those rows must be saved, and the gradient must
    still be plain autograd's over the same kernels."""
    memory, xs, r, f = _inputs(1, seed=2, strength=300.0, erase=1.0)
    saved = []
    orig = rev._ReversibleReadWrite.forward

    def spy(ctx, *args):
        out = orig(ctx, *args)
        saved.append(sum(0 if s is None else s[0].numel() for s in ctx.saved_rows))
        return out

    monkeypatch.setattr(rev._ReversibleReadWrite, "forward", staticmethod(spy))
    got = _reversed_grads(memory, xs, r, f, backend)
    assert saved and saved[0] > 0
    _assert_grads_close(got, _plain_grads(memory, xs, r, f, backend=backend), 1e-10)


@pytest.mark.parametrize("backend", _backends())
def test_erase_to_exact_zero_is_always_saved(backend):
    """w e = 1 exactly (one-hot weights, erase 1) destroys the row: even an
    unbounded max_amplification saves it, and the gradients are finite and right."""
    memory, xs, r, f = _inputs(1, seed=4, erase=1.0)
    onehot = torch.zeros(B, 1, N, dtype=DT)
    onehot[:, 0, 3] = 1.0
    leaves = [memory.clone().requires_grad_(True)] + [x.clone().requires_grad_(True) for x in xs]
    reads, last = reversible_read_write(*leaves, backend=backend, weights_fn=lambda u: onehot,
                                        max_amplification=1e300)
    loss = (reads * r).sum() + (last * f).sum()
    got = torch.autograd.grad(loss, [leaves[0], leaves[1], leaves[5], leaves[6]])

    ref = [memory.clone().requires_grad_(True), xs[0].clone().requires_grad_(True),
           xs[4].clone().requires_grad_(True), xs[5].clone().requires_grad_(True)]
    m, loss2 = ref[0], 0
    for t in range(T):
        loss2 = loss2 + (content_read_ref(m, ref[1][t], xs[1][t]) * r[t]).sum()
        m = memory_write_ref(m, onehot, ref[2][t], ref[3][t])
    loss2 = loss2 + (m * f).sum()
    want = torch.autograd.grad(loss2, ref)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_rows_save_when_their_growth_passes_the_bound():
    """A row written at weight ~0.6 with erase 1 grows its error by 2.5x a
    step: with max_amplification 4 it is saved every other step, with 1.5 every step."""
    memory, xs, r, f = _inputs(1, T=6, erase=1.0)
    w = torch.zeros(B, 1, N, dtype=DT)
    w[:, 0, 5] = 0.6
    w[:, 0, 6] = 0.4
    counts = {}
    for bound in (1.5, 4.0, 1e9):
        fn = rev._ReversibleReadWrite
        cfg = rev._Config(1e-12, "torch", bound, lambda u: w, None, 0.99)

        class Ctx:
            def save_for_backward(self, *a):
                pass

        ctx = Ctx()
        fn.forward(ctx, cfg, memory, *xs)
        counts[bound] = [0 if s is None else s[0].numel() for s in ctx.saved_rows]
    # Row 5 grows 2.5x a step, row 6 1.67x; a saved row starts again from 1.
    assert counts[1.5] == [2 * B] * 6
    # Row 5 passes 4 at steps 1, 3, 5 (2.5^2); row 6 at steps 2 and 5 (1.67^3).
    assert counts[4.0] == [0, B, B, B, 0, 2 * B]
    assert counts[1e9] == [0] * 6


@pytest.mark.parametrize("backend", _backends())
def test_gradcheck_odd_shapes(backend):
    g = torch.Generator().manual_seed(5)
    b, n, d, h, w, t = 1, 7, 3, 2, 2, 3
    args = [torch.randn(b, n, d, dtype=DT, generator=g), torch.randn(t, b, h, d, dtype=DT, generator=g),
            1 + torch.rand(t, b, h, dtype=DT, generator=g), torch.randn(t, b, w, d, dtype=DT, generator=g),
            1 + torch.rand(t, b, w, dtype=DT, generator=g), torch.rand(t, b, w, d, dtype=DT, generator=g),
            torch.randn(t, b, w, d, dtype=DT, generator=g)]
    args = [a.requires_grad_(True) for a in args]
    assert torch.autograd.gradcheck(lambda *a: reversible_read_write(*a, backend=backend), args)


def test_float32_long_sequence_stays_close_to_plain_autograd():
    """T=64 in float32 over the same kernels: the rebuilt memories differ
    from the forward's by rounding only."""
    be = _backends()[-1]
    memory, xs, r, f = _inputs(1, seed=6, T=64, dtype=torch.float32, n=257)
    got = _reversed_grads(memory, xs, r, f, be)
    want = _plain_grads(memory, xs, r, f, backend=be)
    _assert_grads_close(got, want, 1e-4)


@pytest.mark.parametrize("which", ["reads", "memory"])
def test_one_output_unused(which):
    memory, xs, r, f = _inputs(1)
    leaves = [memory.clone().requires_grad_(True)] + [x.clone().requires_grad_(True) for x in xs]
    reads, last = reversible_read_write(*leaves, backend="torch")
    loss = (reads * r).sum() if which == "reads" else (last * f).sum()
    got = torch.autograd.grad(loss, leaves)
    zero_r, zero_f = (r, torch.zeros_like(f)) if which == "reads" else (torch.zeros_like(r), f)
    _assert_grads_close(got, _plain_grads(memory, xs, zero_r, zero_f), 1e-10)


# ------------------------------------------------------------------ safety
def test_callers_tensors_unchanged():
    memory, xs, r, f = _inputs(2)
    m0 = memory.clone().requires_grad_(True)
    before = m0.detach().clone()
    xs0 = [x.clone() for x in xs]
    reads, last = reversible_read_write(m0, *xs, backend="torch")
    ((reads * r).sum() + (last * f).sum()).backward()
    assert torch.equal(m0.detach(), before)
    assert all(torch.equal(a, b) for a, b in zip(xs, xs0))


def _loss_on_a_leaf():
    memory, xs, r, f = _inputs(1)
    m0 = memory.clone().requires_grad_(True)
    reads, last = reversible_read_write(m0, *xs, backend="torch")
    return m0, last, (reads * r).sum() + (last * f).sum()


def test_backward_twice_raises():
    _, _, loss = _loss_on_a_leaf()
    loss.backward()
    with pytest.raises(RuntimeError, match="second time|already been freed|retain_graph"):
        loss.backward()


def test_last_memory_modified_in_place_before_backward_raises():
    _, last, loss = _loss_on_a_leaf()
    with torch.no_grad():
        last.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_create_graph_refused():
    m0, _, loss = _loss_on_a_leaf()
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(loss, m0, create_graph=True)


def test_bad_input_names_the_argument():
    memory, xs, r, f = _inputs(1)
    with pytest.raises(TypeError, match="float32 or float64"):
        reversible_read_write(memory.half(), *[x.half() for x in xs])
    with pytest.raises(ValueError, match="at least 1"):
        reversible_read_write(memory, *[x[:0] for x in xs])
    bad = list(xs)
    bad[3] = xs[3][:-1]
    with pytest.raises(ValueError, match="write_strengths must have shape"):
        reversible_read_write(memory, *bad)
    bad = list(xs)
    bad[1] = xs[1].float()
    with pytest.raises(TypeError, match="read_strengths must have the memory's dtype"):
        reversible_read_write(memory, *bad)
    with pytest.raises(ValueError, match="max_amplification"):
        reversible_read_write(memory, *xs, max_amplification=1.0)
    nan = memory.clone()
    nan[0, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="inf or NaN"):
        reversible_read_write(nan, *xs)
    with pytest.raises(ValueError, match="memory must be a \\(B, N, D\\)"):
        reversible_read_write(memory[0], *xs)


# ------------------------------------------------------------------ the bank
def _bank(backend, write_mode, memory):
    from neuralmem_fast.config import MemoryConfig

    cfg = MemoryConfig(memory_size=N, memory_dim=D, num_read_heads=H)
    b = NeuralMemoryBank(cfg, backend=backend, batch_size=B, differentiable=True, write_mode=write_mode).double()
    b.memory = memory.clone().requires_grad_(True)
    return b


@pytest.mark.parametrize("write_mode", ["content", "allocation"])
@pytest.mark.parametrize("backend", _backends())
def test_bank_backprop_schemes_agree(backend, write_mode):
    memory, xs, r, f = _inputs(1, seed=7)
    rk, rs, wk, ws, er, ad = xs
    grads, usages = {}, {}
    for scheme in ("reverse", "checkpoint", "full"):
        b = _bank(backend, write_mode, memory)
        m = b.memory
        reads = b.sequence(rk, rs, wk[:, :, 0], ad[:, :, 0], er[:, :, 0], ws, backprop=scheme)
        loss = (reads * r.reshape(T, B, -1)).sum() + (b.memory * f).sum()
        grads[scheme] = torch.autograd.grad(loss, m)[0]
        usages[scheme] = b.usage
    for scheme in ("checkpoint", "full"):
        torch.testing.assert_close(grads["reverse"], grads[scheme], rtol=0, atol=1e-10)
        torch.testing.assert_close(usages["reverse"], usages[scheme], rtol=0, atol=1e-12)


def test_bank_backprop_bad_values():
    memory, xs, _, _ = _inputs(1)
    rk, rs, wk, ws, er, ad = xs
    args = (rk, rs, wk[:, :, 0], ad[:, :, 0], er[:, :, 0], ws)
    with pytest.raises(ValueError, match="backprop must be one of"):
        _bank("torch", "content", memory).sequence(*args, backprop="reversible")
    with pytest.raises(ValueError, match="write_mode='none'"):
        _bank("torch", "none", memory).sequence(*args, backprop="reverse")
    with pytest.raises(ValueError, match="max_amplification applies"):
        _bank("torch", "content", memory).sequence(*args, backprop="checkpoint", max_amplification=4.0)


@pytest.mark.parametrize("backend", _backends())
def test_bank_unbatched_reverse_equals_checkpoint(backend):
    """One (N, D) memory, (T, H, D) read keys, one write key per step and a strength per step."""
    from neuralmem_fast.config import MemoryConfig

    t, n, d, h = 5, 11, 4, 2
    cfg = MemoryConfig(memory_size=n, memory_dim=d, num_read_heads=h)
    g = torch.Generator().manual_seed(8)
    rk, rs = torch.randn(t, h, d, dtype=DT, generator=g), 3 * torch.rand(t, h, dtype=DT, generator=g)
    wk, ad = torch.randn(t, d, dtype=DT, generator=g), torch.randn(t, d, dtype=DT, generator=g)
    er, ws = torch.rand(t, d, dtype=DT, generator=g), torch.full((t,), 2.0, dtype=DT)
    m0 = torch.randn(n, d, dtype=DT, generator=g)
    got = {}
    for scheme in ("reverse", "checkpoint"):
        b = NeuralMemoryBank(cfg, backend=backend, differentiable=True).double()
        b.memory = m0.clone().requires_grad_(True)
        m = b.memory
        reads = b.sequence(rk, rs, wk, ad, er, ws, backprop=scheme)
        assert reads.shape == (t, h * d) and b.memory.shape == (n, d)
        loss = (reads ** 2).sum() + (b.memory ** 3).sum()
        got[scheme] = (torch.autograd.grad(loss, m)[0], b.usage.clone())
    torch.testing.assert_close(got["reverse"][0], got["checkpoint"][0], rtol=0, atol=1e-10)
    torch.testing.assert_close(got["reverse"][1], got["checkpoint"][1], rtol=0, atol=1e-12)


def test_bank_segment_means_checkpoint():
    """An explicit segment is a checkpointing choice: "auto" takes "checkpoint" for it (same gradients as
    the reversed writes), and the schemes that keep no segments refuse one."""
    memory, xs, r, f = _inputs(1)
    rk, rs, wk, ws, er, ad = xs
    args = (rk, rs, wk[:, :, 0], ad[:, :, 0], er[:, :, 0], ws)
    grads, kinds = {}, {}
    for name, kw in (("auto+segment", dict(segment=2)), ("checkpoint", dict(backprop="checkpoint", segment=2)),
                     ("reverse", dict(backprop="reverse"))):
        b = _bank("torch", "content", memory)
        m = b.memory
        reads = b.sequence(*args, **kw)
        kinds[name] = type(reads.grad_fn).__name__
        loss = (reads * r.reshape(T, B, -1)).sum() + (b.memory * f).sum()
        grads[name] = torch.autograd.grad(loss, m)[0]
    assert kinds["auto+segment"] == kinds["checkpoint"] != kinds["reverse"], kinds
    torch.testing.assert_close(grads["auto+segment"], grads["reverse"], rtol=0, atol=1e-10)
    for kw in (dict(backprop="reverse"), dict(backprop="full"), dict(checkpoint=False)):
        with pytest.raises(ValueError, match="segment=2 applies to backprop='checkpoint' only"):
            _bank("torch", "content", memory).sequence(*args, segment=2, **kw)


@pytest.mark.parametrize("strength", [0.5, 4.0, 300.0])
def test_write_lse_from_the_heaviest_slot_is_the_logsumexp(strength):
    """The forward's write logsumexp, taken from one row per head, equals the logsumexp over every slot."""
    from neuralmem_fast.ops.reference import logits_ref

    memory, xs, _, _ = _inputs(W=2, strength=strength)
    wk, ws = xs[2][0], xs[3][0]
    w = content_addressing_ref(memory, wk, ws)
    want = torch.logsumexp(logits_ref(memory, wk, ws), dim=-1)
    torch.testing.assert_close(rev._write_lse(memory, w, wk, ws, 1e-12), want, rtol=0, atol=1e-12)
