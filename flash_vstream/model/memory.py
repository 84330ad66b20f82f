"""STAR memory: the spatial, temporal, abstract and retrieved memory of a video stream, one or many at once.

A small state machine over tensors (paper §3.2). Training and offline eval feed a
whole clip as one chunk, the realtime engine feeds one frame at a time; both call the same
`STARMemory.update`. The memory lives in CLIP feature space (D = `mm_hidden_size`) on the device
of the features it is fed; distances and cluster arithmetic run in fp32 (matmul-based, so they
are TF32 only if the caller switched TF32 on globally). The state is bounded: a ring buffer of
N_buff frames plus at most N_spa + N_tem + N_abs + N_ret memory frames, whatever the stream length.

The state is a row of a `MemoryStack`, fixed-size tensors for many streams. `MemoryStack.update` takes one
frame of each of many streams at once (the engine's batched ingest); a lone stream's frame runs that same
update with a batch of one, so a stream's memory is the same whichever streams share its stack.

`config.memory_mode` picks the behaviour:
  "paper"     Algorithms 1-3 of the paper: bounded buffer, weighted k-means with persistent
              weights, time-ordered centroids, retrieval of the buffer frames nearest the
              largest clusters.
  "upstream"  what the published code did, which the released checkpoint was
              trained with. Every difference carries an `# upstream:` note where it branches.
"""

import math
import weakref
from typing import NamedTuple

import torch
import torch.nn as nn

from .language_model.configuration_vstream import PATCH_GRID

INF = float("inf")
MAX_LLOYD_ITERATIONS = 10
UPSTREAM_TOLERANCE = 1e-4  # upstream k-means stops when the centroids move less than this in total


def pool(features, side):
    """Average-pool each frame's square patch grid to side x side, flattened row-major (paper g_pooling).

    (n, G*G, D) -> (n, side*side, D) in fp32; side=1 is the plain mean over patches. Pooling the
    16x16 grid to 8x8 and then to 4x4 equals pooling it to 4x4 directly.
    """
    n, tokens, dim = features.shape
    grid = math.isqrt(tokens)
    cell = grid // side
    x = features.reshape(n, side, cell, side, cell, dim)  # (n, P, G/P, P, G/P, D)
    return x.mean(dim=(2, 4), dtype=torch.float32).flatten(1, 2)  # (n, P*P, D)


def memory_num_tokens(num_frames, config):
    """Tokens that `num_frames` frames produce in ONE update of an empty memory (`config.memory_mode`).

    Released sizes: 1 frame -> 81 (paper: the frame at three scales) or 64 (upstream: spatial
    only); >= 26 frames -> 681 in both modes. Equals `len(STARMemory(config).update(x).read())`.
    """
    spatial = min(num_frames, config.spatial_frames)
    if config.memory_mode == "upstream":
        fed = num_frames - spatial  # upstream: offline, the newest frames are spatial memory only
        retrieved = min(config.retrieved_frames, fed, config.temporal_frames)
    else:
        fed = num_frames
        candidates = min(num_frames, config.buffer_frames) - spatial
        retrieved = min(config.retrieved_frames, fed, config.temporal_frames, candidates)
    temporal = min(fed, config.temporal_frames)
    abstract = min(fed, config.abstract_frames)
    return (abstract * config.abstract_pool**2 + temporal * config.temporal_pool**2
            + (retrieved + spatial) * config.spatial_pool**2)


class SemanticAttention(nn.Module):
    """Semantic Attention, the abstract-memory update (upstream "NeuralTuringMachine").

    Only `q_proj` and `k_proj` take part; `v_proj`, `out_proj` and `out_ln` are never used and
    are kept so that released checkpoints load key for key.
    """

    def __init__(self, input_dim, hidden_dim=32):
        super().__init__()
        self.q_proj = nn.Linear(input_dim, hidden_dim)
        self.k_proj = nn.Linear(input_dim, hidden_dim)
        self.v_proj = nn.Linear(input_dim, hidden_dim)  # unused, kept for checkpoint keys
        self.out_proj = nn.Linear(hidden_dim, input_dim)  # unused, kept for checkpoint keys
        self.out_ln = nn.LayerNorm(input_dim, eps=1e-12)  # unused, kept for checkpoint keys

    @classmethod
    def from_seed(cls, input_dim, hidden_dim, seed):
        """nn.Linear's default init drawn from a generator seeded by `seed`; the global RNG is untouched."""
        with torch.device("meta"):
            module = cls(input_dim, hidden_dim)  # shapes only: nothing drawn yet
        module.to_empty(device="cpu")
        generator = torch.Generator().manual_seed(seed)
        for linear in (module.q_proj, module.k_proj, module.v_proj, module.out_proj):
            nn.init.kaiming_uniform_(linear.weight, a=math.sqrt(5), generator=generator)
            bound = 1 / math.sqrt(linear.in_features)
            nn.init.uniform_(linear.bias, -bound, bound, generator=generator)
        module.out_ln.reset_parameters()
        return module

    def forward(self, memory, tokens, update_ratio, mask=None):
        """M <- (1 - a) M + a softmax(q(M) k(X)^T / sqrt(h), over the new tokens) X.

        memory (..., m, t, D) and tokens (..., n, t, D), t tokens per frame (t=1 released; for t>1
        each patch position attends on its own); leading dims batch several memories. `mask`
        (..., n) marks the real tokens of a padded batch (None: all real); a memory with no real
        token comes out as a finite, meaningless update, for the caller to discard. Returns
        (..., m, t, D) in the memory's dtype. Calls the projections as modules (ZeRO-3 gathers
        their weights) in their own dtype, the rest in fp32.
        """
        dtype = self.q_proj.weight.dtype
        q = self.q_proj(memory.to(dtype)).float()  # (..., m, t, h)
        k = self.k_proj(tokens.to(dtype)).float()  # (..., n, t, h)
        scores = torch.einsum("...mth,...nth->...tmn", q, k) / math.sqrt(q.shape[-1])  # (..., t, m, n)
        if mask is not None:  # a finite floor, not -inf: an all-padding row stays NaN-free (and its grads)
            scores = scores.masked_fill(~mask[..., None, None, :], torch.finfo(scores.dtype).min)
        # softmax over the n new tokens, written out: CPU softmax opens a thread pool even for 25 scores
        weights = (scores - scores.amax(dim=-1, keepdim=True)).exp()  # (..., t, m, n)
        attention = weights / weights.sum(dim=-1, keepdim=True)
        read = torch.einsum("...tmn,...ntd->...mtd", attention, tokens.float())  # (..., m, t, D)
        return ((1 - update_ratio) * memory.float() + update_ratio * read).to(memory.dtype)


class _Points(NamedTuple):
    """Temporal-memory points: centroids (or new frames) with what they stand for; (B, k) leading dims batch streams."""

    x: torch.Tensor  # (..., k, P_tem*P_tem*D) fp32, the 4x4 grid flattened
    w: torch.Tensor  # (..., k) fp32, frames each stands for
    t: torch.Tensor  # (..., k) fp64, weighted mean timestamp
    first: torch.Tensor  # (..., k) fp64, earliest member timestamp
    last: torch.Tensor  # (..., k) fp64, latest member timestamp

    def take(self, index):
        return _Points(*(v.index_select(0, index) for v in self))

    def batched(self):
        """These points as a batch of one stream: (k, ...) -> (1, k, ...)."""
        return _Points(*(v[None] for v in self))

    def stream(self, b=0):
        """Stream b of a batch: (B, k, ...) -> (k, ...)."""
        return _Points(*(v[b] for v in self))

    def cat(self, other):
        return _Points(*(torch.cat(pair) for pair in zip(self, other)))

    def gather(self, index):
        """Per stream, the points at `index` (B, m) -> (B, m, ...)."""
        return _Points(*(v.gather(1, index[..., None].expand(-1, -1, v.shape[-1]) if v.dim() == 3 else index)
                         for v in self))


TEMPORAL = ("tx", "tw", "tt", "tfirst", "tlast")  # MemoryStack's temporal tensors, the fields of _Points in order


# --- batched primitives: leading dim B = streams. The one-frame update of every stream (MemoryStack.update)
# runs on them, and a lone memory runs the same calls with B = 1, so that a stream's result never depends on
# how many streams share the call. Decisions (argmins) come from fp32 products whose reduction order does not
# depend on B (see _gram); values (centroids, frames) come from element-wise arithmetic and gathers.
GRAM_CHUNK = 256  # features per partial product in _gram


def _gram(a, b):
    """Dot products (B, n, F) x (B, m, F) -> (B, n, m) fp32, as a sum of products over chunks of GRAM_CHUNK
    features: each chunk is a small matrix product, so a BLAS never splits the long reduction across threads
    (which it does for B = 1 and not for B > 1, and the sums would then round differently)."""
    batch, n, features = a.shape
    chunk = math.gcd(features, GRAM_CHUNK)
    parts = features // chunk
    if parts == 1:
        return torch.bmm(a, b.transpose(1, 2))
    a = a.view(batch, n, parts, chunk).transpose(1, 2).reshape(batch * parts, n, chunk)
    b = b.view(batch, b.shape[1], parts, chunk).transpose(1, 2).reshape(batch * parts, -1, chunk)
    return torch.bmm(a, b.transpose(1, 2)).view(batch, parts, n, -1).sum(dim=1)  # (B, n, m)


def _sqdist_many(a, b, centre):
    """Squared L2 distances (B, n, F) x (B, m, F) -> (B, n, m) fp32, both centred on `centre` (B, F) first
    (a point near the data: less cancellation in |a|^2 + |b|^2 - 2ab)."""
    a, b = a - centre[:, None], b - centre[:, None]
    d2 = a.pow(2).sum(-1)[..., None] + b.pow(2).sum(-1)[:, None, :] - 2 * _gram(a, b)  # (B, n, m)
    return d2.clamp_min_(0)


def _reduce_many(points, assign, k):
    """Clusters from an assignment (B, n) -> (B, k): centroid sum(w x)/sum(w), weight sum(w), time sum(w t)/sum(w)."""
    member = assign[:, None, :] == torch.arange(k, device=assign.device)[None, :, None]  # (B, k, n)
    wm = member * points.w[:, None, :]  # (B, k, n)
    w = wm.sum(-1)  # (B, k)
    x = torch.bmm(wm, points.x) / w[..., None]  # (B, k, F)
    t = torch.bmm(wm.double(), points.t[..., None]).squeeze(-1) / w.double()  # (B, k)
    first = torch.where(member, points.first[:, None, :], INF).amin(-1)  # (B, k)
    last = torch.where(member, points.last[:, None, :], -INF).amax(-1)  # (B, k)
    return _Points(x, w, t, first, last)


def _nearest_many(x, w, centroids):
    """Each point's nearest centroid (B, n); an empty cluster is re-seeded with the worst-fitting movable point.

    The re-seeding rule, sequential in its definition (for each empty cluster in index order, move the point of
    largest w * d2 among those whose cluster still has more than one point), in closed form without a host
    sync: a cluster of c points gives away its c - 1 worst-fitting ones at most, and the empty clusters take the
    worst of those candidates over all clusters in order (ties: the lower point index first, as argmax).
    """
    batch, n, _ = x.shape
    k = centroids.shape[1]
    d2 = _sqdist_many(x, centroids, centroids.mean(dim=1))  # (B, n, k)
    assign = d2.argmin(dim=-1)  # (B, n)
    counts = torch.nn.functional.one_hot(assign, k).sum(dim=1)  # (B, k)
    cost = w * d2.gather(-1, assign[..., None]).squeeze(-1)  # (B, n) each point's share of the objective
    order = torch.sort(cost, dim=1, descending=True, stable=True).indices  # (B, n) worst first
    ranked = assign.gather(1, order)  # (B, n) their clusters
    onehot = torch.nn.functional.one_hot(ranked, k)  # (B, n, k)
    rank = (onehot.cumsum(dim=1) * onehot).sum(-1) - 1  # (B, n) place among its cluster's points, worst first
    movable = rank < counts.gather(1, ranked) - 1  # (B, n)
    candidate = movable.cumsum(dim=1) - 1  # (B, n) index among the movable points
    empty = counts == 0  # (B, k)
    empties = torch.sort((~empty).to(torch.uint8), dim=1, stable=True).indices  # (B, k) empty clusters first, in order
    take = movable & (candidate < empty.sum(dim=1, keepdim=True))  # (B, n)
    target = empties.gather(1, candidate.clamp(0, k - 1))  # (B, n)
    return assign.scatter(1, order, torch.where(take, target, ranked))  # (B, n)


def _merge_closest_pair_many(points, count):
    """Weighted k-means of the first count_b points of each stream (B, P) into count_b - 1 clusters, exactly.

    The optimum keeps the other points and merges the pair of least w_i w_j / (w_i + w_j) |x_i - x_j|^2: the
    merge goes to row i, and row j (B,) is the one to drop (i < j). Streams with fewer than 2 points: garbage
    indices, for the caller to ignore. Device-side indices only: no host sync on the per-frame path.
    """
    batch, n = points.w.shape
    w = points.w
    index = torch.arange(n, device=w.device)
    real = index < count[:, None]  # (B, P)
    pairs = real[:, :, None] & real[:, None, :] & (index[:, None] < index[None, :])  # (B, P, P) pairs i < j
    centre = points.x.gather(1, (count - 1).clamp_min(0)[:, None, None].expand(-1, 1, points.x.shape[-1]))[:, 0]
    weight = w[:, :, None] * w[:, None, :] / (w[:, :, None] + w[:, None, :])  # (B, P, P)
    cost = (weight * _sqdist_many(points.x, points.x, centre)).masked_fill(~pairs, INF)  # (B, P, P)
    flat = cost.flatten(1).argmin(dim=1)  # (B,)
    i, j = flat // n, flat % n  # (B,), (B,) with i < j
    p_i, p_j = points.gather(i[:, None]), points.gather(j[:, None])  # (B, 1, ...)
    w_ij = p_i.w + p_j.w  # (B, 1)
    merged = _Points(
        x=(p_i.w[..., None] * p_i.x + p_j.w[..., None] * p_j.x) / w_ij[..., None],
        w=w_ij,
        t=(p_i.w.double() * p_i.t + p_j.w.double() * p_j.t) / w_ij.double(),
        first=torch.minimum(p_i.first, p_j.first),
        last=torch.maximum(p_i.last, p_j.last),
    )
    at_i = index[None, :] == i[:, None]  # (B, P)
    out = _Points(*(torch.where(at_i[..., None] if v.dim() == 3 else at_i, m, v) for v, m in zip(points, merged)))
    return out, j


def _upstream_kmeans_many(points, k, generators):
    """The published k-means of each stream's n points -> assignment (B, n): unit weights, a random-permutation
    start drawn from each stream's own generator, cluster ids in initialisation order, stop when the centroids
    move less than 1e-4 in total (a stream that stopped keeps its assignment while the others iterate)."""
    x = points.x
    batch, n, _ = x.shape
    ones = torch.ones_like(points.w)
    start = torch.stack([torch.randperm(n, generator=g, device=x.device)[:k] for g in generators])  # (B, k)
    centroids = x.gather(1, start[..., None].expand(-1, -1, x.shape[-1]))  # (B, k, F)
    assign = torch.zeros(batch, n, dtype=torch.long, device=x.device)
    moving = torch.ones(batch, dtype=torch.bool, device=x.device)
    for _ in range(MAX_LLOYD_ITERATIONS):  # a stream that stopped keeps its rows while the others iterate
        if x.device.type == "cpu" and not bool(moving.any()):  # all stopped (on CPU reading a flag is free; on
            break  # CUDA it would be a host sync, and the remaining iterations change nothing)
        update_assign = _nearest_many(x, ones, centroids)  # upstream re-seeded an empty cluster with a random point
        update = _reduce_many(points._replace(w=ones), update_assign, k).x  # (B, k, F)
        moved = (update - centroids).norm(dim=-1).sum(-1)  # (B,)
        assign = torch.where(moving[:, None], update_assign, assign)
        centroids = torch.where(moving[:, None, None], update, centroids)
        moving = moving & ~(moved < UPSTREAM_TOLERANCE)
    return assign


# --- one stream, B = 1 of the above (the chunk path: training, offline eval) -----------------------------
def _sqdist(a, b):
    """Squared L2 distances (n, F) x (m, F) -> (n, m) in fp32 (centred on b)."""
    return _sqdist_many(a[None], b[None], b.mean(dim=0)[None])[0]


def _reduce(points, assign, k):
    return _reduce_many(points.batched(), assign[None], k).stream()


def _nearest(x, w, centroids):
    return _nearest_many(x[None], w[None], centroids[None])[0]


def _weighted_kmeans(points, k, generator):
    """Weighted Lloyd (at most 10 iterations) from a seeded weighted k-means++ start -> assignment (n,)."""
    x, w = points.x, points.w
    n = w.shape[0]
    chosen = torch.zeros(n, dtype=torch.bool, device=w.device)
    seed = torch.multinomial(w, 1, generator=generator)  # (1,) first seed drawn by weight
    seeds, d2 = [seed], _sqdist(x, x.index_select(0, seed)).squeeze(1)  # (n,)
    for _ in range(k - 1):
        chosen = chosen.index_fill(0, seed, True)
        prob = torch.where(chosen, 0.0, w * d2)  # next seed drawn by weight x squared distance
        prob = torch.where(prob.sum() > 0, prob, w * ~chosen)  # only duplicates left: any unchosen point
        seed = torch.multinomial(prob, 1, generator=generator)
        seeds.append(seed)
        d2 = torch.minimum(d2, _sqdist(x, x.index_select(0, seed)).squeeze(1))
    assign = _nearest(x, w, x.index_select(0, torch.cat(seeds)))
    for _ in range(MAX_LLOYD_ITERATIONS):
        update = _nearest(x, w, _reduce(points, assign, k).x)
        if torch.equal(update, assign):  # host sync: the chunk path only
            break
        assign = update
    return assign


class MemoryStack:
    """The stacked state of many streams' STAR memories, one row per stream, of one config, device and dtype.

    A `STARMemory` keeps its state in a row of a stack: its own stack of one row when it is alone, or a stack
    shared with other streams (`STARMemory.join`), whose `update` then takes one new frame of every
    stream at once. Every size is fixed (streams at different fill levels are masked), so an update is a fixed
    set of batched kernels with no host sync: the counts of each memory are known on the host (they depend on
    the number of frames only). Rows grow by doubling; a row is freed when its memory is collected or moves.

    Per row (R = N_ret, K = N_tem, S = N_spa):
      buffer (N_buff, P_spa^2, D), keys (N_buff, P_tem^2*D) fp32, key_sq (N_buff,), buffer_times (N_buff,)
      spatial (S, P_spa^2, D), spatial_times (S,)       right-aligned: the newest frame last
      temporal x (K+1, P_tem^2*D), w, t, first, last    left-aligned, row K a spare for the new point
      abstract (N_abs, P_abs^2, D) fp32                 left-aligned
      retrieved (R,) long                               buffer slots (upstream: indices into head)
      head (K, P_spa^2, D), head_times (K,)             upstream only: the stream's first frames
    """

    def __init__(self, config, device, dtype, attention_model, capacity=1):
        self.config_key = _config_key(config)
        self.dim = config.mm_hidden_size
        self.spatial_frames, self.spatial_pool = config.spatial_frames, config.spatial_pool
        self.temporal_frames, self.temporal_pool = config.temporal_frames, config.temporal_pool
        self.abstract_frames, self.abstract_pool = config.abstract_frames, config.abstract_pool
        self.abstract_update_ratio = config.abstract_update_ratio
        self.retrieved_frames, self.buffer_frames = config.retrieved_frames, config.buffer_frames
        self.upstream = config.memory_mode == "upstream"
        self.device, self.dtype = torch.device(device), dtype
        self.attention_model = attention_model
        self.capacity = 0
        self._free = []
        self._grow(max(1, capacity))

    def _shapes(self):
        dim, spa, abs_ = self.dim, self.spatial_pool**2, self.abstract_pool**2
        tem = self.temporal_pool**2 * dim
        k, head = self.temporal_frames, self.temporal_frames if self.upstream else 0
        f32, f64, stored = torch.float32, torch.float64, self.dtype
        return {
            "buffer": ((self.buffer_frames, spa, dim), stored), "keys": ((self.buffer_frames, tem), f32),
            "key_sq": ((self.buffer_frames,), f32), "buffer_times": ((self.buffer_frames,), f64),
            "spatial": ((self.spatial_frames, spa, dim), stored), "spatial_times": ((self.spatial_frames,), f64),
            "tx": ((k + 1, tem), f32), "tw": ((k + 1,), f32), "tt": ((k + 1,), f64),
            "tfirst": ((k + 1,), f64), "tlast": ((k + 1,), f64),
            "abstract": ((self.abstract_frames, abs_, dim), f32),
            "retrieved": ((self.retrieved_frames,), torch.long),
            "head": ((head, spa, dim), stored), "head_times": ((head,), f64),
        }

    def _grow(self, capacity):
        old = self.capacity
        for name, (shape, dtype) in self._shapes().items():
            new = torch.zeros(capacity, *shape, dtype=dtype, device=self.device)
            if old:
                new[:old] = getattr(self, name)
            setattr(self, name, new)
        self._free.extend(range(capacity - 1, old - 1, -1))  # pop() hands out the lowest row first
        self.capacity = capacity

    def _take_row(self):
        if not self._free:
            self._grow(2 * self.capacity)
        row = self._free.pop()
        for name in self._shapes():
            getattr(self, name)[row].zero_()
        return row

    def _release_row(self, row):
        self._free.append(row)  # may run on any thread (a memory's finalizer): a list append

    @property
    def rows_used(self):
        return self.capacity - len(self._free)

    @property
    def row_nbytes(self):
        """Bytes of one stream's row (what a memory in this stack holds, whatever its fill level)."""
        return sum(getattr(self, name)[0].nbytes for name in self._shapes())

    # --- the one-frame update of many streams ----------------------------------------------------
    def update(self, memories, features, timestamps):
        """One new frame for each of `memories` (distinct, all in this stack): features (B, 256, D) in their
        order, timestamps B seconds. Buffer, spatial, temporal (merge of the closest pair, or upstream k-means),
        abstract (Semantic Attention) and retrieval of all B at once; not differentiated."""
        batch = len(memories)
        if features.shape[0] != batch or len(timestamps) != batch:
            raise ValueError(f"{batch} memories, {features.shape[0]} frames and {len(timestamps)} timestamps")
        if any(m._stack is not self for m in memories):
            raise ValueError("every memory of a stack update must be in that stack (STARMemory.join)")
        if len({id(m) for m in memories}) != batch:
            raise ValueError(f"{batch} memories, not distinct: a stack update takes one frame of each")
        for m in memories:
            m._dtype = features.dtype
        with torch.no_grad():
            self._update(memories, features.detach(), [float(t) for t in timestamps])

    def _update(self, memories, features, timestamps):
        device, k, upstream = self.device, self.temporal_frames, self.upstream
        rows = [m._row for m in memories]
        # host-side plan: what each stream's frame does (the counts depend on the number of frames only)
        fed = [not (upstream and m._frames_seen == 0) for m in memories]  # upstream: the first frame is spatial only
        plan = {
            "rows": rows,
            "slot": [m._buffer_next for m in memories],
            "tc": [m._temporal_count for m in memories],
            "fed_at": [i for i, f in enumerate(fed) if f],
            "abs_fill": [i for i, (m, f) in enumerate(zip(memories, fed)) if f and m._abstract_count < self.abstract_frames],
            "abs_full": [i for i, (m, f) in enumerate(zip(memories, fed)) if f and m._abstract_count >= self.abstract_frames],
            "head_at": [i for i, m in enumerate(memories) if upstream and m._frames_seen < k],
        }
        plan["abs_slot"] = [memories[i]._abstract_count for i in plan["abs_fill"]]
        plan["head_pos"] = [memories[i]._head_count for i in plan["head_at"]]
        index = _to_device(plan, device)  # one host-to-device copy
        row_t, slot_t = index["rows"], index["slot"]
        features = features.to(device)
        times = _upload(timestamps, device, torch.float64)  # (B,)
        keys = pool(features, self.temporal_pool).flatten(1)  # (B, P_tem^2*D)
        frames = pool(features, self.spatial_pool).to(self.dtype)  # (B, P_spa^2, D)
        # ring buffer and spatial memory (every frame)
        _put(self.buffer, row_t, slot_t, frames)
        _put(self.keys, row_t, slot_t, keys)
        _put(self.key_sq, row_t, slot_t, keys.pow(2).sum(-1))
        _put(self.buffer_times, row_t, slot_t, times)
        if self.spatial_frames > 1:  # shift left by one, the new frame last
            self.spatial.index_copy_(0, row_t, torch.cat([_rows(self.spatial, row_t)[:, 1:], frames[:, None]], 1))
            self.spatial_times.index_copy_(0, row_t, torch.cat([_rows(self.spatial_times, row_t)[:, 1:],
                                                                times[:, None]], 1))
        else:
            self.spatial.index_copy_(0, row_t, frames[:, None])
            self.spatial_times.index_copy_(0, row_t, times[:, None])
        if plan["head_at"]:
            at = index["head_at"]
            head_rows = row_t.index_select(0, at)
            _put(self.head, head_rows, index["head_pos"], frames.index_select(0, at))
            _put(self.head_times, head_rows, index["head_pos"], times.index_select(0, at))
        if plan["fed_at"]:
            self._update_temporal(memories, plan, index, keys, times)
            self._update_abstract(plan, index, features)
        # host counts, then retrieval over the new state
        for i, m in enumerate(memories):
            if upstream and m._frames_seen < k:
                m._head_count += 1
            m._frames_seen += 1
            m._buffer_next = (m._buffer_next + 1) % self.buffer_frames
            m._buffer_count = min(m._buffer_count + 1, self.buffer_frames)
            m._spatial_count = min(m._spatial_count + 1, self.spatial_frames)
            if fed[i]:
                m._temporal_count = min(m._temporal_count + 1, k)
                m._abstract_count = min(m._abstract_count + 1, self.abstract_frames)
                m._abstract_live = None
        self.retrieve(memories, row_t)

    def _update_temporal(self, memories, plan, index, keys, times):
        fed_at = index["fed_at"]
        rows = index["rows"].index_select(0, fed_at)  # (b,) stack rows of the fed streams
        count = index["tc"].index_select(0, fed_at)  # (b,) centroids before this frame
        new_t = times.index_select(0, fed_at)
        # the new point goes into row `count` (the spare row K when the memory is full)
        _put(self.tx, rows, count, keys.index_select(0, fed_at))
        _put(self.tw, rows, count, torch.ones_like(new_t, dtype=torch.float32))
        for name in ("tt", "tfirst", "tlast"):
            _put(getattr(self, name), rows, count, new_t)
        points = self._temporal(rows)  # (b, K+1, ...)
        k, n = self.temporal_frames, count + 1  # n: points per stream
        position = torch.arange(k + 1, device=self.device)
        full = [plan["tc"][i] >= k for i in plan["fed_at"]]
        if self.upstream:
            # upstream: every point weighs 1 and the centroids stay in initialisation order (no time sort)
            if any(full):
                at = _upload([j for j, f in enumerate(full) if f], self.device)
                generators = [memories[plan["fed_at"][j]]._generator for j, f in enumerate(full) if f]
                sub = _Points(*(v.index_select(0, at) for v in points))
                unweighted = sub._replace(w=torch.ones_like(sub.w))
                clusters = _reduce_many(unweighted, _upstream_kmeans_many(sub, k, generators), k)  # (u, K)
                pad = _Points(*(torch.cat([c, v[:, k:]], dim=1) for c, v in zip(clusters, sub)))  # (u, K+1)
                self._set_temporal(rows.index_select(0, at), pad)
            return
        merged, drop = _merge_closest_pair_many(points, n)
        merging = _upload(full, self.device, torch.bool)  # (b,) k+1 points: merge the closest pair
        points = _Points(*(torch.where(merging.view(-1, *[1] * (v.dim() - 1)), m, v) for m, v in zip(merged, points)))
        kept = (position[None] < n[:, None]) & ~(merging[:, None] & (position[None] == drop[:, None]))  # (b, K+1)
        order = torch.sort(torch.where(kept, points.t, INF), dim=1, stable=True).indices  # time order, dropped last
        self._set_temporal(rows, points.gather(order))

    def _temporal(self, rows):
        """The temporal points of stack rows `rows` (b,) -> _Points (b, K+1, ...)."""
        return _Points(*(_rows(getattr(self, name), rows) for name in TEMPORAL))

    def _set_temporal(self, rows, points):
        """Write _Points (b, K+1, ...) into stack rows `rows` (b,)."""
        for name, v in zip(TEMPORAL, points):
            getattr(self, name).index_copy_(0, rows, v)

    def _update_abstract(self, plan, index, features):
        tokens = pool(features, self.abstract_pool)  # (B, P_abs^2, D)
        if plan["abs_fill"]:  # free slots: the new token goes into the next one
            at = index["abs_fill"]
            _put(self.abstract, index["rows"].index_select(0, at), index["abs_slot"], tokens.index_select(0, at))
        if plan["abs_full"]:
            at = index["abs_full"]
            rows = index["rows"].index_select(0, at)
            memory = _rows(self.abstract, rows)  # (b, N_abs, P_abs^2, D)
            updated = self.attention_model(memory, tokens.index_select(0, at)[:, None], self.abstract_update_ratio)
            self.abstract.index_copy_(0, rows, updated)

    def retrieve(self, memories, row_t=None):
        """Refill the retrieved memory of `memories` from their temporal memory and buffer (after an update)."""
        rows = [m._row for m in memories]
        if row_t is None:
            row_t = _upload(rows, self.device)
        k, r_max = self.temporal_frames, self.retrieved_frames
        counts = [(m._temporal_count, m._spatial_count, m._buffer_count, m._buffer_next) for m in memories]
        tc, sc, bc, nxt = _upload(counts, self.device).unbind(1)  # (B,) each
        valid = torch.arange(k + 1, device=self.device)[None] < tc[:, None]  # (B, K+1)
        w = torch.where(valid, _rows(self.tw, row_t), -INF)
        by_weight = torch.sort(w, dim=1, descending=True, stable=True).indices[:, :r_max]  # (B, R) largest first
        if by_weight.shape[1] < r_max:  # N_tem + 1 < N_ret: the slots past the clusters are never used
            by_weight = torch.cat([by_weight, by_weight.new_zeros(len(rows), r_max - by_weight.shape[1])], dim=1)
        if self.upstream:  # the unused slots' ids must stay inside the head's N_tem rows too (reads gather them all)
            by_weight = by_weight.clamp_max(k - 1)
        for m in memories:
            m._retrieved_count = (min(r_max, m._temporal_count) if self.upstream else
                                  max(0, min(r_max, m._temporal_count, m._buffer_count - m._spatial_count)))
        if r_max == 0:
            return
        if self.upstream:
            # upstream: the ids of the largest clusters index the input frames (= the stream's first N_tem
            # frames) instead of the buffer frames nearest the centroids; emitted by weight
            self.retrieved.index_copy_(0, row_t, by_weight)
            return
        wanted = _upload([m._retrieved_count for m in memories], self.device)  # (B,)
        centroids = _pick(self.tx, row_t, by_weight)  # (B, R, F)
        if 2 * len(rows) >= self.capacity:
            # most rows: the products against the whole stack's keys in place (the keys are most of the state; a
            # copy of them would cost more than the products of the rows not in the batch), the batch's rows kept
            spread = centroids.new_zeros(self.capacity, *centroids.shape[1:]).index_copy_(0, row_t, centroids)
            dots = _rows(torch.bmm(spread, self.keys.transpose(1, 2)), row_t)  # (B, R, N_buff)
        else:
            dots = torch.bmm(centroids, _rows(self.keys, row_t).transpose(1, 2))  # (B, R, N_buff)
        # |c - key|^2 up to |c|^2, which is the same for every key of a centroid
        score = _rows(self.key_sq, row_t)[:, None, :] - 2 * dots  # (B, R, N_buff)
        slot = torch.arange(self.buffer_frames, device=self.device)
        age = (nxt[:, None] - 1 - slot[None]) % self.buffer_frames  # (B, N_buff) 0 = newest frame
        banned = (age < sc[:, None]) | (age >= bc[:, None])  # spatial memory or empty slot
        picks = []
        for j in range(r_max):
            pick = score[:, j].masked_fill(banned, INF).argmin(dim=1)  # (B,) nearest frame to this centroid
            real = j < wanted  # (B,)
            banned = banned | (real[:, None] & (slot[None] == pick[:, None]))  # no frame twice
            picks.append(pick)
        picks = torch.stack(picks, dim=1)  # (B, R)
        real = torch.arange(r_max, device=self.device)[None] < wanted[:, None]
        pick_times = torch.where(real, _pick(self.buffer_times, row_t, picks), INF)
        picks = picks.gather(1, torch.sort(pick_times, dim=1, stable=True).indices)  # time order, unused last
        self.retrieved.index_copy_(0, row_t, picks)

    # --- read many --------------------------------------------------------------------------------
    def read(self, memories):
        """Memory tokens of each of `memories`: a list of (N_i, D), fresh tensors in each memory's fed dtype."""
        if not memories:
            return []
        row_t = _upload([m._row for m in memories], self.device)
        source = self.head if self.upstream else self.buffer
        retrieved = _pick(source, row_t, _rows(self.retrieved, row_t))  # (B, R, P_spa^2, D)
        parts = (_rows(self.abstract, row_t).flatten(1, 2),  # (B, N_abs*P_abs^2, D)
                 _rows(self.tx, row_t)[:, :self.temporal_frames].reshape(len(memories), -1, self.dim),  # (B, 400, D)
                 retrieved.flatten(1, 2), _rows(self.spatial, row_t).flatten(1, 2))  # (B, 192, D), (B, 64, D)
        dtype = memories[0]._dtype
        if all(m._dtype == dtype for m in memories):
            everything = torch.cat([p.to(dtype) for p in parts], dim=1)  # (B, 681, D) every slot, used or not
        else:
            everything = None
        out = []
        for b, m in enumerate(memories):
            used = m._token_index()
            if everything is not None and m._abstract_live is None:
                tokens = everything[b] if used is None else everything[b].index_select(0, used.to(self.device))
            else:
                tokens = m._read_row()
            out.append(tokens)
        return out

    def describe(self, memories):
        """timestamps(), temporal_weights() and temporal_spans() of each of `memories`, with one device-to-host
        copy: a list of (timestamps dict, weights list, spans list)."""
        if not memories:
            return []
        row_t = _upload([m._row for m in memories], self.device)
        source_times = self.head_times if self.upstream else self.buffer_times
        retrieved_times = _pick(source_times, row_t, _rows(self.retrieved, row_t))  # (B, R)
        packed = torch.cat([_rows(self.tt, row_t), _rows(self.tfirst, row_t), _rows(self.tlast, row_t),
                            _rows(self.tw, row_t).double(), retrieved_times, _rows(self.spatial_times, row_t)],
                           dim=1).cpu()  # one sync
        k1, end = self.temporal_frames + 1, packed.shape[1]
        out = []
        for row, m in zip(packed.tolist(), memories):  # Python lists: slicing them is cheap, tensors' is not
            tc, rc, sc = m._temporal_count, m._retrieved_count, m._spatial_count
            t, first, last, w = (row[i * k1:i * k1 + tc] for i in range(4))
            times = {"temporal": t, "retrieved": row[4 * k1:4 * k1 + rc], "spatial": row[end - sc:end]}
            out.append((times, [int(x) for x in w], list(zip(first, last))))
        return out


def _rows(t, rows):
    """t[rows] (index_select: a plain copy of whole rows)."""
    return t.index_select(0, rows)


def _pick(t, rows, index):
    """t[rows[b], index[b, j]] -> (B, m, ...) for index (B, m), one flat index_select."""
    flat = (rows[:, None] * t.shape[1] + index).flatten()
    return t.flatten(0, 1).index_select(0, flat).view(*index.shape, *t.shape[2:])


def _put(t, rows, positions, values):
    """t[rows[b], positions[b]] = values[b] (distinct pairs), one flat index_copy_ into t (C, P, ...)."""
    t.view(-1, *t.shape[2:]).index_copy_(0, rows * t.shape[1] + positions, values)


def _config_key(config):
    """What two memories must share to live in one stack."""
    names = ("mm_hidden_size", "spatial_frames", "spatial_pool", "temporal_frames", "temporal_pool",
             "abstract_frames", "abstract_pool", "abstract_update_ratio", "retrieved_frames", "buffer_frames",
             "memory_mode")
    return tuple(getattr(config, name) for name in names)


def _upload(values, device, dtype=torch.long):
    """A host list -> a tensor on `device` without waiting for the device: through pinned memory on CUDA (a copy
    from pageable memory would wait for the stream)."""
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def _to_device(plan, device):
    """{name: list of ints} -> {name: (len,) long tensors on `device`}, in one host-to-device copy."""
    names = list(plan)
    flat = _upload([v for name in names for v in plan[name]], device)
    out, start = {}, 0
    for name in names:
        out[name] = flat[start:start + len(plan[name])]
        start += len(plan[name])
    return out


class STARMemory:
    """The STAR memory of one stream: `update` with chunks of frames, `read` the memory tokens.

    Readout order (as released): abstract, temporal, retrieved, spatial; flattened frame-major,
    then patch row-major. The state lives in a row of a `MemoryStack` (its own, or one shared with other
    streams: `join`); the counts of each part are kept here, on the host. A one-frame update (streaming) is
    the stack's batched update of this one row, so a stream alone and a stream in a stack of many compute the
    same thing; a chunk of several frames (training, offline eval) takes the chunk path below. The abstract
    update of the latest chunk stays differentiable w.r.t. `attention_model` (training backprops through
    q_proj/k_proj); everything else is computed from detached features, no autograd graph outlives one
    update, and one-frame updates are not differentiated.
    """

    def __init__(self, config, attention_model=None, seed=0):
        self.config = config
        self._config_key = _config_key(config)
        self.dim = config.mm_hidden_size  # D
        self.spatial_frames, self.spatial_pool = config.spatial_frames, config.spatial_pool  # N_spa, P_spa
        self.temporal_frames, self.temporal_pool = config.temporal_frames, config.temporal_pool  # N_tem, P_tem
        self.abstract_frames, self.abstract_pool = config.abstract_frames, config.abstract_pool  # N_abs, P_abs
        self.abstract_update_ratio = config.abstract_update_ratio  # alpha
        self.retrieved_frames = config.retrieved_frames  # N_ret
        self.buffer_frames = config.buffer_frames  # N_buff
        self.video_fps = config.video_fps
        self.upstream = config.memory_mode == "upstream"
        self.seed = seed
        self._owns_attention = attention_model is None
        if attention_model is None:
            attention_model = SemanticAttention.from_seed(self.dim, config.abstract_hidden_dim, seed)
        self.attention_model = attention_model
        self._dtype = torch.float32
        self._stack = self._row = self._release = self._generator = None  # a stack row from the first update
        # host-side counts: every one follows from the number of frames fed
        self._frames_seen = self._buffer_next = self._buffer_count = self._spatial_count = 0
        self._temporal_count = self._abstract_count = self._retrieved_count = self._head_count = 0
        self._abstract_live = None  # the latest chunk's abstract memory while it is differentiable

    # --- state --------------------------------------------------------------------------------
    def _allocate(self, features):
        self.join(MemoryStack(self.config, features.device, features.dtype, self.attention_model))

    def join(self, stack):
        """Keep this memory's state in a row of `stack` (moved there from the row it had, if any); memories that
        share a stack can be updated together (`MemoryStack.update`)."""
        if stack is self._stack:
            return self
        if stack.config_key != self._config_key or stack.attention_model is not self.attention_model:
            raise ValueError("a memory joins only a stack of its config and its Semantic Attention module")
        if self._stack is not None and (stack.device, stack.dtype) != (self._stack.device, self._stack.dtype):
            raise ValueError(f"a memory on {self._stack.device} {self._stack.dtype} cannot join a stack on "
                             f"{stack.device} {stack.dtype}")
        if self._generator is None:
            if self._owns_attention:
                self.attention_model.to(stack.device)  # our own module follows the stream once; a model's stays put
            self._generator = torch.Generator(device=stack.device).manual_seed(self.seed)
        row = stack._take_row()
        if self._stack is not None:
            for name in stack._shapes():
                getattr(stack, name)[row] = getattr(self._stack, name)[self._row]
            self._release.detach()
            self._stack._release_row(self._row)
        self._stack, self._row = stack, row
        self._release = weakref.finalize(self, stack._release_row, row)  # the row is free again with the memory
        return self

    @property
    def stack(self):
        return self._stack

    @property
    def _buffer(self):
        return self._stack.buffer[self._row]  # (N_buff, P_spa^2, D) ring buffer, slot order

    @property
    def _buffer_times(self):
        return self._stack.buffer_times[self._row]  # (N_buff,)

    # --- update -------------------------------------------------------------------------------
    def update(self, features, timestamps=None):
        """Add a chunk of frames (n, 256, D) in time order; `timestamps`: n seconds (default frame / fps)."""
        n = self._check(features)
        if n == 0:
            return self
        if self._stack is None:
            self._allocate(features)
        if n == 1:  # a stream's frame: the batched one-frame update, with a batch of one
            times = [self._frames_seen / self.video_fps] if timestamps is None else self._times(1, timestamps).tolist()
            self._stack.update([self], features, times)
            return self
        tokens = self._ingest(features, timestamps)
        if tokens is not None:
            self._update_abstract(tokens)
        return self

    def _check(self, features):
        n, tokens, dim = features.shape
        if tokens != PATCH_GRID**2 or dim != self.dim:
            raise ValueError(f"features must be (n, {PATCH_GRID**2}, {self.dim}), got {tuple(features.shape)}")
        return n

    def _times(self, n, timestamps, device=None):
        """n frames' seconds (n,) fp64: `timestamps` checked against n, or frame counter / fps."""
        if timestamps is None:
            return (self._frames_seen + torch.arange(n, dtype=torch.float64, device=device)) / self.video_fps
        times = torch.as_tensor(timestamps, dtype=torch.float64, device=device).reshape(-1)  # (n,)
        if times.shape[0] != n:
            raise ValueError(f"{n} frames but {times.shape[0]} timestamps")
        return times

    def _ingest(self, features, timestamps):
        """The chunk path's part of `update` that does not depend on trained weights (buffer, spatial, temporal,
        retrieved); returns the chunk's pooled abstract inputs (fed, P_abs^2, D) fp32, or None."""
        n = self._check(features)
        if n == 0:
            return None
        if self._stack is None:
            self._allocate(features)
        stack, row, device = self._stack, self._row, features.device
        times = self._times(n, timestamps, device)
        features = features.detach()
        self._dtype = features.dtype

        keys = pool(features, self.temporal_pool).flatten(1)  # (n, P_tem^2*D)
        recent = pool(features[-self.buffer_frames:], self.spatial_pool).to(stack.dtype)  # (<=N_buff, P_spa^2, D)
        self._write_buffer(n, recent, keys[-self.buffer_frames:], times[-self.buffer_frames:])
        newest = -self.spatial_frames  # right-aligned: the newest frame last
        stack.spatial[row] = torch.cat([stack.spatial[row], recent[newest:]])[newest:]  # (N_spa, P_spa^2, D)
        stack.spatial_times[row] = torch.cat([stack.spatial_times[row], times[-self.buffer_frames:][newest:]])[newest:]
        self._spatial_count = min(self._spatial_count + n, self.spatial_frames)
        if self.upstream and self._frames_seen < self.temporal_frames:
            first = features[: self.temporal_frames - self._frames_seen]
            end = self._head_count + first.shape[0]
            stack.head[row, self._head_count:end] = pool(first, self.spatial_pool).to(stack.dtype)  # (<=N_tem, ...)
            stack.head_times[row, self._head_count:end] = times[: first.shape[0]]
            self._head_count = end

        fed = n
        if self.upstream and self._frames_seen == 0:
            fed = n - min(n, self.spatial_frames)  # upstream: offline, the newest frames are spatial memory only
        abstract_inputs = None
        if fed:
            ones = torch.ones(fed, device=device)
            fed_times = times[:fed]
            self._update_temporal(_Points(keys[:fed], ones, fed_times, fed_times, fed_times))
            abstract_inputs = pool(features[:fed], self.abstract_pool)  # (fed, P_abs^2, D)
        self._frames_seen += n
        stack.retrieve([self])  # reads the temporal memory and the buffer, never the abstract memory
        return abstract_inputs

    def _write_buffer(self, n, frames, keys, times):
        """Write the last (<= N_buff) of n new frames into the slots they would reach one at a time."""
        stack, row = self._stack, self._row
        start = self._buffer_next + n - frames.shape[0]
        slots = (start + torch.arange(frames.shape[0], device=frames.device)) % self.buffer_frames  # (<=N_buff,)
        stack.buffer[row].index_copy_(0, slots, frames)
        stack.keys[row].index_copy_(0, slots, keys)
        stack.key_sq[row].index_copy_(0, slots, keys.pow(2).sum(-1))
        stack.buffer_times[row].index_copy_(0, slots, times)
        self._buffer_next = (self._buffer_next + n) % self.buffer_frames
        self._buffer_count = min(self._buffer_count + n, self.buffer_frames)

    def _update_temporal(self, new):
        stack, row, count = self._stack, self._row, self._temporal_count
        points = _Points(*(getattr(stack, name)[row, :count] for name in TEMPORAL)).cat(new)
        n, k = points.w.shape[0], self.temporal_frames
        if self.upstream:
            # upstream: every point weighs 1 (no weights carried over) and the centroids stay in
            # initialisation order instead of time order
            if n > k:
                unweighted = points._replace(w=torch.ones_like(points.w))
                assign = _upstream_kmeans_many(points.batched(), k, [self._generator])[0]
                points = _reduce(unweighted, assign, k)
            clusters = points
        else:
            if n <= k:
                clusters = points
            elif n == k + 1:  # k+1 points: the exact optimum, no Lloyd
                merged, drop = _merge_closest_pair_many(points.batched(), torch.tensor([n], device=points.w.device))
                index = torch.arange(k, device=drop.device)
                clusters = merged.stream().take(index + (index >= drop).long())  # all but j
            else:
                clusters = _reduce(points, _weighted_kmeans(points, k, self._generator), k)
            clusters = clusters.take(torch.sort(clusters.t, stable=True).indices)  # time order
        size = min(n, k)
        for name, v in zip(TEMPORAL, clusters):
            getattr(stack, name)[row, :size] = v
        self._temporal_count = size

    def _update_abstract(self, tokens):
        # gradients flow within one update (a training clip is one chunk); the carried state is
        # detached so that a stream's autograd graph stays bounded too
        stack, row = self._stack, self._row
        current = self._abstract_live if self._abstract_live is not None else stack.abstract[row, :self._abstract_count]
        free = self.abstract_frames - current.shape[0]
        abstract = torch.cat([current.detach(), tokens[:free]])  # (<=N_abs, P_abs^2, D)
        rest = tokens[free:]
        # upstream: the remaining tokens update the memory in chunks of N_abs; paper: as one chunk
        chunk = self.abstract_frames if self.upstream else max(rest.shape[0], 1)
        for start in range(0, rest.shape[0], chunk):
            abstract = self.attention_model(abstract, rest[start:start + chunk], self.abstract_update_ratio)
        stack.abstract[row, :abstract.shape[0]] = abstract.detach()
        self._abstract_count = abstract.shape[0]
        self._abstract_live = abstract if abstract.requires_grad else None

    # --- read ---------------------------------------------------------------------------------
    def read(self):
        """Memory tokens (N, D): abstract, temporal, retrieved, spatial. A fresh tensor in the fed dtype."""
        if self._stack is None:
            return torch.zeros(0, self.dim, dtype=self._dtype)
        return self._read_row()

    def _read_row(self):
        stack, row = self._stack, self._row
        abstract = self._abstract_live
        if abstract is None:
            abstract = stack.abstract[row, :self._abstract_count]
        source = stack.head if self.upstream else stack.buffer
        parts = (
            abstract.flatten(0, 1),  # (N_abs*P_abs^2, D)
            stack.tx[row, :self._temporal_count].reshape(-1, self.dim),  # (N_tem*P_tem^2, D)
            source[row].index_select(0, stack.retrieved[row, :self._retrieved_count]).flatten(0, 1),  # (N_ret*P_spa^2, D)
            stack.spatial[row, self.spatial_frames - self._spatial_count:].flatten(0, 1),  # (N_spa*P_spa^2, D)
        )
        return torch.cat([p.to(self._dtype) for p in parts])  # (N, D)

    def _token_index(self):
        """The used positions of this memory among every slot's tokens (MemoryStack.read), or None for all."""
        a, t, s = self.abstract_pool**2, self.temporal_pool**2, self.spatial_pool**2
        sizes = ((self._abstract_count * a, self.abstract_frames * a), (self._temporal_count * t, self.temporal_frames * t),
                 (self._retrieved_count * s, self.retrieved_frames * s))
        if all(used == size for used, size in sizes) and self._spatial_count == self.spatial_frames:
            return None
        index, start = [], 0
        for used, size in sizes:
            index.extend(range(start, start + used))
            start += size
        end = start + self.spatial_frames * s
        index.extend(range(end - self._spatial_count * s, end))  # spatial: right-aligned
        return torch.tensor(index)

    def describe(self):
        """(timestamps(), temporal_weights(), temporal_spans()) with one device-to-host copy."""
        if self._stack is None:
            return {"temporal": [], "retrieved": [], "spatial": []}, [], []
        return self._stack.describe([self])[0]

    def timestamps(self):
        """Seconds of each temporal centroid (weighted mean), retrieved frame and spatial frame, in readout order."""
        return self.describe()[0]

    def temporal_weights(self):
        """Frames each temporal centroid stands for, in readout order."""
        return self.describe()[1]

    def temporal_spans(self):
        """(first, last) timestamp of the frames each temporal centroid stands for, in readout order."""
        return self.describe()[2]

    @property
    def nbytes(self):
        """Bytes of this memory's state: its row of the stack (0 before the first update)."""
        return 0 if self._stack is None else self._stack.row_nbytes

    @property
    def frames_seen(self):
        return self._frames_seen

    @property
    def buffered_frames(self):
        """Frames held in the ring buffer (at most N_buff)."""
        return self._buffer_count

    @property
    def num_tokens(self):
        return (self._abstract_count * self.abstract_pool**2 + self._temporal_count * self.temporal_pool**2
                + (self._retrieved_count + self._spatial_count) * self.spatial_pool**2)


# --- training: one whole clip, the frozen part apart from the trained one --------------------------
# A training clip is one `update` of an empty memory. Everything in it but the Semantic Attention
# depends only on the frozen CLIP features, so it can be built outside the autograd step (the data
# loader's workers); `abstract_memory` then runs the trained part batched over the samples.
# abstract_memory([frozen_memory(x, config, seed)], attention, config)[0] equals
# STARMemory(config, attention, seed).update(x).read().


def frozen_memory(features, config, seed=0, timestamps=None):
    """The weight-free part of one clip's memory: one update of an empty `STARMemory` without its abstract step.

    features (T, 256, D) -> dict of
      tokens           (N_f, D) temporal, retrieved and spatial tokens in readout order, in the features' dtype
      abstract         (a, P_abs^2, D) fp32, the abstract slots the clip fills before any attention (a <= N_abs)
      abstract_inputs  (r, P_abs^2, D) fp32, the pooled frames that then update those slots by attention
    A dict of tensors (not a tuple) so that the data collator and the Trainer move it like any input.
    """
    memory = STARMemory(config, seed=seed)
    inputs = memory._ingest(features, timestamps)
    if inputs is None:
        inputs = features.new_zeros(0, config.abstract_pool**2, config.mm_hidden_size, dtype=torch.float32)
    return {"tokens": memory.read(),  # the abstract memory is still empty: temporal, retrieved, spatial
            "abstract": inputs[:config.abstract_frames], "abstract_inputs": inputs[config.abstract_frames:]}


def abstract_memory(frozen, attention_model, config):
    """Finish the memories of a batch: the Semantic Attention over all samples at once.

    frozen: list of `frozen_memory` dicts -> list of (N_i, D) memory tokens (abstract, temporal,
    retrieved, spatial), differentiable w.r.t. `attention_model`. Paper mode attends once over all of
    a sample's remaining inputs; upstream mode in chunks of N_abs, one after another (as `update`).
    Samples are padded to a common shape and masked: each chunk step is one batched call.
    """
    chunk = config.abstract_frames
    updated = [i for i, f in enumerate(frozen) if f["abstract_inputs"].shape[0]]  # full slots, more inputs
    abstract = [f["abstract"] for f in frozen]
    if updated:
        rests = [frozen[i]["abstract_inputs"] for i in updated]
        if config.memory_mode != "upstream":
            chunk = max(r.shape[0] for r in rests)  # paper: all remaining inputs as one chunk
        steps = max(-(-r.shape[0] // chunk) for r in rests)  # C chunk steps
        first = rests[0]
        x = first.new_zeros(len(rests), steps * chunk, *first.shape[1:])  # (B', C*L, t, D)
        real = torch.zeros(len(rests), steps * chunk, dtype=torch.bool, device=first.device)  # (B', C*L)
        for row, r in enumerate(rests):
            x[row, :r.shape[0]] = r
            real[row, :r.shape[0]] = True
        x = x.unflatten(1, (steps, chunk))  # (B', C, L, t, D)
        real = real.unflatten(1, (steps, chunk))  # (B', C, L)
        m = torch.stack([abstract[i] for i in updated])  # (B', N_abs, t, D) every such sample has all slots
        for step in range(steps):
            new = attention_model(m, x[:, step], config.abstract_update_ratio, mask=real[:, step])
            m = torch.where(real[:, step].any(dim=1)[:, None, None, None], new, m)  # (B', N_abs, t, D)
        for row, i in enumerate(updated):
            abstract[i] = m[row]
    out = []
    for f, a in zip(frozen, abstract):
        tokens = f["tokens"]
        out.append(torch.cat([a.flatten(0, 1).to(device=tokens.device, dtype=tokens.dtype), tokens]))  # (N_i, D)
    return out
