// MemoryCore's whole sequence, forward and backward, as two C++ loops.
//
// The bodies of the autograd Function in neuralmem_fast/nn/core_sequence.py:
// the formulas, the layout of what is saved and the tests are there. Per time
// step the loops run the LSTM cell, the interface layer and its
// nonlinearities, and the DNC access through the registered native ops
// (write_weights and its backward, looked up once) and the host functions of
// write_read and content addressing (dnc/write_read.h), so that the Python
// interpreter and autograd are out of the loop: at the dnc package's setting
// (B = 16, N = 128, T = 22) each of the ~70 small ops per step costs a few
// microseconds more from Python than from here. The forward keeps write_read's
// read-head cosine numerators and row norms (kDots) and the write head's raw
// dots (kCaDots), which the backward would otherwise compute again in sweeps of
// the memories; the next step's write addressing takes those norms too.
// The LSTM cell's and the interface's nonlinearities are one vectorised kernel
// each (cpu/dnc_controller_kernels.h, in the per-instruction-set kernel table),
// their backwards and the interface's fields plain loops here: about 50 ATen
// calls per step fewer than with ATen's pointwise ops.
// The per-step matmuls (the LSTM's and the interface's, rows = the batch or its
// chunk) run through the kernel table's small_matmul, which at these few rows
// runs at about twice MKL's sgemm rate (cpu/dnc_controller_kernels.h); the
// matmuls over all T steps at once stay ATen's.
// In the backward, the write addressing's gradient of each memory but the
// first is not a pass of its own: it is left as per-slot coefficients and
// added inside the next write_read backward, which reads and writes that
// memory's gradient anyway (dnc/write_read.h).
// Not ops of their own (no schema, no autograd): two functions of the _C
// module, called only by that Function, which owns saving, version checks and
// create_graph (and four of dnc/write_read.h's, bound for the tests).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/extension.h>

#include <atomic>
#include <cmath>
#include <tuple>
#include <vector>

#include "cpu/kernel_table.h"
#include "dnc/core_sequence.h"
#include "dnc/write_read.h"

namespace neuralmem {
namespace dnc {
namespace {

using T = at::Tensor;

struct Ops {
  c10::TypedOperatorHandle<std::tuple<T, T, T, T>(const T&, const T&, const T&, const T&, const T&, const T&,
                                                  const T&, double)>
      write_weights;
  c10::TypedOperatorHandle<std::tuple<T, T, T, T, T, T>(const T&, const T&, const T&, const T&, const T&, const T&,
                                                        const T&, const T&, const T&, const T&, const T&, double)>
      write_weights_backward;
  c10::TypedOperatorHandle<std::tuple<T, T>(T&, const T&, const T&, const T&, const T&, const T&, double)>
      addressing_backward_add_;
};

const Ops& ops() {
  static const Ops o = [] {
    auto& d = c10::Dispatcher::singleton();
    Ops r{
        d.findSchemaOrThrow("neuralmem_dnc::write_weights", "")
            .typed<std::tuple<T, T, T, T>(const T&, const T&, const T&, const T&, const T&, const T&, const T&,
                                          double)>(),
        d.findSchemaOrThrow("neuralmem_dnc::write_weights_backward", "")
            .typed<std::tuple<T, T, T, T, T, T>(const T&, const T&, const T&, const T&, const T&, const T&, const T&,
                                                const T&, const T&, const T&, const T&, double)>(),
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
  kContent, kHu, kOrder, kNewWw, kNewMemory, kNewRw, kDots, kCaDots, kPerStep
};

// The interface's fields in the order of its columns: rk, wk, wv (linear), rs, ws (oneplus), er, fg, ag, wg
// (sigmoid); each (B, width) block of columns becomes one contiguous tensor, and back.
struct Fields {
  int64_t width[9];
  int64_t shape_last[9];  // D for (B, heads, D) fields, 0 for (B, heads)
};

Fields fields_of(int64_t R, int64_t W, int64_t D) {
  return {{R * D, W * D, W * D, R, W, W * D, R, W, W}, {D, D, D, 0, 0, D, 0, 0, 0}};
}

// act (B, S) -> the 9 fields, contiguous, as views of one buffer laid out field by field.
std::vector<at::Tensor> split_fields(const at::Tensor& act, const Fields& f) {
  const int64_t B = act.size(0), S = act.size(1);
  at::Tensor buf = at::empty({B * S}, act.options());
  AT_DISPATCH_FLOATING_TYPES(act.scalar_type(), "split_fields", [&] {
    const scalar_t* a = act.const_data_ptr<scalar_t>();
    scalar_t* o = buf.data_ptr<scalar_t>();
    int64_t off = 0;
    for (int i = 0; i < 9; ++i) {
      const int64_t w = f.width[i];
      for (int64_t b = 0; b < B; ++b) std::copy(a + b * S + off, a + b * S + off + w, o + b * w);
      o += B * w;
      off += w;
    }
  });
  std::vector<at::Tensor> out;
  out.reserve(9);
  int64_t start = 0;
  for (int i = 0; i < 9; ++i) {  // one as_strided each (narrow and view took four ATen calls)
    const int64_t w = f.width[i], d = f.shape_last[i];
    out.push_back(d ? buf.as_strided({B, w / d, d}, {w, d, 1}, start) : buf.as_strided({B, w}, {w, 1}, start));
    start += B * w;
  }
  return out;
}

// dr (B, S) = [the 9 fields' gradients, side by side] * fac.
void join_fields_mul(const std::vector<at::Tensor>& grads, const at::Tensor& fac, const Fields& f, at::Tensor& dr) {
  const int64_t B = fac.size(0), S = fac.size(1);
  AT_DISPATCH_FLOATING_TYPES(fac.scalar_type(), "join_fields", [&] {
    const scalar_t* fc = fac.const_data_ptr<scalar_t>();
    scalar_t* o = dr.data_ptr<scalar_t>();
    int64_t off = 0;
    for (int i = 0; i < 9; ++i) {
      const int64_t w = f.width[i];
      const at::Tensor gi = grads[i].contiguous();
      const scalar_t* g = gi.const_data_ptr<scalar_t>();
      for (int64_t b = 0; b < B; ++b)
        for (int64_t j = 0; j < w; ++j) o[b * S + off + j] = g[b * w + j] * fc[b * S + off + j];
      off += w;
    }
  });
}

// Plain row copies in place of the narrow, reshape and copy_ calls (three or four ATen calls each) that the
// loops made per step. join_rows: rows row0 to row0 + B of dst (rows of a + b, contiguous) = [first (B, a),
// second (B, b)]. leading_columns: the first a columns of src (B rows), as a new tensor of `shape`.
void join_rows(at::Tensor& dst, int64_t row0, const at::Tensor& first, const at::Tensor& second, int64_t B,
               int64_t a, int64_t b) {
  AT_DISPATCH_FLOATING_TYPES(dst.scalar_type(), "join_rows", [&] {
    scalar_t* o = dst.data_ptr<scalar_t>() + row0 * (a + b);
    const at::Tensor f = first.contiguous(), g = second.contiguous();
    const scalar_t* p = f.const_data_ptr<scalar_t>();
    const scalar_t* q = g.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < B; ++i) {
      std::copy(p + i * a, p + (i + 1) * a, o + i * (a + b));
      std::copy(q + i * b, q + (i + 1) * b, o + i * (a + b) + a);
    }
  });
}

at::Tensor leading_columns(const at::Tensor& src, int64_t a, at::IntArrayRef shape) {
  at::Tensor out = at::empty(shape, src.options());
  const int64_t B = src.size(0), w = src.size(1);
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "leading_columns", [&] {
    const at::Tensor c = src.contiguous();
    const scalar_t* p = c.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    for (int64_t i = 0; i < B; ++i) std::copy(p + i * w, p + i * w + a, o + i * a);
  });
  return out;
}

// The LSTM cell's backward, c_t = f c_{t-1} + i g, h_t = o tanh(c_t): from dh and dc (the gradient of c_t
// from later steps) the pre-activations' gradient dg (B, 4H) and the gradient of c_{t-1} (returned).
at::Tensor lstm_cell_backward(const at::Tensor& dh, const at::Tensor& dc, const at::Tensor& s, const at::Tensor& g,
                              const at::Tensor& tc, const at::Tensor& c_prev, at::Tensor& dg) {
  const int64_t B = dh.size(0), H = dh.size(1);
  at::Tensor dc_prev = at::empty({B, H}, dh.options());
  AT_DISPATCH_FLOATING_TYPES(dh.scalar_type(), "lstm_cell_backward", [&] {
    using V = scalar_t;
    const V *DH = dh.const_data_ptr<V>(), *DC = dc.const_data_ptr<V>(), *SG = s.const_data_ptr<V>(),
            *G = g.const_data_ptr<V>(), *TC = tc.const_data_ptr<V>(), *CP = c_prev.const_data_ptr<V>();
    V* DG = dg.data_ptr<V>();
    V* DCP = dc_prev.data_ptr<V>();
    for (int64_t b = 0; b < B; ++b) {
      const V* sb = SG + b * 4 * H;
      V* gb = DG + b * 4 * H;
      for (int64_t j = 0; j < H; ++j) {
        const int64_t n = b * H + j;
        const V i = sb[j], f = sb[H + j], o = sb[3 * H + j], gv = G[n], t = TC[n];
        const V dct = DC[n] + (DH[n] * o) * (V(1) - t * t);
        gb[3 * H + j] = (DH[n] * t) * (o * (V(1) - o));
        gb[j] = (dct * gv) * (i * (V(1) - i));
        gb[2 * H + j] = (dct * i) * (V(1) - gv * gv);
        gb[H + j] = (dct * CP[n]) * (f * (V(1) - f));
        DCP[n] = dct * f;
      }
    }
  });
  return dc_prev;
}

// The per-step matmuls take the kernel table's small_matmul (cpu/dnc_controller_kernels.h) up to this many
// rows (the batch, or its chunk) and a weight of up to this many bytes, which stays in L2 from one block of
// rows to the next; ATen's addmm otherwise.
constexpr int64_t kSmallRows = 32;
constexpr int64_t kSmallBytes = 1 << 20;

// Off: ATen's addmm for every step (core_sequence_use_small_matmul, for the tests and alternated timings).
std::atomic<bool> use_small_matmul{true};

// c0 + a b (c0 undefined: a b), b (K, N) contiguous.
T step_matmul(const cpu::KernelTable& K, const T& a, const T& b, const T& c0) {
  if (K.small_matmul != nullptr && use_small_matmul.load(std::memory_order_relaxed) && a.size(0) <= kSmallRows &&
      b.numel() * b.element_size() <= kSmallBytes && a.stride(1) == 1 && b.is_contiguous() &&
      (!c0.defined() || c0.stride(-1) == 1)) {
    T out = at::empty({a.size(0), b.size(1)}, a.options());
    K.small_matmul(a, b, c0, out);
    return out;
  }
  return c0.defined() ? at::addmm(c0, a, b) : a.mm(b);
}

// The node's check of x, which MemoryCore.forward leaves to it (nn/memory_core.py): each chunk checks its own
// rows before its loop, where Python's isfinite(x).all() took three ATen calls and a sync, 40 to 60 us of
// the caller's thread at the dnc package's setting. Raises ValueError naming x; nothing has been written.
void check_finite(const at::Tensor& x) {
  bool bad = false;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "check_finite", [&] {
    const at::Tensor c = x.contiguous();
    const scalar_t* p = c.const_data_ptr<scalar_t>();
    const int64_t n = c.numel();
    for (int64_t i = 0; i < n; ++i) bad |= !std::isfinite(p[i]);
  });
  TORCH_CHECK_VALUE(!bad, "x contains NaN or inf");
}

}  // namespace

std::vector<at::Tensor> core_sequence_forward(const std::vector<at::Tensor>& in, int64_t R, int64_t W, int64_t D,
                                              int64_t n_lin, int64_t n_one, double eps, double alloc_eps) {
  TORCH_CHECK(in.size() == 16, "core_sequence_forward: expected 16 tensors, got ", in.size());
  const T &x = in[0], &h0 = in[1], &c0 = in[2], &reads0 = in[3], &w_ih = in[8], &b_ih = in[9], &w_hh = in[10],
          &b_hh = in[11], &w_if = in[12], &b_if = in[13], &w_o = in[14], &b_o = in[15];
  check_finite(x);
  at::NoGradGuard no_grad;
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Ops& op = ops();
  const int64_t B = x.size(0), Tn = x.size(1), I = x.size(2), H = h0.size(1), RD = R * D;
  const int64_t S = w_if.size(0), n_sig = S - n_lin - n_one;
  const cpu::KernelTable& K = cpu::kernels();
  // [reads_{t-1}, h_{t-1}] for step t at rh[t]; rh[t + 1] holds [reads_t, h_t], the output layer's input.
  T rh = at::empty({Tn + 1, B, RD + H}, x.options());
  join_rows(rh, 0, reads0, h0, B, RD, H);
  T w_rh = at::cat({w_ih.narrow(1, I, RD), w_hh}, 1);
  T w_rh_t = w_rh.t().contiguous(), w_if_t = w_if.t().contiguous();
  T xg = at::addmm(b_ih + b_hh, x.transpose(0, 1).reshape({Tn * B, I}), w_ih.narrow(1, 0, I).t())
             .view({Tn, B, 4 * H});
  const Fields fields = fields_of(R, W, D);
  TORCH_CHECK(n_lin == R * D + 2 * W * D && n_one == R + W && n_sig == W * D + R + 2 * W,
              "core_sequence_forward: the interface's layout does not match R, W, D");
  std::vector<T> out(11);
  out.reserve(11 + kPerStep * Tn);
  T h = h0, c = c0.contiguous(), memory = in[4], usage = in[5], rw = in[6], ww = in[7], reads = reads0;
  T prev_dots;  // write_read's dots of the previous step
  for (int64_t t = 0; t < Tn; ++t) {
    T gates = step_matmul(K, rh[t], w_rh_t, xg[t]);
    T s = at::empty({B, 4 * H}, x.options()), g = at::empty({B, H}, x.options());
    T c_prev = c, tc = at::empty({B, H}, x.options());
    c = at::empty({B, H}, x.options()), h = at::empty({B, H}, x.options());
    K.lstm_cell(gates, c_prev, s, g, c, tc, h);
    T raw = step_matmul(K, h, w_if_t, b_if);
    T act = at::empty({B, S}, x.options()), fac = at::empty({B, S}, x.options());
    K.dnc_interface(raw, n_lin, n_one, act, fac);
    // Each field contiguous once, for the forward and backward ops alike.
    const std::vector<T> fl = split_fields(act, fields);
    const T &rk = fl[0], &wk = fl[1], &wv = fl[2], &rs = fl[3], &ws = fl[4], &er = fl[5], &fg = fl[6], &ag = fl[7],
            &wg = fl[8];
    // The write head's content addressing: from step 1 on, the rows' norms are those write_read kept for the
    // memory it wrote; its raw dots are kept for the backward.
    auto [content, ca_dots] =
        content_addressing_keep(memory, wk, ws, eps, t > 0 && R > 0 ? prev_dots.select(1, R) : T());
    auto [new_usage, new_ww, hu, order] = op.write_weights.call(usage, ww, fg, rw, content, wg, ag, alloc_eps);
    // write_read as the registered op, keeping its read heads' cosine numerators and the new rows' norms: the
    // backward takes them instead of a sweep of the new memory that would compute them again.
    auto [new_memory, new_rw, new_reads, dots] = write_read_keep(memory, new_ww, er, wv, rk, rs, eps);
    for (const T& v : {s, g, tc, c_prev, fac, memory, usage, rw, ww, wk, ws, fg, wg, ag, er, wv, rk, rs, content, hu,
                       order, new_ww, new_memory, new_rw, dots, ca_dots})
      out.push_back(v);
    prev_dots = dots;
    memory = new_memory, usage = new_usage, rw = new_rw, ww = new_ww, reads = new_reads;
    join_rows(rh, (t + 1) * B, reads, h, B, RD, H);
  }
  // The output layer's weight has columns [h, reads]; rh holds [reads, h].
  // y^T = w_o rh^T: with its O (a few) columns as the rows, MKL's sgemm took 24 against 49 us at B = 8, N = 128.
  T w_o_rh = at::cat({w_o.narrow(1, H, RD), w_o.narrow(1, 0, H)}, 1);
  T y = at::addmm(b_o.unsqueeze(1), w_o_rh, rh.narrow(0, 1, Tn).reshape({Tn * B, RD + H}).t())
            .view({-1, Tn, B})
            .permute({2, 1, 0})
            .contiguous();
  out[0] = y, out[1] = h, out[2] = c, out[3] = reads, out[4] = memory, out[5] = usage, out[6] = rw, out[7] = ww;
  out[8] = rh, out[9] = w_rh, out[10] = w_o_rh;
  return out;
}

std::vector<at::Tensor> core_sequence_backward(const std::vector<at::Tensor>& grads, const at::Tensor& x,
                                               const at::Tensor& w_ih, const at::Tensor& w_if,
                                               std::vector<at::Tensor> saved, int64_t R, int64_t W, int64_t D,
                                               double eps, double alloc_eps, bool release, bool memory_grad) {
  TORCH_CHECK(grads.size() == 8, "core_sequence_backward: expected 8 gradients, got ", grads.size());
  const int64_t B = x.size(0), Tn = x.size(1), I = x.size(2), RD = R * D;
  TORCH_CHECK(static_cast<int64_t>(saved.size()) == 3 + kPerStep * Tn,
              "core_sequence_backward: expected ", 3 + kPerStep * Tn, " saved tensors, got ", saved.size());
  at::NoGradGuard no_grad;
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Ops& op = ops();
  // A gradient autograd did not materialise (an output the loss does not use: undefined) counts as zeros;
  // the memory's and the read weights' stay undefined, which write_read's backward takes as zeros without a
  // pass over them, the small ones become zeros here.
  const T &rh = saved[0], &w_rh = saved[1], &w_o_rh = saved[2];
  const int64_t H = w_if.size(1), S = w_if.size(0), O = w_o_rh.size(0), N = saved[3 + kUsage].size(1);
  auto or_zeros = [&](const T& g, at::IntArrayRef shape) { return g.defined() ? g : at::zeros(shape, x.options()); };
  const T g_y = or_zeros(grads[0], {B, Tn, O}), g_h = or_zeros(grads[1], {B, H}), &g_ww = grads[7];
  const cpu::KernelTable& K = cpu::kernels();
  const T w_if_c = w_if.contiguous();
  T g_y_tb = g_y.transpose(0, 1).reshape({Tn * B, O});
  T d_w_o_rh = g_y_tb.t().mm(rh.narrow(0, 1, Tn).reshape({Tn * B, RD + H}));
  T d_rh_out = g_y_tb.mm(w_o_rh).view({Tn, B, RD + H});
  T d_gates = at::empty({Tn, B, 4 * H}, x.options());
  T d_raw = at::empty({Tn, B, S}, x.options());
  // d [reads_t, h_t], the output layer's share d_rh_out[t] included
  T d_rh = at::cat({or_zeros(grads[3], {B, R, D}).reshape({B, RD}), g_h}, 1).add_(d_rh_out[Tn - 1]);
  const Fields fields = fields_of(R, W, D);
  T dc = or_zeros(grads[2], {B, H}).contiguous(), d_usage = or_zeros(grads[5], {B, N}).contiguous();
  T d_mem = grads[4].defined() ? grads[4].contiguous() : T(), d_rw = grads[6].defined() ? grads[6].contiguous() : T();
  // The write addressing's memory gradient of step t + 1, over the memory that step t wrote, left as per-slot
  // coefficients (write_read.h): step t's write_read backward adds it where it reads the gradient of that
  // memory anyway, so that it costs no pass of its own over (B, N, D). Step 0's is added to the initial
  // memory's gradient at once, where that gradient is asked for (memory_grad).
  T pend_gamma, pend_coef, pend_q;
  for (int64_t t = Tn - 1; t >= 0; --t) {
    T* st = saved.data() + 3 + kPerStep * t;
    T d_reads = leading_columns(d_rh, RD, {B, R, D});
    auto [dm, dww, de, da, drk, drs] =
        write_read_backward_pending(d_mem, d_rw, d_reads, st[kMemory], st[kNewWw], st[kEr], st[kWv], st[kRk],
                                    st[kRs], st[kNewMemory], st[kNewRw], eps, pend_gamma, pend_coef, pend_q,
                                    st[kDots]);
    if (t == Tn - 1 && g_ww.defined()) dww = dww + g_ww;  // the write weights reach later steps only detached (the usage)
    auto [du, dfg, dprw, dcw, dgw, dga] =
        op.write_weights_backward.call(d_usage, dww, st[kUsage], st[kWw], st[kFg], st[kRw], st[kContent], st[kWg],
                                       st[kAg], st[kHu], st[kOrder], alloc_eps);
    T dwk, dws;
    if (t > 0) {
      // The forward's dots and the norms it took from step t - 1's write_read (none without read heads).
      const T* prev = st - kPerStep;
      std::tie(dwk, dws, pend_gamma, pend_coef, pend_q) = addressing_backward_coefs(
          dcw, st[kContent], st[kMemory], st[kWk], st[kWs], eps, R > 0 ? st[kCaDots] : T(),
          R > 0 ? prev[kDots].select(1, R) : T());
    } else if (memory_grad) {
      std::tie(dwk, dws) = op.addressing_backward_add_.call(dm, dcw, st[kContent], st[kMemory], st[kWk], st[kWs], eps);
    } else {
      // The initial memory needs no gradient (a state that does not require grad, as initial_state's): the
      // keys' and strengths' gradients without the addressing's read and write of a memory-sized gradient
      // (its dots again, from the memory alone), and none returned.
      std::tie(dwk, dws, std::ignore, std::ignore, std::ignore) =
          addressing_backward_coefs(dcw, st[kContent], st[kMemory], st[kWk], st[kWs], eps, T(), T());
      dm = T();
    }
    d_mem = dm, d_usage = du, d_rw = dprw;
    T dr = d_raw[t];
    join_fields_mul({drk, dwk, da, drs, dws, de, dfg, dga, dgw}, st[kFac], fields, dr);
    T dh = step_matmul(K, dr, w_if_c, d_rh.narrow(1, RD, H));
    T dg = d_gates[t];
    dc = lstm_cell_backward(dh, dc, st[kSig], st[kTanhG], st[kTanhC], st[kCPrev], dg);
    // d [reads_{t-1}, h_{t-1}]: through the LSTM, plus the output layer's share (none for the initial state)
    d_rh = step_matmul(K, dg, w_rh, t > 0 ? d_rh_out[t - 1] : T());
    // Step t's tensors are not needed by the steps still to come (t - 1 reads step t - 2's dots, not t's).
    if (release)
      for (int64_t k = 0; k < kPerStep; ++k) st[k].reset();
  }
  T dg2 = d_gates.view({Tn * B, 4 * H});
  T d_w_rh = dg2.t().mm(rh.narrow(0, 0, Tn).reshape({Tn * B, RD + H}));
  // The input's few columns (I) as the rows of the product, not its columns: x^T dg2 and w_x^T dg2^T took
  // 20 and 19 us against 75 and 70 us (MKL's sgemm, B = 8, N = 128, I = 10).
  T d_w_ih = at::cat({x.permute({2, 1, 0}).reshape({I, Tn * B}).mm(dg2).t(), d_w_rh.narrow(1, 0, RD)}, 1);
  T d_b = dg2.sum(0);
  T dr2 = d_raw.view({Tn * B, S});
  T d_w_if = dr2.t().mm(rh.narrow(0, 1, Tn).narrow(2, RD, H).reshape({Tn * B, H}));
  T dx = w_ih.narrow(1, 0, I).t().mm(dg2.t()).view({I, Tn, B}).permute({2, 1, 0});
  T d_w_o = at::cat({d_w_o_rh.narrow(1, RD, H), d_w_o_rh.narrow(1, 0, RD)}, 1);
  // (x, h, c, reads, memory, usage, read_weights; w_ih, b_ih, w_hh, b_hh, w_if, b_if, w_o, b_o)
  return {dx, d_rh.narrow(1, RD, H), dc, d_rh.narrow(1, 0, RD).reshape({B, R, D}), d_mem, d_usage, d_rw,
          d_w_ih, d_b, d_w_rh.narrow(1, RD, H), d_b, d_w_if, dr2.sum(0), d_w_o, g_y_tb.sum(0)};
}

namespace {

// The batch's memories are independent sequences that share only the weights: with `splits` > 1 the
// sequence runs as that many chunks of the batch, one task each on torch's intra-op threads (each chunk's
// own ops then run on its task's thread alone), instead of every op splitting the batch over the threads
// itself, which at the dnc package's setting (B = 16, N = 128, two threads) costs about as much in per-op
// synchronisation as it gains. The caller chooses `splits` (nn/core_sequence.py: small memories only). Each
// chunk's results are bitwise those of the chunk run alone; against the whole batch as one chunk they differ
// in rounding (matmuls over fewer rows, the weights' gradients summed over the chunks).
int64_t chunk_start(int64_t B, int64_t splits, int64_t s) { return s * B / splits; }

// Output i of every chunk, concatenated along the batch.
at::Tensor cat_chunks(const std::vector<std::vector<at::Tensor>>& outs, size_t i) {
  std::vector<at::Tensor> pieces;
  pieces.reserve(outs.size());
  for (const auto& o : outs) pieces.push_back(o[i]);
  return at::cat(pieces, 0);
}

// What the backward needs of a sequence (3 + kPerStep T tensors per chunk) as one tensor: a token of no
// elements whose storage owns them and frees them with itself. The Function saves the token in their place
// (nn/core_sequence.py), so that autograd keeps, and frees after a backward without retain_graph, one saved
// tensor instead of ~600 per chunk, each of which costs a Python object from pybind11, a SavedVariable and
// an unpacking. The caller's tensors that the set shares (the initial state, and with one chunk the final
// state: see core_sequence_forward_split) are also saved one by one beside the token, where their version
// counters are checked.
struct SavedSet {
  std::vector<at::Tensor> tensors;
  bool released = false;  // freed by a backward that was told no other will follow
};
std::atomic<int64_t> live_saved_sets{0};

void delete_saved_set(void* p) {
  delete static_cast<SavedSet*>(p);
  live_saved_sets.fetch_sub(1);
}

at::Tensor pack_saved(std::vector<at::Tensor> tensors) {
  auto* set = new SavedSet{std::move(tensors)};
  live_saved_sets.fetch_add(1);
  c10::DataPtr ptr(set, set, &delete_saved_set, c10::Device(c10::kCPU));
  c10::Storage storage(c10::Storage::use_byte_size_t(), 0, std::move(ptr), nullptr, /*resizable=*/false);
  return at::detail::make_tensor<c10::TensorImpl>(std::move(storage), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                                  caffe2::TypeMeta::Make<uint8_t>());
}

// The set a token owns, or nullptr for any other tensor (a copy of a token included).
SavedSet* saved_set_of(const at::Tensor& t) {
  if (!t.defined() || !t.has_storage()) return nullptr;
  const c10::DataPtr& ptr = t.storage().data_ptr();
  return ptr.get_deleter() == &delete_saved_set ? static_cast<SavedSet*>(ptr.get_context()) : nullptr;
}

// Runs fn(s) for s < splits, one task each; the first exception is rethrown on the caller's thread.
template <typename F>
void each_chunk(int64_t splits, const F& fn) {
  at::parallel_for(0, splits, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) fn(s);
  });
}

}  // namespace

// core_sequence_forward over `splits` chunks of the batch: y and the final state concatenated over the
// chunks, then each chunk's saved tensors (3 + kPerStep T of them) in chunk order, or with `pack` one token
// that owns them (pack_saved).
std::vector<at::Tensor> core_sequence_forward_chunks(const std::vector<at::Tensor>& in, int64_t R, int64_t W,
                                                     int64_t D, int64_t n_lin, int64_t n_one, double eps,
                                                     double alloc_eps, int64_t splits) {
  TORCH_CHECK(in.size() == 16, "core_sequence_forward: expected 16 tensors, got ", in.size());
  const int64_t B = in[0].size(0);
  TORCH_CHECK(splits >= 1 && splits <= B, "core_sequence_forward: splits must be in [1, B = ", B, "], got ",
              splits);
  if (splits == 1) return core_sequence_forward(in, R, W, D, n_lin, n_one, eps, alloc_eps);
  std::vector<std::vector<at::Tensor>> outs(splits);
  each_chunk(splits, [&](int64_t s) {
    at::NoGradGuard no_grad;  // grad mode is per thread
    const int64_t b0 = chunk_start(B, splits, s), nb = chunk_start(B, splits, s + 1) - b0;
    std::vector<at::Tensor> part(in);
    for (int i = 0; i < 8; ++i) part[i] = in[i].narrow(0, b0, nb);  // x and the state: batch first
    outs[s] = core_sequence_forward(part, R, W, D, n_lin, n_one, eps, alloc_eps);
  });
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> out;
  out.reserve(8 + (outs[0].size() - 8) * splits);
  for (size_t i = 0; i < 8; ++i) out.push_back(cat_chunks(outs, i));
  for (const auto& o : outs) out.insert(out.end(), o.begin() + 8, o.end());
  return out;
}

std::vector<at::Tensor> core_sequence_forward_split(const std::vector<at::Tensor>& in, int64_t R, int64_t W,
                                                    int64_t D, int64_t n_lin, int64_t n_one, double eps,
                                                    double alloc_eps, int64_t splits, bool pack) {
  std::vector<at::Tensor> out = core_sequence_forward_chunks(in, R, W, D, n_lin, n_one, eps, alloc_eps, splits);
  if (!pack) return out;
  std::vector<at::Tensor> saved(std::make_move_iterator(out.begin() + 8), std::make_move_iterator(out.end()));
  out.resize(8);
  // With one chunk the final memory, read weights and write weights are the last step's saved tensors
  // themselves. Returned, they become outputs of the autograd node, whose grad_fn is that node: the token,
  // held by the node, would hold them, and they the node, a cycle of C++ references that nothing frees
  // (save_for_backward stores its outputs without their grad_fn for this reason). The token keeps a shallow
  // copy of each such tensor instead (the same storage and version counter, no autograd history).
  for (at::Tensor& t : saved) {
    for (size_t i = 0; i < 8; ++i) {
      if (t.defined() && t.unsafeGetTensorImpl() == out[i].unsafeGetTensorImpl()) {
        t = t.tensor_data();
        break;
      }
    }
  }
  out.push_back(pack_saved(std::move(saved)));
  return out;
}

// core_sequence_backward of core_sequence_forward_split: the inputs' gradients concatenated over the
// chunks, the weights' summed. `saved`: the forward's saved tensors, or the one token that owns them.
std::vector<at::Tensor> core_sequence_backward_chunks(const std::vector<at::Tensor>& grads, const at::Tensor& x,
                                                      const at::Tensor& w_ih, const at::Tensor& w_if,
                                                      std::vector<at::Tensor>& saved, int64_t R, int64_t W,
                                                      int64_t D, double eps, double alloc_eps, int64_t splits,
                                                      bool release, bool memory_grad) {
  TORCH_CHECK(grads.size() == 8, "core_sequence_backward: expected 8 gradients, got ", grads.size());
  const int64_t B = x.size(0);
  TORCH_CHECK(splits >= 1 && splits <= B, "core_sequence_backward: splits must be in [1, B = ", B, "], got ",
              splits);
  if (splits == 1)
    return core_sequence_backward(grads, x, w_ih, w_if, release ? std::move(saved) : saved, R, W, D, eps,
                                  alloc_eps, release, memory_grad);
  const int64_t per = static_cast<int64_t>(saved.size()) / splits;
  TORCH_CHECK(per * splits == static_cast<int64_t>(saved.size()), "core_sequence_backward: ", saved.size(),
              " saved tensors do not split into ", splits, " chunks");
  std::vector<std::vector<at::Tensor>> outs(splits);
  each_chunk(splits, [&](int64_t s) {
    at::NoGradGuard no_grad;
    const int64_t b0 = chunk_start(B, splits, s), nb = chunk_start(B, splits, s + 1) - b0;
    std::vector<at::Tensor> g(grads.size());
    for (size_t i = 0; i < grads.size(); ++i) g[i] = grads[i].defined() ? grads[i].narrow(0, b0, nb) : T();
    // With `release` the chunk's tensors move to its task, which frees them step by step.
    auto first = saved.begin() + s * per, last = saved.begin() + (s + 1) * per;
    std::vector<at::Tensor> sv = release ? std::vector<at::Tensor>(std::make_move_iterator(first),
                                                                   std::make_move_iterator(last))
                                         : std::vector<at::Tensor>(first, last);
    outs[s] = core_sequence_backward(g, x.narrow(0, b0, nb), w_ih, w_if, std::move(sv), R, W, D, eps, alloc_eps,
                                     release, memory_grad);
  });
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> out;
  out.reserve(outs[0].size());
  for (size_t i = 0; i < outs[0].size(); ++i) {
    if (i < 7) {  // x and the initial state: per memory (none for the memory without memory_grad)
      out.push_back(outs[0][i].defined() ? cat_chunks(outs, i) : at::Tensor());
    } else {  // the weights: summed over the chunks
      at::Tensor sum = outs[0][i].clone();
      for (int64_t s = 1; s < splits; ++s) sum.add_(outs[s][i]);
      out.push_back(sum);
    }
  }
  return out;
}

std::vector<at::Tensor> core_sequence_backward_split(const std::vector<at::Tensor>& grads, const at::Tensor& x,
                                                     const at::Tensor& w_ih, const at::Tensor& w_if,
                                                     const std::vector<at::Tensor>& saved, int64_t R, int64_t W,
                                                     int64_t D, double eps, double alloc_eps, int64_t splits,
                                                     bool release, bool memory_grad) {
  if (saved.size() == 1) {
    SavedSet* set = saved_set_of(saved[0]);
    TORCH_CHECK(set != nullptr, "core_sequence_backward: the saved tensor is not the token of a forward's saved "
                "tensors (a copy of it, made by a saved-tensor hook, owns none)");
    TORCH_CHECK(!set->released, "core_sequence_backward: the forward's saved tensors were freed by an earlier "
                "backward without retain_graph=True; run the forward again, or pass retain_graph=True to the first "
                "backward");
    // With `release` no backward will follow (autograd frees the node's saved tensors after this one): each
    // step's tensors are freed as soon as the loop has passed them, on the thread of their chunk, which keeps
    // the backward's peak memory falling with every step and the freeing off the caller's thread. The set is
    // marked first, so that a backward that raises midway leaves a token that refuses, not one with holes.
    // Without it the set is only read (copied from, chunk by chunk).
    set->released = release;
    return core_sequence_backward_chunks(grads, x, w_ih, w_if, set->tensors, R, W, D, eps, alloc_eps, splits,
                                         release, memory_grad);
  }
  std::vector<at::Tensor> sv = saved;  // saved one by one: autograd owns them
  return core_sequence_backward_chunks(grads, x, w_ih, w_if, sv, R, W, D, eps, alloc_eps, splits, false,
                                       memory_grad);
}

void bind_core_sequence(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("core_sequence_forward", &core_sequence_forward_split,
        "MemoryCore's sequence forward (nn/core_sequence.py): outputs, final state and what the backward needs; "
        "splits > 1: that many chunks of the batch on torch's threads; pack: what the backward needs as one token",
        py::arg("inputs"), py::arg("R"), py::arg("W"), py::arg("D"), py::arg("n_lin"), py::arg("n_one"),
        py::arg("eps"), py::arg("alloc_eps"), py::arg("splits") = 1, py::arg("pack") = false);
  m.def(
      "core_sequence_use_small_matmul",
      [](bool on) { return use_small_matmul.exchange(on); },
      "Whether the sequence node's per-step matmuls take the kernel table's small_matmul where it applies "
      "(default) or ATen's addmm; returns the previous setting (for the tests and alternated timings)",
      py::arg("on"));
  m.def(
      "core_sequence_live_saved_sets", [] { return live_saved_sets.load(); },
      "How many tokens of core_sequence_forward(pack=True) own their saved tensors now (for the tests)");
  m.def(
      "core_sequence_backward",
      [](const std::vector<std::optional<at::Tensor>>& grads, const at::Tensor& x, const at::Tensor& w_ih,
         const at::Tensor& w_if, const std::vector<at::Tensor>& saved, int64_t R, int64_t W, int64_t D, double eps,
         double alloc_eps, int64_t splits, bool release, bool memory_grad) {
        std::vector<at::Tensor> g;
        g.reserve(grads.size());
        for (const auto& o : grads) g.push_back(o.has_value() ? *o : at::Tensor());
        return core_sequence_backward_split(g, x, w_ih, w_if, saved, R, W, D, eps, alloc_eps, splits, release,
                                            memory_grad);
      },
        "MemoryCore's sequence backward (nn/core_sequence.py): the gradients of the inputs and parameters, over "
        "the forward's chunks; a gradient given as None counts as zeros; memory_grad=False: None for the initial "
        "memory's",
        py::arg("grads"), py::arg("x"), py::arg("w_ih"), py::arg("w_if"), py::arg("saved"), py::arg("R"),
        py::arg("W"), py::arg("D"), py::arg("eps"), py::arg("alloc_eps"), py::arg("splits") = 1,
        py::arg("release") = false, py::arg("memory_grad") = true);
  // What the sequence node calls of write_read besides the registered ops, for the tests: the forward that
  // keeps its dots, and the backward that takes them (and a pending addressing gradient, None for none).
  m.def("write_read_keep", &write_read_keep,
        "neuralmem_dnc::write_read plus (B, R + 1, N): the read heads' cosine numerators and the rows' squared norms");
  m.def(
      "write_read_backward_pending",
      [](const std::optional<at::Tensor>& g_mo, const std::optional<at::Tensor>& g_rw,
         const std::optional<at::Tensor>& g_rd, const at::Tensor& memory, const at::Tensor& ww,
         const at::Tensor& erase, const at::Tensor& add, const at::Tensor& keys, const at::Tensor& str,
         const at::Tensor& new_memory, const at::Tensor& read_weights, double eps,
         const std::optional<at::Tensor>& pend_gamma, const std::optional<at::Tensor>& pend_coef,
         const std::optional<at::Tensor>& pend_q, const std::optional<at::Tensor>& dots) {
        at::NoGradGuard no_grad;
        auto t = [](const std::optional<at::Tensor>& o) { return o.has_value() ? *o : at::Tensor(); };
        return write_read_backward_pending(t(g_mo), t(g_rw), t(g_rd), memory, ww, erase, add, keys, str,
                                           new_memory, read_weights, eps, t(pend_gamma), t(pend_coef), t(pend_q),
                                           t(dots));
      },
      "neuralmem_dnc::write_read_backward with a pending addressing gradient and write_read_keep's dots");
  m.def(
      "content_addressing_keep",
      [](const at::Tensor& memory, const at::Tensor& keys, const at::Tensor& str, double eps,
         const std::optional<at::Tensor>& norms2) {
        at::NoGradGuard no_grad;
        return content_addressing_keep(memory, keys, str, eps, norms2.has_value() ? *norms2 : at::Tensor());
      },
      "neuralmem::content_addressing as (weights, raw dots), taking the rows' squared norms where given");
  m.def(
      "addressing_backward_coefs",
      [](const at::Tensor& gw, const at::Tensor& w, const at::Tensor& memory, const at::Tensor& keys,
         const at::Tensor& str, double eps, const std::optional<at::Tensor>& dots,
         const std::optional<at::Tensor>& norms2) {
        at::NoGradGuard no_grad;
        auto t = [](const std::optional<at::Tensor>& o) { return o.has_value() ? *o : at::Tensor(); };
        return addressing_backward_coefs(gw, w, memory, keys, str, eps, t(dots), t(norms2));
      },
      "content addressing's backward with its memory gradient as coefficients (gamma, coef, q)");
}

}  // namespace dnc
}  // namespace neuralmem
