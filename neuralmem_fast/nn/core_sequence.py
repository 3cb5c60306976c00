"""MemoryCore's whole sequence as one autograd node, with a hand-written backward.

`MemoryCore.step` runs every time step as about 40 small PyTorch ops and 15
autograd nodes: the LSTM cell, the interface layer and its nonlinearities, the
access (one node, `ops.dnc.access_step`) and the output layer. At the
`dnc` package's setting (B = 16, N = 128, T = 22) that per-op and per-node
cost is about as large as the arithmetic. `core_sequence` runs the same
formulas over the whole sequence under one `torch.autograd.Function`:

  forward   the input's share of the LSTM gates for every step in one matmul;
            per step, one matmul for [reads_{t-1}, h_{t-1}], the LSTM cell,
            one matmul for the interface, its nonlinearities, then the three
            native access ops (`content_addressing`, `write_weights`,
            `write_read`) as `access_step` runs them; the output layer for
            every step in one matmul at the end. Nothing is recorded.
  backward  the output layer's gradients in one matmul; per step backwards,
            the access's native backwards as in `access_step`'s backward,
            the interface's nonlinearities by one saved factor, the LSTM cell
            by its formulas and one matmul to [reads_{t-1}, h_{t-1}]; then
            the weight gradients of the LSTM and the interface layer for
            every step at once (three matmuls where 3 T small ones were).

It computes what the step-by-step path computes (tests/test_core_sequence.py
compares outputs, final state and every gradient in float64) and keeps the
same tensors for the backward: T copies of the memory, so it runs only where
the step path would not checkpoint. Under create_graph=True the backward
differentiates `_eager`, the same formulas through differentiable ops.
`MemoryCore.runs_as_one_node(x, state)` says when MemoryCore takes this path: the access runs as
`access_step` would (the DNC's own rules on float32/64 CPU tensors), no
checkpointing, no hooks on the core's layers and no overridden `step` or
access `forward`. `CoreSequence.enabled = False` turns it off (the
step-by-step path, for comparisons: benchmarks/dnc_write_read.py).
"""
import torch
import torch.nn.functional as F

from ..config import DEFAULT_EPS
from ..ops.autograd import _reference_grads
from ..ops.dnc import ALLOC_EPS, _lib, access_step

__all__ = ["CoreSequence", "applies", "core_sequence"]


def _layout(access):
    """Interface widths: (n_lin, n_one, n_sig) and the per-field widths, as MemoryAccess.parse_interface."""
    n_lin, n_one = sum(access._linear_sizes), sum(access._oneplus_sizes)
    return n_lin, n_one, access.interface_size - n_lin - n_one


def _split(act, B, R, W, D):
    """The activated interface (B, S) -> rk, wk, wv, rs, ws, er, fg, ag, wg (views)."""
    RD, WD = R * D, W * D
    o = 0
    out = []
    for width, shape in ((RD, (B, R, D)), (WD, (B, W, D)), (WD, (B, W, D)), (R, None), (W, None),
                         (WD, (B, W, D)), (R, None), (W, None), (W, None)):
        v = act[:, o:o + width]
        out.append(v if shape is None else v.reshape(shape))
        o += width
    return out


def _eager(x, h, c, reads, memory, usage, rw, ww, w_ih, b_ih, w_hh, b_hh, w_if, b_if, w_o, b_o, sizes, eps):
    """The step path's formulas through differentiable ops, from the given tensors (create_graph's backward)."""
    B, T, _ = x.shape
    R, W, D, n_lin, n_one = sizes
    ys = []
    for t in range(T):
        gates = F.linear(torch.cat([x[:, t], reads.reshape(B, -1)], 1), w_ih, b_ih) + F.linear(h, w_hh, b_hh)
        i, f, g, o = gates.chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        raw = F.linear(h, w_if, b_if)
        act = torch.cat([raw[:, :n_lin], 1 + F.softplus(raw[:, n_lin:n_lin + n_one]),
                         torch.sigmoid(raw[:, n_lin + n_one:])], 1)
        rk, wk, wv, rs, ws, er, fg, ag, wg = _split(act, B, R, W, D)
        memory, usage, ww, rw, reads = access_step(memory, usage, rw, ww, wk, ws, fg, wg, ag, er, wv, rk, rs, eps)
        ys.append(F.linear(torch.cat([h, reads.reshape(B, -1)], 1), w_o, b_o))
    return torch.stack(ys, 1), h, c, reads, memory, usage, rw, ww


class CoreSequence(torch.autograd.Function):
    enabled = True  # MemoryCore takes this path where `runs_as_one_node` holds; False: step by step

    @staticmethod
    def forward(ctx, x, h, c, reads, memory, usage, rw, ww, w_ih, b_ih, w_hh, b_hh, w_if, b_if, w_o, b_o, sizes,
                eps):
        lib = _lib()
        content_addressing = torch.ops.neuralmem.content_addressing
        initial = (h, c, reads, memory, usage, rw, ww)
        B, T, I = x.shape
        R, W, D, n_lin, n_one = sizes
        H, RD = h.shape[1], R * D
        # [reads_{t-1}, h_{t-1}] for every step, and [reads_t, h_t] for the output layer: one buffer, time-major.
        rh = x.new_empty(T + 1, B, RD + H)
        rh[0, :, :RD] = reads.reshape(B, RD)
        rh[0, :, RD:] = h
        w_rh = torch.cat([w_ih[:, I:], w_hh], 1)                                        # (4H, RD+H)
        xg = torch.addmm(b_ih + b_hh, x.transpose(0, 1).reshape(T * B, I), w_ih[:, :I].t()).view(T, B, 4 * H)
        sig_g, tanh_g, tanh_c, c_prev, fac, access_saved = [], [], [], [], [], []
        for t in range(T):
            gates = torch.addmm(xg[t], rh[t], w_rh.t())
            s = torch.sigmoid(gates)
            g = torch.tanh(gates[:, 2 * H:3 * H])
            c_prev.append(c)
            c = torch.addcmul(s[:, H:2 * H] * c, s[:, :H], g)
            tc = torch.tanh(c)
            h = s[:, 3 * H:] * tc
            sig_g.append(s)
            tanh_g.append(g)
            tanh_c.append(tc)
            raw = torch.addmm(b_if, h, w_if.t())
            # activated interface, and d act / d raw: 1 (linear), sigmoid (oneplus), s (1 - s) (sigmoid)
            one_s = torch.sigmoid(raw[:, n_lin:n_lin + n_one])
            sig = torch.sigmoid(raw[:, n_lin + n_one:])
            act = torch.cat([raw[:, :n_lin], 1 + F.softplus(raw[:, n_lin:n_lin + n_one]), sig], 1)
            fac.append(torch.cat([torch.ones_like(raw[:, :n_lin]), one_s, sig * (1 - sig)], 1))
            rk, wk, wv, rs, ws, er, fg, ag, wg = _split(act, B, R, W, D)
            content = content_addressing(memory, wk, ws, eps)
            new_usage, new_ww, hu, order = lib.write_weights(usage, ww, fg, rw, content, wg, ag, ALLOC_EPS)
            new, new_rw, reads = lib.write_read(memory, new_ww, er, wv, rk, rs, eps)
            access_saved.append((memory, usage, rw, ww, wk, ws, fg, wg, ag, er, wv, rk, rs, content, hu, order,
                                 new_ww, new, new_rw))
            memory, usage, rw, ww = new, new_usage, new_rw, new_ww
            rh[t + 1, :, :RD] = reads.reshape(B, RD)
            rh[t + 1, :, RD:] = h
        # the output layer over [reads_t, h_t]: its weight's columns are [h, reads]
        w_o_rh = torch.cat([w_o[:, H:], w_o[:, :H]], 1)
        y = torch.addmm(b_o, rh[1:].reshape(T * B, RD + H), w_o_rh.t()).view(T, B, -1).transpose(0, 1).contiguous()
        final = (h, c, reads, memory, usage, rw, ww)
        # Everything through save_for_backward: the version counters of the inputs, the parameters and the
        # returned final state are checked, and autograd frees the lot after a backward without retain_graph.
        ctx.save_for_backward(x, *initial, w_ih, b_ih, w_hh, b_hh, w_if, b_if, w_o, b_o, *final, rh, w_rh, w_o_rh,
                              *sig_g, *tanh_g, *tanh_c, *c_prev, *fac, *[t for step in access_saved for t in step])
        ctx.sizes, ctx.eps = sizes, eps
        return (y, *final)

    @staticmethod
    def backward(ctx, g_y, g_h, g_c, g_reads, g_memory, g_usage, g_rw, g_ww):
        saved = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: differentiate the same formulas through autograd
            return _eager_grads(ctx, (g_y, g_h, g_c, g_reads, g_memory, g_usage, g_rw, g_ww))
        x, w_ih, w_if, w_o = saved[0], saved[8], saved[12], saved[14]
        B, T, I = x.shape
        rh, w_rh, w_o_rh = saved[23:26]
        sig_g, tanh_g, tanh_c, c_prev, fac = (saved[26 + k * T:26 + (k + 1) * T] for k in range(5))
        access_saved = saved[26 + 5 * T:]
        lib = _lib()
        eps = ctx.eps
        R, W, D, n_lin, n_one = ctx.sizes
        H, RD = g_h.shape[1], R * D
        # the output layer
        g_y_tb = g_y.transpose(0, 1).reshape(T * B, -1)
        d_w_o_rh = g_y_tb.t() @ rh[1:].reshape(T * B, RD + H)
        d_rh_out = (g_y_tb @ w_o_rh).view(T, B, RD + H)
        d_gates = x.new_empty(T, B, 4 * H)
        d_raw = x.new_empty(T, B, w_if.shape[0])
        d_rh = torch.cat([g_reads.reshape(B, RD), g_h], 1)                             # d [reads_t, h_t]
        dc = g_c
        d_mem, d_usage, d_rw = g_memory, g_usage, g_rw
        for t in range(T - 1, -1, -1):
            d_rh = d_rh + d_rh_out[t]
            (memory, usage, rw, ww, wk, ws, fg, wg, ag, er, wv, rk, rs, content, hu, order, new_ww, new,
             new_rw) = access_saved[19 * t:19 * (t + 1)]
            dm, dww, de, da, drk, drs = lib.write_read_backward(
                d_mem.contiguous(), d_rw.contiguous(), d_rh[:, :RD].reshape(B, R, D).contiguous(), memory, new_ww,
                er, wv, rk, rs, new, new_rw, eps)
            if t == T - 1:  # the write weights reach later steps only detached (the usage): the final state's
                dww = dww + g_ww
            d_usage, dfg, d_rw, dc_w, dgw, dga = lib.write_weights_backward(
                d_usage.contiguous(), dww, usage, ww, fg, rw, content, wg, ag, hu, order, ALLOC_EPS)
            dwk, dws = lib.addressing_backward_add_(dm, dc_w, content, memory, wk, ws, eps)
            d_mem = dm
            d_act = torch.cat([drk.reshape(B, -1), dwk.reshape(B, -1), da.reshape(B, -1), drs, dws,
                               de.reshape(B, -1), dfg, dga, dgw], 1)
            torch.mul(d_act, fac[t], out=d_raw[t])
            dh = torch.addmm(d_rh[:, RD:], d_raw[t], w_if)
            # the LSTM cell: c_t = f c_{t-1} + i g, h_t = o tanh(c_t)
            s, g, tc = sig_g[t], tanh_g[t], tanh_c[t]
            i, f, o = s[:, :H], s[:, H:2 * H], s[:, 3 * H:]
            dct = torch.addcmul(dc, dh * o, 1 - tc * tc)
            dg_t = d_gates[t]
            torch.mul(dh * tc, o * (1 - o), out=dg_t[:, 3 * H:])
            torch.mul(dct * g, i * (1 - i), out=dg_t[:, :H])
            torch.mul(dct * i, 1 - g * g, out=dg_t[:, 2 * H:3 * H])
            torch.mul(dct * c_prev[t], f * (1 - f), out=dg_t[:, H:2 * H])
            dc = dct * f
            d_rh = dg_t @ w_rh                                                          # d [reads_{t-1}, h_{t-1}]
        need = ctx.needs_input_grad
        dg2 = d_gates.view(T * B, 4 * H)
        d_w_rh = dg2.t() @ rh[:-1].reshape(T * B, RD + H)
        d_w_ih = torch.cat([dg2.t() @ x.transpose(0, 1).reshape(T * B, I), d_w_rh[:, :RD]], 1) if need[8] else None
        d_b = dg2.sum(0)
        dr2 = d_raw.view(T * B, -1)
        d_w_if = dr2.t() @ rh[1:, :, RD:].reshape(T * B, H) if need[12] else None
        dx = (d_gates @ w_ih[:, :I]).transpose(0, 1) if need[0] else None
        d_w_o = torch.cat([d_w_o_rh[:, RD:], d_w_o_rh[:, :RD]], 1) if need[14] else None
        return (dx, d_rh[:, RD:], dc, d_rh[:, :RD].reshape(B, R, D), d_mem, d_usage, d_rw, None,
                d_w_ih, d_b, d_w_rh[:, RD:] if need[10] else None, d_b, d_w_if, dr2.sum(0), d_w_o,
                g_y_tb.sum(0), None, None)


def _eager_grads(ctx, grads_out):
    """create_graph: autograd over `_eager` from the saved inputs, which carry the caller's graph."""
    ref = lambda *t: _eager(*t, ctx.sizes, ctx.eps)  # noqa: E731
    return (*_reference_grads(ctx, ref, ctx.saved_tensors[:16], grads_out), None, None)


def _no_hooks(module):
    return not module._forward_hooks and not module._forward_pre_hooks


def _plain(module, cls):
    """An instance of exactly `cls`, with biases and no hooks of its own."""
    return type(module) is cls and getattr(module, "bias", None) is not None and _no_hooks(module)


def applies(core, x, state):
    """Whether `core(x, state)` may run as one node, as far as the access, the layers and their hooks go;
    MemoryCore.runs_as_one_node adds that its own `step` is not overridden (see the module doc)."""
    from torch.nn.modules import module as _m

    from .access import MemoryAccess

    a = core.access
    return (CoreSequence.enabled and a.sparse is None and a._one_node(state.memory)
            and not core.uses_checkpoint(x.shape[0], x.shape[1], x.dtype)
            and type(a).forward is MemoryAccess.forward and "forward" not in a.__dict__
            and _plain(core.controller, torch.nn.LSTMCell) and _plain(core.interface, torch.nn.Linear)
            and _plain(core.output, torch.nn.Linear) and _no_hooks(a) and _no_hooks(core)
            and not _m._global_forward_hooks and not _m._global_forward_pre_hooks
            and all(t.dtype == x.dtype and t.device == x.device for t in state))


def core_sequence(core, x, state):
    """`core(x, state)` as one autograd node: (y (B, T, output_size), the final state's 7 tensors)."""
    a, lstm = core.access, core.controller
    n_lin, n_one, _ = _layout(a)
    sizes = (a.num_reads, a.num_writes, a.word_size, n_lin, n_one)
    y, *final = CoreSequence.apply(x, state.h, state.c, state.reads, state.memory, state.usage,
                                   state.read_weights, state.write_weights, lstm.weight_ih, lstm.bias_ih,
                                   lstm.weight_hh, lstm.bias_hh, core.interface.weight, core.interface.bias,
                                   core.output.weight, core.output.bias, sizes, DEFAULT_EPS)
    return y, final
