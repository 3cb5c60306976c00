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
* `ContinualLearningAgent(replay="sequential")` is the seed's algorithm in the
  seed's order: current sample (read, write), push, then each replay sample
  in turn (read, write), one backward, clip to 1, Adam. With the seed's
  `ExperienceReplay` semantics it reproduces the seed agent's losses.
* `ContinualLearningAgent(replay="batched")` runs the current sample and the
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
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import MemoryConfig
from ..nn import NeuralMemoryBank
from ..ops.dispatch import library, resolve

__all__ = [
    "MemoryConfig",
    "FastMemoryController",
    "FlatAdam",
    "MAML",
    "ContinualLearningAgent",
    "make_agent",
    "create_task_data",
]

def create_task_data(task_id, num_samples=100, seed=None):
    """The seed's synthetic tasks (seed = task_id by default, as in the seed)."""
    g = torch.Generator().manual_seed(task_id if seed is None else seed)
    x = torch.randn(num_samples, 64, generator=g)
    if task_id == 0:
        y = torch.sin(x.mean(dim=1, keepdim=True).expand(-1, 64))
    elif task_id == 1:
        y = torch.cos(x.mean(dim=1, keepdim=True).expand(-1, 64)) * 0.5
    else:
        y = torch.tanh(x * 0.5 + task_id)
    return [(x[i], y[i]) for i in range(num_samples)]


# --------------------------------------------------------------------------
# controller
# --------------------------------------------------------------------------
class FastMemoryController(nn.Module):
    """The seed's MemoryController with fused heads; same forward signature.

    forward(x, memory_bank, hidden=None, write=True): x is (input_dim,) as in the
    seed, or (M, input_dim) for M samples at once (the bank then reads M queries
    against one memory and applies M write heads together; with a bank of
    batch_size=M, sample m uses memory m).
    """

    def __init__(self, input_dim, hidden_dim, memory_config):
        super().__init__()
        self.input_dim = input_dim
        self.hidden_dim = hidden_dim
        self.memory_config = memory_config
        H, D = memory_config.num_read_heads, memory_config.memory_dim
        self.H, self.D = H, D
        # The seed's modules, built in the seed's order, only to draw the same init.
        lstm = nn.LSTM(input_dim, hidden_dim, batch_first=True)
        read_keys = nn.Linear(hidden_dim, H * D)
        read_strengths = nn.Linear(hidden_dim, H)
        write_key = nn.Linear(hidden_dim, D)
        write_vector = nn.Linear(hidden_dim, D)
        erase_vector = nn.Linear(hidden_dim, D)
        write_strength = nn.Linear(hidden_dim, 1)
        output = nn.Linear(hidden_dim + H * D, input_dim)
        self.weight_ih = nn.Parameter(lstm.weight_ih_l0.detach().clone())
        self.weight_hh = nn.Parameter(lstm.weight_hh_l0.detach().clone())
        self.bias_ih = nn.Parameter(lstm.bias_ih_l0.detach().clone())
        self.bias_hh = nn.Parameter(lstm.bias_hh_l0.detach().clone())
        heads = self._head_order(read_keys, read_strengths, write_key, write_vector, erase_vector, write_strength)
        self.heads = nn.Linear(hidden_dim, sum(m.out_features for m in heads))
        with torch.no_grad():
            self.heads.weight.copy_(torch.cat([m.weight for m in heads]))
            self.heads.bias.copy_(torch.cat([m.bias for m in heads]))
        self.output = output
        # Row offsets of the fused heads: [read keys | write key | read s, write s | write vector | erase].
        self._o_wk = H * D
        self._o_s = self._o_wk + D
        self._o_wv = self._o_s + H + 1
        self._o_e = self._o_wv + D

    def fused_params(self):
        """(P, dims) of the fused training step: the parameters in _fused_forward's order."""
        P = (self.weight_ih, self.bias_ih, self.bias_hh, self.heads.weight, self.heads.bias,
             self.output.weight, self.output.bias)
        return P, (self.hidden_dim, self.H, self.D, self._o_s)

    @staticmethod
    def _head_order(read_keys, read_strengths, write_key, write_vector, erase_vector, write_strength):
        return [read_keys, write_key, read_strengths, write_strength, write_vector, erase_vector]

    @torch.no_grad()
    def load_seed_controller(self, seed_controller):
        """Copies the weights of a seed-layout MemoryController into the fused layout."""
        c = seed_controller
        self.weight_ih.copy_(c.lstm.weight_ih_l0)
        self.weight_hh.copy_(c.lstm.weight_hh_l0)
        self.bias_ih.copy_(c.lstm.bias_ih_l0)
        self.bias_hh.copy_(c.lstm.bias_hh_l0)
        heads = self._head_order(c.read_keys, c.read_strengths, c.write_key, c.write_vector, c.erase_vector,
                                 c.write_strength)
        self.heads.weight.copy_(torch.cat([m.weight for m in heads]))
        self.heads.bias.copy_(torch.cat([m.bias for m in heads]))
        self.output.weight.copy_(c.output.weight)
        self.output.bias.copy_(c.output.bias)
        return self

    def seed_layout_grads(self):
        """Gradients split back into the seed's parameter names (for comparisons)."""
        H, D = self.H, self.D

        def g(p):
            return p.grad if p.grad is not None else torch.zeros_like(p)

        gw, gb = g(self.heads.weight), g(self.heads.bias)
        out = {
            "lstm.weight_ih_l0": g(self.weight_ih), "lstm.weight_hh_l0": g(self.weight_hh),
            "lstm.bias_ih_l0": g(self.bias_ih), "lstm.bias_hh_l0": g(self.bias_hh),
        }
        rows = {"read_keys": (0, H * D), "write_key": (self._o_wk, D), "read_strengths": (self._o_s, H),
                "write_strength": (self._o_s + H, 1), "write_vector": (self._o_wv, D), "erase_vector": (self._o_e, D)}
        for name, (o, n) in rows.items():
            out[name + ".weight"] = gw[o:o + n]
            out[name + ".bias"] = gb[o:o + n]
        out["output.weight"], out["output.bias"] = g(self.output.weight), g(self.output.bias)
        return out

    def forward(self, x, memory_bank, hidden=None, write=True):
        single = x.dim() == 1
        xb = x.unsqueeze(0) if single else x
        Hd = self.hidden_dim
        # LSTM cell from (h0, c0); the seed always starts from zeros. chunk/split
        # give one backward node (a cat) where slices would give one each.
        gates = F.linear(xb, self.weight_ih, self.bias_ih) + self.bias_hh
        if hidden is not None:
            h0, c0 = (t.reshape(-1, Hd) for t in hidden)
            gates = gates + F.linear(h0, self.weight_hh)
        i, f, g, o = gates.chunk(4, dim=1)
        c = torch.sigmoid(i) * torch.tanh(g)
        if hidden is not None:
            c = c + torch.sigmoid(f) * c0
        h = torch.sigmoid(o) * torch.tanh(c)

        heads = F.linear(h, self.heads.weight, self.heads.bias)
        H, D = self.H, self.D
        M = heads.shape[0]
        read_k, write_k, read_s, write_s, write_v, erase_v = heads.split([H * D, D, H, 1, D, D], dim=1)
        read_k = read_k.reshape(M, H, D)
        read_s = F.softplus(read_s)
        if single:
            reads = memory_bank.read(read_k[0], read_s[0]).unsqueeze(0)
        else:
            reads = memory_bank.read(read_k, read_s)
        if write:
            differentiable = getattr(memory_bank, "differentiable", True)
            with torch.set_grad_enabled(torch.is_grad_enabled() and differentiable):
                write_s = F.softplus(write_s)
                write_v = torch.tanh(write_v)
                erase_v = torch.sigmoid(erase_v)
                if single:
                    memory_bank.write(write_k[0], write_v[0], erase_v[0], write_s[0])
                else:
                    memory_bank.write(write_k, write_v, erase_v, write_s)
        out = self.output(torch.cat([h, reads], dim=-1))
        new_hidden = (h.unsqueeze(0), c.unsqueeze(0))
        if single:
            return out[0], (new_hidden[0][:, 0], new_hidden[1][:, 0])
        return out, new_hidden


# --------------------------------------------------------------------------
# the fused training step: controller forward and hand-written backward
# --------------------------------------------------------------------------
# At the seed's sizes a training step is ~40 small ops forward and ~60
# autograd nodes backward, each microseconds of dispatch for nanoseconds of
# arithmetic. With the seed's semantics (hidden=None, memory constant to
# autograd) the gradient is short enough to write out: the forget gate and
# the write heads never receive one (c0 = 0; the write is detached), so the
# backward is three weight outer products (output layer, read rows of the
# heads, LSTM input weights), the native read backward and a dozen
# elementwise ops, accumulated straight into the parameters' .grad (views of
# FlatAdam's flat gradient): no graph, no AccumulateGrad, no gradient
# temporaries per parameter. FusedControllerLoss exposes the same two
# functions as an autograd.Function, which is what the tests gradcheck.
def _fused_forward(P, dims, X, memory3, read_op, eps):
    """Controller forward (hidden=None) for rows X (M, in) against a constant memory (1, N, D).

    P: (weight_ih, bias_ih, bias_hh, heads.weight, heads.bias, output.weight,
    output.bias); dims: (hidden_dim, H, D, row offset of the read strengths).
    Returns (pred (M, in), cache for _fused_backward, heads (M, rows)).
    FastMemoryController.forward's arithmetic.
    """
    W_ih, b_ih, b_hh, W_h, b_h, W_o, b_o = P
    Hd, H, D, o_s = dims
    M = X.shape[0]
    gates = torch.addmm(b_ih, X, W_ih.t()).add_(b_hh)
    sig = torch.sigmoid(gates)  # i and o; f too, unused (c0 = 0), one op instead of two
    g = torch.tanh(gates[:, 2 * Hd:3 * Hd])
    tc = torch.tanh(sig[:, :Hd] * g)
    h = sig[:, 3 * Hd:] * tc
    heads = torch.addmm(b_h, h, W_h.t())
    rs_pre = heads[:, o_s:o_s + H]
    keys = heads[:, :H * D].reshape(1, M * H, D)
    strengths = F.softplus(rs_pre).reshape(1, M * H)
    reads, lse = read_op.content_read(memory3, keys, strengths, eps)
    out_in = torch.cat([h, reads.view(M, H * D)], dim=1)
    pred = torch.addmm(b_o, out_in, W_o.t())
    cache = (X, sig, g, tc, h, rs_pre, keys, strengths, reads, lse, out_in, memory3)
    return pred, cache, heads


def _fused_backward(P, dims, cache, dpred, grads, read_op, eps, acc):
    """d(loss)/d(P) into `grads` (tensors shaped like P) given dpred = d(loss)/d(pred) (M, in).

    acc=False overwrites the rows that receive a gradient (the others, the
    forget gate's and the write heads', are left as they are: zero after
    zero_grad); acc=True adds to them.
    """
    X, sig, g, tc, h, rs_pre, keys, strengths, reads, lse, out_in, memory3 = cache
    _, _, _, W_h, _, W_o, _ = P
    g_wih, g_bih, g_bhh, g_wh, g_bh, g_wo, g_bo = grads
    Hd, H, D, o_s = dims
    M, HD = X.shape[0], H * D
    if acc:
        def mm(out, a, b):
            out.addmm_(a, b)

        def colsum(out, a):
            out.add_(a.sum(0))
    else:
        def mm(out, a, b):
            torch.mm(a, b, out=out)

        def colsum(out, a):
            torch.sum(a, 0, out=out)
    # output layer
    mm(g_wo, dpred.t(), out_in)
    colsum(g_bo, dpred)
    d_in = torch.mm(dpred, W_o)  # (M, Hd + H*D): [d h | d reads]
    # the read, memory constant: keys and strengths only
    d_reads = d_in[:, Hd:].reshape(1, M * H, D).contiguous()
    _, d_keys, d_str = read_op.content_read_backward(d_reads, reads, lse, memory3, keys, strengths, eps)
    d_keys = d_keys.view(M, HD)
    d_rs = d_str.view(M, H).mul_(torch.sigmoid(rs_pre))  # softplus' = sigmoid
    mm(g_wh[:HD], d_keys.t(), h)
    mm(g_wh[o_s:o_s + H], d_rs.t(), h)
    colsum(g_bh[:HD], d_keys)
    colsum(g_bh[o_s:o_s + H], d_rs)
    dh = torch.addmm(d_in[:, :Hd], d_keys, W_h[:HD]).addmm_(d_rs, W_h[o_s:o_s + H])
    # LSTM cell from zeros: c = i g, h = o tanh(c); the forget rows get no gradient
    dsig = sig - sig * sig  # sigmoid'
    dho = dh * sig[:, 3 * Hd:]
    dc = torch.addcmul(dho, dho * tc, tc, value=-1.0)  # dh o (1 - tanh(c)^2)
    d_gates = torch.zeros_like(sig)
    torch.mul(dc * g, dsig[:, :Hd], out=d_gates[:, :Hd])
    torch.mul(dc * sig[:, :Hd], 1.0 - g * g, out=d_gates[:, 2 * Hd:3 * Hd])
    torch.mul(dh * tc, dsig[:, 3 * Hd:], out=d_gates[:, 3 * Hd:])
    mm(g_wih, d_gates.t(), X)
    if acc:
        db = d_gates.sum(0)
        g_bih.add_(db)
        g_bhh.add_(db)
    else:
        torch.sum(d_gates, 0, out=g_bih)
        g_bhh.copy_(g_bih)


class FusedControllerLoss(torch.autograd.Function):
    """Per-row MSE (M,) of a FastMemoryController step (hidden=None, no write)
    with the hand-written backward of the fused training step.

    apply(X, Y, memory3, read_op, eps, dims, *P): gradients reach P only (the
    memory is a constant, as in the seed).
    """

    @staticmethod
    def forward(ctx, X, Y, memory3, read_op, eps, dims, *P):
        pred, cache, _ = _fused_forward(P, dims, X, memory3, read_op, eps)
        diff = pred - Y
        ctx.save_for_backward(diff, *P)
        ctx.cache, ctx.read_op, ctx.eps, ctx.dims = cache, read_op, eps, dims
        return diff.pow(2).mean(dim=1)

    @staticmethod
    def backward(ctx, grad_losses):
        diff, *P = ctx.saved_tensors
        dpred = diff * (grad_losses * (2.0 / diff.shape[1])).unsqueeze(1)
        grads = [torch.zeros_like(p) for p in P]
        _fused_backward(P, ctx.dims, ctx.cache, dpred, grads, ctx.read_op, ctx.eps, acc=False)
        return (None,) * 6 + tuple(grads)


# --------------------------------------------------------------------------
# MAML
# --------------------------------------------------------------------------
class MAML:
    """Model-agnostic meta-learning over the controller (Finn et al., 2017).

    `adapt` takes `num_steps` gradient steps on the support set from the
    current parameters and returns the adapted parameters (a dict name ->
    tensor, differentiable w.r.t. the originals unless first_order=True).
    `meta_loss` evaluates the query loss under adapted parameters; its
    backward reaches the original parameters (second-order MAML).
    The memory is read but not written during adaptation.
    """

    def __init__(self, model, memory_bank, inner_lr=0.01, num_steps=5, first_order=False):
        self.model = model
        self.memory_bank = memory_bank
        self.inner_lr = inner_lr
        self.num_steps = num_steps
        self.first_order = first_order

    def _loss(self, params, x, y):
        pred, _ = torch.func.functional_call(self.model, params, (x, self.memory_bank), {"write": False})
        return F.mse_loss(pred, y)

    def adapt(self, support_x, support_y, num_steps=None, lr=None, first_order=None):
        num_steps = self.num_steps if num_steps is None else num_steps
        lr = self.inner_lr if lr is None else lr
        first_order = self.first_order if first_order is None else first_order
        params = dict(self.model.named_parameters())
        names = list(params)
        for _ in range(num_steps):
            loss = self._loss(params, support_x, support_y)
            grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=not first_order,
                                        allow_unused=True)
            params = {n: (params[n] if g is None else params[n] - lr * (g.detach() if first_order else g))
                      for n, g in zip(names, grads)}
        return params

    def meta_loss(self, support_x, support_y, query_x, query_y, **kw):
        return self._loss(self.adapt(support_x, support_y, **kw), query_x, query_y)


# --------------------------------------------------------------------------
# agent
# --------------------------------------------------------------------------
class FlatAdam:
    """Adam over parameters re-based onto one flat buffer (and their grads onto another).

    The parameters' storage becomes views of one flat tensor and their .grad
    views of one flat gradient that autograd accumulates into in place, so
    zeroing, clipping and the Adam update are a handful of ops on one tensor
    instead of per-parameter loops. The arithmetic is torch.optim.Adam's
    (non-fused): m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
    p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps).
    Parameters listed in `rest` (never flattened: here the LSTM's recurrent
    weight, which gets a gradient only when a hidden state is passed) use a
    regular torch.optim.Adam that skips them while their grad is None.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, rest=(), fused=True):
        self.params = list(params)
        self.lr, self.betas, self.eps = lr, betas, eps
        p0 = self.params[0]
        total = sum(p.numel() for p in self.params)
        self.flat = torch.empty(total, dtype=p0.dtype, device=p0.device)
        self.flat_grad = torch.zeros_like(self.flat)
        off = 0
        self._grad_views = []
        for p in self.params:
            n = p.numel()
            self.flat[off:off + n].copy_(p.detach().reshape(-1))
            p.data = self.flat[off:off + n].view_as(p)
            p.grad = self.flat_grad[off:off + n].view_as(p)
            self._grad_views.append(p.grad)
            off += n
        self.exp_avg = torch.zeros_like(self.flat)
        self.exp_avg_sq = torch.zeros_like(self.flat)
        self.step_count = 0
        self.fused = fused and hasattr(torch, "_fused_adam_")
        if self.fused:
            # torch.optim.Adam's fused kernel on the single flat tensor: one op per step.
            self._step_t = torch.zeros((), dtype=torch.float32)
        self.rest = list(rest)
        self._rest_opt = torch.optim.Adam(self.rest, lr=lr, betas=betas, eps=eps) if self.rest else None

    def zero_grad(self, set_to_none=False):
        self.flat_grad.zero_()  # grads stay views of flat_grad
        for p, view in zip(self.params, self._grad_views):
            if p.grad is not view:  # e.g. module.zero_grad() set it to None: re-attach the view
                p.grad = view
        for p in self.rest:  # torch.optim's zero_grad(set_to_none=True), without its hooks
            p.grad = None

    def _rest_step(self):
        # torch.optim.Adam skips parameters without a gradient; when all of them
        # lack one (the LSTM's recurrent weight on the seed's hidden=None path)
        # its step is a no-op that still costs tens of microseconds of hooks.
        if self._rest_opt is not None and any(p.grad is not None for p in self.rest):
            self._rest_opt.step()

    def clip_grad_norm_(self, max_norm):
        grads = [self.flat_grad] + [p.grad for p in self.rest if p.grad is not None]
        total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if len(grads) > 1 \
            else torch.linalg.vector_norm(self.flat_grad)
        if total.device.type == "cpu":
            # No device to sync with: the coefficient as a Python float, and no
            # multiply at all when it is 1 (the norm is within max_norm).
            coef = max_norm / (total.item() + 1e-6)
            if coef < 1.0:
                torch._foreach_mul_(grads, coef)
            return total
        torch._foreach_mul_(grads, torch.clamp(max_norm / (total + 1e-6), max=1.0))
        return total

    @torch.no_grad()
    def step(self):
        self.step_count += 1
        b1, b2 = self.betas
        if self.fused:
            self._step_t.fill_(self.step_count)
            torch._fused_adam_([self.flat], [self.flat_grad], [self.exp_avg], [self.exp_avg_sq], [],
                               [self._step_t], amsgrad=False, lr=self.lr, beta1=b1, beta2=b2,
                               weight_decay=0.0, eps=self.eps, maximize=False)
            self._rest_step()
            return
        g = self.flat_grad
        self.exp_avg.lerp_(g, 1 - b1)
        self.exp_avg_sq.mul_(b2).addcmul_(g, g, value=1 - b2)
        bc1 = 1 - b1 ** self.step_count
        bc2_sqrt = math.sqrt(1 - b2 ** self.step_count)
        denom = (self.exp_avg_sq.sqrt() / bc2_sqrt).add_(self.eps)
        self.flat.addcdiv_(self.exp_avg, denom, value=-self.lr / bc1)
        self._rest_step()

    def state_dict(self):
        return {"step": self.step_count, "exp_avg": self.exp_avg.clone(), "exp_avg_sq": self.exp_avg_sq.clone(),
                "rest": self._rest_opt.state_dict() if self._rest_opt is not None else None}

    def load_state_dict(self, state):
        self.step_count = state["step"]
        self.exp_avg.copy_(state["exp_avg"])
        self.exp_avg_sq.copy_(state["exp_avg_sq"])
        if self._rest_opt is not None and state["rest"] is not None:
            self._rest_opt.load_state_dict(state["rest"])


def _clip_grad_norm_(params, max_norm):
    """torch.nn.utils.clip_grad_norm_'s arithmetic (L2, eps 1e-6) without its
    per-call grouping work; parameters without a gradient are skipped."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    torch._foreach_mul_(grads, torch.clamp(max_norm / (total + 1e-6), max=1.0))
    return total


def _default_buffer(kind, capacity, alpha, beta):
    # Imported here so that the agent module loads without the replay module.
    from .. import replay

    if kind == "seed":
        return replay.ExperienceReplay(capacity=capacity, alpha=alpha)
    return replay.PrioritizedReplayBuffer(capacity, alpha=alpha, beta=beta)


class ContinualLearningAgent:
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
    """

    def __init__(self, input_dim=64, hidden_dim=128, config=None, replay="batched", replay_batch=8,
                 replay_weight=0.3, replay_start=16, capacity=5000, alpha=0.6, beta=0.4, buffer=None,
                 replay_buffer=None, lr=1e-3, optimizer="flat", backend="auto", clip_norm=1.0, fused=True,
                 num_threads=1):
        if replay not in ("batched", "sequential"):
            raise ValueError(f"replay must be 'batched' or 'sequential', got {replay!r}")
        self.replay = replay
        self.config = config if config is not None else MemoryConfig()
        self.memory_bank = NeuralMemoryBank(self.config, backend=backend)
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
        if write_op is None or bank._memory_in_graph:
            # the bank's own write: the torch path, or a pending graph holds the memory (it copies)
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
    Other keyword arguments go to ContinualLearningAgent.
    """
    if kind in ("batched", "fast"):
        return ContinualLearningAgent(replay="batched", **kwargs)
    if kind == "sequential":
        return ContinualLearningAgent(replay="sequential", **kwargs)
    raise ValueError(f"kind must be 'batched' or 'sequential', got {kind!r}")

