"""NeuralMemoryBank: drop-in equivalence with the seed's bank, batching, BPTT."""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from neuralmem_fast import ops
from neuralmem_fast.ops.dispatch import available_backends
from neuralmem_fast.nn import NeuralMemoryBank
from tests import helpers
from tests.helpers import assert_close, shape_id

BACKENDS = [b for b in available_backends("cpu") if b != "triton"]


def seed_module():
    """The seed tutorial module: helpers.load_seed, also from a nested checkout."""
    if not os.path.exists(os.path.abspath(helpers.SEED_PATH)):
        d = os.path.dirname(os.path.abspath(__file__))
        for _ in range(4):
            d = os.path.dirname(d)
            cand = os.path.join(d, "shared", "seed", "seed_tutorial.py")
            if os.path.exists(cand):
                helpers.SEED_PATH = cand
                break
    return helpers.load_seed()


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny ops: a second intra-op thread only adds synchronisation.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Cfg:
    def __init__(self, memory_size=128, memory_dim=64, num_read_heads=4, num_write_heads=1):
        self.memory_size, self.memory_dim = memory_size, memory_dim
        self.num_read_heads, self.num_write_heads = num_read_heads, num_write_heads


# --------------------------------------------------------------------------
# drop-in equivalence with the seed, inside the seed's own agent
# --------------------------------------------------------------------------
def _grads(module):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in module.parameters()]


def _run_seed_agent(seed, bank_factory, steps):
    torch.manual_seed(0)
    np.random.seed(0)
    agent = seed.ContinualLearningAgent()
    if bank_factory is not None:
        agent.memory_bank = bank_factory(agent.config)
    data = [seed.create_task_data(t, 50) for t in range(2)]
    losses, grads = [], []
    for s in range(steps):
        task = 0 if s < steps // 4 else 1
        x, y = data[task][s % 50]
        losses.append(agent.train_step(x, y, use_replay=task > 0))
        grads.append(_grads(agent.controller))
    return agent, losses, grads


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropin_bank_in_seed_agent_matches_seed_over_200_steps(backend):
    seed = seed_module()
    steps = 200  # 50 steps of task 1 without replay, 150 of task 2 with 8 replays each
    ref, ref_losses, ref_grads = _run_seed_agent(seed, None, steps)
    fast, losses, grads = _run_seed_agent(seed, lambda c: NeuralMemoryBank(c, backend=backend), steps)

    np.testing.assert_allclose(losses, ref_losses, atol=1e-5, rtol=0, err_msg="train_step losses")
    names = [n for n, _ in ref.controller.named_parameters()]
    for s in range(steps):
        for n, g, rg in zip(names, grads[s], ref_grads[s]):
            torch.testing.assert_close(g, rg, atol=1e-5, rtol=0, msg=lambda m: f"step {s} grad {n}: {m}")
    torch.testing.assert_close(fast.memory_bank.memory, ref.memory_bank.memory, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast.memory_bank.usage, ref.memory_bank.usage, atol=1e-5, rtol=0)

    # Outputs of the two trained controllers on fresh inputs, from their own memories.
    probe = torch.randn(5, 64)
    with torch.no_grad():
        for x in probe:
            out_ref, _ = ref.controller(x, ref.memory_bank)
            out, _ = fast.controller(x, fast.memory_bank)
            torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=0, msg=lambda m: f"output: {m}")

    # Parameters agree except the read heads. The seed's writes give every slot
    # the same weight, so all memory rows are equal, the read weights do not
    # depend on the read keys, and the read heads' true gradient is zero: what
    # both banks compute there is rounding noise (~1e-10), which Adam's
    # normalisation turns into +-lr steps. Check that it is noise, not signal.
    for (n, p), q in zip(ref.controller.named_parameters(), fast.controller.parameters()):
        if n.startswith("read_"):
            assert max(g[names.index(n)].abs().max().item() for g in ref_grads) < 1e-7, n
            continue
        torch.testing.assert_close(q, p, atol=1e-5, rtol=0, msg=lambda m: f"parameter {n}: {m}")
    assert torch.allclose(ref.memory_bank.memory, ref.memory_bank.memory[:1].expand_as(ref.memory_bank.memory))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N,D,H", [(128, 64, 4), (7, 3, 1), (2, 5, 2)],
                         ids=lambda v: str(v))
def test_read_and_write_match_seed_bank(backend, N, D, H):
    seed = seed_module()
    cfg = Cfg(N, D, H)
    ref, fast = seed.NeuralMemoryBank(cfg), NeuralMemoryBank(cfg, backend=backend)
    torch.manual_seed(1)
    for step in range(4):
        keys = torch.randn(H, D, requires_grad=True)
        strengths = (torch.rand(H) * 5).requires_grad_()
        r_ref = ref.read(keys, strengths)
        r = fast.read(keys, strengths)
        assert r.shape == (H * D,)
        assert_close(r, r_ref, name=f"read step {step}")
        g = torch.randn(H * D)
        gk_ref, gs_ref = torch.autograd.grad(r_ref, (keys, strengths), g)
        gk, gs = torch.autograd.grad(r, (keys, strengths), g)
        assert_close(gk, gk_ref, name=f"d keys step {step}")
        assert_close(gs, gs_ref, name=f"d strengths step {step}")
        w = (torch.randn(D), torch.tanh(torch.randn(D)), torch.rand(D), torch.rand(1) * 3)
        ref.write(*w)
        fast.write(*w)
        assert_close(fast.memory, ref.memory, name=f"memory after write {step}")
        assert_close(fast.usage, ref.usage, name=f"usage after write {step}")
    key, beta = torch.randn(D), torch.tensor([2.0])
    assert_close(fast.content_addressing(key, beta), ref.content_addressing(key, beta), name="addressing")


def test_write_is_in_place_unless_a_backward_holds_the_memory():
    bank = NeuralMemoryBank(Cfg(16, 8, 2), backend="torch")
    bank.memory.normal_()
    w = (torch.randn(8), torch.randn(8), torch.rand(8), torch.rand(1))
    first = bank.memory
    with torch.no_grad():
        bank.read(torch.randn(2, 8), torch.rand(2))
    bank.write(*w)
    assert bank.memory is first, "a write after a no-grad read must not copy"
    keys = torch.randn(2, 8, requires_grad=True)
    r = bank.read(keys, torch.rand(2))
    held = bank.memory.clone()
    bank.write(*w)
    assert bank.memory is not first, "the memory saved by a pending backward must not be overwritten"
    torch.testing.assert_close(first, held)
    r.sum().backward()  # would raise on a version mismatch
    assert keys.grad is not None


def test_multi_query_read_and_merged_write_semantics():
    """(M,H,D) keys are M reads of one memory; (M,D) write keys are an M-head write."""
    torch.manual_seed(3)
    N, D, H, M = 9, 4, 2, 3
    bank = NeuralMemoryBank(Cfg(N, D, H), backend="torch")
    bank.memory.normal_()
    mem0 = bank.memory.clone()
    keys, strengths = torch.randn(M, H, D), torch.rand(M, H) * 3
    reads = bank.read(keys, strengths)
    assert reads.shape == (M, H * D)
    for m in range(M):
        assert_close(reads[m], bank.read(keys[m], strengths[m]), name=f"query {m}")
    wk, wv, we, ws = torch.randn(M, D), torch.randn(M, D), torch.rand(M, D), torch.rand(M, 1) * 2
    bank.write(wk, wv, we, ws)
    w = ops.content_addressing_ref(mem0[None], wk[None], ws.reshape(1, M))
    expected = ops.memory_write_ref(mem0[None], w, we[None], wv[None])[0]
    assert_close(bank.memory, expected, name="merged write")
    assert_close(bank.usage, w.sum(dim=1)[0], name="usage after merged write")


# --------------------------------------------------------------------------
# B independent memories
# --------------------------------------------------------------------------
@pytest.mark.parametrize("B,N,D,H", [(3, 7, 5, 2), (2, 128, 64, 4), (1, 1, 3, 1)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_bank_equals_independent_banks(B, N, D, H, backend):
    torch.manual_seed(2)
    cfg = Cfg(N, D, H)
    batched = NeuralMemoryBank(cfg, backend=backend, batch_size=B)
    singles = [NeuralMemoryBank(cfg, backend=backend) for _ in range(B)]
    assert batched.memory.shape == (B, N, D) and batched.usage.shape == (B, N)
    for step in range(5):
        keys = torch.randn(B, H, D, requires_grad=True)
        strengths = (torch.rand(B, H) * 4).requires_grad_()
        r = batched.read(keys, strengths)
        assert r.shape == (B, H * D)
        r_single = torch.stack([singles[b].read(keys[b], strengths[b]) for b in range(B)])
        ident = shape_id(B=B, N=N, H=H, D=D, dtype=torch.float32)
        assert_close(r, r_single, name=f"{ident} read {step}")
        g = torch.randn_like(r)
        assert_close(torch.autograd.grad(r, keys, g)[0], torch.autograd.grad(r_single, keys, g)[0],
                     name=f"{ident} d keys {step}")
        wk, wv, we, ws = torch.randn(B, D), torch.tanh(torch.randn(B, D)), torch.rand(B, D), torch.rand(B, 1) * 3
        batched.write(wk, wv, we, ws)
        for b in range(B):
            singles[b].write(wk[b], wv[b], we[b], ws[b])
        assert_close(batched.memory, torch.stack([s.memory for s in singles]), name=f"{ident} memory {step}")
        assert_close(batched.usage, torch.stack([s.usage for s in singles]), name=f"{ident} usage {step}")


# --------------------------------------------------------------------------
# differentiable=True: truncated BPTT reaches the write heads
# --------------------------------------------------------------------------
class BPTTReferenceBank(torch.nn.Module):
    """The seed's bank with its two .detach() calls removed (pure PyTorch)."""

    def __init__(self, cfg):
        super().__init__()
        self.num_read_heads = cfg.num_read_heads
        self.memory = torch.zeros(cfg.memory_size, cfg.memory_dim)

    def content_addressing(self, key, beta):
        sim = torch.matmul(F.normalize(key, dim=-1), F.normalize(self.memory, dim=-1).t())
        return F.softmax(beta * sim, dim=-1)

    def write(self, write_key, write_vector, erase_vector, write_strength):
        w = self.content_addressing(write_key, write_strength)
        self.memory = self.memory * (1 - torch.outer(w.squeeze(), erase_vector.squeeze()))
        self.memory = self.memory + torch.outer(w.squeeze(), write_vector.squeeze())

    def read(self, read_keys, read_strengths):
        return torch.cat([torch.matmul(self.content_addressing(read_keys[i], read_strengths[i]), self.memory)
                          for i in range(self.num_read_heads)], dim=-1)


def _sequence_grads(seed, bank, T=5):
    torch.manual_seed(4)
    ctrl = seed.MemoryController(16, 32, Cfg(24, 8, 2))
    xs, ys = torch.randn(T, 16), torch.randn(T, 16)
    loss = sum(F.mse_loss(ctrl(xs[t], bank)[0], ys[t]) for t in range(T))
    loss.backward()
    return {n: p.grad for n, p in ctrl.named_parameters()}, loss.item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_differentiable_bank_gives_write_heads_bptt_gradients(backend):
    seed = seed_module()
    cfg = Cfg(24, 8, 2)
    detached, _ = _sequence_grads(seed, NeuralMemoryBank(cfg, backend=backend))
    write_heads = ["write_key", "write_vector", "erase_vector", "write_strength"]
    for h in write_heads:
        assert detached[h + ".weight"] is None, f"{h}: the seed's detach gives no gradient"

    ref_bank = BPTTReferenceBank(cfg)
    ref_bank.memory = torch.rand(24, 8)  # nonzero start: every write head matters from step 1
    bank = NeuralMemoryBank(cfg, backend=backend, differentiable=True)
    bank.memory = ref_bank.memory.clone()
    ref, ref_loss = _sequence_grads(seed, ref_bank)
    got, loss = _sequence_grads(seed, bank)
    assert abs(loss - ref_loss) < 1e-5
    for n, g in ref.items():
        assert got[n] is not None, n
        assert_close(got[n], g, name=f"BPTT grad {n}", tol_scale=5)
    for h in write_heads:
        assert got[h + ".weight"].abs().max() > 1e-6, f"{h} must learn through the writes"

    # Truncation: after detach_memory() earlier writes no longer receive gradient.
    k = torch.randn(8, requires_grad=True)
    bank.reset()
    bank.write(k, torch.randn(8), torch.rand(8), torch.rand(1))
    bank.detach_memory()
    r = bank.read(torch.randn(2, 8), torch.rand(2))
    assert not r.requires_grad


def test_bad_shapes_name_the_argument():
    bank = NeuralMemoryBank(Cfg(8, 4, 2), backend="torch")
    with pytest.raises(ValueError, match="read_keys"):
        bank.read(torch.randn(2, 5), torch.rand(2))
    with pytest.raises(ValueError, match="read_strengths"):
        bank.read(torch.randn(2, 4), torch.rand(3))
    with pytest.raises(ValueError, match="batch_size"):
        NeuralMemoryBank(Cfg(), batch_size=0)
    with pytest.raises(ValueError, match="write_vector"):
        bank.write(torch.randn(4), torch.randn(2, 4), torch.rand(4), torch.rand(1))


def test_read_gradients_for_zero_and_tiny_keys_match_reference():
    """The bank's own read backward against autograd over the op reference,
    including keys whose norm is clamped at eps (all-zero keys)."""
    torch.manual_seed(6)
    bank = NeuralMemoryBank(Cfg(10, 4, 3), backend="torch")
    bank.memory.normal_()
    keys = torch.randn(3, 4)
    keys[1] = 0.0
    keys[2] *= 1e-14
    keys.requires_grad_()
    strengths = (torch.rand(3) * 3).requires_grad_()
    r = bank.read(keys, strengths)
    r_ref = ops.content_read_ref(bank.memory[None], keys[None], strengths[None]).reshape(-1)
    assert_close(r, r_ref, name="read")
    g = torch.randn_like(r)
    for got, exp, name in zip(torch.autograd.grad(r, (keys, strengths), g),
                              torch.autograd.grad(r_ref, (keys, strengths), g), ("d keys", "d strengths")):
        assert torch.isfinite(got).all()
        assert_close(got, exp, name=name, tol_scale=10)
