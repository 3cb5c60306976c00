"""The random generators of the replay classes, saved and restored exactly.

A state is a plain dict of strings, ints and one int64 tensor, so a state dict
that holds it survives ``torch.save`` / ``torch.load(weights_only=True)`` and
a new process: the restored generator draws exactly what the saved one would
have drawn next.

    {"kind": "generator", "state": <numpy Generator's bit_generator.state>}
    {"kind": "random_state", "state": {...}, "key": int64 tensor}  numpy RandomState
    {"kind": "numpy_global", "state": {...}, "key": int64 tensor}  numpy's global RNG (np.random.*)
    {"kind": "torch", "state": uint8 tensor}                        a torch.Generator
"""
from __future__ import annotations

import copy
from typing import Any, Dict, Optional

import numpy as np
import torch

# The bit generators numpy ships; a saved name outside this set is refused.
_BIT_GENERATORS = ("PCG64", "PCG64DXSM", "Philox", "SFC64", "MT19937")


def _legacy_state(get_state):
    s = get_state(legacy=False)
    key = s["state"]["key"]
    out = {"bit_generator": s["bit_generator"], "pos": int(s["state"]["pos"]),
           "has_gauss": int(s["has_gauss"]), "gauss": float(s["gauss"])}
    return out, torch.from_numpy(np.asarray(key, dtype=np.int64).copy())


def rng_state(gen) -> Optional[Dict[str, Any]]:
    """The state of `gen` (None: numpy's global RNG), or None for a generator of another kind."""
    if gen is None or gen is np.random:
        s, key = _legacy_state(np.random.get_state)
        return {"kind": "numpy_global", "state": s, "key": key}
    if isinstance(gen, np.random.Generator):
        return {"kind": "generator", "state": copy.deepcopy(gen.bit_generator.state)}
    if isinstance(gen, np.random.RandomState):
        s, key = _legacy_state(gen.get_state)
        return {"kind": "random_state", "state": s, "key": key}
    if isinstance(gen, torch.Generator):
        return {"kind": "torch", "state": gen.get_state().clone()}
    return None


def _legacy_dict(saved, what):
    s, key = saved["state"], saved["key"]
    key = np.asarray(key.numpy() if isinstance(key, torch.Tensor) else key, dtype=np.int64)
    if key.shape != (624,) or key.min() < 0 or key.max() >= 2**32:
        raise ValueError(f"{what}: the saved generator's MT19937 key must be 624 values in [0, 2**32)")
    return {"bit_generator": "MT19937", "state": {"key": key.astype(np.uint32), "pos": int(s["pos"])},
            "has_gauss": int(s["has_gauss"]), "gauss": float(s["gauss"])}


def restored_rng(saved: Dict[str, Any], what: str):
    """A new generator in the saved state, built and checked without touching any existing one.

    Returns (generator, install): for numpy's global RNG the generator is
    None and `install()` sets the global state; otherwise `install` is None.
    Raises ValueError for a state that is not one `rng_state` writes.
    """
    try:
        kind = saved["kind"]
        if kind == "generator":
            state = saved["state"]
            name = state["bit_generator"]
            if name not in _BIT_GENERATORS:
                raise ValueError(f"unknown bit generator {name!r}")
            bg = getattr(np.random, name)()
            bg.state = copy.deepcopy(state)
            return np.random.Generator(bg), None
        if kind in ("random_state", "numpy_global"):
            legacy = _legacy_dict(saved, what)
            rs = np.random.RandomState()
            rs.set_state(legacy)  # checks the state
            if kind == "random_state":
                return rs, None
            return None, lambda: np.random.set_state(legacy)
        if kind == "torch":
            g = torch.Generator()
            g.set_state(saved["state"])
            return g, None
        raise ValueError(f"unknown generator kind {kind!r}")
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{what}: the saved generator state is not valid ({exc}); nothing was loaded") from exc
