"""An episodic memory of past inputs and targets, read by content, beside an agent.

Why. The tutorial's memory cannot carry label information on a supervised
stream. Its write heads never receive a gradient (the write is detached, as in
the tutorial), so what a slot stores is a fixed random projection of the
controller's state for a past input, never the input's target; a read returns
a mix of such projections. Whatever the read's key, nothing in it tells the
controller what the target of a similar past input was. (With the tutorial's
content-addressed writes from a zero memory it is worse: every slot holds the
same vector and a read is the same whatever its key.)

What carries information is the episodic-memory recipe of continual learning
(e.g. Sprechmann et al. 2018, "Memory-based parameter adaptation"; de Masson
d'Autume et al. 2019, "Episodic memory in lifelong language learning"): store
the pair itself and read it by similarity of the input. Here each slot of a
NeuralMemoryBank holds [x | y] (the input and the first `target_dim` target
values), written by allocation (each sample in the least-used slot, so the
slots hold distinct samples); a query [x | 0] reads by cosine similarity with
strength `strength` (a soft nearest-neighbour over stored samples), and the
target part of the read is added to the agent's prediction. With the
tutorial's content writes (`write_mode="content"`) the same memory holds one
vector repeated in every slot, a decayed average of the stream, and its read
is the same for every query: the ablation that shows what allocation does.

The memory holds `memory_size` samples; past that, allocation overwrites the
least-used (oldest) slot, so a memory smaller than the stream forgets the
earliest samples first.
"""
import torch

from ..config import MemoryConfig
from ..nn import NeuralMemoryBank

__all__ = ["EpisodicAgent"]


class EpisodicAgent:
    """`agent` (train_step, predict) plus an episodic memory of (input, target) pairs.

    Args:
        agent: the learning agent (e.g. FastAgent); trained as usual.
        input_dim: the inputs' width.
        target_dim: how many leading target values the memory stores and adds to
            the prediction (the digits experiment: 10 classes).
        memory_size: slots (samples held).
        strength: the read's softmax strength on cosine similarity.
        write_mode: "allocation" (each sample its own slot) or "content" (the
            tutorial's addressing: every slot receives the same write).
    """

    def __init__(self, agent, input_dim=64, target_dim=10, memory_size=2048, strength=50.0,
                 write_mode="allocation", backend="auto"):
        if write_mode not in ("allocation", "content"):
            raise ValueError(f"write_mode must be 'allocation' or 'content', got {write_mode!r}")
        if not (isinstance(target_dim, int) and target_dim >= 1):
            raise ValueError(f"target_dim must be a positive int, got {target_dim!r}")
        self.agent = agent
        self.input_dim = input_dim
        self.target_dim = target_dim
        self.strength = float(strength)
        cfg = MemoryConfig(memory_size=memory_size, memory_dim=input_dim + target_dim, num_read_heads=1)
        self.memory_bank = NeuralMemoryBank(cfg, backend=backend, write_mode=write_mode)

    def train_step(self, x, y, use_replay=True):
        loss = self.agent.train_step(x, y, use_replay=use_replay)
        self.store(x, y)
        return loss

    @torch.no_grad()
    def store(self, x, y):
        """Writes the pair [x | y[:target_dim]] into one slot (allocation)."""
        value = torch.cat([x, y[:self.target_dim]]).to(self.memory_bank.memory.dtype)
        key = torch.cat([x, value.new_zeros(self.target_dim)])
        self.memory_bank.write(key, value, torch.ones_like(value), self.strength)

    @torch.no_grad()
    def recall(self, xs):
        """The targets read for queries xs (M, input_dim): (M, target_dim)."""
        keys = torch.cat([xs, xs.new_zeros(xs.shape[0], self.target_dim)], dim=1).unsqueeze(1)
        strengths = keys.new_full((xs.shape[0], 1), self.strength)
        return self.memory_bank.read(keys, strengths)[:, self.input_dim:]

    @torch.no_grad()
    def predict(self, xs):
        out = self.agent.predict(xs).clone()
        out[:, :self.target_dim] += self.recall(xs)
        return out
