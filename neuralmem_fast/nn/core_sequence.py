"""MemoryCore's whole sequence as one autograd node, with a hand-written backward.

`MemoryCore.step` runs every time step as about 40 small PyTorch ops and 15
autograd nodes: the LSTM cell, the interface layer and its nonlinearities, the
access (one node, `ops.dnc.access_step`) and the output layer. At the
`dnc` package's setting (B = 16, N = 128, T = 22) that per-op and per-node
cost is about as large as the arithmetic. `CoreSequence` runs the same
formulas over the whole sequence under one `torch.autograd.Function` whose
forward and backward are two C++ loops (csrc/dnc/core_sequence.cpp), out of
the interpreter:

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
the step path would not checkpoint. Beside them it keeps, per step, the read
heads' cosine numerators, the new rows' squared norms and the write heads' dots
((R + 1 + W) N values a memory, (R + 1 + W) / D of a copy: 6 / 64 at the
classic setting), which its backward takes instead of sweeping the memories
again for them (bitwise the same). Everything it keeps goes through
save_for_backward, and the lot is freed by a backward without retain_graph:
the inputs, the parameters and the returned final state one by one (writing
in place to any of them before the backward raises), and the per-step
tensors as one token tensor that owns them (csrc/dnc/core_sequence.cpp,
pack_saved): one saved tensor instead of 3 + 26 T per chunk of the batch,
each a Python object, a SavedVariable and an unpacking. With one chunk the
last step's memory and weights are also the returned final state: the token
keeps shallow copies of those (the same storage and version counter), so that
it holds no output of the node, which holds it. Under saved-tensor hooks
(save_on_cpu, the non-reentrant checkpoint, a user's) they go one by one, so
that the hooks see, and may move or copy, every one of them.
Under create_graph=True the backward differentiates `_eager`, the same
formulas through differentiable ops. `MemoryCore.runs_as_one_node(x, state)`
says when MemoryCore takes this path: the access runs as `access_step` would
(the DNC's own rules on float32/64 CPU tensors), no checkpointing, no hooks on
the core's layers and no overridden `step` or access `forward`.
`CoreSequence.enabled = False` turns it off (the step-by-step path, for
comparisons: benchmarks/dnc_write_read.py).

With several torch threads, at least as many memories and small memories
(`_splits`), the node runs the batch as one chunk per thread, each chunk's
loops on a thread of its own: the memories are independent sequences that
share only the weights, whose gradients are summed over the chunks. Each
chunk's outputs, state and input gradients are bitwise those of the chunk run
alone (tests/test_core_sequence.py). Against the whole batch as one chunk the
results differ in rounding (matmuls over fewer rows, the weights' gradients
summed): in float32, outputs equal or within 1.5e-8 and the weights'
gradients within 6.4e-7 relative, in the checks run.
"""
import torch
import torch.nn.functional as F

from .. import _ext
from ..config import DEFAULT_EPS
from ..ops.autograd import _reference_grads
from ..ops.dnc import ALLOC_EPS, access_step

__all__ = ["CoreSequence", "applies", "core_sequence"]


def _layout(access):
    """The interface's block widths (linear, oneplus, sigmoid), as MemoryAccess.parse_interface splits it."""
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


# The most memory copies (T B N D elements, in bytes) that the sequence runs as chunks of the batch for.
_CHUNK_BYTES = 16 << 20


def _splits(x, memory):
    """How many chunks of the batch the sequence runs as (csrc/dnc/core_sequence.cpp): one per torch
    intra-op thread, each chunk's loop on a thread of its own, where every thread gets a memory and the T
    memory copies the node keeps take at most _CHUNK_BYTES. There, at the dnc package's setting (B = 16,
    N = 128, T = 22, two threads), one loop over the whole batch splits every small op over the threads and
    waits for them, and the chunks took 0.71x to 0.88x its time. With larger memories the ops' own threads
    do as well, and a chunk's tensors, allocated on its worker thread, came from fresh pages every step
    (N = 512: 2.9x the time). Otherwise one chunk, whose ops use the threads as they can."""
    threads, (B, T) = torch.get_num_threads(), x.shape[:2]
    small = T * memory.numel() * memory.element_size() <= _CHUNK_BYTES
    return threads if small and 1 < threads <= B else 1


# The innermost default saved-tensor hooks (torch.autograd.graph.saved_tensors_hooks, save_on_cpu, the
# non-reentrant checkpoint), or None; a torch without this query counts as having hooks.
_top_saved_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def _pack_saved():
    """Whether the forward hands its per-step tensors to autograd as one token (csrc/dnc/core_sequence.cpp,
    pack_saved) rather than one by one: only where no saved-tensor hooks are active, so that hooks still see,
    and may move or copy, every tensor the node keeps."""
    return _top_saved_hooks is not None and _top_saved_hooks(False) is None


# Whether the running backward keeps the graph (retain_graph=True); a torch without this query counts as keeping it.
_keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)


def _last_backward():
    """Whether no backward will follow this one through the node (no retain_graph). Then, with chunks of the
    batch (`_splits`), the C++ backward frees each step's tensors of a token as soon as its loop has passed
    them, on the chunk's thread, rather than leaving them all to autograd's release on the caller's thread
    after it; the token then refuses a second backward, as autograd does for tensors it saved itself. At the
    dnc package's setting and two threads the step took 0.97x to 0.976x the time (blocks of 15 steps
    alternated in one process). With one chunk the freeing stays autograd's: there it cost 1.015x the time
    at N = 128 (one thread) and 1.04x at N = 1,024, where freeing the large memory copies mid-loop tripled
    the page faults (the allocator returns them to the system and maps them again)."""
    return _keep_graph is not None and not _keep_graph()


class CoreSequence(torch.autograd.Function):
    enabled = True  # MemoryCore takes this path where `runs_as_one_node` holds; False: step by step

    @staticmethod
    def forward(ctx, x, h, c, reads, memory, usage, rw, ww, w_ih, b_ih, w_hh, b_hh, w_if, b_if, w_o, b_o, sizes,
                eps):
        R, W, D, n_lin, n_one = sizes
        inputs = (x, h, c, reads, memory, usage, rw, ww, w_ih, b_ih, w_hh, b_hh, w_if, b_if, w_o, b_o)
        splits = _splits(x, memory)
        out = _ext._C.core_sequence_forward(list(inputs), R, W, D, n_lin, n_one, eps, ALLOC_EPS, splits,
                                            _pack_saved())
        final = out[1:8]
        # Everything through save_for_backward: the version counters of the inputs, the parameters and the
        # returned final state are checked, and autograd frees the lot after a backward without retain_graph.
        # out[8:]: per chunk of the batch, rh, the weights rearranged, and 26 tensors per step
        # (csrc/dnc/core_sequence.cpp), or, without saved-tensor hooks, one token that owns them; the
        # caller's tensors among them (the initial and final state) are in `inputs` and `final` as well.
        ctx.save_for_backward(*inputs, *final, *out[8:])
        ctx.sizes, ctx.eps, ctx.splits = sizes, eps, splits
        # An output the loss does not use (the final memory, as a rule) gets None, not a zero-filled tensor of
        # its size: the C++ backward takes None as zeros (csrc/dnc/core_sequence.cpp), and the step saves
        # autograd's fill of a (B, N, D) gradient.
        ctx.set_materialize_grads(False)
        return (out[0], *final)

    @staticmethod
    def backward(ctx, g_y, g_h, g_c, g_reads, g_memory, g_usage, g_rw, g_ww):
        saved = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: differentiate the same formulas through autograd
            return _eager_grads(ctx, (g_y, g_h, g_c, g_reads, g_memory, g_usage, g_rw, g_ww))
        R, W, D, _, _ = ctx.sizes
        grads = _ext._C.core_sequence_backward([g_y, g_h, g_c, g_reads, g_memory, g_usage, g_rw, g_ww], saved[0],
                                               saved[8], saved[12], list(saved[23:]), R, W, D, ctx.eps, ALLOC_EPS,
                                               ctx.splits, ctx.splits > 1 and _last_backward(),
                                               ctx.needs_input_grad[4])
        # the initial write weights enter only the usage, detached: no gradient, as step by step
        return (*grads[:7], None, *grads[7:], None, None)


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
    return (CoreSequence.enabled and hasattr(_ext._C, "core_sequence_forward")
            and a.sparse is None and a._one_node(state.memory)
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
