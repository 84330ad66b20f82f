"""The engine's batched ingest: every tick's frames of many sessions go in as one CLIP batch and one memory
update, and each session ends with exactly the memory a lone `StreamSession` builds from its frames (fp32, CPU);
sessions join and leave between ticks; a bad frame fails its own session only."""

import numpy as np
import pytest
import torch

from flash_vstream.model.builder import load_pretrained_model
from flash_vstream.serve.engine import END_OF_STREAM, Engine
from flash_vstream.serve.session import StreamSession


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    tokenizer, model, image_processor, _ = load_pretrained_model(tiny_model_dir, device="cpu")
    return tokenizer, model, image_processor


def _session(loaded, seed=0):
    tokenizer, model, image_processor = loaded
    return StreamSession(model, tokenizer, image_processor, max_new_tokens=4, seed=seed)


def _frames(n, fps, seed, size=(24, 32)):
    """A stream: n random uint8 frames of its own size at `fps` (timestamps k / fps)."""
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 256, (*size, 3), dtype=np.uint8), k / fps) for k in range(n)]


class _CountingBatches:
    """Records the batch size of every CLIP forward: a forward hook on the tower's first layer."""

    def __init__(self, model):
        self.sizes = []
        tower = model.get_vision_tower().vision_tower
        layer = getattr(tower, "vision_model", tower).encoder.layers[0]
        self._hook = layer.register_forward_hook(lambda module, args, out: self.sizes.append(int(args[0].shape[0])))

    def remove(self):
        self._hook.remove()


def _assert_same_memory(session, lone):
    mine, theirs = session.snapshot(), lone.snapshot()
    assert torch.equal(mine.tokens, theirs.tokens)
    assert (mine.frames_seen, mine.stream_time, mine.timestamps, mine.temporal_weights, mine.temporal_spans) == (
        theirs.frames_seen, theirs.stream_time, theirs.timestamps, theirs.temporal_weights, theirs.temporal_spans)


# (frames, fps, first tick, frame size): different lengths, rates, sizes and joining ticks
STREAMS = [(12, 1.0, 0, (24, 32)), (6, 2.0, 2, (40, 40)), (10, 0.5, 1, (16, 48)), (1, 1.0, 9, (32, 24)),
           (8, 3.0, 0, (24, 32)), (5, 1.0, 10, (20, 20)), (9, 1.0, 3, (24, 32)), (4, 5.0, 12, (30, 18))]


@pytest.mark.parametrize("count", [1, 3, 8])
def test_sessions_in_one_engine_get_the_memories_of_lone_sessions(loaded, count):
    engine = Engine(play_speed=float("inf"), on_error="session", keep_running=True)  # ticks driven here
    specs = STREAMS[:count]
    streams = [_frames(n, fps, seed=i, size=size) for i, (n, fps, _, size) in enumerate(specs)]
    sessions = [_session(loaded, seed=i) for i in range(count)]
    counter = _CountingBatches(loaded[1])
    held = {}
    for tick in range(max(n + first for n, _, first, _ in specs) + 1):
        for i, (n, _, first, _) in enumerate(specs):
            if tick == first:  # joins between ticks, with its first frame queued
                held[i] = engine.add_session(f"s{i}", sessions[i], None, fps=specs[i][1], inbox_size=2)
            if i in held and first <= tick < first + n:
                held[i].frames.put(streams[i][tick - first])
            elif i in held and tick == first + n:
                held[i].frames.put(END_OF_STREAM)
        engine.step(timeout=0)
        for i, stream in list(held.items()):
            if stream.ended.is_set():  # leaves between ticks
                assert engine.remove_session(stream.id) is stream
                del held[i]
    counter.remove()
    assert not held and engine.error is None
    assert sum(counter.sizes) == sum(n for n, *_ in specs)  # one forward per tick, of all its frames
    assert count == 1 or max(counter.sizes) > 1 and len(set(counter.sizes)) > 1  # batches of several, changing
    for i, session in enumerate(sessions):
        lone = _session(loaded, seed=i)
        for frame, t in streams[i]:
            lone.add_frame(frame, t)
        _assert_same_memory(session, lone)


def test_the_loop_and_the_batch_give_the_same_memories(loaded):
    streams = [_frames(8, 1.0, seed=20), _frames(5, 2.0, seed=21)]
    memories = []
    for batch_ingest in (True, False):
        engine = Engine(play_speed=float("inf"), batch_ingest=batch_ingest)
        held = [engine.add_session(f"s{i}", _session(loaded, seed=i), None, fps=1.0, inbox_size=16)
                for i in range(2)]
        for stream, frames in zip(held, streams):
            for item in frames:
                stream.frames.put(item)
        while engine.step(timeout=0):
            pass
        memories.append([s.session.snapshot() for s in held])
    for batched, looped in zip(*memories):
        assert torch.equal(batched.tokens, looped.tokens) and batched.timestamps == looped.timestamps


def test_a_bad_frame_fails_its_own_session_and_the_others_go_on(loaded):
    engine = Engine(play_speed=float("inf"), on_error="session", keep_running=True)
    good = [engine.add_session(f"good{i}", _session(loaded, seed=i), None, fps=1.0, inbox_size=8) for i in range(2)]
    bad_shape = engine.add_session("flat", _session(loaded), None, fps=1.0, inbox_size=8)
    bad_type = engine.add_session("floats", _session(loaded), None, fps=1.0, inbox_size=8)
    streams = [_frames(3, 1.0, seed=30 + i) for i in range(2)]
    for k in range(3):
        for stream, frames in zip(good, streams):
            stream.frames.put(frames[k])
    bad_shape.frames.put((np.zeros((24, 32), np.uint8)[..., None].repeat(2, -1), 0.0))  # two channels
    bad_type.frames.put((np.zeros((24, 32, 3), np.float32), 0.0))
    taken = [engine.step(timeout=0) for _ in range(3)]
    assert taken == [4, 2, 2]
    assert bad_shape.state == bad_type.state == "failed"
    assert bad_shape.error.startswith("FrameError: session 'flat', frame at 0 s: ValueError: expected a uint8 HxWx3")
    assert "(24, 32, 2)" in bad_shape.error
    assert bad_type.error.startswith("FrameError: session 'floats', frame at 0 s:") and "float32" in bad_type.error
    assert [s.state for s in good] == ["running", "running"] and engine.error is None
    for i, (stream, frames) in enumerate(zip(good, streams)):
        lone = _session(loaded, seed=i)
        for frame, t in frames:
            lone.add_frame(frame, t)
        _assert_same_memory(stream.session, lone)
    assert bad_shape.session.snapshot() is None  # nothing of the bad frame reached its memory


def test_under_the_stop_policy_a_bad_frame_stops_the_engine_naming_its_session(loaded):
    engine = Engine(play_speed=float("inf"))  # on_error="stop", the CLI's policy
    good = engine.add_session("good", _session(loaded), None, fps=1.0)
    bad = engine.add_session("bad", _session(loaded), None, fps=1.0)
    good.frames.put(_frames(1, 1.0, seed=40)[0])
    bad.frames.put(("not a frame", 0.0))
    with pytest.raises(Exception, match="session 'bad', frame at 0 s"):
        engine.step(timeout=0)
    assert good.frames_ingested == 1  # the tick's other frame went in before the engine stopped


def test_device_preprocessing_of_a_tick_stays_within_the_processors_tolerance(loaded):
    """`device_preprocess` (CUDA's default; forced here on the CPU): a tick's frames of each size preprocessed
    together in torch, within the bounds tests/test_extract_pipeline.py holds DevicePreprocessor to against
    the processor's PIL path; a frame the device path cannot take goes through the host path and its error."""
    from flash_vstream.mm_utils import process_images
    from flash_vstream.serve.batching import IngestBatcher

    sessions = [_session(loaded, seed=i) for i in range(5)]
    frames = [f for i, size in enumerate([(24, 32), (24, 32), (40, 40), (16, 48)]) for f, _ in _frames(1, 1.0, i, size)]
    frames.append(np.zeros((24, 32, 2), np.uint8))  # two channels: the host path's error
    items = [(f"s{i}", s, f, 0.0) for i, (s, f) in enumerate(zip(sessions, frames))]
    batcher = IngestBatcher(device_preprocess=True)
    pixels = batcher._preprocess(items, range(len(items)))
    for i, frame in enumerate(frames[:4]):
        expected = process_images([frame], loaded[2], loaded[1].config.image_aspect_ratio)
        diff = (pixels[i] - expected).abs()
        assert pixels[i].shape == expected.shape and diff.mean() <= 0.005 and diff.max() <= 0.35, i
    assert isinstance(pixels[4], ValueError) and "session 's4'" in str(pixels[4]) and "(24, 32, 2)" in str(pixels[4])
    results = batcher.ingest(items[:4])  # and the tick goes through: one snapshot each
    assert [r.frames_seen for r in results] == [1, 1, 1, 1]
