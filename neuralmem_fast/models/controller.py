"""The fast controller: the seed's LSTM controller with its seven heads as one matmul, and its fused step.

`FastMemoryController` computes the seven heads with ONE matmul (rows
reordered so that each activation covers one contiguous slice: softplus on
both strengths at once) and the LSTM step as one matmul plus four elementwise
ops. `_fused_forward` / `_fused_backward` are the training step without
autograd (the backward written out, accumulating into flat gradients);
`FusedControllerLoss` wraps them as an autograd.Function, which the tests
gradcheck. See models/agent.py for how the agent uses them.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


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
    # Below autograd: the gradient is written out here, not recorded (and the
    # op's registered formula would cost a Python call per step).
    with torch._C._AutoDispatchBelowAutograd():
        reads, lse = read_op.content_read(memory3, keys, strengths, eps)
    out_in = torch.cat([h, reads.view(M, H * D)], dim=1)
    pred = torch.addmm(b_o, out_in, W_o.t())
    cache = (X, sig, g, tc, h, rs_pre, keys, strengths, reads, lse, out_in, memory3)
    return pred, cache, heads


def _fused_backward(P, dims, cache, dpred, grads, read_op, eps, acc):
    """d(loss)/d(P) into `grads` (tensors shaped like P) given dpred = d(loss)/d(pred) (M, in).

    acc=False overwrites the gradients (the forget gate's rows, which get no
    gradient, come out zero, as after zero_grad); acc=True adds to them.
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
