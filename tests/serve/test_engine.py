"""The realtime engine: the real threads around sessions -- one session as the CLI runs it, several
sessions on one model, the scheduling rule shared with the synchronous core."""

import threading
import time

import numpy as np
import pytest
import torch

from flash_vstream.model.builder import load_pretrained_model
from flash_vstream.serve.engine import END_OF_STREAM, Due, Engine
from flash_vstream.serve.session import EmptyStreamError, MemorySnapshot, QuestionSchedule, StreamSession
from flash_vstream.serve.sources import FrameSource, open_source
from flash_vstream.video_io import VideoReadError

MAX_NEW_TOKENS = 8
INF = float("inf")


# ------------------------------------------------------------------------------ one session's roles

class _StubSession:
    """Stands in for StreamSession: counts frames, optionally slow or failing."""

    def __init__(self, delay=0.0, fail_at=None):
        self.delay, self.fail_at = delay, fail_at
        self.frames = 0
        self._snapshot = None

    def add_frame(self, frame, t):
        if self.fail_at is not None and self.frames + 1 == self.fail_at:
            raise RuntimeError("encoder exploded")
        time.sleep(self.delay)
        self.frames += 1
        self._snapshot = MemorySnapshot(tokens=torch.zeros(1, 2), frames_seen=self.frames, stream_time=t,
                                        timestamps={"temporal": [], "retrieved": [], "spatial": [t]},
                                        temporal_weights=[], temporal_spans=[])
        return self._snapshot

    def snapshot(self):
        return self._snapshot


def _noise(n=None, live=False):
    def frames():
        k = 0
        while n is None or k < n:
            yield np.zeros((4, 4, 3), np.uint8), float(k)
            k += 1

    return FrameSource("test", "noise", live=live, _open=frames)


def _drain_until_end(engine, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        item = engine.next_work()
        if item is END_OF_STREAM or engine.error is not None:
            return item
    raise AssertionError("no end of stream")


def test_live_source_drops_the_oldest_frames_when_the_handler_lags():
    engine = Engine(_StubSession(delay=0.01), _noise(300, live=True), play_speed=float("inf"),
                    inbox_size=4).start()
    assert engine.drop_oldest
    assert _drain_until_end(engine) is END_OF_STREAM
    assert engine.join() == []
    assert engine.frames_dropped > 0 and engine.frames_produced == 300
    assert engine.frames_ingested + engine.frames_dropped == 300
    assert engine.session.snapshot().stream_time == 299.0  # the newest frame always gets in


def test_file_source_blocks_instead_of_dropping():
    engine = Engine(_StubSession(delay=0.002), _noise(60), play_speed=float("inf"),
                    inbox_size=2).start()
    assert _drain_until_end(engine) is END_OF_STREAM
    assert engine.join() == [] and engine.frames_dropped == 0 and engine.frames_ingested == 60


def test_an_error_in_one_role_stops_the_others():
    engine = Engine(_StubSession(fail_at=5), _noise(None), play_speed=float("inf"),
                    inbox_size=2).start()  # an endless source, blocked on a full queue
    _drain_until_end(engine)
    assert engine.join(10) == []  # both threads ended
    role, error, trace = engine.error
    assert role == "frame handler" and "encoder exploded" in str(error) and "RuntimeError" in trace
    assert engine.frames_ingested == 4 and engine.stopped


def test_a_failure_fails_its_session_only_under_the_session_policy():
    # the server's policy: the failing session ends "failed" with the reason, the others and the lanes go on
    engine = Engine(play_speed=INF, inbox_size=2, on_error="session", keep_running=True)
    bad = engine.add_session("bad", _StubSession(fail_at=3), _noise(None))  # an endless source, blocked
    good = engine.add_session("good", _StubSession(), _noise(20))
    pushed = engine.add_session("pushed", _StubSession(), None, fps=1.0)
    engine.start()
    assert good.ended.wait(30) and bad.ended.wait(30)
    assert (bad.state, bad.error, bad.frames_ingested) == ("failed", "RuntimeError: encoder exploded", 2)
    assert (good.state, good.frames_ingested) == ("ended", 20)
    # the lanes still run: pushed frames go in (one per sample time k / fps; the 0.5 s one is sampled away)
    futures = [engine.push_frame(pushed, np.zeros((4, 4, 3), np.uint8), t, wait=True) for t in (0.0, 0.5, 1.0)]
    assert [f.result(10) is None for f in futures] == [False, True, False]
    assert (pushed.frames_ingested, pushed.frames_dropped, pushed.state) == (2, 1, "running")
    assert engine.error is None and not engine.stopped
    assert engine.counts() == {"running": 1, "ended": 1, "failed": 1}
    assert engine.remove_session("bad") is bad and bad.closed and engine.counts()["failed"] == 0
    engine.stop()
    assert engine.join() == []


def test_paced_file_plays_at_video_fps_times_play_speed():
    engine = Engine(_StubSession(), _noise(6), play_speed=10.0).start()  # 5 s of stream at 10x
    began = time.monotonic()
    assert _drain_until_end(engine) is END_OF_STREAM
    assert 0.45 <= time.monotonic() - began < 5.0
    engine.join()



# ------------------------------------------------------------------------------ the shared schedule rule

def test_the_schedule_rule_around_frames():
    schedule = QuestionSchedule([{"time": 0.5, "question": "before any frame"}, {"time": 1.0, "question": "at 1"},
                                 {"time": 2.5, "question": "between"}, {"time": 9, "question": "after the end"}])
    snapshot = object()  # before_frame only asks whether there is a memory yet
    assert schedule.before_frame(1.0, None) == []  # no memory yet: 0.5 waits for the first frame
    assert [q["question"] for q in schedule.after_frame(1.0)] == ["before any frame", "at 1"]
    assert schedule.before_frame(2.0, snapshot) == [] and schedule.after_frame(2.0) == []
    assert [q["question"] for q in schedule.before_frame(3.0, snapshot)] == ["between"]
    assert schedule.after_frame(3.0) == []
    assert [q["question"] for q in schedule.at_end(snapshot)] == ["after the end"] and len(schedule) == 0

    never = QuestionSchedule([{"time": 1, "question": "q"}])
    with pytest.raises(EmptyStreamError, match="before its first frame"):
        never.at_end(None)
    assert QuestionSchedule([]).at_end(None) == []  # nothing asked: an empty stream is fine


def test_a_stream_without_frames_fails_its_scripted_questions_in_the_engine():
    schedule = QuestionSchedule([{"time": 1, "question": "q"}])
    engine = Engine(_StubSession(), _noise(0), play_speed=INF, schedule=schedule).start()
    _drain_until_end(engine)
    assert engine.join() == []
    role, error, _ = engine.error
    assert role == "frame handler" and isinstance(error, VideoReadError)
    assert str(error) == "noise: the stream ended before its first frame"


# ------------------------------------------------------------------------------ several sessions, one model

@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    tokenizer, model, image_processor, _ = load_pretrained_model(tiny_model_dir, device="cpu")
    return tokenizer, model, image_processor


def _session(loaded):
    tokenizer, model, image_processor = loaded
    return StreamSession(model, tokenizer, image_processor, max_new_tokens=MAX_NEW_TOKENS)


def _answer_all(engine, session_id, records, on_text=None):
    """A question handler for one session (as a server runs one per session): answer each due question."""
    while True:
        item = engine.next_work(session_id=session_id)
        if item is END_OF_STREAM or engine.error is not None:
            return
        if isinstance(item, Due):
            records.append(engine.answer(item.question["question"], item.snapshot, item.at, on_text=on_text,
                                         time_label=item.question["time"], extra=item.question,
                                         session_id=session_id))


def _handler_thread(*args, **kwargs):
    thread = threading.Thread(target=_answer_all, args=args, kwargs=kwargs, daemon=True)
    thread.start()
    return thread


def test_two_sessions_in_one_engine_give_what_two_lone_sessions_give(loaded, example_mp4):
    sources = {"file": lambda: open_source(video_file=example_mp4, max_frames=6),
               "noise": lambda: open_source(video_source="synthetic:32x32", max_frames=7, seed=1)}
    questions = {"file": [{"time": 2.5, "question": "what is in the video?", "id": "f1"},
                          {"time": 100, "question": "describe the video.", "id": "f2"}],
                 "noise": [{"time": 0, "question": "what is in the video?", "id": "n1"},
                           {"time": 4, "question": "describe the video.", "id": "n2"}]}
    engine = Engine(play_speed=INF, inbox_size=2)  # small queues: the sessions interleave
    for name in sources:
        engine.add_session(name, _session(loaded), sources[name](), schedule=QuestionSchedule(questions[name]))
    records = {name: [] for name in sources}
    engine.start()
    handlers = [_handler_thread(engine, name, records[name]) for name in sources]
    for thread in handlers:
        thread.join(120)
    assert engine.join() == [] and engine.error is None
    assert engine.summary()["sessions"] == {
        "file": {"produced": 6, "ingested": 6, "dropped": 0, "stream_time": 5.0},
        "noise": {"produced": 7, "ingested": 7, "dropped": 0, "stream_time": 6.0}}

    for name in sources:
        lone = _session(loaded)
        expected = lone.run_timeline(list(sources[name]().frames()), questions[name])
        got = records[name]
        assert [r["id"] for r in got] == [r["id"] for r in expected]
        for g, e in zip(got, expected):
            for key in ("time", "question", "answer", "frames_seen", "memory_tokens", "stream_time"):
                assert g[key] == e[key], (name, key)
        mine = engine.stream(name).session.snapshot()
        assert torch.equal(mine.tokens, lone.snapshot().tokens)
        assert mine.timestamps == lone.snapshot().timestamps and mine.frames_seen == lone.snapshot().frames_seen
    assert [r["frames_seen"] for r in records["file"]] == [3, 6]
    assert [r["frames_seen"] for r in records["noise"]] == [1, 5]


def test_one_sessions_long_answer_does_not_hold_up_anothers_ingest(loaded):
    engine = Engine(play_speed=INF)
    engine.add_session("talker", _session(loaded), open_source(video_source="synthetic:32x32", max_frames=3),
                       schedule=QuestionSchedule([{"time": 0, "question": "what is in the video?"}]))
    # 12 frames paced at 10x: the other stream takes about a second of wall time
    other = engine.add_session("other", _session(loaded),
                               open_source(video_source="synthetic:32x32", max_frames=12, seed=2), play_speed=10.0)
    seen = {}

    def slow_reader(piece):  # a client that reads the answer slowly: the answer lasts until the other stream ends
        if "at_first_piece" not in seen:
            seen["at_first_piece"] = other.frames_ingested
            seen["other_ended"] = other.ended.wait(30)
            seen["at_release"] = other.frames_ingested

    records = []
    engine.start()
    talker = _handler_thread(engine, "talker", records, on_text=slow_reader)
    talker.join(60)
    assert engine.join() == [] and engine.error is None
    assert seen["at_first_piece"] < 12  # the answer began while the other stream was still coming in
    assert seen["other_ended"] and seen["at_release"] == 12  # ... and it all came in while the answer ran
    (record,) = records
    assert record["frames_seen"] == 1


def test_each_tick_takes_one_frame_from_every_session(loaded):
    engine = Engine(play_speed=INF)  # not started: the test drives the frame handler's ticks
    frames = list(open_source(video_source="synthetic:32x32", max_frames=4).frames())
    busy = engine.add_session("busy", _session(loaded), _noise(0))
    quiet = engine.add_session("quiet", _session(loaded), _noise(0))
    for item in frames:
        busy.frames.put(item)  # a backlog of four
    quiet.frames.put(frames[0])
    quiet.frames.put(END_OF_STREAM)
    ticks = []
    for _ in range(5):
        ticks.append(engine.step(timeout=0.01))
        ticks[-1] = (ticks[-1], busy.frames_ingested, quiet.frames_ingested)
    # the quiet session's frame goes in with the first tick, not after the busy session's backlog
    assert ticks == [(2, 1, 1), (1, 2, 1), (1, 3, 1), (1, 4, 1), (0, 4, 1)]
    assert quiet.ended.is_set() and not busy.ended.is_set()
    assert engine.next_work(timeout=0, session_id="quiet") is END_OF_STREAM
    with pytest.raises(ValueError, match="2 sessions"):
        engine.stream()
    with pytest.raises(ValueError, match="exists already"):
        engine.add_session("busy", _session(loaded), _noise(0))


def test_a_busy_ingest_lane_lets_its_next_tick_gather_and_a_quiet_one_does_not():
    from flash_vstream.serve.engine import GATHER_MIN_FRAMES

    class Timed(_StubSession):
        def add_frame(self, frame, t):
            times.append((t, time.perf_counter()))
            return super().add_frame(frame, t)

    for sessions, paused in ((GATHER_MIN_FRAMES, True), (2, False)):
        times = []
        engine = Engine(on_error="session", keep_running=True, gather_s=0.4, log_every=0)
        streams = [engine.add_session(f"s{i}", Timed(), None, fps=1.0, inbox_size=4) for i in range(sessions)]
        for stream in streams:  # two frames each: two ticks
            for t in (0.0, 1.0):
                stream.frames.put((np.zeros((4, 4, 3), np.uint8), t))
        engine.start()
        deadline = time.monotonic() + 10
        while len(times) < 2 * sessions and time.monotonic() < deadline:
            time.sleep(0.01)
        engine.stop()
        engine.join()
        first_tick = min(w for t, w in times if t == 0.0)
        second_tick = min(w for t, w in times if t == 1.0)
        assert (second_tick - first_tick >= 0.35) == paused, (sessions, second_tick - first_tick)
    with pytest.raises(ValueError, match="gather_s"):
        Engine(gather_s=-1)
