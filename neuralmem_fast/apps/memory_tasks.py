"""The classic memory tasks (copy, associative recall) and the models trained on them.

Each generator returns (x, target, mask): x (B, T, bits + 2) inputs with two
flag channels, target (B, T, bits) and mask (B, T), 1 where the model's
output is scored. Sequences of a batch have their own lengths and are padded
at the end (mask 0 there).

copy (Graves et al. 2014): L random vectors of `bits` bits (L uniform in
  [min_len, max_len]), then one step with the end flag (channel bits + 1), then
  L blank steps during which the target is the sequence. T = 2 L + 1.
associative recall: n items (n uniform in [min_items, max_items]) of
  `item_len` vectors of `bits` bits, each item preceded by one step with the
  item flag (channel bits); then the query flag (channel bits + 1), a query
  item chosen among the first n - 1, the query flag again, and `item_len`
  blank steps whose target is the item that followed the query.
key-value recall (kv), a task that needs capacity: n items (n uniform in [min_items, max_items]), each
  one step holding a distinct random key of `key_bits` bits, its random value of `value_bits` bits and
  the store flag (channel key_bits + value_bits); then `queries` steps, each the key of a stored item
  with the query flag (the last channel), whose target at that same step is the item's value. T =
  max_items + queries. A memory that holds the n items answers by content; an LSTM must hold them all in
  its state.

Loss: sigmoid cross-entropy summed over the scored bits of a sequence and
averaged over the batch. Bits wrong per sequence: output bits wrong after
thresholding at 0.5 (logit 0), summed over the scored part, averaged over the
batch.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import DEFAULT_SPARSE_EPS
from ..nn import MemoryCore

__all__ = ["copy_batch", "recall_batch", "kv_batch", "TASKS", "task_sizes", "sequence_loss", "bits_wrong", "LSTMModel", "DNCPackageModel",
           "build_model", "param_count", "dnc_package_available"]


def copy_batch(batch_size, bits=8, min_len=1, max_len=20, generator=None, dtype=torch.float32):
    """A copy batch: (x (B, 2 L_max + 1, bits + 2), target (B, T, bits), mask (B, T))."""
    if not (1 <= min_len <= max_len):
        raise ValueError(f"need 1 <= min_len <= max_len, got {min_len}, {max_len}")
    B, T = batch_size, 2 * max_len + 1
    lens = torch.randint(min_len, max_len + 1, (B,), generator=generator)
    seq = torch.randint(0, 2, (B, max_len, bits), generator=generator).to(dtype)
    x = torch.zeros(B, T, bits + 2, dtype=dtype)
    target = torch.zeros(B, T, bits, dtype=dtype)
    mask = torch.zeros(B, T, dtype=dtype)
    for b, L in enumerate(lens.tolist()):
        x[b, :L, :bits] = seq[b, :L]
        x[b, L, bits + 1] = 1
        target[b, L + 1:2 * L + 1] = seq[b, :L]
        mask[b, L + 1:2 * L + 1] = 1
    return x, target, mask


def recall_batch(batch_size, bits=6, item_len=3, min_items=2, max_items=6, generator=None, dtype=torch.float32):
    """An associative-recall batch: (x (B, T, bits + 2), target (B, T, bits), mask (B, T))."""
    if not (2 <= min_items <= max_items):
        raise ValueError(f"need 2 <= min_items <= max_items, got {min_items}, {max_items}")
    B = batch_size
    T = max_items * (item_len + 1) + 2 + 2 * item_len
    ns = torch.randint(min_items, max_items + 1, (B,), generator=generator)
    items = torch.randint(0, 2, (B, max_items, item_len, bits), generator=generator).to(dtype)
    x = torch.zeros(B, T, bits + 2, dtype=dtype)
    target = torch.zeros(B, T, bits, dtype=dtype)
    mask = torch.zeros(B, T, dtype=dtype)
    for b, n in enumerate(ns.tolist()):
        t = 0
        for i in range(n):
            x[b, t, bits] = 1
            x[b, t + 1:t + 1 + item_len, :bits] = items[b, i]
            t += item_len + 1
        q = int(torch.randint(0, n - 1, (1,), generator=generator))
        x[b, t, bits + 1] = 1
        x[b, t + 1:t + 1 + item_len, :bits] = items[b, q]
        t += item_len + 1
        x[b, t, bits + 1] = 1
        t += 1
        target[b, t:t + item_len] = items[b, q + 1]
        mask[b, t:t + item_len] = 1
    return x, target, mask


def kv_batch(batch_size, key_bits=10, value_bits=8, min_items=2, max_items=16, queries=4, generator=None,
             dtype=torch.float32):
    """A key-value recall batch: (x (B, max_items + queries, key_bits + value_bits + 2), target (B, T,
    value_bits), mask (B, T)); see the module doc."""
    if not (1 <= min_items <= max_items):
        raise ValueError(f"need 1 <= min_items <= max_items, got {min_items}, {max_items}")
    if max_items > 2 ** key_bits:
        raise ValueError(f"max_items ({max_items}) needs at most 2**key_bits ({2 ** key_bits}) distinct keys")
    if queries < 1:
        raise ValueError(f"queries must be >= 1, got {queries}")
    B, T, kb, vb = batch_size, max_items + queries, key_bits, value_bits
    x = torch.zeros(B, T, kb + vb + 2, dtype=dtype)
    target = torch.zeros(B, T, vb, dtype=dtype)
    mask = torch.zeros(B, T, dtype=dtype)
    ns = torch.randint(min_items, max_items + 1, (B,), generator=generator)
    bit = 2 ** torch.arange(kb)
    for b, n in enumerate(ns.tolist()):
        codes = torch.randperm(2 ** kb, generator=generator)[:n]
        keys = ((codes.unsqueeze(1) // bit) % 2).to(dtype)
        values = torch.randint(0, 2, (n, vb), generator=generator).to(dtype)
        x[b, :n, :kb] = keys
        x[b, :n, kb:kb + vb] = values
        x[b, :n, kb + vb] = 1
        q = torch.randint(0, n, (queries,), generator=generator)
        x[b, max_items:, :kb] = keys[q]
        x[b, max_items:, kb + vb + 1] = 1
        target[b, max_items:] = values[q]
        mask[b, max_items:] = 1
    return x, target, mask


# name -> (generator, its keyword defaults: the settings)
TASKS = {
    "copy": (copy_batch, {"bits": 8, "min_len": 1, "max_len": 20}),
    "recall": (recall_batch, {"bits": 6, "item_len": 3, "min_items": 2, "max_items": 6}),
    "kv": (kv_batch, {"key_bits": 10, "value_bits": 8, "min_items": 2, "max_items": 16, "queries": 4}),
}


def task_sizes(task, kw):
    """(input width, output width) of a task's batches with keyword settings kw."""
    if task == "kv":
        return kw["key_bits"] + kw["value_bits"] + 2, kw["value_bits"]
    return kw["bits"] + 2, kw["bits"]


def sequence_loss(logits, target, mask):
    """Sigmoid cross-entropy summed over the scored bits of a sequence, averaged over the batch."""
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (ce * mask.unsqueeze(-1)).sum() / logits.shape[0]


@torch.no_grad()
def bits_wrong(logits, target, mask):
    """Output bits wrong after thresholding at 0.5, summed per sequence, averaged over the batch."""
    wrong = ((logits > 0).to(target.dtype) != target).to(target.dtype) * mask.unsqueeze(-1)
    return float(wrong.sum() / logits.shape[0])


def param_count(module):
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


class LSTMModel(nn.Module):
    """The baseline: one LSTM layer and a linear read-out; `(y, state) = model(x)` like MemoryCore."""

    def __init__(self, input_size, output_size, hidden_size):
        super().__init__()
        self.lstm = nn.LSTM(input_size, hidden_size, batch_first=True)
        self.output = nn.Linear(hidden_size, output_size)

    def forward(self, x, state=None):
        h, state = self.lstm(x, state)
        return self.output(h), state


def lstm_hidden_for(params, input_size, output_size):
    """The LSTM width whose parameter count is closest to `params`."""
    best, h = 1, 1
    while True:
        n = 4 * h * (input_size + h + 2) + h * output_size + output_size
        if abs(n - params) < abs(4 * best * (input_size + best + 2) + best * output_size + output_size - params):
            best = h
        if n > params:
            return best
        h += 1


def dnc_package_available():
    """True when the `dnc` package (pytorch-dnc) imports; it is an optional peer."""
    try:
        from dnc import DNC  # noqa: F401
    except Exception:  # noqa: BLE001 - any failure to import means: not available
        return False
    return True


class DNCPackageModel(nn.Module):
    """The `dnc` package's DNC (pytorch-dnc) with a fresh memory per batch.

    Its output has the input's width; the first output_size channels are the model's output."""

    def __init__(self, input_size, output_size, memory_size, word_size, num_reads, hidden_size):
        super().__init__()
        from dnc import DNC
        if output_size > input_size:
            raise ValueError("the dnc package's output has the input's width; output_size must be <= input_size")
        self.output_size = output_size
        self.dnc = DNC(input_size=input_size, hidden_size=hidden_size, rnn_type="lstm", num_layers=1,
                       nr_cells=memory_size, cell_size=word_size, read_heads=num_reads, batch_first=True,
                       gpu_id=-1)

    def forward(self, x, state=None):
        out, state = self.dnc(x, (None, None, None), reset_experience=True, pass_through_memory=True)
        return out[..., :self.output_size], state


def build_model(kind, input_size, output_size, memory_size=32, word_size=16, num_reads=1, num_writes=1,
                hidden_size=64, alloc_topk=None, sparse_k=8, index="auto", sparse_eps=DEFAULT_SPARSE_EPS,
                read_topk=None, write_rule=None, write_topk=None, allocation="usage"):
    """'core' (MemoryCore), 'sparse' (MemoryCore with sparse_k and index), 'lstm' (an LSTM with about the
    core's parameter count) or 'dnc' (the dnc package). read_topk, write_topk, allocation: ablations of the
    core's read, content write and allocation ('core' only; see MemoryAccess); write_rule: None for each
    access's default, or 'content' / 'previous_reads' ('core' and 'sparse'; see MemoryAccess)."""
    for name, v in (("read_topk", read_topk), ("write_topk", write_topk),
                    ("allocation", None if allocation == "usage" else allocation)):
        if v is not None and kind != "core":
            raise ValueError(f"{name} applies to the 'core' model only, got model {kind!r}")
    if write_rule is not None and kind not in ("core", "sparse"):
        raise ValueError(f"write_rule applies to the 'core' and 'sparse' models only, got model {kind!r}")
    if kind == "core":
        return MemoryCore(input_size, output_size, memory_size, word_size, num_reads, num_writes,
                          hidden_size=hidden_size, alloc_topk=alloc_topk, read_topk=read_topk,
                          write_rule=write_rule, write_topk=write_topk, allocation=allocation)
    if kind == "sparse":
        return MemoryCore(input_size, output_size, memory_size, word_size, num_reads, num_writes,
                          hidden_size=hidden_size, sparse_k=sparse_k, index=index, sparse_eps=sparse_eps,
                          write_rule=write_rule)
    if kind == "lstm":
        ref = MemoryCore(input_size, output_size, memory_size, word_size, num_reads, num_writes, hidden_size)
        return LSTMModel(input_size, output_size, lstm_hidden_for(param_count(ref), input_size, output_size))
    if kind == "dnc":
        return DNCPackageModel(input_size, output_size, memory_size, word_size, num_reads, hidden_size)
    raise ValueError(f"model must be 'core', 'sparse', 'lstm' or 'dnc', got {kind!r}")
