"""Backpropagation through T steps of a recurrent memory in bounded memory.

`checkpointed_scan(step, state, xs)` runs ``y_t, state = step(x_t, state)``
for t = 0 .. T-1 and returns the stacked outputs and the final state. With
plain autograd, a memory that changes at every step keeps every step's
memory for the backward: T copies of N*D values. Here the steps run in
segments of `segment` steps under `torch.utils.checkpoint` (non-reentrant):
the forward keeps only the state at each segment's start, and the backward
runs each segment again, in reverse order, keeping that one segment's
intermediates while it is differentiated. With S = segment, the memory held
is about T/S boundary states plus one segment's S steps; the time is one
more forward of every step (the recomputation). S = ceil(sqrt(T)) makes
T/S + S smallest (2*sqrt(T) copies instead of T+1); see docs/training.md for
measurements and the choice.

The step may close over parameters (an LSTM controller, say): they receive
their gradients through `torch.autograd.grad` as well as `.backward()`,
since the non-reentrant checkpoint recomputes inside the same graph.

Shapes: `state` is a tensor, or a tuple or NamedTuple of tensors (the same
kind goes to `step` and comes back); `xs` is a tensor or a tuple/NamedTuple
of tensors whose first dimension is T (step t gets the t-th slices, in the
same kind), or a list of T per-step inputs (each a tensor or tuple of
tensors, all of one shape). `step` returns ``(y_t, new_state)``, y_t a
tensor, a tuple of tensors or None; the returned ys are stacked along a new
first dimension (None when the step returns None).
"""
import math

import torch
from torch.utils.checkpoint import checkpoint

__all__ = ["checkpointed_scan", "default_segment"]


def default_segment(T):
    """ceil(sqrt(T)): the segment length that minimises the states held,
    T/S boundary states plus S recomputed ones."""
    if T < 1:
        raise ValueError(f"sequence length T must be at least 1, got {T}")
    return max(1, math.ceil(math.sqrt(T)))


# --------------------------------------------------------------------------
# structures of tensors
# --------------------------------------------------------------------------
def _is_namedtuple(obj):
    return isinstance(obj, tuple) and hasattr(type(obj), "_fields")


def _flatten(obj, what):
    """(tensors, rebuild, names): a tensor or a tuple/NamedTuple of tensors."""
    if isinstance(obj, torch.Tensor):
        return [obj], (lambda ts: ts[0]), [what]
    if isinstance(obj, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in obj):
        if _is_namedtuple(obj):
            kind = type(obj)
            names = [f"{what}.{f}" for f in obj._fields]
            return list(obj), (lambda ts: kind(*ts)), names
        kind = tuple if isinstance(obj, tuple) else list
        names = [f"{what}[{i}]" for i in range(len(obj))]
        return list(obj), (lambda ts: kind(ts)), names
    raise TypeError(f"{what} must be a tensor or a tuple/NamedTuple of tensors, got {type(obj).__name__}")


def _sig(t):
    return tuple(t.shape), t.dtype, t.device


def _per_step_inputs(xs):
    """(T, get(t) -> x_t for a tensor or tuple, slice(t0, t1) -> flat tensors, rebuild)."""
    if isinstance(xs, list):
        T = len(xs)
        if T == 0:
            raise ValueError("sequence length T must be at least 1, got an empty list of inputs")
        flat0, rebuild, names = _flatten(xs[0], "xs[0]")
        sig0 = [_sig(t) for t in flat0]
        for t in range(1, T):
            flat, _, _ = _flatten(xs[t], f"xs[{t}]")
            if len(flat) != len(flat0) or [_sig(u) for u in flat] != sig0:
                raise ValueError(f"per-step inputs must all have one shape: xs[{t}] has "
                                 f"{[tuple(u.shape) for u in flat]}, xs[0] has {[s[0] for s in sig0]}")
        stacked = [torch.stack([_flatten(xs[t], "xs")[0][i] for t in range(T)]) for i in range(len(flat0))]
        return T, stacked, rebuild
    flat, rebuild, names = _flatten(xs, "xs")
    if any(t.dim() == 0 for t in flat):
        raise ValueError("xs must have the sequence as its first dimension (T, ...), got a 0-d tensor")
    T = flat[0].shape[0]
    for t, name in zip(flat, names):
        if t.shape[0] != T:
            raise ValueError(f"every input must hold T={T} steps in its first dimension; "
                             f"{name} has shape {tuple(t.shape)}")
    if T == 0:
        raise ValueError("sequence length T must be at least 1, got xs with 0 steps")
    return T, flat, rebuild


def _check_finite(flat, names, t):
    for x, name in zip(flat, names):
        if x.is_floating_point() or x.is_complex():
            if not bool(torch.isfinite(x.detach()).all()):
                raise ValueError(f"non-finite values (inf or NaN) in {name} of the state at step {t}, the state "
                                 "a segment restarts from in the backward; the gradient through it would be NaN")


# --------------------------------------------------------------------------
# the scan
# --------------------------------------------------------------------------
class _Segment:
    """Runs steps [t0, t1) from a flat state; checks what each step returns."""

    def __init__(self, step, rebuild_state, state_sigs, state_names, rebuild_x):
        self.step = step
        self.rebuild_state = rebuild_state
        self.state_sigs = state_sigs
        self.state_names = state_names
        self.rebuild_x = rebuild_x
        self.y_rebuild = None  # set by the first step: how to rebuild y_t from its tensors
        self.y_sigs = None
        self.y_none = False

    def run(self, t0, n_state, *flat):
        state = self.rebuild_state(list(flat[:n_state]))
        xs = flat[n_state:]
        ys = []
        for i in range(xs[0].shape[0] if xs else 0):
            t = t0 + i
            out = self.step(self.rebuild_x([x[i] for x in xs]), state)
            if not (isinstance(out, tuple) and len(out) == 2):
                raise TypeError(f"step must return (y_t, new_state), got {type(out).__name__} at step {t}")
            y, state = out
            flat_s, _, _ = _flatten(state, "new_state")
            got = [_sig(s) for s in flat_s]
            if got != self.state_sigs:
                raise ValueError(f"step {t} returned a state of shapes/dtypes {got}, but the state it was given "
                                 f"has {self.state_sigs} ({', '.join(self.state_names)}): every step must keep "
                                 "the state's shapes")
            ys.append(self._check_y(y, t))
        if self.y_none:
            return tuple(_flatten(state, "state")[0])
        stacked = [torch.stack([y[i] for y in ys]) for i in range(len(self.y_sigs))]
        return (*stacked, *_flatten(state, "state")[0])

    def _check_y(self, y, t):
        if y is None:
            if self.y_sigs is not None and not self.y_none:
                raise ValueError(f"step {t} returned no output, earlier steps did")
            self.y_none, self.y_sigs = True, []
            return []
        flat, rebuild, _ = _flatten(y, "y_t")
        sigs = [_sig(u) for u in flat]
        if self.y_sigs is None:
            self.y_sigs, self.y_rebuild = sigs, rebuild
        elif self.y_none or sigs != self.y_sigs:
            raise ValueError(f"step {t} returned outputs of shapes/dtypes {sigs}, step 0 returned "
                             f"{self.y_sigs}: the outputs must have one shape to be stacked")
        return flat


def checkpointed_scan(step, state, xs, segment=None, checkpoint_segments=True, check_finite=True):
    """Runs ``y_t, state = step(x_t, state)`` over T steps; returns (ys, final_state).

    Args:
        step: ``step(x_t, state) -> (y_t, new_state)``, differentiable.
        state: the initial state, a tensor or a tuple/NamedTuple of tensors;
            never modified (the steps must be out of place, as autograd needs).
        xs: the inputs, stacked along a first dimension of T, or a list of T.
        segment: steps per checkpointed segment; None for ceil(sqrt(T)).
        checkpoint_segments: False runs plain autograd (every step's
            intermediates kept until the backward: fastest, T copies of the state).
        check_finite: refuse (ValueError) a segment's starting state holding
            inf or NaN, which the backward would turn into NaN gradients
            everywhere; one read of the state per segment.

    Raises ValueError for an empty sequence, inputs or states whose shapes
    change from step to step, and non-finite saved states; a second backward
    through the result without ``retain_graph=True`` raises autograd's error.
    """
    if not callable(step):
        raise TypeError(f"step must be callable, got {type(step).__name__}")
    T, flat_x, rebuild_x = _per_step_inputs(xs)
    flat_s, rebuild_s, s_names = _flatten(state, "state")
    seg = default_segment(T) if segment is None else segment
    if not isinstance(seg, int) or isinstance(seg, bool) or seg < 1:
        raise ValueError(f"segment must be a positive int (steps per checkpointed segment), got {segment!r}")
    runner = _Segment(step, rebuild_s, [_sig(s) for s in flat_s], s_names, rebuild_x)
    # The step may close over parameters that need gradients: checkpoint
    # whenever autograd records, whether or not the state requires grad.
    use_ckpt = bool(checkpoint_segments) and torch.is_grad_enabled()
    n = len(flat_s)
    pieces = []
    cur = flat_s
    for t0 in range(0, T, seg):
        t1 = min(T, t0 + seg)
        if use_ckpt and check_finite:
            _check_finite(cur, s_names, t0)
        args = (t0, n, *cur, *[x[t0:t1] for x in flat_x])
        if use_ckpt:
            out = checkpoint(runner.run, *args, use_reentrant=False)
        else:
            out = runner.run(*args)
        k = len(out) - n
        pieces.append(out[:k])
        cur = list(out[k:])
    final = rebuild_s(cur)
    if runner.y_none:
        return None, final
    ys = [torch.cat([p[i] for p in pieces]) if len(pieces) > 1 else pieces[0][i] for i in range(len(runner.y_sigs))]
    return runner.y_rebuild(ys), final

