"""FlatAdam: torch.optim.Adam's arithmetic over one flat parameter buffer, and gradient clipping on it."""
import math

import torch


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
