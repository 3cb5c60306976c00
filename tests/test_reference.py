"""The faithful reference: hand-checked memory ops, agreement with the batched
op references and with the seed's own classes, and the fixes (MAML, read-only
evaluation, disjoint test data)."""
import math

import numpy as np
import pytest
import torch

from neuralmem_fast import ops
from neuralmem_fast.models import tutorial_reference as R
from tests.helpers import assert_close, load_seed, shape_id

LN3 = math.log(3.0)  # softmax([ln 3, 0]) = [3/4, 1/4]


@pytest.fixture(autouse=True)
def _one_thread():
    # Per-sample steps on tiny tensors: extra intra-op threads only add
    # synchronisation, which stalls on a busy machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def t64(x):
    return torch.tensor(x, dtype=torch.float64)


def bank_with(memory, usage=None, heads=1):
    memory = t64(memory)
    N, D = memory.shape
    bank = R.NeuralMemoryBank(R.MemoryConfig(memory_size=N, memory_dim=D, num_read_heads=heads)).double()
    bank.memory = memory
    if usage is not None:
        bank.usage = t64(usage)
    return bank


def tiny_agent(seed=0, seed_compat=False, dim=6):
    torch.manual_seed(seed)
    cfg = R.MemoryConfig(memory_size=8, memory_dim=4, num_read_heads=2)
    return R.ContinualLearningAgent(input_dim=dim, hidden_dim=8, config=cfg, seed_compat=seed_compat)


def fill_memory(agent, seed=1):
    g = torch.Generator().manual_seed(seed)
    agent.memory_bank.memory = torch.randn(agent.memory_bank.memory.shape, generator=g)
    agent.memory_bank.usage = torch.rand(agent.memory_bank.usage.shape, generator=g)


def stacked(data):
    xs, ys = zip(*data)
    return torch.stack(xs), torch.stack(ys)


# --------------------------------------------------------------------------
# hand-checked values on tiny inputs
# --------------------------------------------------------------------------
def test_addressing_hand_checked():
    bank = bank_with([[1.0, 0.0], [0.0, 1.0]])
    # the key is normalised: [2, 0] is [1, 0]; cosines [1, 0]
    w = bank.content_addressing(t64([2.0, 0.0]), t64(LN3))
    assert_close(w, t64([0.75, 0.25]), name="weights")
    # zero strength: uniform whatever the key
    assert_close(bank.content_addressing(t64([0.3, -5.0]), t64(0.0)), t64([0.5, 0.5]), name="weights beta=0")


def test_addressing_all_zero_memory_is_uniform():
    bank = bank_with([[0.0] * 3] * 4)
    for key, beta in (([1.0, 2.0, 3.0], 10.0), ([0.0, 0.0, 0.0], 1.0), ([-1.0, 0.0, 0.0], 1e4)):
        w = bank.content_addressing(t64(key), t64(beta))
        assert_close(w, t64([0.25] * 4), name=f"weights key={key} beta={beta}")


def test_zero_key_is_uniform():
    bank = bank_with([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    assert_close(bank.content_addressing(t64([0.0, 0.0]), t64(7.0)), t64([1 / 3] * 3), name="weights")


def test_read_hand_checked():
    bank = bank_with([[1.0, 0.0], [0.0, 1.0]], heads=2)
    reads = bank.read(t64([[1.0, 0.0], [0.0, 3.0]]), t64([LN3, LN3]))
    assert_close(reads, t64([0.75, 0.25, 0.25, 0.75]), name="reads")
    zero = bank_with([[0.0, 0.0]] * 3, heads=2)
    assert_close(zero.read(t64([[1.0, 0.0], [0.0, 1.0]]), t64([1.0, 1.0])), t64([0.0] * 4), name="reads zero memory")


def test_write_hand_checked():
    bank = bank_with([[1.0, 0.0], [0.0, 1.0]], usage=[1.0, 0.0])
    # w = [3/4, 1/4]; keep = 1 - w e^T = [[1/4, 5/8], [3/4, 7/8]]; add w a^T = [[3/2, -3], [1/2, -1]]
    bank.write(t64([1.0, 0.0]), t64([2.0, -4.0]), t64([1.0, 0.5]), t64([LN3]))
    assert_close(bank.memory, t64([[1.75, -3.0], [0.5, -0.125]]), name="memory")
    assert_close(bank.usage, t64([1.74, 0.25]), name="usage")


def test_write_all_zero_memory():
    bank = bank_with([[0.0] * 3] * 4)
    a = [0.4, -0.8, 1.2]
    bank.write(t64([1.0, 1.0, 1.0]), t64(a), t64([0.9, 0.1, 0.5]), t64([5.0]))
    # uniform weights: nothing to erase, each row gets a / N
    assert_close(bank.memory, t64([[x / 4 for x in a]] * 4), name="memory")
    assert_close(bank.usage, t64([0.25] * 4), name="usage")
    assert not bank.memory.requires_grad


def test_bank_rejects_several_write_heads():
    with pytest.raises(ValueError, match="num_write_heads"):
        R.NeuralMemoryBank(R.MemoryConfig(num_write_heads=2))


# --------------------------------------------------------------------------
# the bank and the batched op references agree (B=1, W=1)
# --------------------------------------------------------------------------
BANK_SHAPES = [(7, 3, 1), (16, 8, 4), (128, 64, 4)]


@pytest.mark.parametrize("N,D,H", BANK_SHAPES, ids=[shape_id(N=n, D=d, H=h, dtype=torch.float32)
                                                    for n, d, h in BANK_SHAPES])
def test_bank_matches_op_references(N, D, H):
    g = torch.Generator().manual_seed(N)
    bank = R.NeuralMemoryBank(R.MemoryConfig(memory_size=N, memory_dim=D, num_read_heads=H))
    bank.memory = torch.randn(N, D, generator=g)
    bank.usage = torch.rand(N, generator=g)
    keys = torch.randn(H, D, generator=g)
    strengths = torch.rand(H, generator=g) * 5
    m0, u0 = bank.memory.clone(), bank.usage.clone()

    w_ref = ops.content_addressing_ref(m0[None], keys[None], strengths[None])[0]
    for h in range(H):
        assert_close(bank.content_addressing(keys[h], strengths[h]), w_ref[h], name=f"weights head {h}")
    reads_ref = ops.content_read_ref(m0[None], keys[None], strengths[None])[0]
    assert_close(bank.read(keys, strengths), reads_ref.reshape(-1), name="reads")

    wk, wv, we, ws = torch.randn(D, generator=g), torch.randn(D, generator=g).tanh(), \
        torch.rand(D, generator=g), torch.rand(1, generator=g) * 5
    ww = ops.content_addressing_ref(m0[None], wk[None, None], ws[None])          # (1,1,N)
    mem_ref = ops.memory_write_ref(m0[None], ww, we[None, None], wv[None, None])[0]
    usage_ref = ops.usage_update_ref(u0[None], ww)[0]
    bank.write(wk, wv, we, ws)
    assert_close(bank.memory, mem_ref, name="memory")
    assert_close(bank.usage, usage_ref, name="usage")


# --------------------------------------------------------------------------
# the seed's classes as the oracle (skipped when the seed file is absent)
# --------------------------------------------------------------------------
def test_bank_equals_seed_outputs_and_grads():
    S = load_seed()
    g = torch.Generator().manual_seed(3)
    cfg = R.MemoryConfig()
    mem = torch.randn(cfg.memory_size, cfg.memory_dim, generator=g)
    sb, rb = S.NeuralMemoryBank(S.MemoryConfig()), R.NeuralMemoryBank(cfg)
    sb.memory, rb.memory = mem.clone(), mem.clone()
    keys = torch.randn(cfg.num_read_heads, cfg.memory_dim, generator=g)
    strengths = torch.rand(cfg.num_read_heads, generator=g) * 3
    grads = []
    for b in (sb, rb):
        k, s = keys.clone().requires_grad_(), strengths.clone().requires_grad_()
        out = b.read(k, s)
        out.pow(2).sum().backward()
        grads.append((out.detach(), k.grad, s.grad))
    for name, a, e in zip(("reads", "d keys", "d strengths"), grads[1], grads[0]):
        assert torch.equal(a, e), name
    for step in range(3):
        args = (torch.randn(cfg.memory_dim, generator=g), torch.randn(cfg.memory_dim, generator=g).tanh(),
                torch.rand(cfg.memory_dim, generator=g), torch.rand(1, generator=g) * 4)
        sb.write(*args)
        rb.write(*args)
        assert torch.equal(rb.memory, sb.memory), f"memory after write {step}"
        assert torch.equal(rb.usage, sb.usage), f"usage after write {step}"


def test_controller_equals_seed_outputs_and_grads():
    S = load_seed()
    torch.manual_seed(5)
    sc = S.MemoryController(64, 128, S.MemoryConfig())
    torch.manual_seed(5)
    rc = R.MemoryController(64, 128, R.MemoryConfig())
    for (n, p), (_, q) in zip(sc.named_parameters(), rc.named_parameters()):
        assert torch.equal(p, q), f"initial {n}"
    sb, rb = S.NeuralMemoryBank(S.MemoryConfig()), R.NeuralMemoryBank(R.MemoryConfig())
    data = R.create_task_data(2, 3)
    for i, (x, y) in enumerate(data):
        outs = []
        for c, b in ((sc, sb), (rc, rb)):
            c.zero_grad()
            pred, _ = c(x, b)
            torch.nn.functional.mse_loss(pred, y).backward()
            outs.append((pred.detach(), {n: p.grad for n, p in c.named_parameters()}))
        assert torch.equal(outs[1][0], outs[0][0]), f"output at step {i}"
        for n, ge in outs[0][1].items():
            ga = outs[1][1][n]
            assert (ga is None) == (ge is None), f"grad presence of {n}"
            assert ge is None or torch.equal(ga, ge), f"grad of {n} at step {i}"
        assert torch.equal(rb.memory, sb.memory) and torch.equal(rb.usage, sb.usage), f"memory at step {i}"


def test_agent_equals_seed_for_training_steps_and_evaluation():
    S = load_seed()
    torch.manual_seed(0)
    sa = S.ContinualLearningAgent()
    torch.manual_seed(0)
    ra = R.ContinualLearningAgent(seed_compat=True)
    train = S.create_task_data(1, 20)  # 20 steps: replay starts at the 18th
    for agent in (sa, ra):
        np.random.seed(7)
        agent.losses = [agent.train_step(x, y, use_replay=True) for x, y in train]
    assert ra.losses == sa.losses
    for (n, p), (_, q) in zip(sa.controller.named_parameters(), ra.controller.named_parameters()):
        assert torch.equal(q, p), n
    assert torch.equal(ra.memory_bank.memory, sa.memory_bank.memory)
    assert torch.equal(ra.memory_bank.usage, sa.memory_bank.usage)
    assert list(ra.replay_buffer.priorities) == list(sa.replay_buffer.priorities)
    # seed_compat evaluation writes exactly as the seed's does
    test = S.create_task_data(1, 5)
    assert ra.evaluate(test) == sa.evaluate(test)
    assert torch.equal(ra.memory_bank.memory, sa.memory_bank.memory)


def test_task_data_matches_seed():
    S = load_seed()
    for task in range(4):
        seed_data = S.create_task_data(task, 10)
        for mine in (R.create_task_data(task, 10, seed_compat=True), R.create_task_data(task, 10, "train")):
            for (xs, ys), (xm, ym) in zip(seed_data, mine):
                assert torch.equal(xm, xs) and torch.equal(ym, ys), f"task {task}"


# --------------------------------------------------------------------------
# fixes
# --------------------------------------------------------------------------
def test_evaluate_leaves_memory_and_usage_unchanged():
    agent = tiny_agent()
    fill_memory(agent)
    m0, u0 = agent.memory_bank.memory.clone(), agent.memory_bank.usage.clone()
    data = R.create_task_data(0, 5, "test", dim=6)
    e1 = agent.evaluate(data)
    assert torch.equal(agent.memory_bank.memory, m0) and torch.equal(agent.memory_bank.usage, u0)
    assert agent.evaluate(data) == e1  # and so evaluation is repeatable

    compat = tiny_agent(seed_compat=True)
    fill_memory(compat)
    compat.evaluate(data)
    assert not torch.equal(compat.memory_bank.memory, m0), "seed_compat evaluation should write"
    assert not torch.equal(compat.memory_bank.usage, u0)


@pytest.mark.parametrize("task", [0, 1, 2, 3])
def test_train_and_test_data_are_disjoint(task):
    train = torch.stack([x for x, _ in R.create_task_data(task, 50, "train")])
    test = torch.stack([x for x, _ in R.create_task_data(task, 20, "test")])
    # no test row equals (or nearly equals) any training row
    assert torch.cdist(test, train).min() > 1.0
    seed_train = torch.stack([x for x, _ in R.create_task_data(task, 50, "train", seed_compat=True)])
    seed_test = torch.stack([x for x, _ in R.create_task_data(task, 20, "test", seed_compat=True)])
    assert torch.equal(seed_test, seed_train[:20]), "under seed_compat the test set is the training prefix"
    assert torch.equal(train, seed_train), "the training split stays the seed's data"


def test_task_data_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    R.create_task_data(2, 4, "test")
    R.create_task_data(2, 4, "train")
    assert torch.equal(torch.rand(3), expected)
    with pytest.raises(ValueError, match="split"):
        R.create_task_data(0, 4, "validation")


def test_replay_private_rng_draws_as_global():
    pushes = [((torch.full((2,), float(i)), torch.zeros(2)), 0.1 + i) for i in range(30)]
    out = []
    for rng in (None, np.random.RandomState(11)):
        buf = R.ExperienceReplay(capacity=20, rng=rng)
        for exp, pr in pushes:
            buf.push(exp, pr)
        np.random.seed(11)
        samples, weights = buf.sample(8)
        out.append(([s[0][0].item() for s in samples], weights))
    assert out[0][0] == out[1][0] and torch.equal(out[0][1], out[1][1])
    assert len(set(out[0][0])) == 8 and min(out[0][0]) >= 10  # without replacement, capacity respected
    assert out[0][1].max().item() == 1.0


# --------------------------------------------------------------------------
# MAML
# --------------------------------------------------------------------------
def maml_setup(dtype=torch.float32):
    agent = tiny_agent(seed=4)
    agent.controller.to(dtype)
    fill_memory(agent)
    agent.memory_bank.to(dtype)
    sx, sy = stacked(R.create_task_data(2, 6, "train", dim=6))
    qx, qy = stacked(R.create_task_data(2, 4, "test", dim=6))
    return agent, (sx.to(dtype), sy.to(dtype), qx.to(dtype), qy.to(dtype))


@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
def test_maml_adaptation_lowers_support_loss_and_keeps_state(first_order):
    agent, (sx, sy, _, _) = maml_setup()
    ml = agent.meta_learner
    bank = agent.memory_bank
    m0, u0 = bank.memory.clone(), bank.usage.clone()
    p0 = {n: p.detach().clone() for n, p in agent.controller.named_parameters()}
    before = ml.loss(dict(agent.controller.named_parameters()), sx, sy).item()
    adapted = ml.adapt(sx, sy, 5, 0.05, first_order=first_order)  # the seed's positional signature
    after = ml.loss(adapted, sx, sy).item()
    assert after < 0.95 * before, (before, after)
    assert torch.equal(bank.memory, m0) and torch.equal(bank.usage, u0), "adaptation must not touch memory"
    for n, p in agent.controller.named_parameters():
        assert torch.equal(p, p0[n]), f"adapt changed the controller's own {n}"
    # the write heads are unused by read-only passes and stay as they were
    assert torch.equal(adapted["write_key.weight"], p0["write_key.weight"])
    assert not torch.equal(adapted["output.weight"], p0["output.weight"])


def test_maml_second_order_meta_gradient_matches_torch_func():
    agent, (sx, sy, qx, qy) = maml_setup(torch.float64)
    ml, steps, lr = agent.meta_learner, 2, 0.1
    params = dict(agent.controller.named_parameters())
    names = list(params)

    loss = ml.meta_loss([(sx, sy, qx, qy)], steps, lr, first_order=False)
    got = dict(zip(names, torch.autograd.grad(loss, list(params.values()), allow_unused=True)))

    def outer(p):  # the same objective through torch.func transforms, not create_graph
        for _ in range(steps):
            g = torch.func.grad(lambda q: ml.loss(q, sx, sy))(p)
            p = {k: p[k] - lr * g[k] for k in p}
        return ml.loss(p, qx, qy)

    want = torch.func.grad(outer)({k: v.detach() for k, v in params.items()})
    for n in names:
        if got[n] is None:
            assert want[n].abs().max() == 0, n
        else:
            assert_close(got[n], want[n], name=f"meta grad {n}")

    # first order: the query gradient at the adapted parameters, which differs
    fo = ml.meta_loss([(sx, sy, qx, qy)], steps, lr, first_order=True)
    got_fo = dict(zip(names, torch.autograd.grad(fo, list(params.values()), allow_unused=True)))
    adapted = {k: v.detach().requires_grad_() for k, v in ml.adapt(sx, sy, steps, lr, first_order=True).items()}
    q = dict(zip(names, torch.autograd.grad(ml.loss(adapted, qx, qy), list(adapted.values()), allow_unused=True)))
    assert_close(got_fo["output.weight"], q["output.weight"], name="first-order grad")
    assert_close(got_fo["lstm.weight_ih_l0"], q["lstm.weight_ih_l0"], name="first-order grad")
    assert not torch.allclose(got_fo["lstm.weight_ih_l0"], got["lstm.weight_ih_l0"], rtol=1e-3, atol=1e-9)


def test_meta_train_step_lowers_meta_loss_and_keeps_memory():
    agent, task = maml_setup()
    bank = agent.memory_bank
    m0, u0 = bank.memory.clone(), bank.usage.clone()
    ml = agent.meta_learner
    before = ml.meta_loss([task], 1, 0.05).item()
    opt = torch.optim.SGD(agent.controller.parameters(), lr=0.05)
    for _ in range(3):
        ml.meta_train([task], opt, num_steps=1, lr=0.05)
    assert ml.meta_loss([task], 1, 0.05).item() < before
    assert torch.equal(bank.memory, m0) and torch.equal(bank.usage, u0)
    # the agent's outer step (its own Adam) runs too
    out = agent.meta_train_step([task], num_steps=1, lr=0.05)
    assert math.isfinite(out) and agent.meta_optimizer is not None


def test_agent_adapt_then_evaluate():
    agent, _ = maml_setup()
    support = R.create_task_data(3, 8, "train", dim=6)
    test = R.create_task_data(3, 8, "test", dim=6)
    before = agent.evaluate(support)
    m0 = agent.memory_bank.memory.clone()
    params = agent.adapt(support, num_steps=5, lr=0.05)
    assert all(not p.requires_grad for p in params.values())
    assert agent.evaluate(support, params=params) < before
    assert math.isfinite(agent.evaluate(test, params=params))
    assert torch.equal(agent.memory_bank.memory, m0)


# --------------------------------------------------------------------------
# the demo loop
# --------------------------------------------------------------------------
@pytest.mark.parametrize("seed_compat", [False, True], ids=["fixed", "seed-compat"])
def test_run_continual_learning_tiny(seed_compat):
    agent = tiny_agent(seed_compat=seed_compat)
    run = R.run_continual_learning(agent, num_tasks=3, epochs=1, num_samples=7, test_samples=3,
                                   seed_compat=seed_compat, adapt_steps=1, adapt_shots=2, dim=6)
    E = run["error_matrix"]
    for t in range(3):
        for j in range(3):
            seen = j <= t
            if seen or not seed_compat:
                assert E[t][j] is not None and math.isfinite(E[t][j]), (t, j)
            else:
                assert E[t][j] is None, (t, j)
    assert len(agent.replay_buffer) == 21 and len(run["adapted_error"]) == 3
    assert [len(x) for x in run["train_loss"]] == [1, 1, 1]


def test_demo_function_fills_both_curves():
    cfg = R.MemoryConfig(memory_size=4, memory_dim=3, num_read_heads=1)
    res = R.run_continual_learning_demo(
        num_tasks=2, epochs=1, num_samples=10, test_samples=2, seed=3, log=None,
        agent_factory=lambda: R.ContinualLearningAgent(input_dim=5, hidden_dim=4, config=cfg), dim=5)
    assert res["tasks"] == [1, 2]
    assert len(res["with_memory"]) == len(res["without_memory"]) == 2
    # same seed, so the first task (no replay in either run) gives the same error
    assert res["with_memory"][0] == res["without_memory"][0]
    assert res["with_memory"][1] != res["without_memory"][1]
