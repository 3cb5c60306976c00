"""The fast continual-learning agent: fused controller, fast bank, replay, MAML.

Design
------
The seed's step is overhead-bound: at N=128 every tensor op is a few
microseconds of arithmetic and tens of microseconds of dispatch, and the seed
spends ~40 ops per forward (an nn.LSTM call, seven Linear heads, a Python
loop over read heads that re-normalises the whole memory per head, a write
that normalises it again) and runs nine forwards per step. Here:

* `FastMemoryController` computes the seven heads with ONE matmul (rows
  reordered so that each activation covers one contiguous slice: softplus on
  both strengths at once) and the LSTM step as one matmul plus four
  elementwise ops. The seed always calls its LSTM with `hidden=None`, i.e.
  from a zero state, so the recurrent matmul vanishes (kept for a given
  `hidden`). Its parameters are initialised by building the seed's modules in
  the seed's order, so under the same `torch.manual_seed` it starts from the
  seed controller's exact weights; `load_seed_controller` copies a trained
  one. The two LSTM biases stay separate parameters because Adam and gradient
  clipping would treat a merged bias differently. With the seed's detached
  memory the write heads are computed outside autograd (they never get a
  gradient anyway).
* `FastAgent(replay="sequential")` is the seed's algorithm in the
  seed's order: current sample (read, write), push, then each replay sample
  in turn (read, write), one backward, clip to 1, Adam. With the seed's
  `ExperienceReplay` semantics it reproduces the seed agent's losses.
* `FastAgent(replay="batched")` runs the current sample and the
  replay minibatch in ONE forward of 1+k rows. Batched semantics: the k
  replay samples are drawn before the current sample enters the buffer (so a
  sample is never replayed in the step it arrives); all 1+k rows read the
  same memory M0 (the memory at the start of the step); their 1+k writes are
  applied together as one (1+k)-head DNC write addressed against M0:
  `M1 = M0 * prod_j(1 - w_j e_j) + sum_j w_j a_j`, usage decayed once and
  increased by the sum of the weightings. (In the seed's order the current
  sample writes first and replay j reads the writes of everything before it,
  one forward each.) The loss is the seed's: current MSE + 0.3 * sum_j w_j
  MSE_j with the buffer's importance weights w_j; the per-sample replay MSEs
  become the sampled items' new priorities (the seed never updates
  priorities). New samples enter the `PrioritizedReplayBuffer` at the largest
  priority seen, as in PER.
* `evaluate` leaves memory and usage unchanged, in both modes: all items in
  one forward against the current memory, reading without writing (the
  reference agent's evaluation, which reads item by item without writing; the
  seed wrote to the memory on every evaluated item).
* The training step is fused (`fused=True`, the default, where it applies:
  FlatAdam, the seed's detached unbatched bank, the native CPU kernels): the
  controller's forward runs without autograd and its backward is written
  out (`_fused_backward`), accumulating into the flat gradient directly. With
  the seed's semantics the forget gate and the write heads get no gradient,
  so the backward is three weight outer products, the native read backward
  and a dozen elementwise ops; autograd's graph cost several times that.
  `FusedControllerLoss` wraps the same code as an autograd.Function (the
  tests gradcheck it); `fused=False` or any other configuration uses autograd.
* `FlatAdam` re-bases the parameters onto one flat buffer and their grads
  onto another, so zero_grad, the clip to norm 1 and Adam (its fused kernel)
  are a few ops per step instead of per-parameter loops.
* `MAML` is a real MAML inner loop over the controller with
  torch.func.functional_call (second order by default, first-order option);
  it reads the memory but never writes it.

`make_agent(kind, **kwargs)` builds an agent by name for the demo.
"""

import torch
import torch.nn.functional as F

from ..config import MemoryConfig
from ..nn import NeuralMemoryBank
from ..ops.dispatch import library, resolve

from .controller import FastMemoryController, _fused_backward, _fused_forward
from .maml import MAML
from .optimizer import FlatAdam, _clip_grad_norm_
from .tasks import synthetic_task

__all__ = [
    "MemoryConfig",
    "FastMemoryController",
    "FlatAdam",
    "MAML",
    "FastAgent",
    "make_agent",
    "synthetic_task",
]

def _default_buffer(kind, capacity, alpha, beta):
    # Imported here so that the agent module loads without the replay module.
    from .. import replay

    if kind == "seed":
        return replay.ExperienceReplay(capacity=capacity, alpha=alpha)
    return replay.PrioritizedReplayBuffer(capacity, alpha=alpha, beta=beta)


class FastAgent:
    """The seed's agent on the fused controller and the fast bank.

    Args:
        input_dim, hidden_dim: as in the seed (64, 128).
        config: MemoryConfig (the seed's default when None).
        replay: "batched" (one forward for the replay minibatch) or "sequential"
            (the seed's order); see the module docstring for the semantics.
        replay_batch, replay_weight, replay_start: 8, 0.3 and 16 as in the seed.
        buffer: "prioritized" (PrioritizedReplayBuffer, priorities updated from
            the replay losses) or "seed" (ExperienceReplay: push with the current
            loss as priority, never updated, as in the seed). Default: "seed"
            for sequential, "prioritized" for batched.
        replay_buffer: a ready buffer object to use instead (either API).
        lr: Adam learning rate (the seed's 1e-3).
        optimizer: "flat" (FlatAdam: Adam's arithmetic on one flat buffer, a few
            ops per step) or "adam" (torch.optim.Adam, as in the seed).
        backend: backend of the memory ops.
        fused: train with the fused step (controller forward and hand-written
            backward, no autograd graph) where it applies: FlatAdam, the seed's
            detached unbatched bank, the native CPU kernels. Same arithmetic as the
            autograd step up to float rounding; False always uses autograd.
        num_threads: torch's intra-op threads while train_step runs (restored
            after it); None leaves torch's setting. At these sizes (ops of
            microseconds) a second thread only adds synchronisation: on an idle
            2-core machine the batched step took 272 us on one thread and 378 us
            on two, and on a busy machine the parallel ops (the optimizer's
            flat buffers) waited milliseconds for the other core.
        write_mode: the bank's write addressing (NeuralMemoryBank): "allocation"
            (the default: the DNC's least-used slot first, so the slots differ),
            "content" (the tutorial's; from the zero memory every write is
            uniform and the slots stay identical) or "none" (no writes, every
            read zero: an ablation). None: "allocation", or "content" under
            seed_compat.
        seed_compat: the tutorial's memory behaviour bit for bit (content-addressed
            writes); the agent then reproduces the seed agent's losses.
    """

    def __init__(self, input_dim=64, hidden_dim=128, config=None, replay="batched", replay_batch=8,
                 replay_weight=0.3, replay_start=16, capacity=5000, alpha=0.6, beta=0.4, buffer=None,
                 replay_buffer=None, lr=1e-3, optimizer="flat", backend="auto", clip_norm=1.0, fused=True,
                 num_threads=1, write_mode=None, seed_compat=False):
        if replay not in ("batched", "sequential"):
            raise ValueError(f"replay must be 'batched' or 'sequential', got {replay!r}")
        if write_mode is None:
            write_mode = "content" if seed_compat else "allocation"
        elif seed_compat and write_mode != "content":
            raise ValueError(f"seed_compat=True writes as the tutorial (write_mode='content'), got {write_mode!r}")
        self.replay = replay
        self.seed_compat = seed_compat
        self.config = config if config is not None else MemoryConfig()
        self.memory_bank = NeuralMemoryBank(self.config, backend=backend, write_mode=write_mode)
        self.controller = FastMemoryController(input_dim, hidden_dim, self.config)
        if buffer is None:
            buffer = "seed" if replay == "sequential" else "prioritized"
        if buffer not in ("seed", "prioritized"):
            raise ValueError(f"buffer must be 'seed' or 'prioritized', got {buffer!r}")
        self.replay_buffer = replay_buffer if replay_buffer is not None else _default_buffer(
            buffer, capacity, alpha, beta)
        self._seed_api = hasattr(self.replay_buffer, "push")
        self.replay_batch = replay_batch
        self.replay_weight = replay_weight
        self.replay_start = replay_start
        self.beta = beta
        self.clip_norm = clip_norm
        self.meta_learner = MAML(self.controller, self.memory_bank)
        self._params = list(self.controller.parameters())
        if optimizer == "flat":
            flat = [p for p in self._params if p is not self.controller.weight_hh]
            self.optimizer = FlatAdam(flat, lr=lr, rest=[self.controller.weight_hh])
        elif optimizer == "adam":
            self.optimizer = torch.optim.Adam(self._params, lr=lr)
        else:
            raise ValueError(f"optimizer must be 'flat' or 'adam', got {optimizer!r}")
        self.task_history = []
        self.fused = fused
        if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
            raise ValueError(f"num_threads must be None or a positive int, got {num_threads!r}")
        self.num_threads = num_threads
        self._read_ops = {}  # device -> the fused step's (read, write) op namespaces, or None

    # ------------------------------------------------------------- replay I/O
    def _buffer_len(self):
        buf = self.replay_buffer
        return len(buf) if hasattr(buf, "__len__") else len(buf.buffer)

    def _push(self, x, y, loss_value):
        if self._seed_api:
            self.replay_buffer.push((x.detach().clone(), y.detach().clone()), priority=loss_value + 1e-6)
        else:
            self.replay_buffer.add((x.detach(), y.detach()))

    def _sample(self):
        """(xs (k, in), ys (k, in), weights (k,), indices or None)."""
        if self._seed_api:
            samples, weights = self.replay_buffer.sample(self.replay_batch)
            xs = torch.stack([s[0] for s in samples])
            ys = torch.stack([s[1] for s in samples])
            return xs, ys, weights, None
        batch, indices, weights = self.replay_buffer.sample(self.replay_batch, self.beta)
        xs, ys = batch
        return xs, ys, torch.as_tensor(weights), indices

    # --------------------------------------------------------------- training
    def train_step(self, x, y, use_replay=True):
        """One step on (x, y) plus replay; returns the total loss (the seed's value)."""
        n = self.num_threads
        prev = torch.get_num_threads() if n is not None else n
        if prev == n:
            return self._train_step(x, y, use_replay)
        torch.set_num_threads(n)
        try:
            return self._train_step(x, y, use_replay)
        finally:
            torch.set_num_threads(prev)

    def _train_step(self, x, y, use_replay):
        native = self._fused_read_op() if self.fused else None
        if native is not None:
            if self.replay == "batched":
                return self._train_step_batched_fused(x, y, use_replay, native)
            return self._train_step_sequential_fused(x, y, use_replay, native)
        if self.replay == "batched":
            return self._train_step_batched(x, y, use_replay)
        self.optimizer.zero_grad()
        pred, _ = self.controller(x, self.memory_bank)
        current_loss = F.mse_loss(pred, y)
        self._push(x, y, current_loss.item())
        total_loss = current_loss
        if use_replay and self._buffer_len() > self.replay_start:
            xs, ys, weights, indices = self._sample()
            weights = weights.to(dtype=pred.dtype, device=pred.device)
            losses = []
            for i in range(xs.shape[0]):
                replay_pred, _ = self.controller(xs[i], self.memory_bank)
                replay_loss = F.mse_loss(replay_pred, ys[i])
                total_loss = total_loss + self.replay_weight * replay_loss * weights[i]
                losses.append(replay_loss)
            if indices is not None:
                self.replay_buffer.update_priorities(indices, torch.stack(losses).detach() + 1e-6)
        self._update(total_loss)
        return total_loss.item()

    def _train_step_batched(self, x, y, use_replay):
        # The seed samples after pushing the current item and replays once the
        # buffer holds more than 16; sampling before the push, that is >= 16.
        self.optimizer.zero_grad()
        if use_replay and self._buffer_len() >= self.replay_start:
            xs, ys, weights, indices = self._sample()
            pred, _ = self.controller(torch.cat([x.unsqueeze(0), xs]), self.memory_bank)
            losses = (pred - torch.cat([y.unsqueeze(0), ys])).pow(2).mean(dim=1)
            weights = weights.to(dtype=pred.dtype, device=pred.device)
            current_loss = losses[0]
            total_loss = current_loss + self.replay_weight * torch.dot(losses[1:], weights)
            if indices is not None:
                self.replay_buffer.update_priorities(indices, losses[1:].detach() + 1e-6)
        else:
            pred, _ = self.controller(x, self.memory_bank)
            current_loss = F.mse_loss(pred, y)
            total_loss = current_loss
        self._push(x, y, current_loss.item())
        self._update(total_loss)
        return total_loss.item()

    # ------------------------------------------------------------ fused step
    def _fused_read_op(self):
        """The native op namespaces (read, write) that the fused step calls, or
        None where the fused step does not apply (then autograd).

        CPU only: the CPU kernels take the step's strided slices as they are,
        and that is where the step is dispatch-bound and was measured; other
        devices keep the autograd step.
        """
        bank = self.memory_bank
        if (bank.differentiable or bank.batched or not isinstance(self.optimizer, FlatAdam)
                or type(self.controller) is not FastMemoryController or bank.memory.requires_grad
                or bank.memory.device.type != "cpu"):
            return None
        dev = bank.memory.device
        if dev not in self._read_ops:
            n = bank.memory_size
            be_r = resolve(bank.backend, "content_read", dev, n)
            be_w = resolve(bank.backend, "content_write_", dev, n)
            write_op = library(be_w) if be_w == "cpu" else None
            self._read_ops[dev] = (library(be_r), write_op) if be_r == "cpu" else None
        return self._read_ops[dev]

    def _fused_rows(self, X, Y, lw, native, acc=False):
        """Forward, per-row MSE, backward into .grad (weighted by lw (M,) or 1), write.

        The write comes last: the read's backward needs the memory it read.
        """
        read_op, write_op = native
        ctrl, bank = self.controller, self.memory_bank
        P, dims = ctrl.fused_params()
        eps = bank.eps
        memory3 = bank.memory.unsqueeze(0)
        pred, cache, heads = _fused_forward(P, dims, X, memory3, read_op, eps)
        diff = pred - Y
        losses = torch.linalg.vecdot(diff, diff).mul_(1.0 / diff.shape[1])
        scale = 2.0 / diff.shape[1]
        dpred = diff * scale if lw is None else diff * (lw * scale).unsqueeze(1)
        _fused_backward(P, dims, cache, dpred, [p.grad for p in P], read_op, eps, acc)
        D, o_wk, o_wv, o_e = ctrl.D, ctrl._o_wk, ctrl._o_wv, ctrl._o_e
        key, vec = heads[:, o_wk:o_wk + D], torch.tanh(heads[:, o_wv:o_wv + D])
        erase, strength = torch.sigmoid(heads[:, o_e:o_e + D]), F.softplus(heads[:, o_wv - 1:o_wv])
        if write_op is None or bank.memory_in_graph or bank.write_mode != "content":
            # the bank's own write: the torch path, a pending graph holds the memory (it copies),
            # or the addressing is not the tutorial's content addressing
            bank.write(key, vec, erase, strength)
        else:
            # the bank's in-place write op, minus its per-call shape checks (shapes are ours)
            write_op.content_write_(memory3, bank.usage.unsqueeze(0), key.unsqueeze(0), strength.view(1, -1),
                                    erase.unsqueeze(0), vec.unsqueeze(0), eps, bank.decay)
        return losses

    @torch.no_grad()
    def _train_step_batched_fused(self, x, y, use_replay, native):
        """_train_step_batched's semantics and arithmetic on the fused step."""
        self.optimizer.zero_grad()
        if use_replay and self._buffer_len() >= self.replay_start:
            xs, ys, weights, indices = self._sample()
            weights = weights.to(dtype=x.dtype, device=x.device)
            lw = torch.cat([weights.new_ones(1), weights * self.replay_weight])
            losses = self._fused_rows(torch.cat([x.unsqueeze(0), xs]), torch.cat([y.unsqueeze(0), ys]), lw,
                                      native)
            total_loss = losses[0] + self.replay_weight * torch.dot(losses[1:], weights)
            if indices is not None:
                self.replay_buffer.update_priorities(indices, losses[1:] + 1e-6)
        else:
            losses = self._fused_rows(x.unsqueeze(0), y.unsqueeze(0), None, native)
            total_loss = losses[0]
        # The prioritized buffer enters new items at its max priority: no loss needed, no sync.
        self._push(x, y, losses[0].item() if self._seed_api else None)
        self._clip_and_step()
        return total_loss.item()

    @torch.no_grad()
    def _train_step_sequential_fused(self, x, y, use_replay, native):
        """The seed's order (each row reads the writes before it) on the fused step:
        each row's backward runs right after its forward, before its write."""
        self.optimizer.zero_grad()
        current_loss = self._fused_rows(x.unsqueeze(0), y.unsqueeze(0), None, native)[0]
        self._push(x, y, current_loss.item())
        total_loss = current_loss
        if use_replay and self._buffer_len() > self.replay_start:
            xs, ys, weights, indices = self._sample()
            weights = weights.to(dtype=x.dtype, device=x.device)
            losses = []
            for i in range(xs.shape[0]):
                w = weights[i:i + 1] * self.replay_weight
                replay_loss = self._fused_rows(xs[i:i + 1], ys[i:i + 1], w, native, acc=True)[0]
                total_loss = total_loss + self.replay_weight * replay_loss * weights[i]
                losses.append(replay_loss)
            if indices is not None:
                self.replay_buffer.update_priorities(indices, torch.stack(losses) + 1e-6)
        self._clip_and_step()
        return total_loss.item()

    def _clip_and_step(self):
        if self.clip_norm is not None:
            self.optimizer.clip_grad_norm_(self.clip_norm)
        self.optimizer.step()

    def _update(self, total_loss):
        total_loss.backward()
        if self.clip_norm is not None:
            if isinstance(self.optimizer, FlatAdam):
                self.optimizer.clip_grad_norm_(self.clip_norm)
            else:
                _clip_grad_norm_(self._params, self.clip_norm)
        self.optimizer.step()

    @torch.no_grad()
    def evaluate(self, test_data, params=None):
        """Mean MSE over (x, y) pairs, read-only: memory and usage are left unchanged.

        `params` (from `adapt`) evaluates those parameters instead of the
        controller's own, in one read-only forward over all items (as the
        reference agent's evaluate(..., params=...)).
        """
        self.controller.eval()
        try:
            if params is not None:
                xs = torch.stack([x for x, _ in test_data])
                ys = torch.stack([y for _, y in test_data])
                pred, _ = torch.func.functional_call(self.controller, params, (xs, self.memory_bank),
                                                     {"write": False})
                return (pred - ys).pow(2).mean(dim=1).mean().item()
            xs = torch.stack([x for x, _ in test_data])
            ys = torch.stack([y for _, y in test_data])
            pred, _ = self.controller(xs, self.memory_bank, write=False)
            return (pred - ys).pow(2).mean(dim=1).mean().item()
        finally:
            self.controller.train()

    @torch.no_grad()
    def predict(self, xs):
        """Outputs for a batch (M, input_dim), reading memory without writing."""
        self.controller.eval()
        try:
            return self.controller(xs, self.memory_bank, write=False)[0]
        finally:
            self.controller.train()

    def adapt(self, support_x, support_y=None, **kw):
        """MAML inner loop from the current parameters (see MAML.adapt).

        adapt(support_x, support_y, ...) with tensors (M, input_dim) returns the
        adapted parameters, differentiable w.r.t. the controller's unless
        first_order. adapt(pairs, num_steps=, lr=) with a list of (x, y) pairs is
        the demo's test-time adaptation, as the reference agent's: first order,
        the returned parameters detached, for evaluate(..., params=...).
        """
        if support_y is None:
            xs = torch.stack([x for x, _ in support_x])
            ys = torch.stack([y for _, y in support_x])
            kw.setdefault("first_order", True)
            with torch.enable_grad():
                params = self.meta_learner.adapt(xs, ys, **kw)
            return {n: p.detach() for n, p in params.items()}
        return self.meta_learner.adapt(support_x, support_y, **kw)

    def meta_train_step(self, support_x, support_y, query_x, query_y, **kw):
        """One outer MAML step: Adam on the query loss after adaptation."""
        self.optimizer.zero_grad()
        loss = self.meta_learner.meta_loss(support_x, support_y, query_x, query_y, **kw)
        self._update(loss)
        return loss.item()


def make_agent(kind="batched", **kwargs):
    """Agent factory for the demo.

    kind: "batched" (fast agent, batched prioritized replay; the default),
    "sequential" (fast agent, the seed's replay order and buffer semantics).
    Other keyword arguments go to FastAgent (write_mode, seed_compat, ...): new
    agents write by allocation unless seed_compat=True.
    """
    if kind in ("batched", "fast"):
        return FastAgent(replay="batched", **kwargs)
    if kind == "sequential":
        return FastAgent(replay="sequential", **kwargs)
    raise ValueError(f"kind must be 'batched' or 'sequential', got {kind!r}")

