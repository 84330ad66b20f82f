"""STAR memory: the spatial, temporal, abstract and retrieved memory of one video stream.

A small state machine over tensors (paper §3.2). Training and offline eval feed a
whole clip as one chunk, the realtime engine feeds one frame at a time; both call the same
`STARMemory.update`. The memory lives in CLIP feature space (D = `mm_hidden_size`) on the device
of the features it is fed; distances and cluster arithmetic run in fp32 (matmul-based, so they
are TF32 only if the caller switched TF32 on globally). The state is bounded: a ring buffer of
N_buff frames plus at most N_spa + N_tem + N_abs + N_ret memory frames, whatever the stream length.

`config.memory_mode` picks the behaviour:
  "paper"     Algorithms 1-3 of the paper: bounded buffer, weighted k-means with persistent
              weights, time-ordered centroids, retrieval of the buffer frames nearest the
              largest clusters.
  "upstream"  what the published code did, which the released checkpoint was
              trained with. Every difference carries an `# upstream:` note where it branches.
"""

import math
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
    """Temporal-memory points: centroids (or new frames) with what they stand for."""

    x: torch.Tensor  # (k, P_tem*P_tem*D) fp32, the 4x4 grid flattened
    w: torch.Tensor  # (k,) fp32, frames each stands for
    t: torch.Tensor  # (k,) fp64, weighted mean timestamp
    first: torch.Tensor  # (k,) fp64, earliest member timestamp
    last: torch.Tensor  # (k,) fp64, latest member timestamp

    def take(self, index):
        return _Points(*(v.index_select(0, index) for v in self))

    def cat(self, other):
        return _Points(*(torch.cat(pair) for pair in zip(self, other)))


def _sqdist(a, b):
    """Squared L2 distances (n, F) x (m, F) -> (n, m) in fp32 (centred on b to limit cancellation)."""
    centre = b.mean(dim=0)
    a, b = a - centre, b - centre
    d2 = a.pow(2).sum(1)[:, None] + b.pow(2).sum(1)[None, :] - 2 * a @ b.T  # (n, m)
    return d2.clamp_min_(0)


def _reduce(points, assign, k):
    """Clusters from an assignment: centroid sum(w x)/sum(w), weight sum(w), time sum(w t)/sum(w)."""
    member = assign[None, :] == torch.arange(k, device=assign.device)[:, None]  # (k, n)
    wm = member * points.w  # (k, n)
    w = wm.sum(1)  # (k,)
    x = (wm @ points.x) / w[:, None]  # (k, F)
    t = (wm.double() @ points.t) / w.double()  # (k,)
    first = torch.where(member, points.first, INF).amin(1)  # (k,)
    last = torch.where(member, points.last, -INF).amax(1)  # (k,)
    return _Points(x, w, t, first, last)


def _nearest(x, w, centroids):
    """Each point's nearest centroid; an empty cluster is re-seeded with the worst-fitting movable point."""
    k = centroids.shape[0]
    d2 = _sqdist(x, centroids)  # (n, k)
    assign = d2.argmin(dim=1)  # (n,)
    counts = torch.bincount(assign, minlength=k)
    if bool((counts == 0).any()):  # host sync: only the multi-frame (Lloyd) path comes here
        cost = w * d2.gather(1, assign[:, None]).squeeze(1)  # each point's share of the objective
        for empty in (counts == 0).nonzero().flatten().tolist():
            worst = torch.where(counts[assign] > 1, cost, -INF).argmax()
            counts[assign[worst]] -= 1
            counts[empty] += 1
            assign[worst] = empty
            cost[worst] = -INF
    return assign


def _merge_closest_pair(points):
    """Weighted k-means of k+1 points into k clusters, exactly.

    The optimum keeps k-1 singletons and merges the pair of least w_i w_j / (w_i + w_j) |x_i - x_j|^2.
    Device-side indices only: no host sync on the per-frame path.
    """
    n = points.w.shape[0]
    w = points.w
    cost = (w[:, None] * w[None, :] / (w[:, None] + w[None, :])) * _sqdist(points.x, points.x)  # (n, n)
    index = torch.arange(n, device=w.device)
    upper = index[:, None] < index[None, :]  # (n, n) pairs i < j
    flat = cost.masked_fill(~upper, INF).argmin().view(1)
    i, j = flat // n, flat % n  # (1,), (1,) with i < j
    w_i, w_j = w.index_select(0, i), w.index_select(0, j)
    w_ij = w_i + w_j
    merged = _Points(
        x=(w_i[:, None] * points.x.index_select(0, i) + w_j[:, None] * points.x.index_select(0, j)) / w_ij[:, None],
        w=w_ij,
        t=(w_i.double() * points.t.index_select(0, i) + w_j.double() * points.t.index_select(0, j)) / w_ij.double(),
        first=torch.minimum(points.first.index_select(0, i), points.first.index_select(0, j)),
        last=torch.maximum(points.last.index_select(0, i), points.last.index_select(0, j)),
    )
    keep = index[:-1] + (index[:-1] >= j).long()  # (k,) every point but j; i keeps its row
    return _Points(*(v.index_copy(0, i, m).index_select(0, keep) for v, m in zip(points, merged)))


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
        if torch.equal(update, assign):
            break
        assign = update
    return assign


def _upstream_kmeans(points, k, generator):
    """The published k-means -> assignment (n,): unit weights, random-permutation start, cluster ids
    in initialisation order, stop when the centroids move less than 1e-4 in total."""
    x = points.x
    ones = torch.ones_like(points.w)
    centroids = x.index_select(0, torch.randperm(x.shape[0], generator=generator, device=x.device)[:k])  # (k, F)
    for _ in range(MAX_LLOYD_ITERATIONS):
        assign = _nearest(x, ones, centroids)  # upstream re-seeded an empty cluster with a random point
        update = _reduce(points._replace(w=ones), assign, k).x
        moved = (update - centroids).norm(dim=1).sum()
        centroids = update
        if moved < UPSTREAM_TOLERANCE:
            break
    return assign


class STARMemory:
    """The STAR memory of one stream: `update` with chunks of frames, `read` the memory tokens.

    Readout order (as released): abstract, temporal, retrieved, spatial; flattened frame-major,
    then patch row-major. The abstract update of the latest chunk stays differentiable w.r.t.
    `attention_model` (training backprops through q_proj/k_proj); everything else is computed from
    detached features, and no autograd graph outlives one update.
    """

    def __init__(self, config, attention_model=None, seed=0):
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
        self._frames_seen = 0
        self._dtype = torch.float32
        self._buffer = None  # allocated on the first update, on the features' device

    # --- state --------------------------------------------------------------------------------
    def _allocate(self, features):
        device, dim = features.device, self.dim
        if self._owns_attention:
            self.attention_model.to(device)  # our own module follows the stream once; a model's stays put
        self._generator = torch.Generator(device=device).manual_seed(self.seed)
        spa, tem, abs_ = self.spatial_pool**2, self.temporal_pool**2 * dim, self.abstract_pool**2

        def frames(rows, tokens, dtype):
            return torch.zeros(rows, tokens, dim, dtype=dtype, device=device)

        def times(rows):
            return torch.zeros(rows, dtype=torch.float64, device=device)

        # ring buffer of the last N_buff frames: P_spa grid, flattened P_tem grid, timestamp
        self._buffer = frames(self.buffer_frames, spa, features.dtype)  # (N_buff, P_spa^2, D)
        self._buffer_keys = torch.zeros(self.buffer_frames, tem, device=device)  # (N_buff, P_tem^2*D)
        self._buffer_times = times(self.buffer_frames)  # (N_buff,)
        self._buffer_next, self._buffer_count = 0, 0
        self._spatial, self._spatial_times = frames(0, spa, features.dtype), times(0)
        self._retrieved, self._retrieved_times = frames(0, spa, features.dtype), times(0)
        self._temporal = _Points(torch.zeros(0, tem, device=device), torch.zeros(0, device=device),
                                 times(0), times(0), times(0))
        self._abstract = frames(0, abs_, torch.float32)  # (filled slots, P_abs^2, D)
        # upstream: retrieval reads the stream's first frames (cluster id = frame index), see _retrieve
        self._head, self._head_times = frames(0, spa, features.dtype), times(0)

    # --- update -------------------------------------------------------------------------------
    def update(self, features, timestamps=None):
        """Add a chunk of frames (n, 256, D) in time order; `timestamps`: n seconds (default frame / fps)."""
        tokens = self._ingest(features, timestamps)
        if tokens is not None:
            self._update_abstract(tokens)
        return self

    def _ingest(self, features, timestamps):
        """Everything of `update` that does not depend on trained weights (buffer, spatial, temporal,
        retrieved); returns the chunk's pooled abstract inputs (fed, P_abs^2, D) fp32, or None."""
        n, tokens, dim = features.shape
        if tokens != PATCH_GRID**2 or dim != self.dim:
            raise ValueError(f"features must be (n, {PATCH_GRID**2}, {self.dim}), got {tuple(features.shape)}")
        if n == 0:
            return None
        if self._buffer is None:
            self._allocate(features)
        device = features.device
        if timestamps is None:
            times = (self._frames_seen + torch.arange(n, dtype=torch.float64, device=device)) / self.video_fps
        else:
            times = torch.as_tensor(timestamps, dtype=torch.float64, device=device).reshape(-1)  # (n,)
            if times.shape[0] != n:
                raise ValueError(f"{n} frames but {times.shape[0]} timestamps")
        features = features.detach()
        self._dtype = features.dtype

        keys = pool(features, self.temporal_pool).flatten(1)  # (n, P_tem^2*D)
        stored = self._buffer.dtype  # the first chunk's dtype; reads come out in the latest chunk's
        recent = pool(features[-self.buffer_frames:], self.spatial_pool).to(stored)  # (<=N_buff, P_spa^2, D)
        self._write_buffer(n, recent, keys[-self.buffer_frames:], times[-self.buffer_frames:])
        newest = -self.spatial_frames
        self._spatial = torch.cat([self._spatial, recent[newest:]])[newest:]  # (<=N_spa, P_spa^2, D)
        self._spatial_times = torch.cat([self._spatial_times, times[newest:]])[newest:]
        if self.upstream and self._frames_seen < self.temporal_frames:
            first = features[: self.temporal_frames - self._frames_seen]
            self._head = torch.cat([self._head, pool(first, self.spatial_pool).to(stored)])  # (<=N_tem, P_spa^2, D)
            self._head_times = torch.cat([self._head_times, times[: first.shape[0]]])

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
        self._retrieve()  # reads the temporal memory and the buffer, never the abstract memory
        return abstract_inputs

    def _write_buffer(self, n, frames, keys, times):
        """Write the last (<= N_buff) of n new frames into the slots they would reach one at a time."""
        start = self._buffer_next + n - frames.shape[0]
        slots = (start + torch.arange(frames.shape[0], device=frames.device)) % self.buffer_frames  # (<=N_buff,)
        self._buffer.index_copy_(0, slots, frames)
        self._buffer_keys.index_copy_(0, slots, keys)
        self._buffer_times.index_copy_(0, slots, times)
        self._buffer_next = (self._buffer_next + n) % self.buffer_frames
        self._buffer_count = min(self._buffer_count + n, self.buffer_frames)

    def _update_temporal(self, new):
        points = self._temporal.cat(new)
        n, k = points.w.shape[0], self.temporal_frames
        if self.upstream:
            # upstream: every point weighs 1 (no weights carried over) and the centroids stay in
            # initialisation order instead of time order
            if n > k:
                unweighted = points._replace(w=torch.ones_like(points.w))
                points = _reduce(unweighted, _upstream_kmeans(points, k, self._generator), k)
            self._temporal = points
            return
        if n <= k:
            clusters = points
        elif n == k + 1:
            clusters = _merge_closest_pair(points)  # k+1 points (every streamed frame): exact optimum, no Lloyd
        else:
            clusters = _reduce(points, _weighted_kmeans(points, k, self._generator), k)
        self._temporal = clusters.take(torch.sort(clusters.t, stable=True).indices)  # time order

    def _update_abstract(self, tokens):
        # gradients flow within one update (a training clip is one chunk); the carried state is
        # detached so that a stream's autograd graph stays bounded too
        free = self.abstract_frames - self._abstract.shape[0]
        self._abstract = torch.cat([self._abstract.detach(), tokens[:free]])  # (<=N_abs, P_abs^2, D)
        rest = tokens[free:]
        # upstream: the remaining tokens update the memory in chunks of N_abs; paper: as one chunk
        chunk = self.abstract_frames if self.upstream else max(rest.shape[0], 1)
        for start in range(0, rest.shape[0], chunk):
            self._abstract = self.attention_model(self._abstract, rest[start:start + chunk],
                                                  self.abstract_update_ratio)

    def _retrieve(self):
        clusters = self._temporal
        by_weight = torch.sort(clusters.w, descending=True, stable=True).indices  # largest clusters first
        if self.upstream:
            # upstream: the ids of the largest clusters index the input frames (= the stream's first
            # N_tem frames) instead of the buffer frames nearest the centroids; emitted by weight
            ids = by_weight[: min(self.retrieved_frames, clusters.w.shape[0])]
            self._retrieved = self._head.index_select(0, ids)  # (r, P_spa^2, D)
            self._retrieved_times = self._head_times.index_select(0, ids)
            return
        spatial = self._spatial.shape[0]
        r = min(self.retrieved_frames, clusters.w.shape[0], self._buffer_count - spatial)
        slot = torch.arange(self.buffer_frames, device=self._buffer.device)
        age = (self._buffer_next - 1 - slot) % self.buffer_frames  # (N_buff,) 0 = newest frame
        banned = (age < spatial) | (age >= self._buffer_count)  # spatial memory or empty slot
        d2 = _sqdist(clusters.x.index_select(0, by_weight[:r]), self._buffer_keys)  # (r, N_buff)
        picks = []
        for row in d2:
            pick = row.masked_fill(banned, INF).argmin().view(1)  # nearest frame to this centroid
            banned = banned.index_fill(0, pick, True)  # no frame twice
            picks.append(pick)
        picks = torch.cat(picks) if picks else slot[:0]
        picks = picks.index_select(0, torch.sort(self._buffer_times.index_select(0, picks)).indices)  # time order
        self._retrieved = self._buffer.index_select(0, picks)  # (r, P_spa^2, D) a copy, not a view
        self._retrieved_times = self._buffer_times.index_select(0, picks)

    # --- read ---------------------------------------------------------------------------------
    def read(self):
        """Memory tokens (N, D): abstract, temporal, retrieved, spatial. A fresh tensor in the fed dtype."""
        if self._buffer is None:
            return torch.zeros(0, self.dim, dtype=self._dtype)
        parts = (
            self._abstract.flatten(0, 1),  # (N_abs*P_abs^2, D)
            self._temporal.x.view(-1, self.dim),  # (N_tem*P_tem^2, D)
            self._retrieved.flatten(0, 1),  # (N_ret*P_spa^2, D)
            self._spatial.flatten(0, 1),  # (N_spa*P_spa^2, D)
        )
        return torch.cat([p.to(self._dtype) for p in parts])  # (N, D)

    def timestamps(self):
        """Seconds of each temporal centroid (weighted mean), retrieved frame and spatial frame, in readout order."""
        if self._buffer is None:
            return {"temporal": [], "retrieved": [], "spatial": []}
        return {"temporal": self._temporal.t.tolist(), "retrieved": self._retrieved_times.tolist(),
                "spatial": self._spatial_times.tolist()}

    def temporal_weights(self):
        """Frames each temporal centroid stands for, in readout order."""
        return [] if self._buffer is None else self._temporal.w.long().tolist()

    def temporal_spans(self):
        """(first, last) timestamp of the frames each temporal centroid stands for, in readout order."""
        if self._buffer is None:
            return []
        return list(zip(self._temporal.first.tolist(), self._temporal.last.tolist()))

    @property
    def frames_seen(self):
        return self._frames_seen

    @property
    def buffered_frames(self):
        """Frames held in the ring buffer (at most N_buff)."""
        return 0 if self._buffer is None else self._buffer_count

    @property
    def num_tokens(self):
        if self._buffer is None:
            return 0
        return (self._abstract.shape[0] * self.abstract_pool**2 + self._temporal.w.shape[0] * self.temporal_pool**2
                + (self._retrieved.shape[0] + self._spatial.shape[0]) * self.spatial_pool**2)


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
