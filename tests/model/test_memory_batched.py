"""Many streams' STAR memories in one `MemoryStack`: one batched update per tick gives every stream exactly
the memory it gets alone (fp32, CPU), whatever the other streams do."""

import pytest
import torch

from flash_vstream.model.language_model.configuration_vstream import VStreamConfig
from flash_vstream.model.memory import (INF, MemoryStack, SemanticAttention, STARMemory, _nearest_many,
                                        _sqdist_many)

D = 8
# 1 spatial frame at 8x8, 4 temporal centroids at 4x4, 5 abstract slots, 2 retrieved, a buffer of 30 frames
SMALL = dict(video_current_memory_length=1, compress_size=8, video_long_memory_length=4,
             compress_long_memory_size=4, video_Turing_memory_length=5, compress_Turing_memory_size=1,
             video_retrieved_memory_length=2, video_buffer_length=30)


def make_config(mode="paper", **sizes):
    return VStreamConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=64, mm_hidden_size=D, memory_mode=mode, **sizes)


def random_frames(n, seed):
    return torch.randn(n, 256, D, generator=torch.Generator().manual_seed(seed))


def attention(config, seed=0):
    return SemanticAttention.from_seed(config.mm_hidden_size, config.abstract_hidden_dim, seed)


def state(memory):
    return memory.read(), memory.timestamps(), memory.temporal_weights(), memory.temporal_spans()


def assert_same(a, b):
    tokens_a, *rest_a = state(a)
    tokens_b, *rest_b = state(b)
    assert torch.equal(tokens_a, tokens_b)
    assert rest_a == rest_b


def lone_run(config, module, frames, times, seed):
    memory = STARMemory(config, module, seed=seed)
    for x, t in zip(frames, times):
        memory.update(x[None], [t])
    return memory


# streams of different lengths, frame rates and starting ticks: (frames, fps, first tick)
STREAMS = [(40, 1.0, 0), (7, 2.0, 3), (33, 0.5, 1), (1, 1.0, 12), (29, 4.0, 0), (18, 1.0, 20), (35, 3.0, 2),
           (26, 1.0, 5)]


@pytest.mark.parametrize("mode", ["paper", "upstream"])
@pytest.mark.parametrize("count", [1, 3, 8])
def test_a_stack_of_streams_equals_each_stream_alone(mode, count):
    """Streams join at different ticks, leave when they end, and skip nothing: the batch changes every tick."""
    config = make_config(mode, **SMALL)  # 4 centroids, 30-frame buffer: merges, retrieval and EMA all run
    module = attention(config)
    specs = STREAMS[:count]
    frames = [random_frames(n, seed=10 + i) for i, (n, _, _) in enumerate(specs)]
    times = [[first + k / fps for k in range(n)] for n, fps, first in specs]
    stack = MemoryStack(config, "cpu", torch.float32, module)
    memories = [STARMemory(config, module, seed=i) for i in range(count)]
    batch_sizes = set()
    for tick in range(max(n + first for n, _, first in specs)):
        due = [i for i, (n, _, first) in enumerate(specs) if first <= tick < first + n]
        if not due:
            continue
        for i in due:
            memories[i].join(stack)
        stack.update([memories[i] for i in due], torch.stack([frames[i][tick - specs[i][2]] for i in due]),
                     [times[i][tick - specs[i][2]] for i in due])
        batch_sizes.add(len(due))
    assert count == 1 or len(batch_sizes) > 2  # the batch really changed
    reads = stack.read(memories)
    described = stack.describe(memories)
    for i, memory in enumerate(memories):
        lone = lone_run(config, module, frames[i], times[i], seed=i)
        assert_same(memory, lone)
        assert torch.equal(reads[i], lone.read())
        assert described[i] == (lone.timestamps(), lone.temporal_weights(), lone.temporal_spans())
        assert memory.frames_seen == lone.frames_seen == specs[i][0]


@pytest.mark.parametrize("mode", ["paper", "upstream"])
def test_released_sizes_in_a_stack(mode):
    """The released memory (681 tokens, 300-frame buffer) with streams past and before the 26th frame."""
    config = make_config(mode)
    module = attention(config)
    lengths = [30, 3, 27]
    frames = [random_frames(n, seed=i) for i, n in enumerate(lengths)]
    stack = MemoryStack(config, "cpu", torch.float32, module, capacity=3)
    memories = [STARMemory(config, module, seed=i).join(stack) for i in range(3)]
    for tick in range(max(lengths)):
        due = [i for i in range(3) if tick < lengths[i]]
        stack.update([memories[i] for i in due], torch.stack([frames[i][tick] for i in due]), [float(tick)] * len(due))
    for i, memory in enumerate(memories):
        assert_same(memory, lone_run(config, module, frames[i], [float(t) for t in range(lengths[i])], seed=i))
    assert [m.num_tokens for m in memories] == [681, len(memories[1].read()), 681]


def test_each_stream_keeps_its_own_randomness():
    """Upstream k-means starts from a permutation drawn from each stream's own generator: the same frames under
    two seeds differ, and each equals its lone run."""
    config = make_config("upstream", **SMALL)
    module = attention(config)
    frames = random_frames(20, seed=3)
    stack = MemoryStack(config, "cpu", torch.float32, module)
    memories = [STARMemory(config, module, seed=s).join(stack) for s in (0, 1)]
    for k in range(20):
        stack.update(memories, torch.stack([frames[k], frames[k]]), [float(k)] * 2)
    assert not torch.equal(memories[0].read(), memories[1].read())
    for seed, memory in zip((0, 1), memories):
        assert_same(memory, lone_run(config, module, frames, [float(k) for k in range(20)], seed))


def test_a_memory_moves_into_a_stack_mid_stream_and_rows_are_reused():
    config = make_config(**SMALL)
    module = attention(config)
    frames = random_frames(50, seed=4)
    reference = lone_run(config, module, frames, [float(k) for k in range(50)], seed=7)
    moving = STARMemory(config, module, seed=7)
    moving.update(frames[:12])  # a chunk (the offline path) on its own stack, then frames one by one
    for k in range(12, 20):
        moving.update(frames[k:k + 1], [float(k)])
    stack = MemoryStack(config, "cpu", torch.float32, module, capacity=1)
    other = STARMemory(config, module, seed=8).join(stack)
    other.update(frames[:5])
    moving.join(stack)  # stack grows to 2 rows; its state is copied over
    assert stack.capacity == 2 and stack.rows_used == 2
    for k in range(20, 50):
        stack.update([moving], frames[k:k + 1], [float(k)])
    chunked = STARMemory(config, module, seed=7)
    chunked.update(frames[:12])
    for k in range(12, 50):
        chunked.update(frames[k:k + 1], [float(k)])
    assert_same(moving, chunked)
    assert not torch.equal(moving.read(), reference.read())  # the chunk start differs from frame-by-frame
    row = other._row
    del other  # its row is free again, and a new memory there starts empty
    fresh = STARMemory(config, module, seed=8).join(stack)
    assert fresh._row == row and fresh.num_tokens == 0
    stack.update([fresh], frames[:1], [0.0])
    assert_same(fresh, lone_run(config, module, frames[:1], [0.0], seed=8))


def test_bad_batches_are_refused():
    config = make_config(**SMALL)
    module = attention(config)
    stack = MemoryStack(config, "cpu", torch.float32, module)
    memory = STARMemory(config, module).join(stack)
    outside = STARMemory(config, module)
    with pytest.raises(ValueError, match="every memory of a stack update must be in that stack"):
        stack.update([memory, outside], random_frames(2, seed=0), [0.0, 0.0])
    with pytest.raises(ValueError, match="1 memories, 2 frames and 1 timestamps"):
        stack.update([memory], random_frames(2, seed=0), [0.0])
    with pytest.raises(ValueError, match="2 memories, not distinct"):
        stack.update([memory, memory], random_frames(2, seed=0), [0.0, 1.0])
    assert memory.frames_seen == 0  # a refused batch changes nothing
    with pytest.raises(ValueError, match="its config and its Semantic Attention"):
        STARMemory(make_config(**{**SMALL, "video_long_memory_length": 3}), module).join(stack)
    with pytest.raises(ValueError, match="its config and its Semantic Attention"):
        STARMemory(config).join(stack)  # its own attention module


@pytest.mark.parametrize("mode", ["paper", "upstream"])
@pytest.mark.parametrize("temporal", [1, 2])
def test_fewer_clusters_than_retrieved_slots(mode, temporal):
    """N_tem + 1 <= N_ret: fewer clusters, fewer retrieved frames, and the stack's batched read and timestamps
    still agree with the memory's own (they gather every retrieved slot, used or not)."""
    config = make_config(mode, **{**SMALL, "video_long_memory_length": temporal, "video_retrieved_memory_length": 3})
    memory = STARMemory(config, attention(config))
    for i, frame in enumerate(random_frames(8, seed=4)):
        memory.update(frame[None], [float(i)])
    assert len(memory.timestamps()["retrieved"]) == temporal
    assert torch.equal(memory.stack.read([memory])[0], memory.read())


def _sequential_nearest(x, w, centroids):
    """The re-seeding rule as its definition reads: for each empty cluster in order, the worst-fitting point
    whose cluster still has more than one point moves there."""
    k = centroids.shape[0]
    d2 = _sqdist_many(x[None], centroids[None], centroids.mean(0)[None])[0]
    assign = d2.argmin(dim=1)
    counts = torch.bincount(assign, minlength=k)
    cost = w * d2.gather(1, assign[:, None]).squeeze(1)
    for empty in (counts == 0).nonzero().flatten().tolist():
        worst = torch.where(counts[assign] > 1, cost, -INF).argmax()
        counts[assign[worst]] -= 1
        counts[empty] += 1
        assign[worst] = empty
        cost[worst] = -INF
    return assign


def test_empty_clusters_are_reseeded_as_the_sequential_rule_does():
    generator = torch.Generator().manual_seed(0)
    cases = 0
    for trial in range(60):
        n, k = 9, 6
        x = torch.randn(n, 4, generator=generator)
        if trial % 3 == 0:
            x[3:6] = x[2]  # duplicates: tied costs
        centroids = torch.randn(k, 4, generator=generator) * 3
        centroids[: trial % 4 + 1] += 50  # far away: those clusters come out empty
        w = torch.randint(1, 4, (n,), generator=generator).float()
        expected = _sequential_nearest(x, w, centroids)
        got = _nearest_many(x[None], w[None], centroids[None])[0]
        assert torch.equal(got, expected), trial
        assert torch.bincount(got, minlength=k).min() >= 1
        cases += 1
    batched = _nearest_many(x[None].expand(3, -1, -1), w[None].expand(3, -1), centroids[None].expand(3, -1, -1))
    assert all(torch.equal(row, expected) for row in batched) and cases == 60
