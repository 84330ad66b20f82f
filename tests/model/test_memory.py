"""STAR memory on hand-built inputs whose right memory is known (DESIGN §3, §9)."""

import math

import pytest
import torch

from flash_vstream.model.language_model.configuration_vstream import VStreamConfig
from flash_vstream.model.memory import STARMemory, SemanticAttention, memory_num_tokens, pool

D = 8
# Small memory: 1 spatial frame at 8x8, 4 temporal centroids at 4x4, 5 abstract slots, 2 retrieved, buffer of 30.
SMALL = dict(video_current_memory_length=1, compress_size=8, video_long_memory_length=4,
             compress_long_memory_size=4, video_Turing_memory_length=5, compress_Turing_memory_size=1,
             video_retrieved_memory_length=2, video_buffer_length=30)


def make_config(mode="paper", dim=D, **sizes):
    return VStreamConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=64, mm_hidden_size=dim, memory_mode=mode, **sizes)


def constant_frames(vectors):
    """(n, D) -> (n, 256, D): every patch of frame i holds vectors[i], so every pooling gives vectors[i]."""
    return vectors[:, None, :].expand(-1, 256, -1).contiguous()


def on_axes(*columns):
    """Frames whose first len(columns) feature dimensions hold the given per-frame values."""
    values = torch.tensor(columns, dtype=torch.float32).T  # (n, len(columns))
    vectors = torch.zeros(values.shape[0], D)
    vectors[:, : values.shape[1]] = values
    return constant_frames(vectors)


def random_frames(n, seed, dim=D):
    return torch.randn(n, 256, dim, generator=torch.Generator().manual_seed(seed))


def stream(memory, frames):
    for i in range(frames.shape[0]):
        memory.update(frames[i:i + 1])
    return memory


def segments(memory):
    """read() split into its memories (abstract, temporal, retrieved, spatial), each (frames, tokens, D)."""
    times, tokens = memory.timestamps(), memory.read()
    spatial_tokens = memory.spatial_pool**2
    counts = [len(times["temporal"]) * memory.temporal_pool**2, len(times["retrieved"]) * spatial_tokens,
              len(times["spatial"]) * spatial_tokens]
    parts = tokens.split([len(tokens) - sum(counts)] + counts)
    per_frame = [memory.abstract_pool**2, memory.temporal_pool**2, spatial_tokens, spatial_tokens]
    return [part.view(-1, n, part.shape[-1]) for part, n in zip(parts, per_frame)]


def abstract_tokens(memory):
    return segments(memory)[0][:, 0]


# --- pooling --------------------------------------------------------------------------------------
def test_pool_is_row_major_and_hierarchical():
    grid = torch.arange(256.0).view(1, 256, 1)  # patch value = 16 * row + col
    assert pool(grid, 2)[0, :, 0].tolist() == [59.5, 67.5, 187.5, 195.5]  # TL, TR, BL, BR quadrant means
    x = random_frames(3, seed=0)
    assert torch.allclose(pool(pool(x, 8), 4), pool(x, 4), atol=1e-6)
    assert torch.allclose(pool(pool(pool(x, 8), 4), 1), pool(x, 1), atol=1e-6)
    assert torch.allclose(pool(x, 1)[:, 0], x.mean(dim=1), atol=1e-6)
    assert pool(x.bfloat16(), 4).dtype == torch.float32


# --- token counts ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mode, one_frame", [("paper", 81), ("upstream", 64)])
def test_released_token_counts(mode, one_frame):
    config = make_config(mode)  # released sizes
    assert memory_num_tokens(1, config) == one_frame
    assert len(STARMemory(config).update(random_frames(1, seed=1)).read()) == one_frame
    for n in (26, 27, 60):
        assert memory_num_tokens(n, config) == 681
        assert len(STARMemory(config).update(random_frames(n, seed=n)).read()) == 681
    assert len(stream(STARMemory(config), random_frames(30, seed=2)).read()) == 681


CUSTOM = [
    {},  # released sizes
    SMALL,
    dict(video_current_memory_length=2, compress_size=4, video_long_memory_length=3, compress_long_memory_size=2,
         video_Turing_memory_length=4, compress_Turing_memory_size=2, video_retrieved_memory_length=2,
         video_buffer_length=6),
    dict(video_long_memory_length=5, video_retrieved_memory_length=4, video_buffer_length=5),  # buffer-limited
    dict(video_long_memory_length=3, video_retrieved_memory_length=0, video_buffer_length=3),
]


@pytest.mark.parametrize("mode", ["paper", "upstream"])
@pytest.mark.parametrize("sizes", CUSTOM)
def test_token_count_formula_equals_read(mode, sizes):
    config = make_config(mode, **sizes)
    frames = random_frames(40, seed=3)
    for n in range(1, 41):
        memory = STARMemory(config).update(frames[:n])
        assert len(memory.read()) == memory.num_tokens == memory_num_tokens(n, config), n


# --- buffer, temporal memory, retrieval ------------------------------------------------------------
def test_buffer_stays_bounded_over_a_long_stream():
    config = make_config(**{**SMALL, "video_buffer_length": 20})
    memory = STARMemory(config)
    frames = random_frames(2000, seed=4)
    for i in range(2000):
        memory.update(frames[i:i + 1])
        if i % 97 == 0 or i == 1999:
            assert memory.buffered_frames == min(i + 1, 20)
            assert memory._buffer.shape[0] == 20  # allocated once, never grows
            assert all(t > i - 20 for t in memory.timestamps()["retrieved"])  # retrieved from the buffer window
    assert memory.frames_seen == 2000
    assert len(memory.read()) == memory_num_tokens(30, config)
    assert sum(memory.temporal_weights()) == 2000


def test_temporal_centroids_are_time_ordered_and_weights_sum_to_frames_seen():
    config = make_config(**SMALL)
    frames = random_frames(150, seed=5)
    times = (torch.arange(150) * 0.5 + 3.0).tolist()  # explicit timestamps, not the frame counter
    streamed = STARMemory(config)
    for i in range(150):
        streamed.update(frames[i:i + 1], timestamps=[times[i]])
        centroid_times = streamed.timestamps()["temporal"]
        assert centroid_times == sorted(centroid_times)
        assert sum(streamed.temporal_weights()) == i + 1
        for (first, last), t in zip(streamed.temporal_spans(), centroid_times):
            assert times[0] <= first <= t <= last <= times[i]
    offline = STARMemory(config).update(frames, timestamps=times)
    assert offline.timestamps()["temporal"] == sorted(offline.timestamps()["temporal"])
    assert sum(offline.temporal_weights()) == 150
    assert len(offline.temporal_weights()) == 4


def test_streaming_merge_keeps_weights():
    """4 frames into 2 centroids, one at a time: the k+1 merge is weighted by the frames each stands for."""
    config = make_config(**{**SMALL, "video_long_memory_length": 2})
    memory = stream(STARMemory(config), on_axes([0.0, 10.0, 11.0, 12.0]))
    # 10 & 11 merge (10.5, weight 2); then 12 joins it: (2 * 10.5 + 12) / 3 = 11, weight 3
    assert memory.temporal_weights() == [1, 3]
    temporal = segments(memory)[1]
    assert torch.allclose(temporal[:, :, 0], torch.tensor([[0.0], [11.0]]).expand(2, 16))
    assert memory.timestamps()["temporal"] == [0.0, 2.0]
    assert memory.temporal_spans() == [(0.0, 0.0), (1.0, 3.0)]


def test_streaming_merge_minimises_the_weighted_objective():
    """4.8 is nearer the 2-frame centroid at 0, but joining the 1-frame centroid at 10 costs less:
    2/3 * 4.8^2 = 15.4 > 1/2 * 5.2^2 = 13.5."""
    config = make_config(**{**SMALL, "video_long_memory_length": 2})
    memory = stream(STARMemory(config), on_axes([0.0, 0.0, 10.0, 4.8]))
    assert memory.temporal_weights() == [2, 2]
    assert torch.allclose(segments(memory)[1][:, 0, 0], torch.tensor([0.0, 7.4]))
    assert memory.timestamps()["temporal"] == [0.5, 2.5]


def test_lloyd_recovers_well_separated_groups():
    """A whole clip as one chunk (weighted k-means++ then Lloyd): four scenes, four centroids."""
    sizes, levels = [5, 9, 3, 7], [0.0, 10.0, 20.0, 30.0]
    values = [level + 0.01 * j for level, size in zip(levels, sizes) for j in range(size)]
    memory = STARMemory(make_config(**SMALL)).update(on_axes(values))
    assert memory.temporal_weights() == sizes
    starts = [0, 5, 14, 17]
    assert memory.temporal_spans() == [(float(s), float(s + n - 1)) for s, n in zip(starts, sizes)]
    temporal = segments(memory)[1][:, 0, 0]
    expected = [sum(values[s:s + n]) / n for s, n in zip(starts, sizes)]
    assert torch.allclose(temporal, torch.tensor(expected), atol=1e-4)


def test_long_scene_is_largest_cluster_and_is_retrieved_from_the_buffer():
    generator = torch.Generator().manual_seed(6)
    scene_a = torch.zeros(100, D)
    scene_a[:, 0] = 1.0
    scene_b = torch.zeros(10, D)
    scene_b[:, 1] = 1.0
    vectors = torch.cat([scene_a, scene_b]) + 0.01 * torch.randn(110, D, generator=generator)
    frames = constant_frames(vectors)
    paper = stream(STARMemory(make_config(**SMALL)), frames)
    weights = paper.temporal_weights()
    largest = max(range(len(weights)), key=weights.__getitem__)
    first, last = paper.temporal_spans()[largest]
    assert last < 100 and weights[largest] > 10  # the long scene
    retrieved = paper.timestamps()["retrieved"]
    assert len(retrieved) == 2 and len(set(retrieved)) == 2
    assert all(t >= 110 - 30 for t in retrieved)  # from the buffer, not the first frames of the stream
    assert any(t < 100 for t in retrieved)  # the largest cluster's frame is a scene-A frame
    # upstream: cluster ids index the first frames of the stream
    upstream = stream(STARMemory(make_config("upstream", **SMALL)), frames)
    assert all(t < 4 for t in upstream.timestamps()["retrieved"])


def test_no_frame_is_retrieved_twice_and_spatial_frames_are_excluded():
    """Both centroids are nearest to frame 1; the second takes the next nearest non-spatial frame."""
    config = make_config(**{**SMALL, "video_long_memory_length": 2})
    frames = on_axes([1.0, 1.0, 1.0, 1.0, 5.0], [-1.0, 0.05, 1.0, -0.2, -0.0375])
    memory = stream(STARMemory(config), frames)
    # clusters: frames 0-3 -> (1, -0.0375) weight 4; frame 4 -> (5, -0.0375) weight 1 (also the spatial frame)
    assert memory.temporal_weights() == [4, 1]
    assert memory.timestamps() == {"temporal": [1.5, 4.0], "retrieved": [1.0, 3.0], "spatial": [4.0]}
    assert torch.equal(segments(memory)[2], frames[[1, 3], :64])


# --- Semantic Attention ---------------------------------------------------------------------------
def test_semantic_attention_matches_the_formula():
    attention = SemanticAttention(4, hidden_dim=2)
    with torch.no_grad():
        attention.q_proj.weight.copy_(torch.tensor([[1.0, 0.0, 0.5, 0.0], [0.0, 1.0, 0.0, -0.5]]))
        attention.q_proj.bias.copy_(torch.tensor([0.1, -0.2]))
        attention.k_proj.weight.copy_(torch.tensor([[0.5, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]))
        attention.k_proj.bias.copy_(torch.tensor([0.0, 0.3]))
    memory = torch.tensor([[1.0, 2.0, 0.0, -1.0], [0.5, -1.0, 1.0, 0.0], [0.0, 0.0, 2.0, 1.0]])
    tokens = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 2.0, -1.0, 1.0]])
    q = [[sum(w * m for w, m in zip(row, mem)) + b for row, b in zip([[1, 0, .5, 0], [0, 1, 0, -.5]], [.1, -.2])]
         for mem in memory.tolist()]
    k = [[sum(w * x for w, x in zip(row, tok)) + b for row, b in zip([[.5, 1, 0, 0], [0, 0, 1, 1]], [0, .3])]
         for tok in tokens.tolist()]
    expected = []
    for qi, mem in zip(q, memory.tolist()):
        scores = [math.exp(sum(a * b for a, b in zip(qi, kj)) / math.sqrt(2)) for kj in k]
        weights = [s / sum(scores) for s in scores]
        read = [sum(w * tok[d] for w, tok in zip(weights, tokens.tolist())) for d in range(4)]
        expected.append([0.8 * m + 0.2 * r for m, r in zip(mem, read)])
    out = attention(memory[:, None], tokens[:, None], 0.2)[:, 0]
    assert torch.allclose(out, torch.tensor(expected), atol=1e-6)
    # one new token: the softmax is 1 and the update is an EMA, whatever q and k are
    assert torch.allclose(attention(memory[:, None], tokens[:1, None], 0.2)[:, 0], 0.8 * memory + 0.2 * tokens[0])


def test_gradients_reach_q_and_k_through_read():
    config = make_config(**SMALL)
    attention = SemanticAttention(D, config.abstract_hidden_dim)
    memory = STARMemory(config, attention_model=attention).update(random_frames(12, seed=7))
    tokens = memory.read()
    assert tokens.requires_grad
    (tokens * torch.randn(tokens.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    assert attention.q_proj.weight.grad.abs().sum() > 0 and attention.k_proj.weight.grad.abs().sum() > 0
    assert attention.v_proj.weight.grad is None  # kept for checkpoint keys only


def test_autograd_graph_does_not_outlive_an_update():
    """Streams stay bounded with autograd on: only the latest update is differentiated."""
    config = make_config(**SMALL)
    attention = SemanticAttention(D, config.abstract_hidden_dim)
    memory = STARMemory(config, attention_model=attention)
    frames = random_frames(12, seed=15)
    for start in range(0, 10, 2):
        memory.update(frames[start:start + 2])
    previous = abstract_tokens(memory).detach()[:, None]
    memory.update(frames[10:12])
    probe = torch.randn(5, D, generator=torch.Generator().manual_seed(1))
    (abstract_tokens(memory) * probe).sum().backward()
    streamed = attention.q_proj.weight.grad.clone()
    attention.zero_grad()
    (attention(previous, pool(frames[10:12], 1), 0.2)[:, 0] * probe).sum().backward()
    assert streamed.abs().sum() > 0 and torch.allclose(streamed, attention.q_proj.weight.grad)


def test_default_attention_is_seeded_without_touching_the_global_rng():
    config = make_config(**SMALL)
    state = torch.get_rng_state()
    a, b, c = (STARMemory(config, seed=s).attention_model for s in (3, 3, 4))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.q_proj.weight, b.q_proj.weight) and not torch.equal(a.q_proj.weight, c.q_proj.weight)


# --- offline vs streaming, read ----------------------------------------------------------------------
def test_one_chunk_versus_one_frame_at_a_time():
    config = make_config(**SMALL)
    frames = random_frames(40, seed=8)
    offline = STARMemory(config).update(frames)
    streamed = stream(STARMemory(config), frames)
    assert offline.num_tokens == streamed.num_tokens == memory_num_tokens(40, config)
    assert sum(offline.temporal_weights()) == sum(streamed.temporal_weights()) == 40
    assert torch.equal(offline.read()[-64:], streamed.read()[-64:])  # same spatial frame
    assert offline.timestamps()["spatial"] == streamed.timestamps()["spatial"] == [39.0]
    assert torch.equal(offline._buffer, streamed._buffer) and torch.equal(offline._buffer_times, streamed._buffer_times)
    tokens = pool(frames, 1)  # (40, 1, D)
    # streaming: every frame after the 5 slots fill is an EMA step on every slot
    ema = tokens[:5].clone()
    for x in tokens[5:]:
        ema = 0.8 * ema + 0.2 * x
    assert torch.allclose(abstract_tokens(streamed), ema[:, 0], atol=1e-5)
    # offline: the 35 remaining tokens update the 5 slots as one chunk
    with torch.no_grad():
        chunk = offline.attention_model(tokens[:5], tokens[5:], 0.2)
    assert torch.allclose(abstract_tokens(offline), chunk[:, 0], atol=1e-6)
    assert not torch.allclose(abstract_tokens(offline), ema[:, 0], atol=1e-3)


def test_read_order_dtype_and_snapshot():
    config = make_config(**SMALL)
    frames = random_frames(1, seed=9).bfloat16()
    memory = STARMemory(config).update(frames)
    tokens = memory.read()
    assert tokens.dtype == torch.bfloat16 and tokens.shape == (1 + 16 + 64, D)
    # abstract, temporal, spatial: the frame at three scales
    expected = torch.cat([pool(frames, 1)[0], pool(frames, 4)[0], pool(frames, 8)[0]]).bfloat16()
    assert torch.equal(tokens, expected)
    snapshot = tokens.clone()
    memory.update(random_frames(3, seed=10).bfloat16())
    assert torch.equal(tokens, snapshot)  # an earlier read is not touched by later updates
    tokens.zero_()
    assert memory.read().abs().sum() > 0  # nor does writing to a read touch the memory


@pytest.mark.parametrize("mode", ["paper", "upstream"])
def test_same_seed_and_input_give_identical_tokens(mode):
    config = make_config(mode, **SMALL)
    frames = random_frames(70, seed=11)

    def run(seed):
        memory = STARMemory(config, seed=seed).update(frames[:60])  # Lloyd path with a seeded start
        return stream(memory, frames[60:])

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a.read(), b.read())
    assert a.timestamps() == b.timestamps() and a.temporal_weights() == b.temporal_weights()
    assert not torch.equal(a.read(), c.read())


# --- upstream mode ----------------------------------------------------------------------------------
def test_upstream_kmeans_ignores_weights():
    config = make_config("upstream", **{**SMALL, "video_long_memory_length": 2})
    # frame 0 is spatial only (first update); then 0, 0.1 | 10 cluster, and 0.2 joins (0, 0.1)
    memory = stream(STARMemory(config), on_axes([50.0, 0.0, 0.1, 10.0, 0.2]))
    centroids = segments(memory)[1][:, 0, 0]
    order = centroids.argsort()
    assert torch.allclose(centroids[order], torch.tensor([0.125, 10.0]))  # plain mean of 0.05 and 0.2
    assert [memory.temporal_weights()[i] for i in order] == [2, 1]  # point counts, not frames (3 of 4)
    assert 0.0 not in memory.timestamps()["temporal"]
    paper_config = make_config(**{**SMALL, "video_long_memory_length": 2})
    paper = stream(STARMemory(paper_config), on_axes([50.0, 0.0, 0.1, 10.0, 0.2]))
    assert sum(paper.temporal_weights()) == 5


def test_upstream_centroids_stay_in_initialisation_order():
    values = [level + 0.01 * j for level in (0.0, 10.0, 20.0, 30.0) for j in range(4)] + [40.0]
    frames = on_axes(values)
    orders = []
    for seed in range(10):
        upstream = STARMemory(make_config("upstream", **SMALL), seed=seed).update(frames)
        orders.append(upstream.timestamps()["temporal"])
        paper = STARMemory(make_config(**SMALL), seed=seed).update(frames)
        assert paper.timestamps()["temporal"] == sorted(paper.timestamps()["temporal"])
    assert any(times != sorted(times) for times in orders)


def test_upstream_retrieves_early_input_frames():
    """Cluster ids of the largest clusters index the clip's frames: early frames, not the long scene."""
    values = [0.0, 1.0, 2.0, 3.0, 4.0] + [20.0 + 0.001 * j for j in range(40)] + [60.0]
    frames = on_axes(values)
    orders = []
    for seed in range(6):
        upstream = STARMemory(make_config("upstream", **SMALL), seed=seed).update(frames)
        weights = upstream.temporal_weights()
        by_weight = sorted(range(len(weights)), key=lambda i: -weights[i])[:2]  # stable: ties keep cluster order
        assert upstream.timestamps()["retrieved"] == [float(i) for i in by_weight]  # emitted by weight
        assert torch.equal(segments(upstream)[2], frames[by_weight, :64])
        orders.append(by_weight)
    assert any(ids != sorted(ids) for ids in orders)  # not in time order
    paper = STARMemory(make_config(**SMALL)).update(frames)
    assert max(paper.temporal_weights()) == 40  # the long scene
    assert all(t >= 46 - 30 for t in paper.timestamps()["retrieved"])  # inside the buffer, from the long scene


def test_upstream_offline_newest_frame_is_spatial_memory_only():
    upstream = STARMemory(make_config("upstream")).update(random_frames(10, seed=12))
    times = upstream.timestamps()
    assert times["temporal"] == [float(t) for t in range(9)] and times["spatial"] == [9.0]
    assert upstream.num_tokens == 9 * 1 + 9 * 16 + 3 * 64 + 64
    paper = STARMemory(make_config()).update(random_frames(10, seed=12))
    assert paper.timestamps()["temporal"] == [float(t) for t in range(10)]
    single = STARMemory(make_config("upstream")).update(random_frames(1, seed=13))
    assert single.timestamps()["temporal"] == [] and single.num_tokens == 64


def test_upstream_abstract_updates_in_chunks_of_its_length():
    config = make_config("upstream", **SMALL)  # 5 abstract slots
    frames = random_frames(14, seed=14)  # 13 fed + 1 spatial
    memory = STARMemory(config).update(frames)
    tokens = pool(frames, 1)  # (14, 1, D)
    attention = memory.attention_model
    with torch.no_grad():
        chunked = attention(attention(tokens[:5], tokens[5:10], 0.2), tokens[10:13], 0.2)
        one_chunk = attention(tokens[:5], tokens[5:13], 0.2)
    assert torch.allclose(abstract_tokens(memory), chunked[:, 0], atol=1e-6)
    assert not torch.allclose(abstract_tokens(memory), one_chunk[:, 0], atol=1e-4)
