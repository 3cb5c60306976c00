"""MemoryCore's training step against the `dnc` package's DNC and a same-size LSTM (issue 17).

The pytorch-dnc setting: batch 16, sequences of 22 steps, 4 read heads, slot
width 64, an LSTM controller of 64 units, input and output of 10 channels.
One timed call is a whole training step: forward over the sequence, a mean
squared loss, backward and an Adam step. Providers:
  "dnc package"       dnc.DNC (pytorch-dnc), temporal links N x N (baseline;
                      skipped when the package does not import)
  "MemoryCore"        neuralmem_fast.nn.MemoryCore, exact-sort allocation
  "MemoryCore top-k"  the same with alloc_topk=64
  "LSTM (same size)"  nn.LSTM of 64 units and a linear read-out, no memory
                      (baseline when the dnc package is absent)
  "MemoryCore, no access"  MemoryCore with its memory access replaced by
                      reads = read keys: the controller, interface and output
                      layers step by step as in MemoryCore, no memory touched.
                      What MemoryCore's step-by-step path costs before any
                      memory op, so a floor for every access under that
                      eager controller (N = 128 only). The replaced forward
                      keeps it step by step: MemoryCore itself now runs the
                      whole sequence as one node (nn/core_sequence.py) and
                      can be faster than this
N = 128 and 1,024 for all; N = 10^5 for MemoryCore only (the dnc package's
N x N links would need 16 x 10^10 floats), with batch 4: every step keeps its
memory for the backward (22 x 16 x 10^5 x 64 floats would be 9 GB at batch 16).

    pytest benchmarks/test_bench_memory_core.py --benchmark-only
"""
import importlib.util

import pytest
import torch

SETTING = dict(batch=16, steps=22, reads=4, word=64, hidden=64, io=10)
CASES = [(128, 16), (1024, 16), (100_000, 4)]
PROVIDERS = ("dnc package", "MemoryCore", "MemoryCore top-k", "LSTM (same size)", "MemoryCore, no access")


def has_dnc_package():
    if importlib.util.find_spec("dnc") is None:
        return False
    try:
        from dnc import DNC  # noqa: F401
    except Exception:  # noqa: BLE001 - the optional peer is unusable for any reason: skip it
        return False
    return True


class _LSTM(torch.nn.Module):
    def __init__(self, io, hidden):
        super().__init__()
        self.lstm = torch.nn.LSTM(io, hidden, batch_first=True)
        self.out = torch.nn.Linear(hidden, io)

    def forward(self, x):
        return self.out(self.lstm(x)[0])


def make_model(provider, N):
    s = SETTING
    torch.manual_seed(0)
    if provider == "dnc package":
        if not has_dnc_package():
            pytest.skip("the dnc package (pytorch-dnc) is not installed or does not import")
        if N > 4096:
            pytest.skip("the dnc package's temporal links are N x N")
        from dnc import DNC
        net = DNC(input_size=s["io"], hidden_size=s["hidden"], rnn_type="lstm", num_layers=1, nr_cells=N,
                  cell_size=s["word"], read_heads=s["reads"], batch_first=True, gpu_id=-1)
        return net, lambda x: net(x, (None, None, None), reset_experience=True, pass_through_memory=True)[0]
    if provider == "LSTM (same size)":
        if N > 4096:
            pytest.skip("no memory: the LSTM's step does not depend on N (measured at N=128 and 1024)")
        net = _LSTM(s["io"], s["hidden"])
        return net, net
    from neuralmem_fast.nn import MemoryCore
    if provider == "MemoryCore, no access":
        if N != 128:
            pytest.skip("no memory: its step does not depend on N (measured at N=128)")
        net = MemoryCore(s["io"], s["io"], N, s["word"], s["reads"], 1, hidden_size=s["hidden"])
        # The state passes through untouched; the reads are the read keys, so the interface stays in the graph.
        net.access.forward = lambda iface, state, validate=True: (iface.read_keys, state)
        return net, lambda x: net(x)[0]
    topk = 64 if provider.endswith("top-k") else None
    net = MemoryCore(s["io"], s["io"], N, s["word"], s["reads"], 1, hidden_size=s["hidden"], alloc_topk=topk)
    return net, lambda x: net(x)[0]


OPTIMIZERS = ("adam", "adam-fused")


def make_train_step(provider, N, B, optimizer="adam"):
    """One training step of the provider's model on a fixed batch: forward over the sequence, a mean squared
    loss, backward and an Adam step (also used by memory_core_paired.py). `optimizer`: "adam", torch's Adam
    as constructed by default (on the CPU its loop over the parameters, several ops each), or "adam-fused",
    torch's Adam with fused=True (one kernel for all parameters), the same for every provider."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    net, fwd = make_model(provider, N)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, fused=optimizer == "adam-fused" or None)
    x = torch.rand(B, SETTING["steps"], SETTING["io"], generator=torch.Generator().manual_seed(0))

    def step():
        loss = fwd(x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step


@pytest.mark.parametrize("N,B", CASES, ids=[f"N{n}-B{b}" for n, b in CASES])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_memory_core_train_step(benchmark, provider, N, B, bench_device, quick):
    from conftest import measure

    if bench_device.type != "cpu":
        pytest.skip("measured on the CPU, where the dnc package runs")
    if quick and N > 1024:
        pytest.skip("quick subset: N <= 1024")
    step = make_train_step(provider, N, B)
    base = provider == "dnc package" or (provider == "LSTM (same size)" and not has_dnc_package())
    group = f"memory core train step B{B} T22 R4 D64 hidden64 N{N}"
    slow = provider == "dnc package" and N >= 1024
    measure(benchmark, step, group=group, provider=provider, device=bench_device, baseline=base,
            op="memory core train step", N=N, B=B, warmup=1 if slow else 2)
