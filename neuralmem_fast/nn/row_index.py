"""The exact indexes of the sparse access (nn/sparse_access.py) and `make_index`, which builds any index.

`ExactIndex` scans the whole memory per search (`cosine_topk`); `RowIndex` scans only the rows written
(exact), spilling to faiss past a size where that pays, and detects a memory modified behind its back.
The approximate index, `FaissIndex`, is in nn/sparse_index.py. Every index has attach / update / search
(and rebuild / check); see docs/sparse.md for their measured cost and recall.
"""
import time
import warnings

import torch

from ..config import DEFAULT_SPARSE_EPS
from ..ops import sparse as sops

__all__ = ["ExactIndex", "RowIndex", "make_index"]


def _sorted_firsts(indices):
    """Each row of indices (B,M) sorted, and a mask of the first occurrence of every slot (-1 entries,
    which name no slot, are never first): (sorted (B,M), first (B,M) bool, order (B,M))."""
    s, order = torch.sort(indices, dim=1)
    first = s >= 0
    first[:, 1:] &= s[:, 1:] != s[:, :-1]
    return s, first, order


class ExactIndex:
    """The exact top-K by cosine: `cosine_topk` over the whole memory, one pass per step (O(N D))."""

    name = "exact"

    def __init__(self, eps=DEFAULT_SPARSE_EPS):
        self.eps = eps
        self.memory = None
        self.nonzero = None
        self.stats = {"searches": 0, "updates": 0, "rebuilds": 0, "stale_rebuilds": 0, "search_s": 0.0,
                      "update_s": 0.0}

    def attach(self, memory):
        self.memory = memory

    def update(self, indices):
        self.stats["updates"] += 1

    def search(self, keys, k):
        t0 = time.perf_counter()
        scores, idx = sops.cosine_topk(self.memory, keys, k, self.eps)
        self.stats["searches"] += 1
        self.stats["search_s"] += time.perf_counter() - t0
        return scores, idx

    def rebuild(self):
        pass

    def check(self):
        return 0


class RowIndex:
    """The exact top-K over the nonzero rows only, batched over the memories: a table (B, cap) of the slots
    written since they were last all zero, searched by one gather and one matmul, O(rows written) per
    search, O(M) per update of M slots, whatever N. Once more than `full_scan` of the N rows are listed,
    a search is one in-place `cosine_topk` pass instead (no gather). Every nonzero row is listed (rows never written are
    zero, and zero rows all score 0, which the caller fills in), so the result is exact. Listed rows
    that became zero again stay listed (as zero rows, score 0) until the table is compacted, which
    happens when it holds more than twice the nonzero rows. With `spill=n` and faiss installed, a memory
    whose nonzero rows pass n hands over to a FaissIndex (its IVF search) for good."""

    name = "rows"

    def __init__(self, spill=None, full_scan=0.125, eps=DEFAULT_SPARSE_EPS):
        self.spill, self.full_scan, self.eps = spill, full_scan, eps
        self.memory = self.nonzero = self.table = self.count = None
        self.delegate, self.stale, self._version = None, 0, None
        self._stats = {"searches": 0, "updates": 0, "rebuilds": 0, "stale_rebuilds": 0, "search_s": 0.0,
                       "update_s": 0.0, "full_scans": 0}

    @property
    def stats(self):
        return self.delegate.stats if self.delegate is not None else self._stats

    def attach(self, memory):
        self.memory = memory
        B, N, _ = memory.shape
        self.nonzero = torch.zeros(B, N, dtype=torch.bool, device=memory.device)  # listed (see the doc)
        self.table = torch.full((B, 64), -1, dtype=torch.int64, device=memory.device)
        self.count = torch.zeros(B, dtype=torch.int64, device=memory.device)
        self.rebuild()

    def rebuild(self):
        """Lists every nonzero row of the memory (O(N))."""
        if self.delegate is not None:
            return self.delegate.rebuild()
        m = self.memory.detach()
        B, N, _ = m.shape
        for a in range(0, N, 1 << 16):  # chunks: (m != 0) whole would be a B*N*D bool temporary
            self.nonzero[:, a:a + (1 << 16)] = (m[:, a:a + (1 << 16)] != 0).any(-1)
        counts = self.nonzero.sum(1)
        cap = max(64, int(counts.max()) * 2)
        bi, si = self.nonzero.nonzero(as_tuple=True)                  # row-major: slots ascending per memory
        rank = torch.arange(bi.numel(), device=m.device) - (torch.cumsum(counts, 0) - counts)[bi]
        self.table = torch.full((B, cap), -1, dtype=torch.int64, device=m.device)
        self.table[bi, rank] = si
        self.count, self.stale = counts, 0
        self._version = self.memory._version
        self.stats["rebuilds"] += 1
        self._maybe_spill()

    def _maybe_spill(self):
        if self.delegate is None and self.spill is not None and int(self.count.max()) > self.spill:
            from . import sparse_index

            if sparse_index.has_faiss():
                d = sparse_index.FaissIndex(min_train=self.spill, eps=self.eps)
                d.attach(self.memory)
                self.delegate, self.nonzero = d, d.nonzero

    def update(self, indices):
        if self.delegate is not None:
            out = self.delegate.update(indices)
            self.nonzero = self.delegate.nonzero
            return out
        t0 = time.perf_counter()
        B, M = indices.shape
        s, first, _ = _sorted_firsts(indices)
        sc = s.clamp(min=0)
        listed = self.nonzero.gather(1, sc)
        rows = self.memory.detach().gather(1, sc.unsqueeze(-1).expand(B, M, self.memory.shape[2]))
        nz = (rows != 0).any(-1)
        new = first & ~listed & nz          # a zero row need not be listed
        self.stale += int((first & listed & ~nz).sum())
        n_new = new.sum(1)
        if bool(n_new.any()):
            need = int((self.count + n_new).max())
            cap = self.table.shape[1]
            if need > cap:
                self.table = torch.cat([self.table, self.table.new_full((B, max(need, 2 * cap) - cap), -1)], 1)
            pos = self.count.unsqueeze(1) + torch.cumsum(new, 1) - 1
            scratch = torch.cat([self.table, self.table.new_full((B, 1), -1)], 1)
            scratch.scatter_(1, torch.where(new, pos, self.table.shape[1]), torch.where(new, sc, -1))
            self.table = scratch[:, :-1].contiguous()
            self.count += n_new
            bi, si = new.nonzero(as_tuple=True)
            self.nonzero[bi, sc[bi, si]] = True
            self._maybe_spill()
        if self.stale > max(1024, int(self.count.max()) // 2):
            self.compact()
        self._version = self.memory._version
        self.stats["updates"] += 1
        self.stats["update_s"] += time.perf_counter() - t0

    def compact(self):
        """Drops the listed rows that are zero again, O(listed rows * D)."""
        B, D = self.table.shape[0], self.memory.shape[2]
        n = max(int(self.count.max()), 1)
        t = self.table[:, :n]
        rows = self.memory.detach().gather(1, t.clamp(min=0).unsqueeze(-1).expand(B, n, D))
        keep = (t >= 0) & (rows != 0).any(-1)
        bi, ti = ((t >= 0) & ~keep).nonzero(as_tuple=True)
        self.nonzero[bi, t[bi, ti]] = False
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
        self.count = keep.sum(1)
        pos = torch.arange(n, device=t.device).unsqueeze(0)
        self.table[:, :n] = torch.where(pos < self.count.unsqueeze(1), t.gather(1, order), -1)
        self.stale = 0

    def search(self, keys, k):
        if self.delegate is not None:
            return self.delegate.search(keys, k)
        if self.memory._version != self._version:
            # Written without update(): rows may be missing from the table. Rebuild (O(N)), never a
            # silently incomplete search.
            warnings.warn("RowIndex: the memory was modified without update(); rebuilding the index from the "
                          "memory (O(N)). Call update(indices) after every in-place write.", RuntimeWarning,
                          stacklevel=3)
            self.rebuild()
            self._stats["stale_rebuilds"] += 1
        t0 = time.perf_counter()
        B, H, D = keys.shape
        n = max(int(self.count.max()), 1)
        if n > self.full_scan * self.memory.shape[1]:
            # Most rows written: one in-place pass of cosine_topk beats gathering them. Its zero rows
            # (unlisted) are dropped: the caller fills those in, so no slot comes back twice.
            top, idx = sops.cosine_topk(self.memory.detach(), keys.detach().to(self.memory.dtype), k, self.eps)
            keep = self.nonzero.gather(1, idx.reshape(B, -1)).reshape(idx.shape)
            top = torch.where(keep, top.float(), float("-inf"))
            idx = torch.where(keep, idx, -1)
            self.stats["searches"] += 1
            self.stats["full_scans"] += 1
            self.stats["search_s"] += time.perf_counter() - t0
            return top, idx
        slots = self.table[:, :n]
        rows = self.memory.detach().gather(1, slots.clamp(min=0).unsqueeze(-1).expand(B, n, D))
        q = keys / keys.norm(dim=-1, keepdim=True).clamp_min(self.eps)
        r = rows / rows.norm(dim=-1, keepdim=True).clamp_min(self.eps)
        sc = torch.bmm(q.to(r.dtype), r.transpose(1, 2))                       # (B, H, n)
        sc = sc.masked_fill((slots < 0).unsqueeze(1), float("-inf"))
        kk = min(k, n)
        top, at = torch.topk(sc, kk, dim=2)
        idx = slots.unsqueeze(1).expand(B, H, n).gather(2, at)
        idx = torch.where(torch.isinf(top), -1, idx)
        if kk < k:
            top = torch.cat([top, top.new_full((B, H, k - kk), float("-inf"))], 2)
            idx = torch.cat([idx, idx.new_full((B, H, k - kk), -1)], 2)
        self.stats["searches"] += 1
        self.stats["search_s"] += time.perf_counter() - t0
        return top.float(), idx

    def check(self):
        """Nonzero rows that are not listed (0 when the index is current)."""
        if self.delegate is not None:
            return self.delegate.check()
        nz = (self.memory.detach() != 0).any(-1)
        listed = torch.zeros_like(nz)
        t = self.table
        bi, ti = (t >= 0).nonzero(as_tuple=True)
        listed[bi, t[bi, ti]] = True
        bad = int((nz & ~listed).sum()) + int((listed != self.nonzero).sum())
        return bad


def make_index(index, eps=DEFAULT_SPARSE_EPS):
    """"exact" (a full scan per search), "rows" or "auto" (RowIndex: exact over the nonzero rows, a full
    scan once most rows are written), "faiss" (FaissIndex: faiss's IVF past 2^17 nonzero rows per memory;
    approximate), an index object (serving one state at a time) or a factory of them. `eps` is the
    norm floor of the cosine of the indexes built here (objects and factories bring their own). "auto"
    stays exact: on this project's CPU measurements faiss's IVF at recall 0.95 was no faster than the
    exact scan kernel at N=10^6 (docs/sparse.md)."""
    if not isinstance(index, str):
        if callable(index) and not hasattr(index, "attach"):
            index = index()  # a factory: one index per state
        for attr in ("attach", "update", "search"):
            if not callable(getattr(index, attr, None)):
                raise TypeError(f"index must be 'exact', 'faiss', 'auto' or an object with attach/update/search, "
                                f"got {type(index).__name__}")
        return index
    if index == "exact":
        return ExactIndex(eps)
    if index in ("rows", "auto"):
        return RowIndex(eps=eps)
    if index == "faiss":
        from . import sparse_index

        if sparse_index.has_faiss():
            return sparse_index.FaissIndex(eps=eps)
        raise ImportError("index='faiss' needs faiss: pip install faiss-cpu")
    raise ValueError(f"index must be 'exact', 'rows', 'faiss', 'auto' or an index object, got {index!r}")
