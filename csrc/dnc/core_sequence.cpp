// MemoryCore's whole sequence, forward and backward, as two C++ loops.
//
// The bodies of the autograd Function in neuralmem_fast/nn/core_sequence.py:
// the formulas, the layout of what is saved and the tests are there. Per time
// step the loops run the LSTM cell, the interface layer and its
// nonlinearities, and the DNC access through the registered native ops
// (content_addressing, write_weights, write_read and their backwards, looked up
// once), so that the Python interpreter and autograd are out of the loop: at
// the dnc package's setting (B = 16, N = 128, T = 22) each of the ~70 small
// ops per step costs a few microseconds more from Python than from here.
// Not ops of their own (no schema, no autograd): two functions of the _C
// module, called only by that Function, which owns saving, version checks and
// create_graph.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/extension.h>

#include <tuple>
#include <vector>

#include "dnc/core_sequence.h"

namespace neuralmem {
namespace dnc {
namespace {

using T = at::Tensor;
using OptT = std::optional<at::Tensor>;

struct Ops {
  c10::TypedOperatorHandle<T(const T&, const T&, const T&, double)> content_addressing;
  c10::TypedOperatorHandle<std::tuple<T, T, T, T>(const T&, const T&, const T&, const T&, const T&, const T&,
                                                  const T&, double)>
      write_weights;
  c10::TypedOperatorHandle<std::tuple<T, T, T, T, T, T>(const T&, const T&, const T&, const T&, const T&, const T&,
                                                        const T&, const T&, const T&, const T&, const T&, double)>
      write_weights_backward;
  c10::TypedOperatorHandle<std::tuple<T, T, T>(const T&, const T&, const T&, const T&, const T&, const T&, double)>
      write_read;
  c10::TypedOperatorHandle<std::tuple<T, T, T, T, T, T>(const OptT&, const OptT&, const OptT&, const T&, const T&,
                                                        const T&, const T&, const T&, const T&, const T&, const T&,
                                                        double)>
      write_read_backward;
  c10::TypedOperatorHandle<std::tuple<T, T>(T&, const T&, const T&, const T&, const T&, const T&, double)>
      addressing_backward_add_;
};

const Ops& ops() {
  static const Ops o = [] {
    auto& d = c10::Dispatcher::singleton();
    Ops r{
        d.findSchemaOrThrow("neuralmem::content_addressing", "")
            .typed<T(const T&, const T&, const T&, double)>(),
        d.findSchemaOrThrow("neuralmem_dnc::write_weights", "")
            .typed<std::tuple<T, T, T, T>(const T&, const T&, const T&, const T&, const T&, const T&, const T&,
                                          double)>(),
        d.findSchemaOrThrow("neuralmem_dnc::write_weights_backward", "")
            .typed<std::tuple<T, T, T, T, T, T>(const T&, const T&, const T&, const T&, const T&, const T&, const T&,
                                                const T&, const T&, const T&, const T&, double)>(),
        d.findSchemaOrThrow("neuralmem_dnc::write_read", "")
            .typed<std::tuple<T, T, T>(const T&, const T&, const T&, const T&, const T&, const T&, double)>(),
        d.findSchemaOrThrow("neuralmem_dnc::write_read_backward", "")
            .typed<std::tuple<T, T, T, T, T, T>(const OptT&, const OptT&, const OptT&, const T&, const T&, const T&,
                                                const T&, const T&, const T&, const T&, const T&, double)>(),
        d.findSchemaOrThrow("neuralmem_dnc::addressing_backward_add_", "")
            .typed<std::tuple<T, T>(T&, const T&, const T&, const T&, const T&, const T&, double)>(),
    };
    return r;
  }();
  return o;
}

// Saved per time step, in this order (kPerStep tensors).
enum Slot {
  kSig, kTanhG, kTanhC, kCPrev, kFac, kMemory, kUsage, kRw, kWw, kWk, kWs, kFg, kWg, kAg, kEr, kWv, kRk, kRs,
  kContent, kHu, kOrder, kNewWw, kNewMemory, kNewRw, kPerStep
};

}  // namespace

std::vector<at::Tensor> core_sequence_forward(const std::vector<at::Tensor>& in, int64_t R, int64_t W, int64_t D,
                                              int64_t n_lin, int64_t n_one, double eps, double alloc_eps) {
  TORCH_CHECK(in.size() == 16, "core_sequence_forward: expected 16 tensors, got ", in.size());
  const T &x = in[0], &h0 = in[1], &c0 = in[2], &reads0 = in[3], &w_ih = in[8], &b_ih = in[9], &w_hh = in[10],
          &b_hh = in[11], &w_if = in[12], &b_if = in[13], &w_o = in[14], &b_o = in[15];
  at::NoGradGuard no_grad;
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Ops& op = ops();
  const int64_t B = x.size(0), Tn = x.size(1), I = x.size(2), H = h0.size(1), RD = R * D, WD = W * D;
  const int64_t S = w_if.size(0), n_sig = S - n_lin - n_one;
  // [reads_{t-1}, h_{t-1}] for step t at rh[t]; rh[t + 1] holds [reads_t, h_t], the output layer's input.
  T rh = at::empty({Tn + 1, B, RD + H}, x.options());
  rh[0].narrow(1, 0, RD).copy_(reads0.reshape({B, RD}));
  rh[0].narrow(1, RD, H).copy_(h0);
  T w_rh = at::cat({w_ih.narrow(1, I, RD), w_hh}, 1);
  T w_rh_t = w_rh.t(), w_if_t = w_if.t();
  T xg = at::addmm(b_ih + b_hh, x.transpose(0, 1).reshape({Tn * B, I}), w_ih.narrow(1, 0, I).t())
             .view({Tn, B, 4 * H});
  T ones = at::ones({B, n_lin}, x.options());
  std::vector<T> out(11);
  out.reserve(11 + kPerStep * Tn);
  T h = h0, c = c0, memory = in[4], usage = in[5], rw = in[6], ww = in[7], reads = reads0;
  for (int64_t t = 0; t < Tn; ++t) {
    T gates = at::addmm(xg[t], rh[t], w_rh_t);
    T s = at::sigmoid(gates);
    T g = at::tanh(gates.narrow(1, 2 * H, H));
    T c_prev = c;
    c = at::addcmul(s.narrow(1, H, H) * c, s.narrow(1, 0, H), g);
    T tc = at::tanh(c);
    h = s.narrow(1, 3 * H, H) * tc;
    T raw = at::addmm(b_if, h, w_if_t);
    T one_raw = raw.narrow(1, n_lin, n_one);
    T sig = at::sigmoid(raw.narrow(1, n_lin + n_one, n_sig));
    T act = at::cat({raw.narrow(1, 0, n_lin), at::softplus(one_raw) + 1, sig}, 1);
    T fac = at::cat({ones, at::sigmoid(one_raw), sig * (1 - sig)}, 1);
    // Each field contiguous once, for the forward and backward ops alike.
    auto field = [&](int64_t off, int64_t width) { return act.narrow(1, off, width).contiguous(); };
    T rk = field(0, RD).view({B, R, D}), wk = field(RD, WD).view({B, W, D}), wv = field(RD + WD, WD).view({B, W, D});
    T rs = field(n_lin, R), ws = field(n_lin + R, W);
    const int64_t o = n_lin + n_one;
    T er = field(o, WD).view({B, W, D}), fg = field(o + WD, R), ag = field(o + WD + R, W), wg = field(o + WD + R + W, W);
    T content = op.content_addressing.call(memory, wk, ws, eps);
    auto [new_usage, new_ww, hu, order] = op.write_weights.call(usage, ww, fg, rw, content, wg, ag, alloc_eps);
    auto [new_memory, new_rw, new_reads] = op.write_read.call(memory, new_ww, er, wv, rk, rs, eps);
    for (const T& v : {s, g, tc, c_prev, fac, memory, usage, rw, ww, wk, ws, fg, wg, ag, er, wv, rk, rs, content, hu,
                       order, new_ww, new_memory, new_rw})
      out.push_back(v);
    memory = new_memory, usage = new_usage, rw = new_rw, ww = new_ww, reads = new_reads;
    rh[t + 1].narrow(1, 0, RD).copy_(reads.reshape({B, RD}));
    rh[t + 1].narrow(1, RD, H).copy_(h);
  }
  // The output layer's weight has columns [h, reads]; rh holds [reads, h].
  T w_o_rh = at::cat({w_o.narrow(1, H, RD), w_o.narrow(1, 0, H)}, 1);
  T y = at::addmm(b_o, rh.narrow(0, 1, Tn).reshape({Tn * B, RD + H}), w_o_rh.t())
            .view({Tn, B, -1})
            .transpose(0, 1)
            .contiguous();
  out[0] = y, out[1] = h, out[2] = c, out[3] = reads, out[4] = memory, out[5] = usage, out[6] = rw, out[7] = ww;
  out[8] = rh, out[9] = w_rh, out[10] = w_o_rh;
  return out;
}

std::vector<at::Tensor> core_sequence_backward(const std::vector<at::Tensor>& grads, const at::Tensor& x,
                                               const at::Tensor& w_ih, const at::Tensor& w_if,
                                               const std::vector<at::Tensor>& saved, int64_t R, int64_t W, int64_t D,
                                               double eps, double alloc_eps) {
  TORCH_CHECK(grads.size() == 8, "core_sequence_backward: expected 8 gradients, got ", grads.size());
  const int64_t B = x.size(0), Tn = x.size(1), I = x.size(2), RD = R * D;
  TORCH_CHECK(static_cast<int64_t>(saved.size()) == 3 + kPerStep * Tn,
              "core_sequence_backward: expected ", 3 + kPerStep * Tn, " saved tensors, got ", saved.size());
  at::NoGradGuard no_grad;
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Ops& op = ops();
  const T &g_y = grads[0], &g_h = grads[1], &g_ww = grads[7];
  const T &rh = saved[0], &w_rh = saved[1], &w_o_rh = saved[2];
  const int64_t H = g_h.size(1), S = w_if.size(0), O = g_y.size(2);
  T g_y_tb = g_y.transpose(0, 1).reshape({Tn * B, O});
  T d_w_o_rh = g_y_tb.t().mm(rh.narrow(0, 1, Tn).reshape({Tn * B, RD + H}));
  T d_rh_out = g_y_tb.mm(w_o_rh).view({Tn, B, RD + H});
  T d_gates = at::empty({Tn, B, 4 * H}, x.options());
  T d_raw = at::empty({Tn, B, S}, x.options());
  T d_rh = at::cat({grads[3].reshape({B, RD}), g_h}, 1);  // d [reads_t, h_t]
  T dc = grads[2], d_mem = grads[4].contiguous(), d_usage = grads[5].contiguous(), d_rw = grads[6].contiguous();
  for (int64_t t = Tn - 1; t >= 0; --t) {
    const T* st = saved.data() + 3 + kPerStep * t;
    d_rh = d_rh + d_rh_out[t];
    T d_reads = d_rh.narrow(1, 0, RD).reshape({B, R, D}).contiguous();
    auto [dm, dww, de, da, drk, drs] =
        op.write_read_backward.call(d_mem, d_rw, d_reads, st[kMemory], st[kNewWw], st[kEr], st[kWv], st[kRk],
                                    st[kRs], st[kNewMemory], st[kNewRw], eps);
    if (t == Tn - 1) dww = dww + g_ww;  // the write weights reach later steps only detached (the usage)
    auto [du, dfg, dprw, dcw, dgw, dga] =
        op.write_weights_backward.call(d_usage, dww, st[kUsage], st[kWw], st[kFg], st[kRw], st[kContent], st[kWg],
                                       st[kAg], st[kHu], st[kOrder], alloc_eps);
    auto [dwk, dws] = op.addressing_backward_add_.call(dm, dcw, st[kContent], st[kMemory], st[kWk], st[kWs], eps);
    d_mem = dm, d_usage = du, d_rw = dprw;
    T d_act = at::cat({drk.reshape({B, RD}), dwk.reshape({B, -1}), da.reshape({B, -1}), drs, dws,
                       de.reshape({B, -1}), dfg, dga, dgw},
                      1);
    T dr = d_raw[t];
    at::mul_out(dr, d_act, st[kFac]);
    T dh = at::addmm(d_rh.narrow(1, RD, H), dr, w_if);
    // the LSTM cell: c_t = f c_{t-1} + i g, h_t = o tanh(c_t)
    const T &s = st[kSig], &g = st[kTanhG], &tc = st[kTanhC];
    T i = s.narrow(1, 0, H), f = s.narrow(1, H, H), o = s.narrow(1, 3 * H, H);
    T dct = at::addcmul(dc, dh * o, 1 - tc * tc);
    T dg = d_gates[t];
    T dgi = dg.narrow(1, 0, H), dgf = dg.narrow(1, H, H), dgg = dg.narrow(1, 2 * H, H), dgo = dg.narrow(1, 3 * H, H);
    at::mul_out(dgo, dh * tc, o * (1 - o));
    at::mul_out(dgi, dct * g, i * (1 - i));
    at::mul_out(dgg, dct * i, 1 - g * g);
    at::mul_out(dgf, dct * st[kCPrev], f * (1 - f));
    dc = dct * f;
    d_rh = dg.mm(w_rh);  // d [reads_{t-1}, h_{t-1}]
  }
  T dg2 = d_gates.view({Tn * B, 4 * H});
  T d_w_rh = dg2.t().mm(rh.narrow(0, 0, Tn).reshape({Tn * B, RD + H}));
  T d_w_ih = at::cat({dg2.t().mm(x.transpose(0, 1).reshape({Tn * B, I})), d_w_rh.narrow(1, 0, RD)}, 1);
  T d_b = dg2.sum(0);
  T dr2 = d_raw.view({Tn * B, S});
  T d_w_if = dr2.t().mm(rh.narrow(0, 1, Tn).narrow(2, RD, H).reshape({Tn * B, H}));
  T dx = d_gates.view({Tn * B, 4 * H}).mm(w_ih.narrow(1, 0, I)).view({Tn, B, I}).transpose(0, 1);
  T d_w_o = at::cat({d_w_o_rh.narrow(1, RD, H), d_w_o_rh.narrow(1, 0, RD)}, 1);
  // (x, h, c, reads, memory, usage, read_weights; w_ih, b_ih, w_hh, b_hh, w_if, b_if, w_o, b_o)
  return {dx, d_rh.narrow(1, RD, H), dc, d_rh.narrow(1, 0, RD).reshape({B, R, D}), d_mem, d_usage, d_rw,
          d_w_ih, d_b, d_w_rh.narrow(1, RD, H), d_b, d_w_if, dr2.sum(0), d_w_o, g_y_tb.sum(0)};
}

void bind_core_sequence(pybind11::module_& m) {
  m.def("core_sequence_forward", &core_sequence_forward,
        "MemoryCore's sequence forward (nn/core_sequence.py): outputs, final state and what the backward needs");
  m.def("core_sequence_backward", &core_sequence_backward,
        "MemoryCore's sequence backward (nn/core_sequence.py): the gradients of the inputs and parameters");
}

}  // namespace dnc
}  // namespace neuralmem
