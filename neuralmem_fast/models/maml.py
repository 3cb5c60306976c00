"""MAML over the controller: a real inner loop with torch.func.functional_call (second order by default)."""

import torch
import torch.nn.functional as F


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
