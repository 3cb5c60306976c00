"""MemoryAccess and MemoryCore: the DNC's formulas against an independent float64 reference,
gradients through several steps, top-k allocation, bad input, and a short run that learns."""
import math

import pytest
import torch

from .helpers import short_copy_run

from neuralmem_fast.apps.memory_tasks import copy_batch, recall_batch
from neuralmem_fast.nn import AccessInterface, AccessState, CoreState, MemoryAccess, MemoryCore
from neuralmem_fast.nn.access import allocation

F64 = torch.float64


# --------------------------------------------------------------------------
# the reference: the DNC's formulas, one memory at a time, with Python loops
# --------------------------------------------------------------------------
def ref_content(memory, key, strength):
    """Softmax over slots of strength * cosine(key, slot); memory (N, D), key (D,)."""
    sims = []
    for slot in memory:
        den = max(float(key.norm()), 1e-12) * max(float(slot.norm()), 1e-12)
        sims.append(float(key @ slot) / den)
    logits = [strength * s for s in sims]
    top = max(logits)
    e = [math.exp(v - top) for v in logits]
    return torch.tensor([v / sum(e) for v in e], dtype=F64)


def ref_allocation(usage):
    """a_{phi_j} = (1 - u_{phi_j}) prod_{i<j} u_{phi_i}, usage sorted ascending (with DeepMind's eps)."""
    u = [1e-6 + (1 - 1e-6) * float(v) for v in usage]
    order = sorted(range(len(u)), key=lambda i: (u[i], i))
    a, prod = [0.0] * len(u), 1.0
    for j in order:
        a[j] = (1 - u[j]) * prod
        prod *= u[j]
    return torch.tensor(a, dtype=F64)


def ref_step(iface, state):
    """One access step for every memory of the batch, slot by slot."""
    memory, usage, rw_prev, ww_prev = (t.detach().clone() for t in state)
    B, N, D = memory.shape
    R, W = iface.read_keys.shape[1], iface.write_keys.shape[1]
    out_m, out_u, out_rw, out_ww, out_r = [], [], [], [], []
    for b in range(B):
        g = {k: v[b].detach() for k, v in iface._asdict().items()}
        u = usage[b].clone()
        written = torch.ones(N, dtype=F64)
        for w in range(W):
            written = written * (1 - ww_prev[b, w])
        written = 1 - written
        u = u + written - u * written
        psi = torch.ones(N, dtype=F64)
        for r in range(R):
            psi = psi * (1 - g["free_gates"][r] * rw_prev[b, r])
        u = u * psi
        ww, u_alloc = [], u.clone()
        for w in range(W):
            a = ref_allocation(u_alloc)
            gate = g["write_gates"][w] * g["allocation_gates"][w]
            u_alloc = u_alloc + (1 - u_alloc) * gate * a
            c = ref_content(memory[b], g["write_keys"][w], float(g["write_strengths"][w]))
            ga = g["allocation_gates"][w]
            ww.append(g["write_gates"][w] * (ga * a + (1 - ga) * c))
        m = memory[b].clone()
        for n in range(N):
            keep = torch.ones(D, dtype=F64)
            for w in range(W):
                keep = keep * (1 - ww[w][n] * g["erase_vectors"][w])
            m[n] = m[n] * keep + sum(ww[w][n] * g["write_vectors"][w] for w in range(W))
        rw = [ref_content(m, g["read_keys"][r], float(g["read_strengths"][r])) for r in range(R)]
        out_r.append(torch.stack([sum(rw[r][n] * m[n] for n in range(N)) for r in range(R)]))
        out_m.append(m), out_u.append(u), out_rw.append(torch.stack(rw)), out_ww.append(torch.stack(ww))
    st = AccessState(torch.stack(out_m), torch.stack(out_u), torch.stack(out_rw), torch.stack(out_ww))
    return torch.stack(out_r), st


def random_interface(B, R, W, D, gen, dtype=F64):
    r = lambda *s: torch.rand(*s, generator=gen, dtype=dtype)  # noqa: E731
    n = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    return AccessInterface(n(B, R, D), 1 + 4 * r(B, R), n(B, W, D), 1 + 4 * r(B, W), r(B, W, D), n(B, W, D),
                           r(B, R), r(B, W), 0.2 + 0.8 * r(B, W))


@pytest.mark.parametrize("B,N,D,R,W", [(1, 1, 3, 1, 1), (3, 7, 5, 2, 1), (2, 9, 4, 3, 2)],
                         ids=lambda v: str(v))
def test_access_matches_the_reference_over_steps(B, N, D, R, W):
    gen = torch.Generator().manual_seed(B * 100 + N)
    acc = MemoryAccess(N, D, R, W)
    state = acc.initial_state(B, dtype=F64)
    ref_state = state
    for _ in range(4):
        iface = random_interface(B, R, W, D, gen)
        reads, state = acc(iface, state)
        ref_reads, ref_state = ref_step(iface, ref_state)
        torch.testing.assert_close(reads, ref_reads, rtol=1e-9, atol=1e-10)
        for name, got, want in zip(AccessState._fields, state, ref_state):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10, msg=lambda m: f"{name}: {m}")


def test_allocation_breaks_the_symmetry_of_a_zero_memory():
    """From the all-zero initial state, successive allocating writes land in distinct slots."""
    B, N, D = 2, 6, 4
    acc = MemoryAccess(N, D, 1, 1)
    state = acc.initial_state(B, dtype=F64)
    gen = torch.Generator().manual_seed(0)
    slots = []
    for _ in range(N):
        iface = random_interface(B, 1, 1, D, gen)._replace(allocation_gates=torch.ones(B, 1, dtype=F64),
                                                            write_gates=torch.ones(B, 1, dtype=F64),
                                                            free_gates=torch.zeros(B, 1, dtype=F64))
        _, state = acc(iface, state)
        assert float(state.write_weights.max(dim=-1).values.min()) > 0.99
        slots.append(state.write_weights.argmax(dim=-1))
    slots = torch.cat(slots, dim=1)
    for b in range(B):
        assert sorted(slots[b].tolist()) == list(range(N))
    assert float(torch.cdist(state.memory[0], state.memory[0]).triu(1).max()) > 0


def test_gradcheck_three_steps_of_writes_and_reads():
    B, N, D, R, W = 2, 5, 3, 2, 2
    gen = torch.Generator().manual_seed(3)
    acc = MemoryAccess(N, D, R, W, usage_grad=True)  # the default detaches one path (DeepMind's stop_gradient)
    ifaces = [random_interface(B, R, W, D, gen) for _ in range(3)]
    # Keep gates and erase vectors inside (0, 1) under gradcheck's perturbations.
    ifaces = [AccessInterface(*[(0.1 + 0.8 * t) if i in (4, 6, 7, 8) else t for i, t in enumerate(f)])
              for f in ifaces]
    leaves = [t.clone().requires_grad_() for f in ifaces for t in f]
    mem0 = torch.randn(B, N, D, generator=gen, dtype=F64).requires_grad_()
    usage0 = (0.1 + 0.8 * torch.rand(B, N, generator=gen, dtype=F64)).requires_grad_()

    def run(mem, usage, *flat):
        state = acc.initial_state(B, dtype=F64)._replace(memory=mem, usage=usage)
        outs = []
        for s in range(3):
            reads, state = acc(AccessInterface(*flat[9 * s:9 * s + 9]), state)
            outs.append(reads)
        return torch.stack(outs), state.usage

    assert torch.autograd.gradcheck(run, (mem0, usage0, *leaves), eps=1e-6, atol=1e-6)


def test_loss_at_step_t_reaches_the_write_heads_of_earlier_steps():
    B, N, D, R, W = 2, 6, 4, 1, 1
    gen = torch.Generator().manual_seed(5)
    acc = MemoryAccess(N, D, R, W)
    # a zero memory gives the write keys no gradient at the first step (uniform content weights)
    state = acc.initial_state(B, dtype=F64)._replace(memory=torch.randn(B, N, D, generator=gen, dtype=F64))
    ifaces = []
    for _ in range(3):
        f = AccessInterface(*[t.clone().requires_grad_() for t in random_interface(B, R, W, D, gen)])
        ifaces.append(f)
        reads, state = acc(f, state)
    reads.pow(2).sum().backward()  # only the last step's reads
    for name in ("write_keys", "write_strengths", "erase_vectors", "write_vectors", "allocation_gates",
                 "write_gates"):
        g = getattr(ifaces[0], name).grad
        assert g is not None and float(g.abs().sum()) > 0, name


def test_core_gradient_reaches_earlier_writes():
    """In MemoryCore, a loss on the last output reaches the first step's interface through the memory."""
    torch.manual_seed(0)
    core = MemoryCore(4, 3, memory_size=6, word_size=5, num_reads=2, hidden_size=8).double()
    x = torch.randn(2, 4, 4, dtype=F64)
    state = core.initial_state(2)
    _, state = core.step(x[:, 0], state)
    kept = state.memory
    kept.retain_grad()
    for t in range(1, 4):
        y, state = core.step(x[:, t], state)
    y.sum().backward()
    assert float(kept.grad.abs().sum()) > 0


@pytest.mark.parametrize("k", [3, 5])
def test_topk_allocation_equals_the_exact_sort_where_its_tolerance_holds(k):
    gen = torch.Generator().manual_seed(k)
    B, N = 4, 40
    usage = 0.5 + 0.5 * torch.rand(B, N, generator=gen, dtype=F64)
    low = torch.randperm(N, generator=gen)[:k]
    usage[:, low] = 1e-3 * torch.rand(B, k, generator=gen, dtype=F64)  # k nearly free slots
    exact = allocation(usage)
    top = allocation(usage, topk=k, tol=1e-6)
    beyond = torch.ones(B, N, dtype=torch.bool)
    beyond[:, low] = False
    assert float(top[beyond].abs().max()) == 0.0  # the top-k path ran: nothing beyond k
    assert float(exact[beyond].abs().max()) > 0.0
    # its error is the mass beyond k, bounded by the product of the k smallest usages
    torch.testing.assert_close(top, exact, rtol=0, atol=1e-6)
    torch.testing.assert_close(top[:, low], exact[:, low], rtol=1e-12, atol=0)


def test_topk_allocation_falls_back_to_the_exact_sort():
    gen = torch.Generator().manual_seed(1)
    usage = 0.3 + 0.6 * torch.rand(3, 50, generator=gen, dtype=F64)  # product of 4 smallest >> tol
    torch.testing.assert_close(allocation(usage, topk=4, tol=1e-6), allocation(usage), rtol=0, atol=0)
    acc = MemoryAccess(50, 3, 1, 1, alloc_topk=4)
    acc_exact = MemoryAccess(50, 3, 1, 1)
    st = acc.initial_state(3, dtype=F64)._replace(usage=usage)
    iface = random_interface(3, 1, 1, 3, gen)
    torch.testing.assert_close(acc(iface, st)[1], acc_exact(iface, st)[1], rtol=0, atol=0)


# --------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------
def _good(B=2, N=5, D=3, R=2, W=1):
    acc = MemoryAccess(N, D, R, W)
    gen = torch.Generator().manual_seed(0)
    state = acc.initial_state(B, dtype=F64)._replace(memory=torch.randn(B, N, D, generator=gen, dtype=F64))
    return acc, random_interface(B, R, W, D, gen), state


@pytest.mark.parametrize("field,value,match", [
    ("write_gates", lambda t: t + 1.5, "write_gates.*\\[0, 1\\]"),
    ("allocation_gates", lambda t: -t - 0.1, "allocation_gates.*\\[0, 1\\]"),
    ("free_gates", lambda t: t * 3 + 1.01, "free_gates.*\\[0, 1\\]"),
    ("erase_vectors", lambda t: t + 2, "erase_vectors.*\\[0, 1\\]"),
    ("read_strengths", lambda t: -t, "read_strengths.*>= 0"),
    ("write_vectors", lambda t: t.index_fill(2, torch.tensor([1]), float("nan")), "write_vectors.*NaN"),
    ("read_keys", lambda t: t.index_fill(0, torch.tensor([0]), float("inf")), "read_keys.*NaN or inf"),
    ("write_keys", lambda t: t[:, :, :2], "write_keys.*shape"),
    ("free_gates", lambda t: t[:1], "free_gates.*shape"),
    ("erase_vectors", lambda t: t.float(), "erase_vectors.*float64"),
])
def test_bad_interface_raises_naming_the_argument_and_leaves_the_state(field, value, match):
    acc, iface, state = _good()
    before = [t.clone() for t in state]
    bad = iface._replace(**{field: value(getattr(iface, field))})
    with pytest.raises(ValueError, match=match):
        acc(bad, state)
    for t, b in zip(state, before):
        assert torch.equal(t, b)


def test_bad_state_and_sizes_raise():
    acc, iface, state = _good()
    with pytest.raises(ValueError, match="state.usage"):
        acc(iface, state._replace(usage=state.usage[:, :3]))
    with pytest.raises(ValueError, match="memory_size"):
        MemoryAccess(2, 3, num_reads=4)
    with pytest.raises(ValueError, match="memory_size"):
        MemoryCore(3, 3, memory_size=1, word_size=2, num_reads=1, num_writes=2)
    with pytest.raises(ValueError, match="alloc_topk"):
        MemoryAccess(8, 3, 1, alloc_topk=0)


def test_core_rejects_bad_sequences():
    core = MemoryCore(4, 2, memory_size=6, word_size=3, num_reads=1, hidden_size=8)
    with pytest.raises(ValueError, match="x must be \\(B, T, 4\\)"):
        core(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="x must be \\(B, T, 4\\)"):
        core(torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match="x contains NaN"):
        core(torch.full((2, 3, 4), float("nan")))
    y, state = core(torch.zeros(2, 3, 4))
    before = [t.clone() for t in state]
    with pytest.raises(ValueError, match="state.h"):
        core(torch.zeros(3, 2, 4), state)  # batch of 3 against a state of 2
    with pytest.raises(ValueError, match="x contains NaN"):
        core(torch.full((2, 3, 4), float("inf")), state)
    assert all(torch.equal(t, b) for t, b in zip(state, before))


def test_core_forward_is_a_loop_over_step_and_continues_from_a_state():
    torch.manual_seed(0)
    core = MemoryCore(5, 3, memory_size=7, word_size=4, num_reads=2, num_writes=2, hidden_size=6)
    x = torch.randn(3, 6, 5)
    y, state = core(x)
    assert y.shape == (3, 6, 3) and isinstance(state, CoreState)
    y1, s1 = core(x[:, :2])
    y2, s2 = core(x[:, 2:], s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y)
    for a, b in zip(s2, state):
        torch.testing.assert_close(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_core_on_cuda_matches_cpu():
    torch.manual_seed(0)
    core = MemoryCore(5, 3, memory_size=16, word_size=8, num_reads=2, hidden_size=16)
    x = torch.randn(2, 5, 5)
    y, _ = core(x)
    y_cuda, _ = core.cuda()(x.cuda())
    torch.testing.assert_close(y_cuda.cpu(), y, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------
# the tasks and a short run that learns
# --------------------------------------------------------------------------
def test_task_generators_lay_out_the_sequences():
    gen = torch.Generator().manual_seed(0)
    x, target, mask = copy_batch(5, bits=4, min_len=1, max_len=3, generator=gen)
    assert x.shape == (5, 7, 6) and target.shape == (5, 7, 4)
    for b in range(5):
        L = int(mask[b].sum())
        assert 1 <= L <= 3 and x[b, L, 5] == 1
        torch.testing.assert_close(target[b, L + 1:2 * L + 1], x[b, :L, :4])
    x, target, mask = recall_batch(4, generator=gen)
    assert x.shape[2] == 8 and target.shape[2] == 6
    assert (mask.sum(1) == 3).all()
    for b in range(4):
        items = [x[b, t + 1:t + 4, :6] for t in range(x.shape[1]) if x[b, t, 6] == 1]
        q = int((x[b, :, 7] == 1).nonzero()[0])
        query = x[b, q + 1:q + 4, :6]
        j = [i for i, it in enumerate(items) if torch.equal(it, query)][0]
        torch.testing.assert_close(target[b][mask[b] == 1], items[j + 1])



def test_a_short_copy_run_learns(one_thread):
    """Lengths 1-3, 4 bits: after 300 steps the loss is well below the untrained model's
    (5.53 -> 1.99 nats per sequence with this seed)."""
    torch.manual_seed(0)
    core = MemoryCore(6, 4, memory_size=8, word_size=8, num_reads=1, hidden_size=32)
    untrained, trained = short_copy_run(core)
    assert trained < 0.5 * untrained, (untrained, trained)


def test_train_cli_writes_curves_and_metrics(tmp_path, one_thread):
    pytest.importorskip("matplotlib")
    import json

    from neuralmem_fast.apps.train import main

    argv = ["copy", "--model", "core,lstm", "--steps", "4", "--log-every", "2", "--max-len", "2",
            "--memory-size", "4", "--word-size", "4", "--hidden-size", "8", "--out", str(tmp_path), "--no-progress"]
    assert main(argv) == 0
    res = json.loads((tmp_path / "copy_metrics.json").read_text())
    assert [m["model"] for m in res["models"]] == ["core", "lstm"]
    for m in res["models"]:
        assert m["steps"] == [2, 4] and len(m["bits_wrong"]) == 2 and all(math.isfinite(v) for v in m["loss"])
    assert abs(res["models"][0]["params"] - res["models"][1]["params"]) < 0.1 * res["models"][0]["params"]
    assert (tmp_path / "copy_curves.png").stat().st_size > 0


# ------------------------------------------------------- bounded-memory backprop
@pytest.mark.parametrize("segment", [None, 1, 3])
def test_checkpointed_core_gradients_equal_plain_autograd(segment):
    from neuralmem_fast.nn import MemoryCore

    torch.manual_seed(3)
    kw = dict(input_size=5, output_size=4, memory_size=7, word_size=3, num_reads=2, num_writes=2, hidden_size=6,
              backend="torch")
    plain = MemoryCore(**kw, checkpoint=False).double()
    ckpt = MemoryCore(**kw, checkpoint=True, checkpoint_segment=segment).double()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(3, 8, 5, dtype=torch.float64)
    target = torch.randn(3, 8, 4, dtype=torch.float64)
    grads = []
    for core in (plain, ckpt):
        y, state = core(x)
        loss = ((y - target) ** 2).sum() + state.memory.square().sum()
        grads.append(torch.autograd.grad(loss, list(core.parameters())))
    assert ckpt.uses_checkpoint(3, 8, torch.float64) and not plain.uses_checkpoint(3, 8, torch.float64)
    for g1, g2 in zip(*grads):
        torch.testing.assert_close(g1, g2, rtol=0, atol=1e-10)


def test_checkpoint_auto_follows_the_copies_bytes_and_grad_mode():
    from neuralmem_fast.nn import MemoryCore
    from neuralmem_fast.nn.memory_core import CHECKPOINT_AUTO_BYTES

    core = MemoryCore(3, 3, memory_size=1000, word_size=64, num_reads=1)
    T = CHECKPOINT_AUTO_BYTES // (4 * 1000 * 64)  # float32 copies of one memory
    assert not core.uses_checkpoint(1, T)
    assert core.uses_checkpoint(1, T + 1)
    with torch.no_grad():
        assert not core.uses_checkpoint(1, T + 1)
    with pytest.raises(ValueError, match="checkpoint"):
        MemoryCore(3, 3, 8, 4, 1, checkpoint="yes")
    with pytest.raises(ValueError, match="checkpoint_segment"):
        MemoryCore(3, 3, 8, 4, 1, checkpoint_segment=0)
