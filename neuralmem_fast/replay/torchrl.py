"""TorchRL's prioritized sampler on the C++ sum tree.

    from neuralmem_fast.replay.torchrl import PrioritizedSampler
    rb = TensorDictReplayBuffer(storage=LazyTensorStorage(10**6),
                                sampler=PrioritizedSampler(10**6, alpha=0.6, beta=0.4),
                                priority_key="td_error", batch_size=256)

``PrioritizedSampler`` takes the constructor of
``torchrl.data.replay_buffers.PrioritizedSampler`` and is a subclass of it, so
TorchRL's buffers treat it as theirs (``update_tensordict_priority``, the
writers' ``mark_update``, ``default_priority``, ``state_dict``, ``dumps`` /
``loads``); every method runs on this library's sum tree instead of TorchRL's
segment trees. TorchRL is an optional dependency: importing this module
without it raises ImportError saying what to install.

Differences from TorchRL's sampler that are kept (each tested):

* The tree holds float64 leaves whatever ``dtype``; ``dtype`` (float32 or
  float64, as TorchRL) is the dtype of the returned ``priority_weight``.
  Stored priorities equal TorchRL's to float32 rounding (float64 for dtype
  float64). Priorities of any real dtype are taken; TorchRL's float64
  sampler raises on float32 priorities, its own ``mark_update``'s included.
* A priority of exactly 0 with ``eps=0`` makes its item unreachable and the
  weights are normalised by the smallest positive priority; TorchRL's sampler
  raises ``RuntimeError("non-positive p_min")`` on every ``sample`` until that
  priority is raised. Every priority 0 raises ``RuntimeError("non-positive
  p_sum")`` in both.
* Bad input raises before anything is stored: NaN, inf or negative priorities
  (ValueError), indices below -1 or at or past ``max_capacity`` (or past the
  storage's length when TorchRL passes the storage) (IndexError), non-integer
  indices (TypeError), priorities whose count matches neither one value nor
  one per index (ValueError), and a state dict or dump of another capacity
  (ValueError). TorchRL stores NaN and negative priorities and clamps or
  ignores out-of-range indices. -1, the "do not update" index of TorchRL's
  MaxValueWriter, is skipped as in TorchRL.
* The tree stays on the CPU; ``device`` (default CPU) is where indices and
  weights are returned. TorchRL moves its trees to a CUDA storage's device.
* Draws come from the replay buffer's generator when it set one
  (``ReplayBuffer(generator=...)``, as TorchRL), else from a numpy Generator
  of the sampler's own (``generator=``, an int seed or a Generator; by default
  seeded from torch's global RNG), whose state ``state_dict`` and ``dumps``
  save, so a restored sampler draws what the saved one would have drawn
  next. TorchRL draws from numpy's global RNG there.
* ``state_dict`` holds the leaves as a float64 tensor (``"_priorities"``)
  instead of copies of TorchRL's tree objects; ``dumps`` writes TorchRL's
  file layout (``sumtree.memmap``, ``mintree.memmap``,
  ``sampler_metadata.json``), so each sampler ``loads`` the other's dumps.
"""
from __future__ import annotations

import json
import math
import numbers
import warnings
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch

try:
    from torchrl.data.replay_buffers.samplers import PrioritizedSampler as _TorchRLPrioritizedSampler
    from torchrl.data.replay_buffers.utils import unravel_index as _unravel_index
except ImportError as exc:  # pragma: no cover - exercised in a process without torchrl
    raise ImportError(
        "neuralmem_fast.replay.torchrl needs TorchRL and tensordict, which are optional: "
        "pip install torchrl (or pip install 'neuralmem_fast[peers]'). "
        "The rest of neuralmem_fast.replay works without them."
    ) from exc

from ._checks import _as_float_array, _check_values
from ._rng import restored_rng, rng_state
from .sum_tree import SumTree

__all__ = ["PrioritizedSampler"]

_EMPTY_STORAGE_ERROR = "Cannot sample from an empty storage."
_REDUCTIONS = ("max", "min", "median", "mean", "sum")


def _real(v, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0:
        raise ValueError(f"PrioritizedSampler: {name} must be a finite number >= 0, got {v!r}")
    return float(v)


class PrioritizedSampler(_TorchRLPrioritizedSampler):
    """TorchRL's ``PrioritizedSampler`` (same constructor and semantics) on the C++ sum tree.

    Args:
        max_capacity: number of slots of the storage it samples from.
        alpha: priority exponent; a priority p is stored as (p + eps) ** alpha.
        beta: importance-sampling exponent: weight = (leaf / min leaf) ** -beta.
        eps: added to every priority. Defaults to 1e-8 as in TorchRL.
        dtype: torch.float32 or torch.float64, the dtype of the returned weights.
        reduction: "max", "min", "median", "mean" or "sum": how TorchRL's
            TensorDictReplayBuffer reduces a multi-dimensional priority.
        max_priority_within_buffer: when True, the default priority of new
            items is the largest one in the buffer; when False (default), the
            largest one seen since the sampler was built.
        device: where indices and weights are returned (the tree is on the CPU).
        generator: numpy Generator or int seed used when the replay buffer set
            no generator of its own (keyword only; not in TorchRL).

    See the module docstring for the differences from TorchRL's sampler.
    """

    def __init__(
        self,
        max_capacity: int,
        alpha: float,
        beta: float,
        eps: float = 1e-8,
        dtype: torch.dtype = torch.float,
        reduction: str = "max",
        max_priority_within_buffer: bool = False,
        device=None,
        *,
        generator=None,
    ) -> None:
        if isinstance(max_capacity, bool) or not isinstance(max_capacity, numbers.Integral) or max_capacity < 1:
            raise ValueError(f"PrioritizedSampler: max_capacity must be an integer >= 1, got {max_capacity!r}")
        if dtype not in (torch.float32, torch.float64):
            raise NotImplementedError(f"dtype {dtype} not supported by PrioritizedSampler (float32 or float64)")
        if reduction not in _REDUCTIONS:
            raise ValueError(f"PrioritizedSampler: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self._max_capacity = int(max_capacity)
        self._alpha = _real(alpha, "alpha")
        self._beta = _real(beta, "beta")
        self._eps = _real(eps, "eps")
        self.dtype = dtype
        self.reduction = reduction
        self._max_priority_within_buffer = bool(max_priority_within_buffer)
        self._device = torch.device(device) if device is not None else None
        if generator is None:
            generator = np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))
        elif isinstance(generator, numbers.Integral) and not isinstance(generator, bool):
            generator = np.random.default_rng(int(generator))
        elif not isinstance(generator, np.random.Generator):
            raise TypeError(f"PrioritizedSampler: generator must be an int seed or a numpy Generator, "
                            f"got {type(generator).__name__}")
        self._generator = generator
        self._init()

    # -- the tree ------------------------------------------------------------
    def _init(self) -> None:
        self._tree = SumTree(self._max_capacity)
        self._max_priority = None

    def _empty(self) -> None:
        self._init()

    @property
    def device(self) -> torch.device:
        return self._device if self._device is not None else torch.device("cpu")

    def _maybe_init_from_storage(self, storage) -> None:
        return  # the tree stays on the CPU

    def priorities(self) -> torch.Tensor:
        """The stored leaves, (p + eps) ** alpha, as a float64 tensor of max_capacity values."""
        return torch.from_numpy(self._tree.leaves())

    def _tree_argmax(self):
        leaves = self._tree.leaves()
        k = int(np.argmax(leaves))
        return torch.tensor(leaves[k]), torch.tensor(k)

    def _recompute_max_priority_from_tree(self) -> None:
        if self._alpha == 0:
            return
        leaves = self._tree.leaves()
        k = int(np.argmax(leaves))
        if leaves[k] <= 0:
            self._max_priority = None
            return
        self._max_priority = (max(float(leaves[k]) ** (1.0 / self._alpha) - self._eps, 0.0), k)

    def _retransform_priority_trees(self, old_alpha: float, new_alpha: float) -> None:
        leaves = self._tree.leaves()
        written = leaves > 0
        if not written.any():
            return
        if old_alpha == 0:
            warnings.warn(
                "Changing alpha away from 0 on a PrioritizedSampler that already holds priorities cannot "
                "recover the raw priorities (alpha == 0 stores 1.0 for every written entry); sampling stays "
                "uniform for those entries until their priority is next updated."
            )
            return
        raw = np.maximum(leaves[written] ** (1.0 / old_alpha) - self._eps, 0.0)
        leaves[written] = (raw + self._eps) ** new_alpha
        self._tree.assign(leaves)

    # -- sampling --------------------------------------------------------------
    def _fractions(self, n: int) -> np.ndarray:
        if self._rng is not None:  # the replay buffer's generator, as TorchRL
            return torch.rand(n, generator=self._rng, dtype=torch.float64).numpy()
        return self._generator.random(n)

    def sample(self, storage, batch_size: int):
        """Draws `batch_size` slots with probability leaf / total; returns
        (index, {"priority_weight": (leaf / min leaf) ** -beta})."""
        if len(storage) == 0:
            raise RuntimeError(_EMPTY_STORAGE_ERROR)
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 0:
            raise ValueError(f"PrioritizedSampler.sample: batch_size must be an integer >= 0, got {batch_size!r}")
        try:
            if self.dtype is torch.float32:
                # one C++ call: draws and (leaf / min)^-beta, as float32
                idx, w = self._tree.sample_weighted(self._fractions(int(batch_size)), self._beta)
                index, weight = torch.from_numpy(idx), torch.from_numpy(w)
            else:
                idx, vals, _, mn = self._tree.sample(self._fractions(int(batch_size)))
                index = torch.from_numpy(idx)
                weight = torch.from_numpy(vals).div_(mn).pow_(-self._beta)
        except ValueError as exc:
            if self._tree.total() > 0:
                raise
            raise RuntimeError("non-positive p_sum: every stored priority is 0; update_priority first") from exc
        if self._device is not None and self._device.type != "cpu":
            index, weight = index.to(self._device), weight.to(self._device)
        if storage.ndim > 1:
            index = _unravel_index(index, storage.shape)
        return index, {"priority_weight": weight}

    # -- priorities --------------------------------------------------------------
    def update_priority(self, index, priority, *, storage=None) -> None:
        """Sets priorities (before alpha) for the given slots, as TorchRL's sampler.

        index: an int, or an integer tensor of shape (B,) (or (B, ndim) with a
        multi-dimensional storage, passed as `storage`); -1 entries are
        skipped. priority: one number for every index, or B numbers of any
        shape. On any error (see the module docstring) nothing is stored.
        """
        # The learner's common case, (B,) int64 slots and (B,) float priorities
        # on the CPU, goes straight to the tree, which checks the whole input
        # before it writes; anything else, and any input it refuses (a -1 to
        # skip, a bad value), takes the general path below.
        if (type(index) is torch.Tensor and type(priority) is torch.Tensor and index.dtype is torch.int64
                and (priority.dtype is torch.float32 or priority.dtype is torch.float64)
                and index.dim() == 1 and priority.dim() == 1 and index.is_cpu and priority.is_cpu
                and priority.shape[0] == index.shape[0] and index.shape[0] > 1 and not priority.requires_grad):
            bound = self._max_capacity
            if storage is not None and getattr(storage, "ndim", 1) == 1:
                bound = min(bound, len(storage))
            try:
                self._tree.update_priorities(index, priority, self._alpha, self._eps, bound)
            except (IndexError, ValueError):
                pass
            else:
                mx, j = torch.max(priority, 0)
                self._track_max(float(mx), index, int(j))
                return
        self._update_priority(index, priority, storage)

    def _track_max(self, mx: float, idx, j: int) -> None:
        """The largest priority, tracked as TorchRL does (raw, before alpha), after
        the leaves idx were written with a maximum mx at position j."""
        cur, cur_i = self._max_priority
        if cur is None or mx > cur:
            cur, cur_i = mx, int(idx[j])
            self._max_priority = (cur, cur_i)
        if self._max_priority_within_buffer and self._alpha != 0 and bool((idx == cur_i).any()):
            self._recompute_max_priority_from_tree()

    @torch.no_grad()
    def _update_priority(self, index, priority, storage) -> None:
        what = "PrioritizedSampler.update_priority"
        if isinstance(index, tuple):
            index = torch.stack([torch.as_tensor(i) for i in index], -1)
        index = torch.as_tensor(index)
        if index.dtype == torch.bool or index.is_floating_point() or index.is_complex():
            raise TypeError(f"{what}: `index` must hold integers, got dtype {index.dtype}")
        # A Python number keeps its float64 value (default_priority, fed back by mark_update).
        if isinstance(priority, numbers.Real) and not isinstance(priority, bool):
            priority = torch.tensor(float(priority), dtype=torch.float64)
        priority = torch.as_tensor(priority).detach()
        if priority.is_complex() or priority.dtype == torch.bool:
            raise TypeError(f"{what}: `priority` must be real numbers, got dtype {priority.dtype}")
        if index.ndim == 0:
            index = index.view(1)
        n = index.shape[0]
        if priority.numel() == 1:
            p = np.full(n, float(priority.reshape(-1)[0]))
            scalar = True
        elif priority.numel() == n:
            p = _as_float_array(priority, what, "priority")
            scalar = False
        else:
            raise ValueError(
                f"{what}: `priority` must be one number or one per index; got priority of shape "
                f"{tuple(priority.shape)} for index of shape {tuple(index.shape)}; nothing was updated"
            )
        idx = self._flat_index(index.to("cpu", torch.int64), storage, what)
        keep = idx != -1
        if not keep.all():
            idx, p = idx[keep], p[keep]
        bound = self._max_capacity
        if storage is not None and getattr(storage, "ndim", 1) == 1:
            bound = min(bound, len(storage))
        if idx.size and (idx.min() < 0 or idx.max() >= bound):
            j = int(np.argmax((idx < 0) | (idx >= bound)))
            raise IndexError(f"{what}: index {int(idx[j])} at position {j} is out of range for "
                             f"{'the storage length' if bound < self._max_capacity else 'max_capacity'} {bound}; "
                             f"nothing was updated")
        _check_values(p, what, "priority")
        if idx.size == 0:
            return
        self._tree.update_priorities(idx, p, self._alpha, self._eps, self._max_capacity)
        j = 0 if scalar else int(np.argmax(p))
        self._track_max(float(p[j]), idx, j)

    def _flat_index(self, index: torch.Tensor, storage, what: str) -> np.ndarray:
        if index.ndim == 1:
            return index.numpy().astype(np.int64, copy=False)
        if index.ndim != 2 or storage is None or getattr(storage, "ndim", 1) <= 1:
            raise ValueError(
                f"{what}: `index` must have shape (B,), or (B, ndim) with a storage of ndim > 1 passed as "
                f"`storage`; got shape {tuple(index.shape)}; nothing was updated"
            )
        shape = tuple(storage.shape)
        if index.shape[-1] != len(shape):
            raise ValueError(f"{what}: `index` of shape {tuple(index.shape)} does not address a storage of shape "
                             f"{shape}; nothing was updated")
        hi = torch.tensor(shape)
        if ((index < 0) | (index >= hi)).any():
            raise IndexError(f"{what}: `index` holds coordinates outside the storage's shape {shape}; "
                             f"nothing was updated")
        return np.ravel_multi_index(tuple(index.numpy().T), shape).astype(np.int64)

    # -- state -------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        mp, mi = self._max_priority
        return {
            "_schema_version": self._STATE_SCHEMA_VERSION,
            "_alpha": self._alpha,
            "_beta": self._beta,
            "_eps": self._eps,
            "_max_capacity": self._max_capacity,
            "_max_priority": (None if mp is None else float(mp), None if mi is None else int(mi)),
            "_priorities": torch.from_numpy(self._tree.leaves()),
            "_generator": rng_state(self._generator),
        }

    def _checked_state(self, alpha, beta, eps, max_priority, leaves, capacity, what):
        """Everything a load installs, checked; raises before anything changes."""
        if int(capacity) != self._max_capacity:
            raise ValueError(
                f"{what}: the state is of a sampler of max_capacity {capacity}, this one's is "
                f"{self._max_capacity}; nothing was loaded"
            )
        leaves = _as_float_array(leaves, what, "priorities")
        if leaves.size != self._max_capacity:
            raise ValueError(f"{what}: the state holds {leaves.size} priorities for max_capacity "
                             f"{self._max_capacity}; nothing was loaded")
        _check_values(leaves, what, "priorities")
        alpha, beta, eps = (_real(float(v), k) for v, k in ((alpha, "alpha"), (beta, "beta"), (eps, "eps")))
        mp, mi = max_priority if max_priority is not None else (None, None)
        mp = None if mp is None else float(mp)
        mi = None if mi is None else int(mi)
        return alpha, beta, eps, (mp, mi), leaves

    def _install(self, alpha, beta, eps, max_priority, leaves, generator) -> None:
        self._alpha, self._beta, self._eps = alpha, beta, eps
        self._tree.assign(leaves)
        self._max_priority = None if max_priority[0] is None and max_priority[1] is None else max_priority
        if generator is not None:
            self._generator = generator

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        what = "PrioritizedSampler.load_state_dict"
        if "_priorities" not in state_dict:
            raise ValueError(f"{what}: not a state dict of neuralmem_fast's PrioritizedSampler (no '_priorities'); "
                             f"a TorchRL sampler's priorities travel through its dumps(), which loads() reads")
        capacity = state_dict.get("_max_capacity", len(state_dict["_priorities"]))
        checked = self._checked_state(state_dict["_alpha"], state_dict["_beta"], state_dict["_eps"],
                                      state_dict.get("_max_priority"), state_dict["_priorities"], capacity, what)
        gen = state_dict.get("_generator")
        generator = None if gen is None else restored_rng(gen, what)[0]
        if generator is not None and not isinstance(generator, np.random.Generator):
            raise ValueError(f"{what}: the saved generator is not a numpy Generator; nothing was loaded")
        self._install(*checked, generator)

    def dumps(self, path) -> None:
        """Writes TorchRL's layout: sumtree.memmap and mintree.memmap (float64
        leaves), sampler_metadata.json, plus sampler_generator.pt."""
        path = Path(path).absolute()
        path.mkdir(parents=True, exist_ok=True)
        leaves = self._tree.leaves()
        leaves.tofile(path / "sumtree.memmap")
        leaves.tofile(path / "mintree.memmap")
        mp, mi = self._max_priority
        meta = {"_alpha": self._alpha, "_beta": self._beta, "_eps": self._eps,
                "_max_priority": [None if mp is None else float(mp), None if mi is None else float(mi)],
                "_max_capacity": self._max_capacity, "_schema_version": self._STATE_SCHEMA_VERSION}
        with open(path / "sampler_metadata.json", "w") as f:
            json.dump(meta, f)
        torch.save(rng_state(self._generator), path / "sampler_generator.pt")

    def loads(self, path) -> None:
        """Reads a dumps() of this sampler or of TorchRL's; checks it all before loading."""
        what = "PrioritizedSampler.loads"
        path = Path(path).absolute()
        with open(path / "sampler_metadata.json") as f:
            meta = json.load(f)
        leaves = np.fromfile(path / "sumtree.memmap", dtype=np.float64)
        if leaves.size != int(meta["_max_capacity"]):
            raise ValueError(f"{what}: sumtree.memmap holds {leaves.size} values, the metadata says "
                             f"{meta['_max_capacity']}; nothing was loaded")
        mp = meta.get("_max_priority")
        mp = None if mp is None else tuple(mp) + (None,) * (2 - len(mp))
        if meta.get("_schema_version", 0) < 1 and self._max_priority_within_buffer:
            mp = None  # pre-raw-domain payload: recomputed from the leaves below, as TorchRL does
        checked = self._checked_state(meta["_alpha"], meta["_beta"], meta["_eps"], mp, leaves,
                                      meta["_max_capacity"], what)
        generator = None
        gen_file = path / "sampler_generator.pt"
        if gen_file.exists():
            generator = restored_rng(torch.load(gen_file, weights_only=True), what)[0]
        self._install(*checked, generator)
        if meta.get("_schema_version", 0) < 1 and self._max_priority_within_buffer:
            self._recompute_max_priority_from_tree()

    # -- pickling (deepcopy, torch.save of the sampler itself) ------------------
    def __getstate__(self):
        state = super().__getstate__()
        state["_tree"] = self._tree.leaves()
        return state

    def __setstate__(self, state):
        leaves = state.pop("_tree")
        self.__dict__.update(state)
        self._tree = SumTree(self._max_capacity)
        self._tree.assign(leaves)
