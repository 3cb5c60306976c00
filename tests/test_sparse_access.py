"""Sparse access (nn/sparse_access.py): the in-place memory and its tape against a dense, out-of-place
reference restricted to the same slots, in float64; gradcheck; what the backward stores; the LRU write
set; reset; bad input; and a short sparse copy run that learns."""
import functools

import pytest
import torch

from .helpers import short_copy_run

from neuralmem_fast import ops
from neuralmem_fast.nn import MemoryAccess, MemoryCore
from neuralmem_fast.nn.sparse_access import SparseAccessState
from neuralmem_fast.ops import sparse as sops

F64 = torch.float64


def _run_sparse(acc, flat, B, init=None):
    """T steps of the sparse access from a zero memory (or `init`); returns the reads (T,B,R,D), per step
    (LRU slot, write slots, read slots[, the write keys' candidates]) and the state."""
    st = acc.initial_state(B, dtype=flat.dtype)
    if init is not None:
        st.memory.copy_(init)
    outs, rec, cands = [], [], []
    write_set = acc.sparse._content_write_set

    def spy(state, cand, dtype):
        cands.append(cand.clone())
        return write_set(state, cand, dtype)

    acc.sparse._content_write_set = spy
    try:
        for t in range(flat.shape[0]):
            oldest = sops.lru_oldest(st.links, 1)      # the slot the step allocates
            r, st = acc(acc.parse_interface(flat[t]), st)
            outs.append(r)
            rec.append((oldest,) + tuple(s.clone() for s in st.tape.slots[-1]) + tuple(cands[t:]))
    finally:
        del acc.sparse._content_write_set
    return torch.stack(outs), rec, st


def _run_dense_reference(acc, flat, B, rec):
    """The same steps on a dense memory, out of place, through plain autograd: dense write weights
    (the previous reads averaged over the heads, or each write key's softmax over its recorded
    candidates, and the LRU slot), memory_write_ref over all N slots, and the softmax read over the
    recorded candidates. Candidates must be the exact top-K of the dense memory."""
    N, D, R, K, eps = acc.memory_size, acc.word_size, acc.num_reads, acc.sparse_k, acc.sparse.eps
    W = acc.num_writes
    mem = torch.zeros(B, N, D, dtype=flat.dtype)
    prev_idx = torch.full((B, R, K), -1)
    prev_w = torch.zeros(B, R, K, dtype=flat.dtype)
    outs = []

    def gather(slots, keys):
        """The rows of slots (B,H,K) of the dense memory, after checking they are the keys' exact top K."""
        H = slots.shape[1]
        exact, _ = sops.cosine_topk_ref(mem.detach(), keys.detach(), K, eps)
        got = torch.einsum("bhkd,bhd->bhk",
                           torch.nn.functional.normalize(mem.detach(), dim=-1, eps=eps).gather(
                               1, slots.reshape(B, -1, 1).expand(B, H * K, D)).reshape(B, H, K, D),
                           torch.nn.functional.normalize(keys.detach(), dim=-1, eps=eps))
        torch.testing.assert_close(got, exact, atol=1e-9, rtol=0)
        return mem.gather(1, slots.reshape(B, H * K, 1).expand(B, H * K, D)).reshape(B, H, K, D)

    for t in range(flat.shape[0]):
        it = acc.parse_interface(flat[t])
        oldest, w_slots, r_slots = rec[t][:3]
        if acc.write_rule == "content":
            cand = rec[t][3]
            _, cw = sops.sparse_read_ref(gather(cand, it.write_keys), it.write_keys, it.write_strengths, eps)
            base = torch.zeros(B, W, N, dtype=flat.dtype).scatter_add(2, cand, cw)
        else:
            assert torch.equal(oldest[:, 0], w_slots[:, -1])
            valid = prev_idx >= 0
            base = torch.zeros(B, N, dtype=flat.dtype).scatter_add(
                1, prev_idx.clamp(min=0).reshape(B, -1), (prev_w * valid).reshape(B, -1) / R).unsqueeze(1)
        lru = torch.zeros(B, N, dtype=flat.dtype).scatter(1, oldest, 1.0)
        g_w, g_a = it.write_gates.unsqueeze(-1), it.allocation_gates.unsqueeze(-1)
        wd = g_w * ((1 - g_a) * base + g_a * lru.unsqueeze(1))
        inset = torch.zeros(B, N, dtype=torch.bool).scatter(1, w_slots, True)
        assert not ((wd.detach().abs().sum(1) > 0) & ~inset).any(), "a dense write weight outside the write set"
        mem = ops.memory_write_ref(mem, wd, it.erase_vectors, it.write_vectors)
        reads, w = sops.sparse_read_ref(gather(r_slots, it.read_keys), it.read_keys, it.read_strengths, eps)
        outs.append(reads)
        prev_idx, prev_w = r_slots, w
    return torch.stack(outs)


def _index_kinds():
    from neuralmem_fast.nn.sparse_index import has_faiss

    return ["exact", "rows", "auto", "rows-full-scan"] + (["faiss"] if has_faiss() else [])


def _index(kind, eps):
    """An index spec for MemoryAccess: "rows-full-scan" is a RowIndex factory whose every search is the
    in-place scan, with the access's eps."""
    from neuralmem_fast.nn.sparse_access import RowIndex

    return functools.partial(RowIndex, full_scan=0.0, eps=eps) if kind == "rows-full-scan" else kind


@pytest.mark.parametrize("rule", ["previous_reads", "content"])
@pytest.mark.parametrize("eps", [1e-3, 0.5])
@pytest.mark.parametrize("index", _index_kinds())
@pytest.mark.parametrize("B,N,D,R,W,K,T", [(2, 64, 5, 2, 1, 3, 6), (1, 40, 4, 1, 2, 2, 9), (3, 200, 3, 3, 1, 4, 5)])
def test_sparse_steps_equal_the_dense_reference_on_the_same_slots(B, N, D, R, W, K, T, index, eps, rule):
    """With the faiss index the zero rows come from the LRU list instead of the lowest slots: other
    slots of equal score, so the reference checks scores, not slot numbers. eps=0.5 puts the rows the
    steps write from zero on both sides of the norm floor."""
    torch.manual_seed(B * 100 + N)
    acc = MemoryAccess(N, D, R, W, sparse_k=K, index=_index(index, eps), sparse_eps=eps, write_rule=rule)
    flat = torch.randn(T, B, acc.interface_size, dtype=F64, requires_grad=True)
    ys, rec, st = _run_sparse(acc, flat, B)
    yr = _run_dense_reference(acc, flat, B, rec)
    torch.testing.assert_close(ys, yr, atol=1e-12, rtol=0)
    g = torch.randn_like(ys)
    gs, = torch.autograd.grad(ys, flat, g)
    gr, = torch.autograd.grad(yr, flat, g)
    torch.testing.assert_close(gs, gr, atol=1e-12, rtol=1e-10)
    assert gs.abs().max() > 1e-3  # the gradient is not trivially zero
    for _, w, *_ in rec:
        sops.check_unique_rows(w)   # the write set's slots are distinct
    if rule == "content":           # the write keys and strengths receive a gradient
        wk = gs[..., R * D:R * D + W * D]
        assert wk.abs().max() > 1e-6


@pytest.mark.parametrize("rule", ["previous_reads", "content"])
def test_gradcheck_through_the_memory_of_several_steps(rule):
    """From a random memory: rows written from zero by one add vector are parallel, so their cosines tie
    exactly and a perturbation would swap which of them make the top K (a kink, not a gradient error)."""
    torch.manual_seed(3)
    B, N, D, R, K, T = 2, 48, 4, 2, 3, 4
    acc = MemoryAccess(N, D, R, 1, sparse_k=K, index="exact", write_rule=rule)
    flat = torch.randn(T, B, acc.interface_size, dtype=F64, requires_grad=True)
    init = torch.randn(B, N, D, dtype=F64)
    assert torch.autograd.gradcheck(lambda f: _run_sparse(acc, f, B, init)[0], (flat,), atol=1e-6)


def test_loss_at_a_late_step_reaches_the_writes_of_an_early_one():
    torch.manual_seed(4)
    B, N, D, R, K, T = 1, 64, 6, 1, 4, 6
    acc = MemoryAccess(N, D, R, 1, sparse_k=K, index="exact")
    flat = torch.randn(T, B, acc.interface_size, dtype=F64, requires_grad=True)
    ys, _, _ = _run_sparse(acc, flat, B)
    g, = torch.autograd.grad(ys[-1].sum(), flat)
    R_, W = acc.num_reads, acc.num_writes
    # the first step's write vector lies at [R*D + W*D, R*D + 2*W*D) of the flat interface
    wv = g[0, :, R_ * D + W * D:R_ * D + 2 * W * D]
    assert wv.abs().max() > 1e-6


def test_the_backward_stores_per_step_rows_not_the_memory():
    """The bytes autograd keeps for T steps do not grow with N (they would by N*D per step if dense)."""
    def saved_bytes(N):
        torch.manual_seed(0)
        core = MemoryCore(5, 3, N, 8, 2, sparse_k=4, index="exact")
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y, _ = core(torch.randn(2, 10, 5))
        y.sum().backward()
        return total[0]

    small, large = saved_bytes(256), saved_bytes(8192)
    assert large == small, (small, large)
    assert large < 2 * 10 * 8192 * 8 * 4 / 4  # far below a quarter of one dense copy per step


def test_repeated_backward_passes_agree_and_create_graph_raises():
    torch.manual_seed(5)
    acc = MemoryAccess(64, 4, 2, 1, sparse_k=3, index="exact")
    flat = torch.randn(5, 2, acc.interface_size, dtype=F64, requires_grad=True)
    ys, _, _ = _run_sparse(acc, flat, 2)
    g1, = torch.autograd.grad(ys.sum(), flat, retain_graph=True)
    g2, = torch.autograd.grad(ys.sum(), flat, retain_graph=True)
    torch.testing.assert_close(g1, g2, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="create_graph"):
        torch.autograd.grad(ys.sum(), flat, create_graph=True)


def test_inference_records_nothing_and_reset_zeroes_what_was_written():
    torch.manual_seed(6)
    core = MemoryCore(5, 3, 512, 8, 2, sparse_k=4, index="exact")
    with torch.no_grad():
        _, st = core(torch.randn(3, 12, 5))
    assert st.access.tape.steps == 0
    assert st.access.memory.abs().sum() > 0
    _, st2 = core(torch.randn(3, 4, 5))          # no state: the core's buffer, reset
    assert st2.access.memory is st.access.memory
    fresh = core.access.sparse.reset(st2.access)
    assert fresh.memory.abs().sum() == 0
    assert fresh.written.count == 0


def test_the_lru_slot_is_the_least_recently_used_and_writes_touch_it():
    acc = MemoryAccess(64, 4, 1, 1, sparse_k=2, index="exact")
    st = acc.initial_state(1, dtype=F64)
    flat = torch.randn(3, 1, acc.interface_size, dtype=F64)
    seen = []
    for t in range(3):
        oldest = int(sops.lru_oldest(st.links, 1)[0, 0])
        _, st = acc(acc.parse_interface(flat[t]), st)
        w_slots, r_slots = st.tape.slots[-1] if st.tape.steps else (None, None)
        seen.append(oldest)
        order = sops.lru_order(st.links)
        assert order.index(oldest) >= 64 - 2 * 3  # just touched: among the most recent
    assert len(set(seen)) == 3


@pytest.mark.parametrize("kwargs,match", [
    (dict(sparse_k=0), "sparse_k must be a positive int"),
    (dict(sparse_k=100), r"sparse_k \(100\) must be at most memory_size"),
    (dict(sparse_k=8), r"needs memory_size >= 4\*\(num_reads\*sparse_k\+1\)"),
    (dict(sparse_k=2, index="annoy"), "index must be"),
])
def test_bad_sparse_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MemoryAccess(64, 4, 2, 1, **kwargs)


def test_bad_interface_and_state_raise_and_leave_the_memory():
    acc = MemoryAccess(64, 4, 2, 1, sparse_k=3, index="exact")
    st = acc.initial_state(2)
    it = acc.parse_interface(torch.randn(2, acc.interface_size))
    acc(it, st)
    before = st.memory.clone()
    bad = it._replace(read_keys=torch.full_like(it.read_keys, float("nan")))
    with pytest.raises(ValueError, match="read_keys: contains NaN or inf"):
        acc(bad, st)
    torch.testing.assert_close(st.memory, before, atol=0, rtol=0)
    with pytest.raises(TypeError, match="SparseAccessState"):
        acc(it, acc.__class__(64, 4, 2, 1).initial_state(2))
    m = st.memory
    st_bad = SparseAccessState(m.clone().requires_grad_(True), st.links, st.read_indices, st.read_weights,
                               st.index, st.tape, st.token, st.written)
    with pytest.raises(ValueError, match="cannot require grad"):
        acc(it, st_bad)


@pytest.mark.parametrize("index", _index_kinds())
def test_a_faint_copy_of_a_row_does_not_split_its_read(index):
    """Slot 0 holds a row, slots 1-3 faint copies of it (what a write through a weight of 1e-5 leaves).
    A key equal to the row reads slot 0 with the default norm floor; a plain cosine (eps=1e-12) scores
    all four alike and splits the read four ways, which is what broke the sparse core's copy training."""
    from neuralmem_fast.nn.access import AccessInterface

    def read(eps):
        torch.manual_seed(0)
        N, D, K = 40, 6, 4
        acc = MemoryAccess(N, D, 1, 1, sparse_k=K, index=_index(index, eps), sparse_eps=eps)
        row = torch.randn(D, dtype=F64) + 2
        mem = torch.zeros(1, N, D, dtype=F64)
        mem[0, 0], mem[0, 1:4] = row, 1e-5 * row
        st = acc.sparse.initial_state(1, memory=mem)
        z = torch.zeros(1, 1, dtype=F64)
        it = AccessInterface(row.reshape(1, 1, D), torch.full((1, 1), 10.0, dtype=F64), row.reshape(1, 1, D),
                             z + 1, torch.zeros(1, 1, D, dtype=F64), torch.zeros(1, 1, D, dtype=F64), z, z, z)
        reads, st = acc(it, st)
        w = st.read_weights[0, 0]
        return w[st.read_indices[0, 0] == 0].sum().item(), reads[0, 0], row

    w0, reads, row = read(1e-3)
    assert w0 > 0.999, w0
    torch.testing.assert_close(reads, row, atol=1e-3 * row.norm().item(), rtol=0)
    w_plain, _, _ = read(1e-12)
    assert abs(w_plain - 0.25) < 1e-6, w_plain


def test_sparse_eps_must_be_positive_and_match_the_index():
    from neuralmem_fast.nn.sparse_access import RowIndex

    for bad in (0.0, -1.0, float("nan"), float("inf"), True, "1e-3"):
        with pytest.raises(ValueError, match="sparse_eps"):
            MemoryAccess(64, 4, 1, 1, sparse_k=2, sparse_eps=bad)
    acc = MemoryAccess(64, 4, 1, 1, sparse_k=2, index=lambda: RowIndex(eps=1e-12))
    with pytest.raises(ValueError, match=r"index: its eps \(1e-12\) differs from sparse_eps"):
        acc.initial_state(1)


def test_exact_and_reference_candidates_agree_on_ties_of_zero_rows():
    """A zero memory: every slot scores 0; the exact top-K takes the lowest slots, as a stable sort."""
    mem = torch.zeros(1, 50, 4)
    keys = torch.randn(1, 2, 4)
    s, i = sops.cosine_topk(mem, keys, 5)
    assert i.tolist() == [[[0, 1, 2, 3, 4]] * 2]
    assert (s == 0).all()



def test_a_short_sparse_copy_run_learns(one_thread):
    """Lengths 1-3, 4 bits, N=256 with K=4: after 300 steps the loss is well below the untrained model's."""
    torch.manual_seed(0)
    core = MemoryCore(6, 4, memory_size=256, word_size=8, num_reads=1, hidden_size=32, sparse_k=4, index="exact")
    untrained, trained = short_copy_run(core)
    assert trained < 0.5 * untrained, (untrained, trained)


@pytest.mark.parametrize("rule,field", [("previous_reads", "read_keys"), ("content", "read_keys"),
                                        ("content", "write_keys"), ("content", "write_strengths")])
def test_non_finite_keys_from_the_controller_raise_before_any_write(rule, field):
    acc = MemoryAccess(64, 4, 2, 1, sparse_k=3, index="exact", write_rule=rule)
    st = acc.initial_state(2)
    it = acc.parse_interface(torch.randn(2, acc.interface_size))
    _, st = acc(it, st)
    before = st.memory.clone()
    bad = it._replace(**{field: torch.full_like(getattr(it, field), float("inf"))})
    with pytest.raises(ValueError, match=f"{field}: contains NaN or inf"):
        acc(bad, st, validate=False)
    torch.testing.assert_close(st.memory, before, atol=0, rtol=0)


def test_the_content_write_set_holds_every_candidate_and_the_lru_slot_once():
    """Candidates shared by the two write heads and the least recently used slot among them: the set
    still has W K + 1 distinct slots, each candidate's position holds it, and the LRU mark is on one."""
    acc = MemoryAccess(64, 4, 1, 2, sparse_k=3, index="exact", write_rule="content")
    st = acc.initial_state(2, dtype=F64)
    order = sops.lru_order(st.links)
    o0, o1 = order[0], order[1]                 # the two least recently used slots of batch 0
    cand = torch.tensor([[[o0, 9, 12], [12, 9, o1]],     # batch 0: LRU slot and a shared pair
                         [[30, 31, 32], [33, 34, 35]]])  # batch 1: distinct, LRU slot not among them
    slots, pos, lru = acc.sparse._content_write_set(st, cand, F64)
    assert slots.shape == (2, 7)
    sops.check_unique_rows(slots)
    for b in range(2):
        assert set(cand[b].reshape(-1).tolist()) <= set(slots[b].tolist())
        assert int(slots[b][lru[b].bool()]) == int(sops.lru_oldest(st.links, 1)[b, 0])
    assert torch.equal(lru.sum(1), torch.ones(2, dtype=F64))
    assert torch.equal(slots.gather(1, pos.reshape(2, 6)).reshape(2, 2, 3), cand)


def test_bad_write_rule_settings_raise():
    with pytest.raises(ValueError, match="write_rule must be"):
        MemoryAccess(64, 4, 1, 1, sparse_k=2, write_rule="lru")
    with pytest.raises(ValueError, match=r"needs memory_size >= 2\*num_writes\*sparse_k\+1 = 57"):
        MemoryAccess(40, 4, 1, 4, sparse_k=7, write_rule="content")
    assert MemoryAccess(64, 4, 1, 1, sparse_k=2).write_rule == "previous_reads"
    assert MemoryAccess(64, 4, 1, 1).write_rule == "content"


@pytest.mark.parametrize("index", [i for i in _index_kinds() if i not in ("exact", "rows-full-scan")])
def test_the_index_follows_the_access_writes_and_the_reset(index):
    torch.manual_seed(7)
    core = MemoryCore(5, 3, 2048, 8, 2, sparse_k=4, index=index)
    y, st = core(torch.randn(3, 20, 5))
    y.sum().backward()
    idx = st.access.index
    assert idx.check() == 0
    torch.testing.assert_close(idx.nonzero, (st.access.memory != 0).any(-1), atol=0, rtol=0)
    assert int(idx.nonzero.sum()) > 0
    fresh = core.access.sparse.reset(st.access)
    assert idx.check() == 0 and int(idx.nonzero.sum()) == 0 and fresh.memory.abs().sum() == 0


def test_kv_task_layout_and_the_cli_capacity_report(tmp_path, one_thread):
    from neuralmem_fast.apps import train
    from neuralmem_fast.apps.memory_tasks import kv_batch

    x, target, mask = kv_batch(3, key_bits=5, value_bits=4, min_items=2, max_items=6, queries=3,
                               generator=torch.Generator().manual_seed(0))
    assert x.shape == (3, 9, 11) and target.shape == (3, 9, 4)
    for b in range(3):
        n = int(x[b, :, 9].sum())
        keys, values = x[b, :n, :5], x[b, :n, 5:9]
        assert len({tuple(k.tolist()) for k in keys}) == n            # distinct keys
        for t in range(6, 9):
            assert x[b, t, 10] == 1 and mask[b, t] == 1
            j = [i for i in range(n) if torch.equal(keys[i], x[b, t, :5])]
            assert len(j) == 1 and torch.equal(target[b, t], values[j[0]])
    assert mask[:, :6].sum() == 0
    with pytest.raises(ValueError, match="distinct keys"):
        kv_batch(1, key_bits=2, max_items=5)
    train.main(["kv", "--model", "sparse", "--memory-size", "256", "--sparse-k", "4", "--index", "rows", "--steps",
                "4", "--log-every", "2", "--max-len", "6", "--eval-items", "2,8", "--no-progress",
                "--out", str(tmp_path)])
    import json
    rec = json.load(open(tmp_path / "kv_metrics.json"))["models"][0]
    assert rec["model"] == "sparse" and set(rec["capacity"]) == {"2", "8"}
    assert all(0 <= v["query_accuracy"] <= v["bit_accuracy"] <= 1 for v in rec["capacity"].values())


def test_row_index_rebuilds_when_the_memory_changed_behind_its_back():
    acc = MemoryAccess(64, 4, 1, 1, sparse_k=2, index="rows")
    st = acc.initial_state(1, dtype=F64)
    st.memory[0, 40] = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64)   # no update()
    with pytest.warns(RuntimeWarning, match="modified without update"):
        _, idx = st.index.search(torch.tensor([[[1.0, 2.0, 3.0, 4.0]]], dtype=F64), 2)
    assert int(idx[0, 0, 0]) == 40 and st.index.check() == 0
