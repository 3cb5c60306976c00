"""The seed's continual-learning system, faithful, in pure PyTorch, with its bugs fixed.

This module is the behaviour every fast path is measured against. It is a
plain transcription of the seed tutorial: the same classes, the same
constructor order (so that `torch.manual_seed(s)` gives the same initial
weights), the same operations in the same order (so that the same inputs give
bit-for-bit the same outputs, gradients, memory and usage), and the same use of
the global NumPy random state in the replay buffer.

The memory bank is a single (N, D) memory, one write head, H read heads:

    content_addressing(key, beta)  softmax_n(beta * cos(key, memory[n]))
    read(keys, strengths)          concat_h(weights_h @ memory)
    write(key, v, e, beta)         memory * (1 - w e^T) + w v^T;  usage = 0.99 usage + w

which is the B=1, W=1 case of the batched references in `neuralmem_fast.ops`
(`content_addressing_ref`, `memory_read_ref`, `memory_write_ref`,
`usage_update_ref`); the tests check that the two agree. The bank keeps the
seed's semantics of memory as non-differentiable state: a write stores
detached tensors, so gradients reach the controller through reads only and the
write heads (write_key, write_vector, erase_vector, write_strength) receive no
gradient. That is the seed's design, kept as is, and so is a consequence of
its all-zero initial memory: every slot then has the same cosine (zero) to any
key, the weights are uniform, each write adds the same vector to every row,
and the rows stay identical from then on. The bank behaves as a single slot,
which is what the demo's memory heatmap shows (constant columns). Breaking the
symmetry (random initial memory, location-based allocation) would change the
model, not fix a bug, and is left to the fast agent.

Fixes of the seed's bugs (on by default; `seed_compat=True` restores the seed's
behaviour where that makes sense):

1. `MetaLearner.adapt` called `self.model.memory_bank` (which does not exist)
   and differentiated the loss of the *original* parameters at every step, so
   it could never take more than one real step. It is now a MAML inner loop:
   the controller runs through `torch.func.functional_call` on the adapted
   parameters, each step differentiates with respect to those, with
   `create_graph=True` for second-order MAML or without for first order
   (`first_order=True`). `MetaLearner.meta_loss`/`meta_train` add the outer
   step, and the agent exposes `adapt` (test-time adaptation) and
   `meta_train_step`. No switch: the seed's version cannot run.
   The memory bank is state shared by every forward pass. During adaptation
   (and the query pass of the outer step) the bank is *read-only*: the
   controller reads it and does not write. A writing inner loop would change
   the memory under each step, so the support loss would not be one function
   of the parameters, the query would see the support set written into
   memory, and adaptation would leave the agent's bank altered. With
   read-only passes `adapt` and `meta_train` leave memory and usage exactly
   as they were.
2. `ContinualLearningAgent.evaluate` wrote to the memory bank on every test
   sample, so evaluating changed the agent. It now reads only; memory and
   usage are unchanged. `seed_compat=True` writes as the seed did.
3. `create_task_data` seeded the global generator with the task id for every
   call, so a 20-sample test set was the first 20 rows of the 50-sample
   training set (`torch.randn` fills in order). It now takes `split`
   ("train" or "test"); the training split is the seed's data, the test split
   comes from a different generator seed, and a local `torch.Generator` is
   used so the global random state is left alone. `seed_compat=True` restores
   the seed's draw (global seed = task id, any split).
4. The seed's demo never filled `results['without_memory']`.
   `run_continual_learning_demo` runs the agent with replay and without
   replay and fills both; `neuralmem_fast.apps.demo` plots them.
"""
import time
from collections import deque

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from ..config import MemoryConfig

__all__ = [
    "MemoryConfig",
    "NeuralMemoryBank",
    "MemoryController",
    "ExperienceReplay",
    "MetaLearner",
    "ContinualLearningAgent",
    "create_task_data",
    "run_continual_learning",
    "run_continual_learning_demo",
    "TEST_SEED_OFFSET",
]

# The test split of task t is drawn with generator seed TEST_SEED_OFFSET + t,
# far from the small task ids that seed the training splits.
TEST_SEED_OFFSET = 1_000_003




class NeuralMemoryBank(nn.Module):
    """The seed's memory: buffers `memory` (N, D) and `usage` (N,), one write head."""

    def __init__(self, config: MemoryConfig):
        super().__init__()
        if config.num_write_heads != 1:
            # The seed declares the field but always writes with one head.
            raise ValueError(f"the reference bank has exactly one write head, got num_write_heads="
                             f"{config.num_write_heads}; use neuralmem_fast.ops.memory_write for W heads")
        self.memory_size = config.memory_size
        self.memory_dim = config.memory_dim
        self.num_read_heads = config.num_read_heads
        self.register_buffer('memory', torch.zeros(config.memory_size, config.memory_dim))
        self.register_buffer('usage', torch.zeros(config.memory_size))

    def content_addressing(self, key, beta):
        """Weights (N,) of key (D,) over the slots; beta is a scalar or (1,) strength."""
        key_norm = F.normalize(key, dim=-1)
        mem_norm = F.normalize(self.memory, dim=-1)
        similarity = torch.matmul(key_norm, mem_norm.t())
        return F.softmax(beta * similarity, dim=-1)

    def write(self, write_key, write_vector, erase_vector, write_strength):
        """Erase then add at the content-addressed slots; the stored memory is detached."""
        write_weights = self.content_addressing(write_key, write_strength)
        erase = torch.outer(write_weights.squeeze(), erase_vector.squeeze())
        self.memory = (self.memory * (1 - erase)).detach()
        add = torch.outer(write_weights.squeeze(), write_vector.squeeze())
        self.memory = (self.memory + add).detach()
        self.usage = (0.99 * self.usage + write_weights.squeeze()).detach()

    def read(self, read_keys, read_strengths):
        """read_keys (H, D), read_strengths (H,) -> the H reads concatenated, (H*D,)."""
        reads = []
        for i in range(self.num_read_heads):
            weights = self.content_addressing(read_keys[i], read_strengths[i])
            read_vector = torch.matmul(weights, self.memory)
            reads.append(read_vector)
        return torch.cat(reads, dim=-1)


class MemoryController(nn.Module):
    """The seed's LSTM controller: one sample (input_dim,) per call, read then write.

    `write=False` reads the bank without writing it (evaluation, adaptation);
    the output is the same as with a write, since the read comes first.
    """

    def __init__(self, input_dim, hidden_dim, memory_config: MemoryConfig):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.memory_config = memory_config
        self.lstm = nn.LSTM(input_dim, hidden_dim, batch_first=True)
        total_read_dim = memory_config.num_read_heads * memory_config.memory_dim
        self.read_keys = nn.Linear(hidden_dim, memory_config.num_read_heads * memory_config.memory_dim)
        self.read_strengths = nn.Linear(hidden_dim, memory_config.num_read_heads)
        self.write_key = nn.Linear(hidden_dim, memory_config.memory_dim)
        self.write_vector = nn.Linear(hidden_dim, memory_config.memory_dim)
        self.erase_vector = nn.Linear(hidden_dim, memory_config.memory_dim)
        self.write_strength = nn.Linear(hidden_dim, 1)
        self.output = nn.Linear(hidden_dim + total_read_dim, input_dim)

    def forward(self, x, memory_bank, hidden=None, write=True):
        # x (input_dim,) -> (1, input_dim): an unbatched sequence of length one.
        lstm_out, hidden = self.lstm(x.unsqueeze(0), hidden)
        controller_state = lstm_out.squeeze(0)
        read_k = self.read_keys(controller_state).view(self.memory_config.num_read_heads, -1)
        read_s = F.softplus(self.read_strengths(controller_state))
        read_vectors = memory_bank.read(read_k, read_s)
        if write:
            write_k = self.write_key(controller_state)
            write_v = torch.tanh(self.write_vector(controller_state))
            erase_v = torch.sigmoid(self.erase_vector(controller_state))
            write_s = F.softplus(self.write_strength(controller_state))
            memory_bank.write(write_k, write_v, erase_v, write_s)
        combined = torch.cat([controller_state, read_vectors], dim=-1)
        output = self.output(combined)
        return output, hidden


class ExperienceReplay:
    """The seed's prioritized replay: deques, sampling without replacement.

    `rng` is the NumPy random source (default: the global `np.random`, as in
    the seed); a `np.random.RandomState` gives a private stream with the same
    draws for the same seed.
    """

    def __init__(self, capacity=10000, alpha=0.6, rng=None):
        self.capacity = capacity
        self.alpha = alpha
        self.rng = np.random if rng is None else rng
        self.buffer = deque(maxlen=capacity)
        self.priorities = deque(maxlen=capacity)

    def __len__(self):
        return len(self.buffer)

    def push(self, experience, priority=1.0):
        self.buffer.append(experience)
        self.priorities.append(priority ** self.alpha)

    def sample(self, batch_size, beta=0.4):
        if len(self.buffer) == 0:
            return [], []
        probs = np.array(self.priorities)
        probs = probs / probs.sum()
        indices = self.rng.choice(len(self.buffer), min(batch_size, len(self.buffer)), p=probs, replace=False)
        samples = [self.buffer[i] for i in indices]
        weights = (len(self.buffer) * probs[indices]) ** (-beta)
        weights = weights / weights.max()
        return samples, torch.FloatTensor(weights)


class MetaLearner(nn.Module):
    """MAML over the controller's parameters, with the memory bank read-only.

    adapt:      the inner loop; returns the adapted parameters as a dict name ->
                tensor, differentiable with respect to the starting parameters
                (second order unless first_order).
    meta_loss:  mean query loss after adapting on each task's support set.
    meta_train: one outer step (zero_grad, meta_loss.backward, clip, step).

    Support and query sets are (S, input_dim) tensors or sequences of
    (input_dim,) tensors; the controller takes one sample per call, as in the
    seed, and the loss is the mean of the per-sample MSE.
    """

    def __init__(self, model, memory_bank=None, first_order=False):
        super().__init__()
        self.model = model
        # Not a submodule: the bank belongs to the agent, and a MetaLearner's
        # state_dict should not carry a second copy of it.
        self.__dict__["memory_bank"] = memory_bank
        self.first_order = first_order

    def loss(self, params, xs, ys, memory_bank=None):
        """Mean MSE of the controller run with `params`, reading the bank without writing it."""
        bank = self.memory_bank if memory_bank is None else memory_bank
        if bank is None:
            raise ValueError("MetaLearner needs a memory bank: pass memory_bank to the constructor or the call")
        losses = []
        for x, y in zip(xs, ys):
            pred, _ = functional_call(self.model, params, (x, bank), {"write": False})
            losses.append(F.mse_loss(pred, y))
        if not losses:
            raise ValueError("the support/query set is empty")
        return torch.stack(losses).mean()

    def adapt(self, support_x, support_y, num_steps=5, lr=0.01, first_order=None, params=None):
        """`num_steps` of gradient descent from `params` (default: the model's own).

        Second order (default): each step is differentiable (create_graph), so a
        loss of the adapted parameters back-propagates through the inner loop.
        First order: the inner gradients are constants; the adapted parameters
        still depend on the starting ones through the identity (FOMAML).
        Parameters that the loss does not reach (the write heads, which the
        read-only pass never uses) are returned unchanged.
        """
        first_order = self.first_order if first_order is None else first_order
        params = dict(self.model.named_parameters()) if params is None else dict(params)
        with torch.enable_grad():
            for _ in range(num_steps):
                loss = self.loss(params, support_x, support_y)
                names = [n for n, p in params.items() if p.requires_grad]
                grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=not first_order,
                                            allow_unused=True)
                for name, grad in zip(names, grads):
                    if grad is not None:
                        params[name] = params[name] - lr * grad
        return params

    def meta_loss(self, tasks, num_steps=1, lr=0.01, first_order=None):
        """Mean over tasks (support_x, support_y, query_x, query_y) of the post-adaptation query loss."""
        total = 0.0
        for support_x, support_y, query_x, query_y in tasks:
            adapted = self.adapt(support_x, support_y, num_steps, lr, first_order)
            total = total + self.loss(adapted, query_x, query_y)
        return total / len(tasks)

    def meta_train(self, tasks, optimizer, num_steps=1, lr=0.01, first_order=None, max_grad_norm=1.0):
        """One outer MAML step on the model's parameters; returns the meta loss."""
        optimizer.zero_grad()
        loss = self.meta_loss(tasks, num_steps, lr, first_order)
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_grad_norm)
        optimizer.step()
        return loss.item()


class ContinualLearningAgent:
    """The seed's agent: controller + memory bank + prioritized replay + MAML.

    `config` and `hidden_dim` size the agent (the seed's defaults when
    omitted). `seed_compat=True` makes `evaluate` write to the memory as the
    seed did; by default evaluation reads only.
    """

    def __init__(self, input_dim=64, hidden_dim=128, config=None, seed_compat=False, replay_capacity=5000,
                 lr=0.001, meta_lr=0.001, rng=None):
        # Construction order is the seed's: the controller's initial weights
        # come from the same draws of the global torch generator.
        self.config = MemoryConfig() if config is None else config
        self.memory_bank = NeuralMemoryBank(self.config)
        self.controller = MemoryController(input_dim, hidden_dim, self.config)
        self.replay_buffer = ExperienceReplay(capacity=replay_capacity, rng=rng)
        self.meta_learner = MetaLearner(self.controller, self.memory_bank)
        self.optimizer = torch.optim.Adam(self.controller.parameters(), lr=lr)
        self.meta_lr = meta_lr
        self.meta_optimizer = None
        self.task_history = []
        self.seed_compat = seed_compat

    def train_step(self, x, y, use_replay=True):
        self.optimizer.zero_grad()
        pred, _ = self.controller(x, self.memory_bank)
        current_loss = F.mse_loss(pred, y)
        self.replay_buffer.push((x.detach().clone(), y.detach().clone()), priority=current_loss.item() + 1e-6)
        total_loss = current_loss
        if use_replay and len(self.replay_buffer.buffer) > 16:
            samples, weights = self.replay_buffer.sample(8)
            for (replay_x, replay_y), weight in zip(samples, weights):
                with torch.enable_grad():
                    replay_pred, _ = self.controller(replay_x, self.memory_bank)
                    replay_loss = F.mse_loss(replay_pred, replay_y)
                    total_loss = total_loss + 0.3 * replay_loss * weight
        total_loss.backward()
        torch.nn.utils.clip_grad_norm_(self.controller.parameters(), 1.0)
        self.optimizer.step()
        return total_loss.item()

    def evaluate(self, test_data, params=None):
        """Mean MSE over (x, y) pairs; reads the memory without writing it.

        `params` (e.g. from `adapt`) evaluates those parameters instead of the
        controller's own. Under seed_compat every sample writes to the memory.
        """
        write = self.seed_compat
        self.controller.eval()
        total_error = 0
        with torch.no_grad():
            for x, y in test_data:
                if params is None:
                    pred, _ = self.controller(x, self.memory_bank, write=write)
                else:
                    pred, _ = functional_call(self.controller, params, (x, self.memory_bank), {"write": write})
                total_error += F.mse_loss(pred, y).item()
        self.controller.train()
        return total_error / len(test_data)

    def adapt(self, support_data, num_steps=5, lr=0.01):
        """Test-time adaptation: first-order MAML inner loop on (x, y) pairs.

        Returns detached adapted parameters for `evaluate(..., params=...)`;
        the controller's own parameters, the memory and the usage are unchanged.
        """
        xs, ys = zip(*support_data)
        start = {n: p.detach().requires_grad_() for n, p in self.controller.named_parameters()}
        adapted = self.meta_learner.adapt(xs, ys, num_steps, lr, first_order=True, params=start)
        return {n: p.detach() for n, p in adapted.items()}

    def meta_train_step(self, tasks, num_steps=1, lr=0.01, first_order=False):
        """One MAML outer step over tasks (support_x, support_y, query_x, query_y)."""
        if self.meta_optimizer is None:
            self.meta_optimizer = torch.optim.Adam(self.controller.parameters(), lr=self.meta_lr)
        return self.meta_learner.meta_train(tasks, self.meta_optimizer, num_steps, lr, first_order)


def create_task_data(task_id, num_samples=100, split="train", seed_compat=False, dim=64):
    """(x, y) pairs of task `task_id`: x ~ N(0, 1)^dim.

    Targets: task 0 sin(mean(x)), task 1 0.5 cos(mean(x)) (broadcast to dim),
    task t >= 2 tanh(x / 2 + t). The training split is the seed's data; the
    test split is drawn from generator seed TEST_SEED_OFFSET + task_id.
    seed_compat=True draws as the seed did: global seed = task id, whatever
    the split (so a test set is a prefix of the training set).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if seed_compat:
        torch.manual_seed(task_id)
        x = torch.randn(num_samples, dim)
    else:
        seed = task_id if split == "train" else TEST_SEED_OFFSET + task_id
        x = torch.randn(num_samples, dim, generator=torch.Generator().manual_seed(seed))
    if task_id == 0:
        y = torch.sin(x.mean(dim=1, keepdim=True).expand(-1, dim))
    elif task_id == 1:
        y = torch.cos(x.mean(dim=1, keepdim=True).expand(-1, dim)) * 0.5
    else:
        y = torch.tanh(x * 0.5 + task_id)
    return [(x[i], y[i]) for i in range(num_samples)]


def run_continual_learning(agent, num_tasks=4, epochs=20, num_samples=50, test_samples=20, use_replay=True,
                           seed_compat=False, adapt_steps=0, adapt_shots=10, adapt_lr=0.01, dim=64,
                           on_step=None, log=None):
    """The seed's demo loop for one agent: learn tasks in order, evaluate after each.

    Replay is used from the second task on when `use_replay`. After task t the
    agent is evaluated on every task's test split (on the tasks seen so far
    only under seed_compat, where evaluation writes to memory and the seed's
    call order matters). With adapt_steps > 0, after the last task each task
    is also evaluated after test-time adaptation on its first `adapt_shots`
    training samples.

    on_step(loss) is called after every training step, log(str) with the
    seed's progress lines. Returns a dict of plain lists:
      error_matrix[t][j]  test error on task j after learning task t (None if not evaluated)
      train_loss[t][e]    mean training loss of epoch e on task t
      adapted_error[j]    after adaptation (None when adapt_steps == 0)
      train_time_s, eval_time_s
    """
    say = log or (lambda s: None)
    error = [[None] * num_tasks for _ in range(num_tasks)]
    train_loss = [[] for _ in range(num_tasks)]
    train_time = eval_time = 0.0
    test_sets = {}

    def test_set(j):
        if seed_compat or j not in test_sets:  # seed_compat: reseed on every call, as the seed
            test_sets[j] = create_task_data(j, test_samples, "test", seed_compat, dim)
        return test_sets[j]

    for task_id in range(num_tasks):
        say(f"Learning Task {task_id + 1}/{num_tasks}")
        train_data = create_task_data(task_id, num_samples, "train", seed_compat, dim)
        t0 = time.perf_counter()
        for epoch in range(epochs):
            total_loss = 0
            for x, y in train_data:
                loss = agent.train_step(x, y, use_replay=use_replay and task_id > 0)
                total_loss += loss
                if on_step is not None:
                    on_step(loss)
            train_loss[task_id].append(total_loss / len(train_data))
            if epoch % 5 == 0:
                say(f" Epoch {epoch:2d}: Loss = {total_loss / len(train_data):.4f}")
        t1 = time.perf_counter()
        eval_tasks = range(task_id + 1) if seed_compat else range(num_tasks)
        for j in eval_tasks:
            error[task_id][j] = agent.evaluate(test_set(j))
        eval_time += time.perf_counter() - t1
        train_time += t1 - t0
        say(" Evaluation: " + ", ".join(f"Task {j + 1}: {error[task_id][j]:.4f}" for j in range(task_id + 1)))

    adapted = None
    if adapt_steps > 0:
        adapted = []
        for j in range(num_tasks):
            support = create_task_data(j, num_samples, "train", seed_compat, dim)[:adapt_shots]
            params = agent.adapt(support, num_steps=adapt_steps, lr=adapt_lr)
            adapted.append(agent.evaluate(test_set(j), params=params))
        say(" After adaptation: " + ", ".join(f"Task {j + 1}: {e:.4f}" for j, e in enumerate(adapted)))
    return {"error_matrix": error, "train_loss": train_loss, "adapted_error": adapted,
            "train_time_s": train_time, "eval_time_s": eval_time}


def run_continual_learning_demo(num_tasks=4, epochs=20, num_samples=50, test_samples=20, seed=0,
                                seed_compat=False, agent_factory=None, log=print, **loop_kwargs):
    """The seed's demo without its figure: the agent with replay, then without.

    Both runs start from the same seed (same initial weights, same replay
    draws). Returns the seed's results dict, now with 'without_memory' filled
    (the error on each task right after learning it), plus each run's full
    output under 'runs'. neuralmem_fast.apps.demo draws the figure.
    """
    make = agent_factory or (lambda: ContinualLearningAgent(seed_compat=seed_compat))
    results = {"tasks": list(range(1, num_tasks + 1)), "without_memory": [], "with_memory": [], "runs": {}}
    for key, replay in (("with_memory", True), ("without_memory", False)):
        torch.manual_seed(seed)
        np.random.seed(seed)
        run = run_continual_learning(make(), num_tasks, epochs, num_samples, test_samples, use_replay=replay,
                                     seed_compat=seed_compat, log=log, **loop_kwargs)
        results["runs"][key] = run
        results[key] = [run["error_matrix"][t][t] for t in range(num_tasks)]
    return results
