"""ShardedMemory on CPU with gloo: 2 and 3 spawned ranks against the unsharded ops."""
import os
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import neuralmem_fast as nm
from neuralmem_fast.nn.sharded import ShardedMemory, shard_bounds

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="no gloo")

TOL64 = dict(atol=1e-10, rtol=1e-9)


def _init(rank, world, init_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))


def _close(name, a, b):
    torch.testing.assert_close(a, b, **TOL64, msg=lambda m: f"{name}: {m}")


def _worker_ops(rank, world, init_file, backend):
    _init(rank, world, init_file)
    try:
        g = torch.Generator().manual_seed(1234)  # the same full data on every rank
        B, N, D, H, W = 2, 11, 5, 3, 2
        dt = torch.float64
        mem = torch.randn(B, N, D, generator=g, dtype=dt)
        mem[0, 3] = 0.0  # an all-zero slot
        usage = torch.rand(B, N, generator=g, dtype=dt)
        keys = torch.randn(B, H, D, generator=g, dtype=dt)
        strengths = torch.rand(B, H, generator=g, dtype=dt) * 5
        wkeys = torch.randn(B, W, D, generator=g, dtype=dt)
        wstr = torch.rand(B, W, generator=g, dtype=dt) * 5
        erase = torch.rand(B, W, D, generator=g, dtype=dt)
        add = torch.randn(B, W, D, generator=g, dtype=dt)
        grad_r = torch.randn(B, H, D, generator=g, dtype=dt)

        sm = ShardedMemory(B, N, D, dtype=dt, backend=backend).load_full_(mem, usage)
        a, b = sm.start, sm.stop

        # read: outputs and gradients
        m_loc = sm.memory.clone().requires_grad_(True)
        k1, s1 = keys.clone().requires_grad_(True), strengths.clone().requires_grad_(True)
        r = sm.read(k1, s1, memory=m_loc)
        (r * grad_r).sum().backward()
        m_full = mem.clone().requires_grad_(True)
        k2, s2 = keys.clone().requires_grad_(True), strengths.clone().requires_grad_(True)
        r_ref = nm.content_read_ref(m_full, k2, s2)
        (r_ref * grad_r).sum().backward()
        _close("reads", r, r_ref)
        _close("grad memory", m_loc.grad, m_full.grad[:, a:b])
        _close("grad keys", k1.grad, k2.grad)
        _close("grad strengths", s1.grad, s2.grad)

        # differentiable write + usage: outputs and gradients
        leaves = [t.clone().requires_grad_(True) for t in (wkeys, wstr, erase, add)]
        m_loc = sm.memory.clone().requires_grad_(True)
        new_m, new_u = sm.write(*leaves, memory=m_loc)
        gm_out = torch.randn(B, N, D, generator=g, dtype=dt)
        gu_out = torch.randn(B, N, generator=g, dtype=dt)
        ((new_m * gm_out[:, a:b]).sum() + (new_u * gu_out[:, a:b]).sum()).backward()
        ref_leaves = [t.clone().requires_grad_(True) for t in (wkeys, wstr, erase, add)]
        m_full = mem.clone().requires_grad_(True)
        w_ref = nm.content_addressing_ref(m_full, ref_leaves[0], ref_leaves[1])
        ref_m = nm.memory_write_ref(m_full, w_ref, ref_leaves[2], ref_leaves[3])
        ref_u = nm.usage_update_ref(usage, w_ref)
        ((ref_m * gm_out).sum() + (ref_u * gu_out).sum()).backward()
        _close("written memory", new_m, ref_m[:, a:b])
        _close("updated usage", new_u, ref_u[:, a:b])
        _close("grad memory (write)", m_loc.grad, m_full.grad[:, a:b])
        for name, x, y in zip(("keys", "strengths", "erase", "add"), leaves, ref_leaves):
            _close(f"grad {name} (write)", x.grad, y.grad)

        # in-place write, usage and the least-used slot
        least = sm.write_(wkeys, wstr, erase, add)
        full_m, full_u = sm.gather_full()
        ref_m = mem.clone()
        ref_u = usage.clone()
        ref_least = nm.content_write_(ref_m, wkeys, wstr, erase, add, usage=ref_u, backend="torch")
        _close("in-place memory", full_m, ref_m)
        _close("in-place usage", full_u, ref_u)
        assert torch.equal(least, ref_least), (least, ref_least)
    finally:
        dist.destroy_process_group()


class _TinyController(nn.Module):
    """Emits read and write heads from the input, reads, writes, predicts."""

    def __init__(self, in_dim, D, H, W):
        super().__init__()
        self.D, self.H, self.W = D, H, W
        self.heads = nn.Linear(in_dim, H * D + H + W * (3 * D + 1))
        self.out = nn.Linear(in_dim + H * D, in_dim)

    def forward(self, x, read_fn, write_fn):
        B, D, H, W = x.shape[0], self.D, self.H, self.W
        z = self.heads(x)
        keys, z = z[:, : H * D].reshape(B, H, D), z[:, H * D:]
        strengths, z = F.softplus(z[:, :H]), z[:, H:]
        wk, z = z[:, : W * D].reshape(B, W, D), z[:, W * D:]
        ws, z = F.softplus(z[:, :W]), z[:, W:]
        erase, add = torch.sigmoid(z[:, : W * D]).reshape(B, W, D), torch.tanh(z[:, W * D:]).reshape(B, W, D)
        reads = read_fn(keys, strengths)
        with torch.no_grad():  # the seed's semantics: the write is detached
            write_fn(wk.detach(), ws.detach(), erase.detach(), add.detach())
        return self.out(torch.cat([x, reads.flatten(1)], dim=1))


def _train(model, read_fn, write_fn, data, steps):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for t in range(steps):
        x, y = data[t]
        opt.zero_grad()
        loss = F.mse_loss(model(x, read_fn, write_fn), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _worker_ddp(rank, world, init_file, backend):
    _init(rank, world, init_file)
    try:
        B, N, D, H, W, I, steps = 2, 13, 4, 2, 1, 6, 4
        dt = torch.float64
        g = torch.Generator().manual_seed(7)
        mem0 = torch.randn(B, N, D, generator=g, dtype=dt)
        data = [(torch.randn(B, I, generator=g, dtype=dt), torch.randn(B, I, generator=g, dtype=dt))
                for _ in range(steps)]

        torch.manual_seed(0)
        ref_model = _TinyController(I, D, H, W).to(dt)
        torch.manual_seed(0)
        model = _TinyController(I, D, H, W).to(dt)

        # The seed's semantics: each write makes new memory and usage tensors.
        ref = {"m": mem0.clone(), "u": torch.zeros(B, N, dtype=dt)}

        def ref_write(k, s, e, a):
            w = nm.content_addressing(ref["m"], k, s, backend=backend)
            ref["m"], ref["u"] = nm.memory_write(ref["m"], w, e, a, usage=ref["u"], backend=backend)

        ref_losses = _train(ref_model, lambda k, s: nm.content_read(ref["m"], k, s, backend=backend), ref_write,
                            data, steps)
        ref_mem, ref_usage = ref["m"], ref["u"]

        sm = ShardedMemory(B, N, D, dtype=dt, backend=backend).load_full_(mem0)
        ddp = nn.parallel.DistributedDataParallel(model)
        losses = _train(ddp, sm.read, sm.update, data, steps)

        assert max(abs(x - y) for x, y in zip(losses, ref_losses)) < 1e-9, (losses, ref_losses)
        for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
            _close(f"parameter {name}", p.detach(), q.detach())
        full_m, full_u = sm.gather_full()
        _close("memory after training", full_m, ref_mem)
        _close("usage after training", full_u, ref_usage)
    finally:
        dist.destroy_process_group()


def _worker_fails(rank, world, init_file):
    _init(rank, world, init_file)
    sm = ShardedMemory(1, 8, 4, backend="torch")
    if rank == 1:
        raise ValueError("rank 1 fails on purpose")
    sm.read(torch.randn(1, 2, 4), torch.ones(1, 2))  # would wait for rank 1 forever


def _spawn(fn, world, tmp_path, *args, timeout=120.0):
    init_file = str(tmp_path / f"init-{fn.__name__}-{world}")
    ctx = mp.spawn(fn, args=(world, init_file) + args, nprocs=world, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{fn.__name__} with {world} ranks did not finish within {timeout} s")


def _cpu_backends():
    return [b for b in nm.available_backends("cpu") if b in ("cpu", "torch")]


@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("world", [2, 3], ids=lambda w: f"world{w}")
def test_sharded_ops_equal_unsharded(world, backend, tmp_path):
    _spawn(_worker_ops, world, tmp_path, backend)


@pytest.mark.parametrize("backend", _cpu_backends())
def test_ddp_training_with_sharded_memory_equals_single_process(backend, tmp_path):
    _spawn(_worker_ddp, 2, tmp_path, backend)


def test_a_failing_rank_does_not_hang_the_others(tmp_path):
    start = time.monotonic()
    with pytest.raises(Exception, match="rank 1 fails on purpose"):
        _spawn(_worker_fails, 2, tmp_path, timeout=90.0)
    assert time.monotonic() - start < 90.0


def test_shard_bounds_cover_every_slot_once():
    for n in (3, 10, 11, 1000):
        for world in (1, 2, 3):
            b = shard_bounds(n, world)
            assert b[0][0] == 0 and b[-1][1] == n
            assert all(b[i][1] == b[i + 1][0] for i in range(world - 1))
            sizes = [y - x for x, y in b]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="num_slots"):
        shard_bounds(2, 3)


def test_scale_distributed_under_torchrun_reports_flat_communication(tmp_path):
    import json
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "neuralmem_fast.apps.scale_distributed", "--max-n", "1e4", "--reps", "2", "--threads", "1",
           "--backend", "torch", "--out", str(tmp_path), "--no-plot"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.load(open(tmp_path / "scale_distributed_w2.json"))["rows"]
    assert [r["N"] for r in rows] == [1000, 10000]
    B, H, D = rows[0]["B"], rows[0]["H"], rows[0]["D"]
    for r in rows:
        # one all_gather of the (B,H,D+1) float32 partials, whatever N is
        assert r["read_comm_bytes"] == B * H * (D + 1) * 4
        assert r["read_fwd_bwd_comm_bytes"] > r["read_comm_bytes"]
    assert rows[0]["read_fwd_bwd_comm_bytes"] == rows[1]["read_fwd_bwd_comm_bytes"]
