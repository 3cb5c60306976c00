"""One MemoryCore training step at the pytorch-dnc setting: time and peak RSS.

    python benchmarks/core_peak_memory.py B N auto|off     (e.g. 4 1e5 off)

One intra-op thread, T = 22, 4 read heads, word 64, LSTM 64. The peak is the
whole process's ru_maxrss, printed beside the memory tensor's bytes.
"""
import resource, sys, time, torch
torch.set_num_threads(1)
from neuralmem_fast.nn import MemoryCore
B, T, N = int(sys.argv[1]), 22, int(float(sys.argv[2]))
ck = {"auto": "auto", "off": False}[sys.argv[3]]
torch.manual_seed(0)
core = MemoryCore(10, 8, memory_size=N, word_size=64, num_reads=4, hidden_size=64, checkpoint=ck)
opt = torch.optim.Adam(core.parameters(), 1e-3)
x = torch.randn(B, T, 10); tgt = torch.rand(B, T, 8)
t = time.perf_counter()
y, _ = core(x)
loss = torch.nn.functional.binary_cross_entropy_with_logits(y, tgt)
opt.zero_grad(); loss.backward(); opt.step()
dt = time.perf_counter() - t
mem_bytes = B * N * 64 * 4
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(f"B={B} N={N} T={T} checkpoint={sys.argv[3]} used={core.uses_checkpoint(B, T)} step={dt:.1f}s "
      f"peak_rss={peak/2**30:.2f}GiB memory={mem_bytes/2**30:.3f}GiB peak/memory={peak/mem_bytes:.1f}x")
