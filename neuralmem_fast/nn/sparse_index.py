"""An approximate-nearest-neighbour index over a memory's rows that follows the writes, for Sparse
Access Memory (Rae et al. 2016): each read head finds its K candidate slots by cosine similarity
through the index instead of scanning all N slots.

faiss is an optional dependency (`pip install faiss-cpu`): this module imports without it, and
FaissIndex imports it when constructed. `recall_at_k` needs only torch.
"""
import math
import time
import warnings

import numpy as np
import torch


def _import_faiss():
    import faiss  # optional: pip install faiss-cpu
    return faiss


def has_faiss():
    """True when faiss can be imported."""
    try:
        _import_faiss()
    except ImportError:
        return False
    return True


def _normalize(x, eps):
    """Rows divided by max(|row|, eps): F.normalize's semantics, so a zero row stays zero."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


class _FlatStore:
    """The exact index of one memory: its nonzero rows (normalized, float32) packed in a growing
    array with their slot numbers; insert, overwrite and remove (swap with the last) are O(1)
    per row, a search is one matmul over the stored rows."""

    kind = "flat"

    def __init__(self, n_slots, d):
        self.pos = np.full(n_slots, -1, dtype=np.int64)  # slot -> row of `vecs`, -1 when absent
        self.vecs = np.empty((0, d), dtype=np.float32)
        self.ids = np.empty(0, dtype=np.int64)
        self.ntotal = 0

    def add(self, ids, vecs):
        """Inserts or overwrites the rows of `ids` (distinct slot numbers)."""
        p = self.pos[ids]
        old = p >= 0
        self.vecs[p[old]] = vecs[old]
        new_ids, m = ids[~old], int((~old).sum())
        if not m:
            return
        if self.ntotal + m > len(self.ids):
            cap = max(64, 2 * (self.ntotal + m))
            grown = np.empty((cap, vecs.shape[1]), np.float32)
            grown[: self.ntotal] = self.vecs[: self.ntotal]
            self.vecs = grown
            self.ids = np.concatenate([self.ids[: self.ntotal], np.empty(cap - self.ntotal, np.int64)])
        at = np.arange(self.ntotal, self.ntotal + m)
        self.vecs[at] = vecs[~old]
        self.ids[at] = new_ids
        self.pos[new_ids] = at
        self.ntotal += m

    def remove(self, ids):
        for i in ids.tolist():
            p = self.pos[i]
            if p < 0:
                continue
            last = self.ntotal - 1
            if p != last:
                self.vecs[p] = self.vecs[last]
                self.ids[p] = self.ids[last]
                self.pos[self.ids[p]] = p
            self.pos[i] = -1
            self.ntotal = last

    def search(self, q, k):
        n = self.ntotal
        scores = np.full((len(q), k), -np.inf, dtype=np.float32)
        labels = np.full((len(q), k), -1, dtype=np.int64)
        if n:
            s = torch.from_numpy(q) @ torch.from_numpy(self.vecs[:n]).T
            top = torch.topk(s, min(k, n), dim=1)
            scores[:, : top.values.shape[1]] = top.values.numpy()
            labels[:, : top.values.shape[1]] = self.ids[top.indices.numpy()]
        return scores, labels

    def stored(self):
        """(ids, vectors) of every stored row."""
        return self.ids[: self.ntotal].copy(), self.vecs[: self.ntotal].copy()


class _IVFStore:
    """faiss IndexIVFFlat (inner product) with a hashtable direct map, so that removing or
    replacing a slot costs O(1) in the list sizes; trained on the rows it is built from."""

    kind = "ivf"

    def __init__(self, faiss, d, nlist, nprobe, ids, vecs, train_rows, seed):
        self.faiss = faiss
        self.index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        self.index.cp.niter = 10
        self.index.cp.seed = seed
        self.index.cp.min_points_per_centroid = 1  # no warning for a short sample: it is ours to choose
        rng = np.random.default_rng(seed)
        sample = vecs if len(vecs) <= train_rows else vecs[np.sort(rng.choice(len(vecs), train_rows, replace=False))]
        self.index.train(np.ascontiguousarray(sample))
        self.index.set_direct_map_type(faiss.DirectMap.Hashtable)
        self.index.nprobe = nprobe
        self.nlist, self.nprobe = nlist, nprobe
        if len(ids):
            self.index.add_with_ids(vecs, ids)

    @property
    def ntotal(self):
        return self.index.ntotal

    def _few(self, m):
        """One OpenMP thread for a handful of rows: with more, the threads' start-up costs more
        than the work (measured: 0.2 ms against 7 ms per update of 5 rows on 2 loaded cores)."""
        return m < 1024

    def add(self, ids, vecs):
        if self._few(len(ids)):
            threads = self.faiss.omp_get_max_threads()
            self.faiss.omp_set_num_threads(1)
            try:
                self.index.add_with_ids(vecs, ids)
            finally:
                self.faiss.omp_set_num_threads(threads)
        else:
            self.index.add_with_ids(vecs, ids)

    def remove(self, ids):
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(ids):
            sel = self.faiss.IDSelectorArray(len(ids), self.faiss.swig_ptr(ids))
            self.index.remove_ids(sel)

    def search(self, q, k):
        scores, labels = self.index.search(q, k)
        short = (labels < 0).any(1) & (self.index.ntotal >= k)
        if short.any():  # the probed lists held fewer than k rows: probe them all for these queries
            self.index.nprobe = self.nlist
            scores[short], labels[short] = self.index.search(np.ascontiguousarray(q[short]), k)
            self.index.nprobe = self.nprobe
        return scores, labels

    def stored(self):
        inv = self.index.invlists
        ids = [self.faiss.rev_swig_ptr(inv.get_ids(lst), inv.list_size(lst)).copy()
               for lst in range(self.nlist) if inv.list_size(lst)]
        ids = np.concatenate(ids) if ids else np.empty(0, np.int64)
        vecs = np.empty((len(ids), self.index.d), np.float32)
        for j, i in enumerate(ids.tolist()):
            vecs[j] = self.index.reconstruct(i)
        return ids, vecs


class FaissIndex:
    """Per memory of the batch, an index over its NONZERO rows (ids = slot numbers), cosine by
    inner product of normalized vectors. All-zero rows are not indexed (they all score 0 with every
    key; the caller fills those itself).

    A memory with fewer than `min_train` nonzero rows (and every memory with exact=True) is held
    exactly: its normalized rows packed with their slot numbers, searched by one matmul, so the
    result is the exact top-k. From `min_train` rows on, an IVF index (faiss IndexIVFFlat, inner
    product, hashtable direct map so that removing or replacing a slot is O(1)) trained on the
    memory's current nonzero rows (at most 64 * nlist of them, 10 k-means iterations). Defaults:
    nlist = round(sqrt(n)) and nprobe = ceil(0.4 * nlist) for n indexed rows at training time.
    Measured with benchmarks/sparse_index_recall.py on random Gaussian rows and keys, D=64, k=8,
    B=8 memories, 256 keys, one thread on a shared 2-core machine: recall@8 0.963 at N=10^6
    (nlist 1000, nprobe 400), search 160 ms per batch of 8x4 keys against 308 ms for the exact
    scan in torch (1.9x); 0.943 with 5x10^5 nonzero rows of 10^6; 0.904 at N=10^5. nprobe =
    ceil(0.5 * nlist) gives 0.983 at N=10^6 for about 1.5x the search time. Random Gaussian rows are
    the hard case for IVF (a random key's nearest rows lie in most lists); clustered rows do better.
    The exact store is no slower than the exact torch scan, hence min_train = 2^17: below it the
    IVF index would save little (measured 1.3x at N=10^5, recall 0.90).

    Re-training: `rebuild_every` counts ROWS written (valid entries given to update(), per memory);
    once a memory has had that many since its index was trained, its IVF index is re-trained from
    the memory (rebuild_every=None: never). A memory is also re-trained when its nonzero count has
    doubled since training, switches flat -> IVF when it reaches min_train nonzero rows, and
    IVF -> flat below min_train // 2.

    Staleness is detected by the memory's version counter (`memory._version`): attach, update and
    rebuild record it; a search that finds it moved rebuilds the index from the memory (O(N),
    stats["stale_rebuilds"]) and warns once. update() accepts any change of version as the writes
    it is told of, so the contract is write-then-update for every in-place write; writes that do
    not bump the version (through `.data` or a numpy view) are not detected.

    `threads` sets faiss's OpenMP thread count, a process-wide setting (None: leave it). Updates
    of fewer than 1024 rows run on one thread (cheaper than waking the others).

    Scores returned by search() are recomputed from the memory's current rows in the memory's
    dtype (then float32), so they match a dense cosine on the same rows.
    """

    name = "faiss"

    def __init__(self, nlist=None, nprobe=None, rebuild_every=1 << 20, min_train=1 << 17, exact=False,
                 threads=None, eps=1e-12, seed=0):
        try:
            self._faiss = _import_faiss()
        except ImportError as e:
            raise ImportError("FaissIndex needs faiss: pip install faiss-cpu") from e
        for name, v in (("nlist", nlist), ("nprobe", nprobe), ("rebuild_every", rebuild_every),
                        ("threads", threads)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{name}: expected a positive int or None, got {v!r}")
        if not isinstance(min_train, int) or min_train < 1:
            raise ValueError(f"min_train: expected a positive int, got {min_train!r}")
        self.nlist, self.nprobe, self.rebuild_every = nlist, nprobe, rebuild_every
        self.min_train, self.exact, self.threads, self.eps, self.seed = min_train, bool(exact), threads, eps, seed
        if threads is not None:
            self._faiss.omp_set_num_threads(threads)
        self.memory = None
        self.nonzero = None
        self._stores = []
        self._written = []  # rows written per memory since its index was built
        self._trained_n = []  # nonzero rows per memory when its IVF index was trained
        self._version = None
        self._warned = False
        self.stats = {"searches": 0, "updates": 0, "rows_updated": 0, "rebuilds": 0, "stale_rebuilds": 0,
                      "search_s": 0.0, "update_s": 0.0, "rebuild_s": 0.0}

    # ---------------------------------------------------------------- building
    def _params(self, n):
        nlist = self.nlist or max(1, round(math.sqrt(n)))
        nlist = min(nlist, n)
        nprobe = min(self.nprobe or math.ceil(0.4 * nlist), nlist)
        return nlist, nprobe

    def _scan(self, memory, b, chunk=1 << 16):
        """(ids, normalized float32 rows) of memory b's nonzero rows and its (N,) nonzero mask;
        raises ValueError naming the first non-finite row."""
        n = memory.shape[1]
        ids, vecs, mask = [], [], torch.zeros(n, dtype=torch.bool)
        for s in range(0, n, chunk):
            rows = memory[b, s: s + chunk].detach().cpu()
            bad = ~torch.isfinite(rows).all(-1)
            if bad.any():
                raise ValueError(f"memory: row b={b}, slot={s + int(bad.nonzero()[0])} contains NaN or inf")
            nz = (rows != 0).any(-1)
            mask[s: s + chunk] = nz
            sel = nz.nonzero().flatten()
            ids.append((sel + s).numpy())
            vecs.append(_normalize(rows[sel], self.eps).float().numpy())
        return np.concatenate(ids), np.ascontiguousarray(np.concatenate(vecs)), mask

    @staticmethod
    def _finite_or_raise(memory, chunk=1 << 16):
        for b in range(memory.shape[0]):
            for s in range(0, memory.shape[1], chunk):
                bad = ~torch.isfinite(memory[b, s: s + chunk].detach()).all(-1)
                if bad.any():
                    raise ValueError(f"memory: row b={b}, slot={s + int(bad.nonzero()[0])} contains NaN or inf")

    def _build(self, n_slots, d, ids, vecs):
        if self.exact or len(ids) < self.min_train:
            store = _FlatStore(n_slots, d)
            store.add(ids, vecs)
            return store
        nlist, nprobe = self._params(len(ids))
        return _IVFStore(self._faiss, d, nlist, nprobe, ids, vecs, 64 * nlist, self.seed)

    def attach(self, memory):
        """Indexes the nonzero rows of `memory` (B, N, D), float32 or float64, any device (rows are
        copied to the CPU for faiss), and keeps a reference to it."""
        if not isinstance(memory, torch.Tensor):
            raise TypeError(f"memory: expected a torch.Tensor, got {type(memory).__name__}")
        if memory.dim() != 3 or min(memory.shape) < 1:
            raise ValueError(f"memory: expected a non-empty (B, N, D) tensor, got shape {tuple(memory.shape)}")
        if memory.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"memory: expected float32 or float64, got {memory.dtype}")
        t0 = time.perf_counter()
        B, N, D = memory.shape
        stores, masks, trained = [], [], []
        for b in range(B):  # everything is built before anything is replaced
            ids, vecs, mask = self._scan(memory, b)
            stores.append(self._build(N, D, ids, vecs))
            masks.append(mask)
            trained.append(len(ids))
        self.memory, self._stores, self._trained_n = memory, stores, trained
        self._written = [0] * B
        self.nonzero = torch.stack(masks).to(memory.device)
        self._version = memory._version
        self.stats["rebuild_s"] += time.perf_counter() - t0

    def _rebuild_one(self, b):
        ids, vecs, mask = self._scan(self.memory, b)
        self._stores[b] = self._build(self.memory.shape[1], self.memory.shape[2], ids, vecs)
        self._trained_n[b] = len(ids)
        self._written[b] = 0
        self.nonzero[b] = mask.to(self.nonzero.device)
        self.stats["rebuilds"] += 1

    def rebuild(self):
        """Re-trains / rebuilds every memory's index from the attached memory (O(N))."""
        self._need_attached("rebuild")
        t0 = time.perf_counter()
        self._finite_or_raise(self.memory)  # before replacing any index
        for b in range(self.memory.shape[0]):
            self._rebuild_one(b)
        self._version = self.memory._version
        self.stats["rebuild_s"] += time.perf_counter() - t0

    def _need_attached(self, what):
        if self.memory is None:
            raise RuntimeError(f"{what}: no memory attached; call attach(memory) first")

    def _check_fresh(self):
        if self.memory._version != self._version:
            if not self._warned:
                warnings.warn("FaissIndex: the memory was modified without update(); rebuilding the index "
                              "from the memory (O(N)). Call update(indices) after every in-place write.",
                              RuntimeWarning, stacklevel=3)
                self._warned = True
            self.rebuild()
            self.stats["stale_rebuilds"] += 1

    # ---------------------------------------------------------------- updates
    def update(self, indices):
        """The rows of the attached memory at `indices` (B, M) int64 (-1 ignored, duplicates
        allowed) changed in place: re-reads them; a row now all zero leaves the index, the others
        are (re)inserted. O(M) apart from the re-training described in the class docstring."""
        self._need_attached("update")
        memory = self.memory
        B, N, D = memory.shape
        if not isinstance(indices, torch.Tensor):
            raise TypeError(f"indices: expected a torch.Tensor, got {type(indices).__name__}")
        if indices.dtype != torch.int64:
            raise TypeError(f"indices: expected int64, got {indices.dtype}")
        if indices.dim() != 2 or indices.shape[0] != B:
            raise ValueError(f"indices: expected shape ({B}, M), got {tuple(indices.shape)}")
        if indices.device.type != "cpu" and indices.device != memory.device:
            raise ValueError(f"indices: expected the CPU or the memory's device {memory.device}, got {indices.device}")
        t0 = time.perf_counter()
        idx = indices.cpu()
        if idx.numel() and (idx.min() < -1 or idx.max() >= N):
            raise ValueError(f"indices: values must lie in [-1, {N}), got range [{int(idx.min())}, {int(idx.max())}]")
        # read and validate every row (one gather, one copy to the CPU) before touching any index
        flat = torch.unique(idx[idx >= 0] + N * torch.arange(B).unsqueeze(1).expand_as(idx)[idx >= 0])
        bb, ss = flat // N, flat % N
        r_all = memory.detach()[bb.to(memory.device), ss.to(memory.device)].cpu()
        bad = ~torch.isfinite(r_all).all(-1)
        if bad.any():
            j = int(bad.nonzero()[0])
            raise ValueError(f"memory: row b={int(bb[j])}, slot={int(ss[j])} contains NaN or inf; "
                             "the index was not changed")
        counts = torch.bincount(bb, minlength=B).tolist()
        slots, rows = ss.split(counts), r_all.split(counts)
        for b in range(B):
            s, r = slots[b], rows[b]
            if not len(s):
                continue
            store = self._stores[b]
            nz = (r != 0).any(-1)
            present = self.nonzero[b, s.to(self.nonzero.device)].cpu()
            store.remove(s[present].numpy())
            if nz.any():
                store.add(s[nz].numpy(), np.ascontiguousarray(_normalize(r[nz], self.eps).float().numpy()))
            self.nonzero[b, s.to(self.nonzero.device)] = nz.to(self.nonzero.device)
            self._written[b] += len(s)
            self.stats["rows_updated"] += len(s)
            self._maybe_retrain(b)
        self._version = memory._version
        self.stats["updates"] += 1
        self.stats["update_s"] += time.perf_counter() - t0

    def _maybe_retrain(self, b):
        store, n = self._stores[b], self._stores[b].ntotal
        if self.exact:
            return
        if store.kind == "flat":
            due = n >= self.min_train
        else:
            due = (n < self.min_train // 2 or n >= 2 * max(self._trained_n[b], 1)
                   or (self.rebuild_every is not None and self._written[b] >= self.rebuild_every))
        if due:
            self._rebuild_one(b)

    # ---------------------------------------------------------------- search
    def search(self, keys, k):
        """keys (B, H, D) -> (scores (B, H, k) float32 cosine, indices (B, H, k) int64), best first,
        on the memory's device; only nonzero rows are candidates; where fewer than k rows are
        indexed the missing entries are index -1 with score -inf."""
        self._need_attached("search")
        memory = self.memory
        B, N, D = memory.shape
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= N:
            raise ValueError(f"k: expected an int in [1, {N}], got {k!r}")
        if not isinstance(keys, torch.Tensor):
            raise TypeError(f"keys: expected a torch.Tensor, got {type(keys).__name__}")
        if not keys.is_floating_point():
            raise TypeError(f"keys: expected a floating-point tensor, got {keys.dtype}")
        if keys.dim() != 3 or keys.shape[0] != B or keys.shape[2] != D or keys.shape[1] < 1:
            raise ValueError(f"keys: expected shape ({B}, H, {D}), got {tuple(keys.shape)}")
        if keys.device != memory.device:
            raise ValueError(f"keys: expected the memory's device {memory.device}, got {keys.device}")
        if not torch.isfinite(keys).all():
            raise ValueError("keys: contains NaN or inf")
        self._check_fresh()
        t0 = time.perf_counter()
        H = keys.shape[1]
        q = _normalize(keys.detach().to(memory.dtype), self.eps)
        qn = q.float().cpu().numpy()
        labels = np.empty((B, H, k), np.int64)
        for b in range(B):
            labels[b] = self._stores[b].search(np.ascontiguousarray(qn[b]), k)[1]
        labels = torch.from_numpy(labels).to(memory.device)
        # exact cosine of the candidates from the memory's current rows, in the memory's dtype
        rows = torch.gather(memory.detach(), 1, labels.clamp_min(0).reshape(B, H * k, 1).expand(B, H * k, D))
        s = (_normalize(rows, self.eps).reshape(B, H, k, D) * q.unsqueeze(2)).sum(-1)
        s = s.masked_fill(labels < 0, float("-inf"))
        s, order = torch.sort(s, dim=-1, descending=True, stable=True)
        labels = torch.gather(labels, -1, order)
        self.stats["searches"] += 1
        self.stats["search_s"] += time.perf_counter() - t0
        return s.float(), labels

    # ---------------------------------------------------------------- checks
    def check(self):
        """The number of slots out of step: indexed rows whose stored vector differs from the
        memory's current normalized row, nonzero rows missing, zero rows present, and slots where
        `nonzero` is wrong (each slot counted once; 0 when current). O(N)."""
        self._need_attached("check")
        bad = 0
        for b in range(self.memory.shape[0]):
            ids, vecs = self._stores[b].stored()
            want_ids, want_vecs, mask = self._scan(self.memory, b)
            want = dict(zip(want_ids.tolist(), range(len(want_ids))))
            seen, wrong = set(), set()
            for j, i in enumerate(ids.tolist()):
                p = want.get(i)
                if p is None or i in seen or not np.allclose(vecs[j], want_vecs[p], rtol=0, atol=1e-6):
                    wrong.add(i)
                seen.add(i)
            wrong |= set(want) - seen
            wrong |= set((self.nonzero[b].cpu() != mask).nonzero().flatten().tolist())  # `nonzero` out of step
            bad += len(wrong)
        return bad

    def kinds(self):
        """Per memory: 'flat' (exact) or 'ivf'."""
        return [s.kind for s in self._stores]


def recall_at_k(index, memory, keys, k, eps=1e-12, chunk=1 << 16):
    """Mean over (b, h) of |index top-k ∩ exact top-k| / k, the exact top-k by cosine over ALL rows
    of `memory` (zero rows score 0) computed here in float64, chunked over N. An entry of the
    index's result counts as a hit when its exact score reaches the k-th exact score (so ties, e.g.
    zero rows at score 0, are hits); an entry -1 stands for a zero row (score 0)."""
    B, N, D = memory.shape
    q = _normalize(keys.detach().double(), eps)
    top = None
    for s in range(0, N, chunk):
        m = _normalize(memory[:, s: s + chunk].detach().double(), eps)
        sc = torch.einsum("bhd,bnd->bhn", q, m)
        top = sc if top is None else torch.cat([top, sc], -1)
        top = torch.topk(top, min(k, top.shape[-1]), -1).values
    kth = top[..., -1:]
    _, idx = index.search(keys, k)
    idx = idx.to(memory.device)
    rows = torch.gather(memory.detach(), 1, idx.clamp_min(0).reshape(B, -1, 1).expand(B, idx.shape[1] * k, D)).double()
    got = (_normalize(rows, eps).reshape(B, -1, k, D) * q.unsqueeze(2)).sum(-1)
    got = got.masked_fill(idx < 0, 0.0)
    hits = (got >= kth - 1e-9 * kth.abs().clamp_min(1)).sum(-1).clamp_max(k)
    return float(hits.double().mean() / k)
