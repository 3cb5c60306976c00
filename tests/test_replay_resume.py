"""Exact resume of the replay buffers: a state dict saved here and loaded in a
new process draws exactly the samples the saved buffer draws next."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from neuralmem_fast.replay import ExperienceReplay, PrioritizedReplayBuffer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DRAWS = 5


def _run(code: str) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _prb(stratified=False):
    buf = PrioritizedReplayBuffer(50, alpha=0.7, beta=0.5, generator=3, stratified=stratified)
    g = torch.Generator().manual_seed(0)
    buf.extend({"obs": torch.randn(70, 3, generator=g), "r": torch.arange(70)},
               priorities=torch.rand(70, generator=g, dtype=torch.float64) + 0.1)
    _, idx, _ = buf.sample(16)
    buf.update_priorities(idx, torch.rand(16, generator=g) * 3)
    return buf


@pytest.mark.parametrize("stratified", [False, True])
def test_prioritized_buffer_resumes_exactly_in_a_new_process(tmp_path, stratified):
    buf = _prb(stratified)
    path = tmp_path / "prb.pt"
    torch.save(buf.state_dict(), path)
    expected = []
    for _ in range(DRAWS):
        batch, idx, w = buf.sample(32)
        expected.append([idx.tolist(), w.tolist(), batch["r"].tolist()])
    got = _run(f"""
import json, torch
from neuralmem_fast.replay import PrioritizedReplayBuffer
buf = PrioritizedReplayBuffer(50, generator=12345, stratified={stratified})
buf.load_state_dict(torch.load({str(path)!r}, weights_only=True))
out = []
for _ in range({DRAWS}):
    batch, idx, w = buf.sample(32)
    out.append([idx.tolist(), w.tolist(), batch["r"].tolist()])
print(json.dumps(out))
""")
    assert got == expected


@pytest.mark.parametrize("own_generator", [False, True])
def test_experience_replay_resumes_exactly_in_a_new_process(tmp_path, own_generator):
    np.random.seed(5)
    er = ExperienceReplay(40, alpha=0.6, generator=7 if own_generator else None)
    for i in range(55):
        er.push({"step": i}, priority=float(1 + (i * 7) % 11))
    _, _, idx = er.sample(8, return_indices=True)
    er.update_priorities(idx, np.arange(1, 9, dtype=np.float64))
    path = tmp_path / "er.pt"
    torch.save(er.state_dict(), path)
    expected = []
    for _ in range(DRAWS):
        s, w, i = er.sample(12, beta=0.4, return_indices=True)
        expected.append([[x["step"] for x in s], w.tolist(), i.tolist()])
    got = _run(f"""
import json, numpy as np, torch
from neuralmem_fast.replay import ExperienceReplay
np.random.seed(999)  # another global state: the load must set the saved one
er = ExperienceReplay(40, generator={11 if own_generator else None})
er.load_state_dict(torch.load({str(path)!r}, weights_only=False))
out = []
for _ in range({DRAWS}):
    s, w, i = er.sample(12, beta=0.4, return_indices=True)
    out.append([[x["step"] for x in s], w.tolist(), i.tolist()])
print(json.dumps(out))
""")
    assert got == expected


def _same_prb_state(a, b):
    for k in ("position", "size", "max_priority", "alpha", "beta", "eps", "rng"):
        assert a[k] == b[k] if k != "rng" else a[k]["state"] == b[k]["state"], k
    for k in ("priorities", "generation", "sampled_generation"):
        assert torch.equal(a[k], b[k]), k
    for k in a["storage"]:
        assert torch.equal(a["storage"][k], b["storage"][k]), k


def test_prioritized_buffer_refuses_another_capacity_or_a_bad_generator_and_keeps_its_state():
    buf = _prb()
    before = buf.state_dict()
    other = PrioritizedReplayBuffer(49, generator=0)
    other.extend({"obs": torch.zeros(3, 3), "r": torch.arange(3)})
    with pytest.raises(ValueError, match="capacity 49.*this buffer's is 50.*Nothing was loaded"):
        buf.load_state_dict(other.state_dict())
    _same_prb_state(buf.state_dict(), before)
    bad = buf.state_dict()
    bad["rng"] = {"kind": "generator", "state": {"bit_generator": "NoSuchBitGen"}}
    with pytest.raises(ValueError, match="generator state is not valid"):
        buf.load_state_dict(bad)
    bad["rng"] = {"kind": "generator", "state": {"bit_generator": "PCG64", "state": "garbage"}}
    with pytest.raises(ValueError, match="generator state is not valid"):
        buf.load_state_dict(bad)
    _same_prb_state(buf.state_dict(), before)
    # and the buffer still draws what it would have drawn
    twin = PrioritizedReplayBuffer(50, generator=1)
    twin.load_state_dict(before)
    assert torch.equal(buf.sample(20)[1], twin.sample(20)[1])


def test_experience_replay_refuses_another_capacity_and_keeps_its_state():
    er = ExperienceReplay(10, generator=1)
    for i in range(12):
        er.push(i, priority=i + 1.0)
    before = er.state_dict()
    other = ExperienceReplay(11)
    with pytest.raises(ValueError, match="capacity 11.*this buffer's is 10"):
        er.load_state_dict(other.state_dict())
    bad = er.state_dict()
    bad["rng"] = {"kind": "random_state", "state": {"pos": 0, "has_gauss": 0, "gauss": 0.0},
                  "key": torch.zeros(3, dtype=torch.int64)}
    with pytest.raises(ValueError, match="generator state is not valid"):
        er.load_state_dict(bad)
    after = er.state_dict()
    assert after["items"] == before["items"] and (after["position"], after["size"]) == (before["position"], before["size"])
    assert torch.equal(after["priorities"], before["priorities"]) and after["rng"] == before["rng"]
