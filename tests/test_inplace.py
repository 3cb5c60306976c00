"""In-place ops follow PyTorch's rules, and nothing answers wrong without a word.

Each test is written as a user's script was when the bug was found: it failed
before the fix (version counters that did not move, gradients dropped by
forward-only ops, aliased inputs that corrupted a write, a stale cache,
truncated second derivatives) and passes after it.
"""
import pytest
import torch

import neuralmem_fast as nm
from neuralmem_fast.models.tutorial_reference import MemoryConfig

BACKENDS = nm.available_backends("cpu")  # cpu, triton (interpreted), torch
INPLACE_OPS = ["memory_write_", "content_write_", "content_read_write_"]


def _write_args(B=1, N=64, D=8, W=1, H=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return dict(
        memory=r(B, N, D), usage=torch.rand(B, N, generator=g, dtype=dtype),
        read_keys=r(B, H, D), read_strengths=torch.full((B, H), 3.0, dtype=dtype),
        keys=r(B, W, D), strengths=torch.full((B, W), 4.0, dtype=dtype),
        weights=torch.softmax(r(B, W, N), -1), erase=torch.rand(B, W, D, generator=g, dtype=dtype),
        add=r(B, W, D),
    )


def _call(op, a, backend, **over):
    a = {**a, **over}
    if op == "memory_write_":
        return nm.memory_write_(a["memory"], a["weights"], a["erase"], a["add"], usage=a["usage"], backend=backend)
    if op == "content_write_":
        return nm.content_write_(a["memory"], a["keys"], a["strengths"], a["erase"], a["add"], usage=a["usage"],
                                 backend=backend)
    return nm.content_read_write_(a["memory"], a["read_keys"], a["read_strengths"], a["keys"], a["strengths"],
                                  a["erase"], a["add"], usage=a["usage"], backend=backend)


# ---------------------------------------------------------------- 1. versions
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", INPLACE_OPS)
def test_inplace_ops_bump_the_version_of_what_they_write(op, backend):
    a = _write_args()
    vm, vu = a["memory"]._version, a["usage"]._version
    _call(op, a, backend)
    assert a["memory"]._version > vm, f"{op} on {backend} left memory's version counter unchanged"
    assert a["usage"]._version > vu, f"{op} on {backend} left usage's version counter unchanged"


@pytest.mark.parametrize("op", ["content_write_", "content_read_write_", "memory_write_"])
def test_direct_torch_ops_calls_bump_the_version(op):
    a = _write_args()
    m, u = a["memory"], a["usage"]
    v = m._version
    if op == "memory_write_":
        torch.ops.neuralmem.memory_write_(m, a["weights"], a["erase"], a["add"])
    elif op == "content_write_":
        torch.ops.neuralmem.content_write_(m, u, a["keys"], a["strengths"], a["erase"], a["add"], 1e-12, 0.99)
    else:
        torch.ops.neuralmem.content_read_write_(m, u, a["read_keys"], a["read_strengths"], a["keys"], a["strengths"],
                                                a["erase"], a["add"], 1e-12, 0.99)
    assert m._version > v


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_then_inplace_write_ten_times_raises_pytorchs_inplace_error(backend):
    """The user's pattern: learnable read keys over a memory then written in place.

    Before the fix the native backend ran to the end and returned gradients
    34% off; PyTorch's rule is an error at backward."""
    torch.manual_seed(0)
    N, D = 64 if backend != "triton" else 16, 8
    memory = torch.randn(1, N, D)
    keys = torch.randn(1, 2, D, requires_grad=True)
    total = 0
    for _ in range(10):
        total = total + nm.content_read(memory, keys, torch.full((1, 2), 5.0), backend=backend).sum()
        nm.content_write_(memory, torch.randn(1, 1, D), torch.ones(1, 1), torch.rand(1, 1, D), torch.randn(1, 1, D),
                          backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        total.backward()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", INPLACE_OPS)
def test_inplace_op_on_a_leaf_that_requires_grad_raises(op, backend):
    a = _write_args()
    a["memory"].requires_grad_(True)
    before = a["memory"].detach().clone()
    with pytest.raises(RuntimeError, match="a leaf Variable that requires grad is being used in an in-place"):
        _call(op, a, backend)
    assert torch.equal(a["memory"].detach(), before), "the refused write changed the leaf"
    with torch.no_grad():  # as in an optimizer step, allowed
        _call(op, a, backend)


# ---------------------------------------------------- 2. forward-only ops
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op,arg", [("content_write_", "keys"), ("content_write_", "add"),
                                    ("memory_write_", "weights"), ("content_read_write_", "read_keys"),
                                    ("content_read_write_", "strengths")])
def test_forward_only_op_refuses_inputs_that_require_grad(op, arg, backend):
    a = _write_args()
    a[arg] = a[arg].clone().requires_grad_(True)
    before = a["memory"].clone()
    alternative = "memory_write" if op != "content_read_write_" else "content_read"
    with pytest.raises(RuntimeError, match=f"forward-only.*requires grad.*{alternative}"):
        _call(op, a, backend)
    assert torch.equal(a["memory"], before), "the refused write changed the memory"
    with torch.no_grad():
        _call(op, a, backend)
    _call(op, {**a, arg: a[arg].detach()}, backend)


def test_content_write_inside_a_training_graph_no_longer_drops_the_write_heads_gradient():
    """A memory that requires grad (a non-leaf in a graph) cannot be written in place."""
    base = torch.randn(1, 32, 8, dtype=torch.float64, requires_grad=True)
    memory = base * 1.0
    keys = torch.randn(1, 1, 8, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="forward-only"):
        nm.content_write_(memory, keys, torch.ones(1, 1, dtype=torch.float64), torch.rand(1, 1, 8, dtype=torch.float64),
                          torch.randn(1, 1, 8, dtype=torch.float64))


def test_content_read_write_with_keys_that_require_grad_raises_instead_of_returning_detached_reads():
    a = _write_args()
    k = a["read_keys"].clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="forward-only"):
        nm.content_read_write_(a["memory"], k, a["read_strengths"], a["keys"], a["strengths"], a["erase"], a["add"])


# ------------------------------------------------------------- 5. overlap
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op,arg", [("content_write_", "keys"), ("content_write_", "erase"),
                                    ("content_write_", "add"), ("memory_write_", "add"),
                                    ("memory_write_", "erase"), ("content_read_write_", "keys"),
                                    ("content_read_write_", "read_keys")])
def test_an_input_that_views_a_memory_row_is_refused(op, arg, backend):
    """Before: key = mem[:, 0:1] gave usage summing to ~2400 instead of 1."""
    a = _write_args(N=64 if backend != "triton" else 16)
    rows = 2 if arg == "read_keys" else 1  # two read heads
    a[arg] = a["memory"][:, 0:rows] if arg != "erase" else a["memory"][:, 0:1].sigmoid_()
    before_m, before_u = a["memory"].clone(), a["usage"].clone()
    with pytest.raises(RuntimeError, match=f"{arg} shares memory with memory"):
        _call(op, a, backend)
    assert torch.equal(a["memory"], before_m) and torch.equal(a["usage"], before_u), "a refused call wrote"


@pytest.mark.parametrize("backend", BACKENDS)
def test_usage_sharing_storage_with_memory_is_refused(backend):
    a = _write_args(N=8, D=8)
    store = torch.zeros(1, 9 * 8, dtype=torch.float64)
    memory, usage = store[:, :64].view(1, 8, 8), store[:, 60:68]  # usage's first 4 slots are memory's last 4 values
    memory.copy_(a["memory"])
    with pytest.raises(RuntimeError, match="usage shares memory with memory"):
        nm.content_write_(memory, a["keys"], a["strengths"], a["erase"], a["add"], usage=usage, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_disjoint_views_of_one_buffer_are_accepted(backend):
    """Overlap means shared elements, not a shared allocation."""
    store = torch.randn(2, 1, 16, 8, dtype=torch.float64)
    memory, keys = store[0], store[1, :, :1]
    want = memory.clone()
    nm.content_write_(want, keys.clone(), torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, 1, 8,
                      dtype=torch.float64), keys.clone(), backend="torch")
    nm.content_write_(memory, keys, torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, 1, 8, dtype=torch.float64),
                      keys, backend=backend)
    torch.testing.assert_close(memory, want)


def test_bank_write_of_its_own_row_matches_the_seeds_out_of_place_write():
    """bank.write(bank.memory[0], ...): usage summed to 1.00046 before."""
    torch.manual_seed(0)
    cfg = MemoryConfig(memory_size=4096, memory_dim=16, num_read_heads=1)
    bank = nm.NeuralMemoryBank(cfg)
    bank.memory.copy_(torch.randn(4096, 16))
    want = nm.NeuralMemoryBank(cfg, backend="torch")
    want.memory.copy_(bank.memory)
    for b in (bank, want):
        b.write(b.memory[0], torch.randn(16, generator=torch.Generator().manual_seed(1)),
                torch.rand(16, generator=torch.Generator().manual_seed(2)), torch.tensor([10.0]))
    torch.testing.assert_close(bank.usage.sum(), torch.tensor(1.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(bank.memory, want.memory, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------- 3. torch.compile
def _compile_cases():
    B, N, D, H = 1, 16, 8, 2
    g = torch.Generator().manual_seed(0)
    m = torch.randn(B, N, D, generator=g)
    k = torch.randn(B, H, D, generator=g)
    s = torch.rand(B, H, generator=g) + 1
    w = torch.softmax(torch.randn(B, H, N, generator=g), -1)
    e, a = torch.rand(B, H, D, generator=g), torch.randn(B, H, D, generator=g)
    u = torch.rand(B, N, generator=g)
    return {
        "content_addressing": (lambda m, k, s: nm.content_addressing(m, k, s), (m, k, s)),
        "memory_read": (lambda m, w: nm.memory_read(m, w), (m, w)),
        "content_read": (lambda m, k, s: nm.content_read(m, k, s), (m, k, s)),
        "memory_write": (lambda m, w, e, a: nm.memory_write(m, w, e, a), (m, w, e, a)),
        "usage_update": (lambda u, w: nm.usage_update(u, w), (u, w)),
        "memory_write_": (lambda m, w, e, a: nm.memory_write_(m, w, e, a), (m, w, e, a)),
        "content_write_": (lambda m, k, s, e, a, u: nm.content_write_(m, k, s, e, a, usage=u), (m, k, s, e, a, u)),
        "content_read_write_": (lambda m, k, s, e, a, u: nm.content_read_write_(m, k, s, k, s, e, a, usage=u),
                                (m, k, s, e, a, u)),
    }


@pytest.mark.parametrize("op", list(_compile_cases()))
def test_every_public_op_compiles_fullgraph_with_the_default_backend(op):
    """Before: `Failed to trace builtin operator open` (the backend table was read inside the trace)."""
    torch._dynamo.reset()
    fn, args = _compile_cases()[op]
    eager_args = [t.clone() for t in args]
    want = fn(*eager_args)
    comp_args = [t.clone() for t in args]
    got = torch.compile(fn, fullgraph=True, backend="eager")(*comp_args)
    flat = lambda x: [t for t in (x if isinstance(x, tuple) else (x,)) if t is not None]  # noqa: E731
    for g_, w_ in zip(flat(got), flat(want)):
        torch.testing.assert_close(g_, w_)
    for g_, w_ in zip(comp_args, eager_args):  # the in-place ops wrote the same memory and usage
        torch.testing.assert_close(g_, w_)


def test_bank_read_and_write_compile_fullgraph():
    torch._dynamo.reset()
    cfg = MemoryConfig(memory_size=16, memory_dim=8, num_read_heads=2)
    bank = nm.NeuralMemoryBank(cfg)
    bank.memory.copy_(torch.randn(16, 8))
    k, s = torch.randn(2, 8), torch.rand(2) + 1
    want = bank.read(k, s)
    got = torch.compile(bank.read, fullgraph=True, backend="eager")(k, s)
    torch.testing.assert_close(got, want)
    ref = nm.NeuralMemoryBank(cfg)
    ref.memory.copy_(bank.memory)
    w = (torch.randn(8), torch.randn(8), torch.rand(8), torch.tensor([2.0]))
    ref.write(*w)
    torch.compile(bank.write, fullgraph=True, backend="eager")(*w)
    torch.testing.assert_close(bank.memory, ref.memory)
    torch.testing.assert_close(bank.usage, ref.usage)


# ------------------------------------------------------ 4. bank inputs
def test_bank_checks_the_read_head_count_against_its_config():
    bank = nm.NeuralMemoryBank(MemoryConfig(memory_size=16, memory_dim=8, num_read_heads=2))
    with pytest.raises(ValueError, match="num_read_heads=2"):
        bank.read(torch.randn(3, 8), torch.rand(3))
    with pytest.raises(ValueError, match="num_read_heads=2"):
        bank.read(torch.randn(8), torch.rand(1))
    assert bank.read(torch.randn(2, 8), torch.rand(2)).shape == (16,)
    assert bank.read(torch.randn(5, 2, 8), torch.rand(5, 2)).shape == (5, 16)


@pytest.mark.parametrize("strength", [3.0, 3, torch.tensor(3.0), torch.tensor([3.0])], ids=["float", "int", "0d", "1d"])
def test_bank_write_accepts_the_strengths_the_tutorial_passes(strength):
    bank = nm.NeuralMemoryBank(MemoryConfig(memory_size=16, memory_dim=8, num_read_heads=1))
    ref = nm.NeuralMemoryBank(MemoryConfig(memory_size=16, memory_dim=8, num_read_heads=1))
    bank.memory.copy_(torch.randn(16, 8))
    ref.memory.copy_(bank.memory)
    w = (torch.randn(8), torch.randn(8), torch.rand(8))
    bank.write(*w, strength)
    ref.write(*w, torch.tensor([3.0]))
    torch.testing.assert_close(bank.memory, ref.memory)


def test_bank_write_strength_errors_are_clear():
    bank = nm.NeuralMemoryBank(MemoryConfig(memory_size=16, memory_dim=8, num_read_heads=1))
    with pytest.raises(TypeError, match="write_strength must be a torch.Tensor"):
        bank.write(torch.randn(8), torch.randn(8), torch.rand(8), "3")
    with pytest.raises(ValueError, match="write_strength must hold one strength per key"):
        bank.write(torch.randn(8), torch.randn(8), torch.rand(8), torch.ones(2))


@pytest.mark.parametrize("arg", ["write_key", "write_vector", "erase_vector", "write_strength"])
def test_bank_dtype_errors_name_the_argument(arg):
    bank = nm.NeuralMemoryBank(MemoryConfig(memory_size=16, memory_dim=8, num_read_heads=1))
    a = dict(write_key=torch.randn(8), write_vector=torch.randn(8), erase_vector=torch.rand(8),
             write_strength=torch.ones(1))
    a[arg] = a[arg].double()
    before = bank.memory.clone()
    with pytest.raises(TypeError, match=f"{arg} must have the dtype of the memory"):
        bank.write(**a)
    assert torch.equal(bank.memory, before)
    with pytest.raises(TypeError, match="read_keys must have the dtype of the memory"):
        bank.read(torch.randn(1, 8, dtype=torch.float64), torch.ones(1))


# ------------------------------------------------ 6. second derivatives
def _hvp_fd_check(bank_read, keys, strengths):
    """Hessian-vector product of a read's loss in the keys against central differences."""
    g = torch.Generator().manual_seed(5)
    target = torch.randn(bank_read(keys, strengths).shape, generator=g, dtype=keys.dtype)
    v = torch.randn(keys.shape, generator=g, dtype=keys.dtype)

    def grad_k(k):
        k = k.detach().requires_grad_(True)
        loss = ((bank_read(k, strengths) - target) ** 2).sum()
        return torch.autograd.grad(loss, k)[0]

    k = keys.detach().requires_grad_(True)
    loss = ((bank_read(k, strengths) - target) ** 2).sum()
    (gk,) = torch.autograd.grad(loss, k, create_graph=True)
    (hvp,) = torch.autograd.grad((gk * v).sum(), k)
    h = 1e-5
    fd = (grad_k(keys + h * v) - grad_k(keys - h * v)) / (2 * h)
    torch.testing.assert_close(hvp, fd, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bank_read_hessian_vector_product_matches_finite_differences(backend):
    """Before: the torch-path bank's hand-written read backward dropped key-key terms (off by 0.50)."""
    torch.manual_seed(0)
    cfg = MemoryConfig(memory_size=12, memory_dim=5, num_read_heads=3)
    bank = nm.NeuralMemoryBank(cfg, backend=backend).double()
    bank.memory.copy_(torch.randn(12, 5, dtype=torch.float64))
    keys = torch.randn(3, 5, dtype=torch.float64)
    strengths = torch.tensor([1.5, 4.0, 9.0], dtype=torch.float64)
    _hvp_fd_check(bank.read, keys, strengths)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["content_read", "content_addressing"])
def test_op_hessian_vector_product_matches_finite_differences(op, backend):
    torch.manual_seed(0)
    memory = torch.randn(2, 9, 5, dtype=torch.float64)
    keys = torch.randn(2, 3, 5, dtype=torch.float64)
    strengths = torch.tensor([[1.5, 4.0, 9.0], [0.5, 2.0, 20.0]], dtype=torch.float64)
    fn = getattr(nm, op)
    _hvp_fd_check(lambda k, s: fn(memory, k, s, backend=backend), keys, strengths)


# ------------------------------------------------------ 9. stale caches
@pytest.mark.parametrize("how", ["data_copy", "numpy"])
def test_torch_path_bank_reads_the_memory_as_it_is_now(how):
    """Before: a cache keyed on the version counter returned the old normalised memory (off by 1.09)."""
    torch.manual_seed(0)
    cfg = MemoryConfig(memory_size=16, memory_dim=8, num_read_heads=2)
    bank = nm.NeuralMemoryBank(cfg, backend="torch")
    bank.memory.copy_(torch.randn(16, 8))
    k, s = torch.randn(2, 8, requires_grad=True), torch.full((2,), 5.0)
    bank.read(k, s)
    new = torch.randn(16, 8)
    if how == "data_copy":
        bank.memory.data.copy_(new)
    else:
        bank.memory.numpy()[:] = new.numpy()
    got = bank.read(k, s)
    want = nm.content_read_ref(new.unsqueeze(0), k.unsqueeze(0), s.unsqueeze(0)).reshape(-1)
    torch.testing.assert_close(got, want)
