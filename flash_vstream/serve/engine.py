"""The engine: one model, sessions as state, the lanes that drive the model.

The realtime CLI (one session) and the streaming server (many sessions, added and removed while it
runs) run this one engine. A session is a `Stream`: the `StreamSession` (its STAR memory on the shared
model), a bounded `Inbox` of frames, its questions, an optional scripted `QuestionSchedule`, its
state and counters. The roles around the sessions:

  frame source   one thread per session that reads a source (file, camera, URL, one-shot media);
                 it decodes and paces the frames to the wall clock at `video_fps x play_speed` and
                 puts them into the inbox. Pushed frames (`push_frame`) need no thread.
  ingest lane    one thread for all sessions; each tick (`step`) takes at most one queued frame from
                 every running session, round robin, and ingests them (CLIP encode + memory update +
                 publish). It is the one place that feeds frames to the model: where the sessions'
                 frames can later become one CLIP batch (`_ingest` gets the whole tick).
  answer lane    where a question is answered from the snapshot it was asked on: `answer_lane=True`
                 runs one thread that takes the queued questions (`ask`) of the sessions round robin
                 and answers up to `max_batch` of them at once by continuous batching
                 (runtime/batch_decoder.py: questions of different sessions share prefill and decode
                 steps, join at the next step and leave when done; a question alone keeps the
                 session's fast path) -- the server; without it `answer` runs `StreamSession.ask` on
                 the caller's thread (the CLI's main thread, or a thread per session).

Why threads and not processes (the published CLI used three processes): torch releases the GIL
inside every kernel and PyAV while decoding, so the roles overlap on CPU and GPU; threads share the
model weights as they are and hand a snapshot over by reference, where the published design pickled
the model into another process and copied the whole, ever-growing frame buffer through a Manager
list on every update. On a CPU each role runs its own torch thread team; on a busy machine set
OMP_NUM_THREADS to about half the cores so the two teams do not spin against each other.

Who waits for whom: ingesting never waits for answers (the ingest lane only publishes snapshots and
queues due questions); an answer takes a snapshot and never waits for the frame backlog. An inbox
is bounded: a file or synthetic source waits for room (no frame is dropped, so a scripted run is
deterministic); a live source (camera, URL) and pushed frames push out the oldest queued frame and
count it as dropped. Every wait has a timeout (POLL_S); the end of a stream travels through the
inbox as END_OF_STREAM, so a session ends once its last frame is in the memory.

Failures follow `on_error`: "stop" (the CLI) -- the first error in any role stops every role and
`error` holds it; "session" (the server) -- a failing source or frame fails its session only (state
"failed", the memory stays for questions until the session is removed), a failing answer goes to
its asker, and the lanes go on.

Scripted questions: a session's `QuestionSchedule` says which questions are due around each frame
(the rule `StreamSession.run_timeline` runs synchronously); the ingest lane hands each due question,
with the exact snapshot it is due on, to the session's work queue (`next_work`) and goes on
ingesting, so the answers do not depend on timing. Callbacks (`on_text`, futures) run on the lanes'
threads; an async caller hands them to its event loop.
"""

import collections
import concurrent.futures
import dataclasses
import math
import queue
import threading
import time
import traceback

from ..video_io import VideoReadError
from .batching import IngestBatcher
from .session import EmptyStreamError, state_nbytes
from .telemetry import EventLog, LatencyStats, role_stats, rss_bytes

POLL_S = 0.1  # every wait wakes at least this often to look at the stop flag
LAG_SAMPLES = 1024  # a session's ingest-lag percentiles are over (a reservoir of) this many frames
JOIN_TIMEOUT_S = 10.0
DEFAULT_SESSION = "main"  # the id of the session given to the constructor (the CLI's one session)
GATHER_MIN_FRAMES = 16  # a tick of this many frames or more: the next one may gather (`gather_s`)
WORK_ROOM = 256  # a work queue's room beyond the scripted questions: lines a person types
STATES = ("running", "ended", "failed")
ON_ERROR = ("stop", "session")


class Control:
    """A control message travelling through a queue."""

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f"<{self.name}>"


END_OF_STREAM = Control("end of stream")
STOP = Control("stop")


class SessionError(Exception):
    """A request the session cannot take now; `status` is the HTTP status that says why."""

    def __init__(self, status, code, message):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclasses.dataclass
class Due:
    """A scripted question that became due, with the snapshot it is answered from."""

    question: dict
    snapshot: object
    at: float  # perf_counter when it became due


@dataclasses.dataclass
class QuestionJob:
    """A question on its way through the answer lane; `future` gives its `AnswerResult`."""

    question: str
    snapshot: object  # the MemorySnapshot the question is answered from
    on_text: object = None  # on_text(piece), on the thread that answers
    max_tokens: int | None = None  # None: the session's own settings
    temperature: float | None = None
    arrived: float = dataclasses.field(default_factory=time.perf_counter)
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)
    started: float | None = None


@dataclasses.dataclass
class AnswerResult:
    answer: object  # session.Answer
    wait_s: float  # arrival (or due time) -> the answer began
    cancelled: bool

    @property
    def ttft_s(self):
        return None if self.answer.ttft_s is None else self.wait_s + self.answer.ttft_s

    @property
    def latency_s(self):
        return self.wait_s + self.answer.answer_s


class Inbox:
    """A session's bounded queue of frames ((frame, t, future or None)) for the ingest lane, and the
    END_OF_STREAM marker (never refused). It shares the engine's condition, so a put wakes the lane."""

    def __init__(self, condition, size):
        if size < 1:
            raise ValueError(f"an inbox holds at least one frame, got {size}")
        self._cond, self.size = condition, int(size)
        self._items = collections.deque()

    def put(self, item, drop_oldest=False, give_up=None):
        """Queue `item` ((frame, t), (frame, t, future) or END_OF_STREAM). When the inbox is full,
        `drop_oldest` pushes out the oldest frames; otherwise it waits for room until `give_up()`.
        Returns the items pushed out ([] for none), or None when it gave up."""
        if item is not END_OF_STREAM and len(item) == 2:
            item = (*item, None)
        dropped = []
        with self._cond:
            while item is not END_OF_STREAM and len(self._items) >= self.size:
                if drop_oldest:
                    dropped.append(self._items.popleft())
                elif give_up is not None and give_up():
                    return None
                else:
                    self._cond.wait(POLL_S)
            self._items.append(item)
            self._cond.notify_all()
        return dropped

    def get_nowait(self):
        """The oldest item, or None when empty."""
        with self._cond:
            if not self._items:
                return None
            self._cond.notify_all()  # a source waiting for room
            return self._items.popleft()

    def clear(self):
        """Empty the inbox; returns what it held."""
        with self._cond:
            items = list(self._items)
            self._items.clear()
            self._cond.notify_all()
        return items

    def qsize(self):
        return len(self._items)

    def __len__(self):
        return len(self._items)


class Stream:
    """One session as the engine holds it. Counters and state change on the engine's threads (state
    under the engine's lock)."""

    def __init__(self, condition, stream_id, session, source=None, schedule=None, play_speed=1.0, inbox_size=8,
                 drop_oldest=None, fps=None, public=None, hidden=False, frame_limit=None, end_is_failure=False):
        if not play_speed > 0:
            raise ValueError(f"play_speed must be > 0 (inf: as fast as possible), got {play_speed}")
        self.id = stream_id
        self.session = session  # StreamSession (or anything with add_frame / snapshot / ask)
        # a sources.FrameSource, a callable that opens one (in the source thread: opening may block or
        # fail), or None for pushed frames
        self.source = source
        self.schedule = schedule  # QuestionSchedule or None
        self.play_speed = float(play_speed)
        if drop_oldest is None and not callable(source):  # an opener's source says when it opens
            drop_oldest = True if source is None else source.live
        self.drop_oldest = drop_oldest
        self.fps = fps
        self.public = public  # what a client sees of the source, e.g. {"type": "file", "path": ...}
        self.hidden = hidden  # not listed (a one-shot request's session)
        self.frame_limit = frame_limit  # a source giving more frames fails the session
        self.end_is_failure = end_is_failure  # a live source has no natural end: its end fails the session
        self.frames = Inbox(condition, inbox_size)  # source / pushes -> ingest lane
        self.questions = collections.deque()  # QuestionJob, for the answer lane thread
        # ingest lane and question readers -> the caller's question handler; never fills in practice:
        # it holds at most the scripted questions (already in memory) plus what a person types
        self.work = queue.Queue(maxsize=(len(schedule) if schedule else 0) + WORK_ROOM)
        self.state = "running"
        self.error = None  # why it failed, in words
        self.failure = None  # the exception that failed it
        self.ended = threading.Event()  # the state left "running" (its last frame is in the memory, or it failed)
        self.closed = False  # removed from the engine
        self.end_queued = False
        self.frames_produced = self.frames_ingested = self.frames_dropped = 0
        self.stream_time = None  # timestamp of the newest ingested frame
        self.last_timestamp = None  # newest pushed timestamp (pushed frames must increase)
        self.next_sample_t = None  # pushed frames before this stream time are sampled away
        self.created = time.time()
        self.last_active = time.monotonic()
        self.connections = 0  # clients attached (WebSockets)
        self.busy = 0  # frames or answers a lane is running now
        self.reader = None  # the source thread
        # ingest lag: a frame's arrival (a push received, a source's frame released) -> in the memory
        self.ingest_lag = LatencyStats(capacity=LAG_SAMPLES)
        self.unlanded = {}  # the future of each frame queued or being ingested -> its arrival (perf_counter)

    @property
    def kind(self):
        if self.public is not None:
            return self.public.get("type", "push")
        return "push" if self.source is None else getattr(self.source, "kind", "source")

    def counts(self):
        return {"produced": self.frames_produced, "ingested": self.frames_ingested,
                "dropped": self.frames_dropped, "stream_time": self.stream_time}

    def oldest_unlanded(self):
        """perf_counter arrival of the oldest frame not in the memory yet, or None."""
        return min(self.unlanded.copy().values(), default=None)  # copy(): atomic while other threads add and pop

    def describe(self):
        snapshot = self.session.snapshot() if self.session is not None else None
        lag = self.ingest_lag.summary()
        return {
            "id": self.id,
            "object": "session",
            "state": self.state,
            "source": dict(self.public or {}),
            "fps": self.fps,
            "frames_seen": 0 if snapshot is None else snapshot.frames_seen,
            "stream_time": 0.0 if snapshot is None else snapshot.stream_time,
            "memory_tokens": 0 if snapshot is None else snapshot.num_tokens,
            "dropped_frames": self.frames_dropped,
            "error": self.error,
            "created": int(self.created),
            "frames_ingested": self.frames_ingested,
            "queued_frames": len(self.frames),
            "ingest_lag_s": {"count": lag["count"], "last": self.ingest_lag.last, "p50": lag["p50"],
                             "p99": lag["p99"], "max": lag["max"]},
        }


def _one(name):
    return property(lambda self: getattr(self.stream(), name), doc=f"the one session's `{name}`")


class Engine:
    """Sessions keyed by id, their source threads, the ingest lane and the answer lane.

    `Engine(session, source, ...)` is the one-session engine the CLI runs (id DEFAULT_SESSION);
    `Engine(...)` then `add_session(id, session, source, ...)` holds several sessions, which may share
    one model; `add_session` works while the engine runs (the new session's source thread starts at
    once) and `remove_session` forgets one. `play_speed`, `inbox_size` and `drop_oldest` are defaults
    for every session. The ingest lane ends when every session it holds has ended (the CLI's lifetime)
    unless `keep_running` (a server that keeps adding sessions). `max_pending_questions` bounds each
    session's queued questions; `metrics` (the server's Prometheus counters) is fed beside `stats`.
    `max_batch` bounds the answers the answer lane thread runs at once (batched; 1: one at a time) and
    `batch_prefill_tokens` the prompt tokens joining its batch in one step; `batch_graphs` (None: on CUDA)
    captures its decode step as CUDA graphs. `lone_fast_path` (None: on CUDA): a question alone, of a session
    without a fast path of its own (the server's), runs on one `FastPath` decoder of the engine's, whose
    memory prefix the idle lane keeps for the newest snapshot while one session runs (as the CLI's session
    does after every frame); `warm_up_answers` builds it. `gather_s`: after a tick of at least GATHER_MIN_FRAMES
    frames the lane lets the next one gather for up to this long (from the tick's start), so that a tick's fixed
    host cost (launching the CLIP tower's layers and the memory update, whatever the batch) is spread over more
    frames and leaves the GIL to the answer lane; a tick of fewer frames (a few streams) is followed at once.
    `batch_ingest` (default) ingests each tick's frames of all
    sessions together (one CLIP batch, one memory update); False: one session after another.
    """

    def __init__(self, session=None, source=None, *, schedule=None, play_speed=1.0, inbox_size=8, drop_oldest=None,
                 on_error="stop", answer_lane=False, keep_running=False, max_pending_questions=None, log=None,
                 log_every=100, metrics=None, max_batch=16, batch_prefill_tokens=8192, batch_graphs=None,
                 lone_fast_path=None, batch_ingest=True, gather_s=0.0):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        # the answer lane thread: up to max_batch answers at once, batched (1: one at a time); the prompt
        # tokens that may join the batch in one step
        self.max_batch, self.batch_prefill_tokens = max_batch, int(batch_prefill_tokens)
        self.batch_graphs = batch_graphs  # the batch's decode step as CUDA graphs (None: on CUDA)
        self.lone_fast_path = lone_fast_path  # the engine's own fast path for a lone question (None: on CUDA)
        self._lone = None  # its GreedyDecoder, built with the batch
        self._batch = None  # the answer lane's BatchDecoder, built at its first batched question
        self.batch_ingest = bool(batch_ingest)
        if not gather_s >= 0:
            raise ValueError(f"gather_s must be >= 0 seconds, got {gather_s!r}")
        self.gather_s = float(gather_s)  # a busy lane's least time from one tick's start to the next
        self._batcher = IngestBatcher()  # the sessions' shared memory stacks (batch_ingest)
        self.play_speed = play_speed  # defaults for add_session (checked there)
        self.inbox_size = inbox_size
        self.default_drop_oldest = drop_oldest  # None: drop when the source is live
        self.on_error = on_error
        self.answer_lane = answer_lane
        self.keep_running = keep_running
        self.max_pending_questions = max_pending_questions
        self.log = log or EventLog()
        self.log_every = log_every
        self.metrics = metrics
        self.stop_event = threading.Event()
        self.error = None  # (role, exception, formatted traceback) of the first failure (on_error="stop")
        self._error_lock = threading.Lock()
        self.stats = role_stats()  # shared by all sessions
        self._lock = threading.Condition()  # sessions, their state, inboxes and question queues
        # the answer lane waits on this one (same lock): a question, a stop or the end of an ingest tick wakes it,
        # not every frame queued or taken (each would have it scan every session's questions again)
        self._answer_wake = threading.Condition(self._lock)
        self._streams = {}  # id -> Stream, in the order added
        self._turn = 0  # round robin: the ingest tick's first session
        self._answer_turn = 0  # round robin: where the answer lane looks first
        self._threads = []
        self._started = False
        if session is not None:
            self.add_session(DEFAULT_SESSION, session, source, schedule=schedule)

    # --- sessions -------------------------------------------------------------------------------
    def add_session(self, stream_id, session, source=None, schedule=None, play_speed=None, inbox_size=None,
                    drop_oldest=None, **options):
        """Hold `session` under `stream_id`, fed from `source` (see `Stream`; None: pushed frames); its
        source thread starts with the engine (at once when the engine runs already). Returns the `Stream`."""
        stream = Stream(self._lock, stream_id, session, source, schedule,
                        self.play_speed if play_speed is None else play_speed, inbox_size or self.inbox_size,
                        self.default_drop_oldest if drop_oldest is None else drop_oldest, **options)
        with self._lock:
            if stream_id in self._streams:
                raise ValueError(f"session {stream_id!r} exists already")
            self._streams[stream_id] = stream
            if self._started:
                self._start_source(stream)
        return stream

    def remove_session(self, stream_id):
        """Close and forget a session: its memory goes with the last reference (a lane running one of its
        frames or answers finishes that first). Returns the `Stream`, or None when there is none."""
        with self._lock:
            stream = self._streams.pop(stream_id, None)
            if stream is None:
                return None
            self._close_locked(stream)
        if stream.reader is not None and stream.reader is not threading.current_thread():
            stream.reader.join(5.0)
        return stream

    def _close_locked(self, stream):
        stream.closed = True
        if stream.state == "running":
            stream.state = "ended"
        self._resolve_dropped(stream.frames.clear())
        for job in stream.questions:
            job.cancelled.set()
            if not job.future.done():
                job.future.set_exception(SessionError(409, "session_closed", "the session was closed"))
        stream.questions.clear()
        stream.ended.set()
        self._lock.notify_all()

    def stream(self, stream_id=None):
        """The `Stream` of `stream_id` (None: of the one session of a one-session engine)."""
        with self._lock:
            if stream_id is not None:
                return self._streams[stream_id]
            if len(self._streams) != 1:
                raise ValueError(f"the engine holds {len(self._streams)} sessions: name one")
            return next(iter(self._streams.values()))

    def streams(self):
        with self._lock:
            return list(self._streams.values())

    def is_open(self, stream):
        return not stream.closed and self._streams.get(stream.id) is stream

    # one-session shorthands (the CLI's engine)
    session = _one("session")
    drop_oldest = _one("drop_oldest")
    frames_produced = _one("frames_produced")
    frames_ingested = _one("frames_ingested")
    frames_dropped = _one("frames_dropped")
    stream_time = _one("stream_time")

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self):
        # daemon threads: a source stuck inside a blocking network read must not keep the process
        # alive after a stop; every loop otherwise ends on the stop flag within POLL_S
        with self._lock:
            self._started = True
            self._start_thread("frame handler", self._ingest_loop)
            if self.answer_lane:
                self._start_thread("question handler", self._answer_loop)
            for stream in self._streams.values():
                self._start_source(stream)
        return self

    def _start_thread(self, role, target, stream=None):
        name = role if stream is None else f"{role} ({stream.id})"
        thread = threading.Thread(target=self._guarded, args=(role, target, stream), name=name, daemon=True)
        self._threads.append(thread)
        thread.start()
        return thread

    def _start_source(self, stream):
        if stream.source is not None:
            stream.reader = self._start_thread("frame source", lambda: self._source_loop(stream), stream)

    def stop(self):
        """Ask every role to stop: the flag, a wake-up for the lanes, a STOP message for each work queue's
        reader, and questions not begun yet are refused."""
        self.stop_event.set()
        with self._lock:
            for stream in self._streams.values():
                for job in stream.questions:
                    if not job.future.done():
                        job.future.set_exception(SessionError(503, "stopping", "the engine is stopping"))
                stream.questions.clear()
                try:
                    stream.work.put_nowait(STOP)
                except queue.Full:
                    pass  # the reader sees the flag within POLL_S
            self._lock.notify_all()
            self._answer_wake.notify_all()

    @property
    def stopped(self):
        return self.stop_event.is_set()

    def join(self, timeout=JOIN_TIMEOUT_S):
        """Wait for the engine's threads; returns the names of those still running."""
        deadline = time.monotonic() + timeout
        for thread in list(self._threads):
            thread.join(max(0.0, deadline - time.monotonic()))
        return [t.name for t in self._threads if t.is_alive()]

    def _guarded(self, role, target, stream=None):
        try:
            target()
        except BaseException as error:  # noqa: BLE001 - handled by the failure policy
            self.fail(role, error, stream)

    # --- failures -------------------------------------------------------------------------------
    def fail(self, role, error, stream=None):
        """A role failed (on `stream`, when it is one session's). on_error="stop", or a failure outside any
        session: record the first error and stop everything; "session": fail that session only."""
        if self.on_error == "stop" or stream is None:
            with self._error_lock:
                if self.error is None:
                    self.error = (role, error, traceback.format_exc())
                    where = {} if stream is None else {"session": stream.id}
                    self.log.write("error", role=role, error=f"{type(error).__name__}: {error}",
                                   traceback=self.error[2], **where)
            self.stop()
            return
        reason = error.message if isinstance(error, SessionError) else f"{type(error).__name__}: {error}"
        with self._lock:
            if stream.closed or stream.state == "failed":
                return
            stream.state = "failed"
            stream.error = reason
            stream.failure = error
            self._resolve_dropped(stream.frames.clear())
            stream.ended.set()
            self._lock.notify_all()
        self.log.write("error", role=role, error=reason, traceback=traceback.format_exc(), session=stream.id)
        if self.metrics is not None:
            self.metrics.sessions_failed.inc()

    def _leaving(self, stream):
        return self.stopped or stream.closed or stream.state != "running"

    # --- frames in ------------------------------------------------------------------------------
    def _put_frame(self, stream, item, drop_oldest):
        """Into the session's inbox (waiting for room unless `drop_oldest`). True if it went in."""
        dropped = stream.frames.put(item, drop_oldest=drop_oldest, give_up=lambda: self._leaving(stream))
        if dropped is None:
            return False
        stream.last_active = time.monotonic()
        stream.frames_dropped += len(dropped)
        if dropped and self.metrics is not None:
            self.metrics.frames_dropped.labels(reason="backlog").inc(len(dropped))
        self._resolve_dropped(dropped)
        return True

    @staticmethod
    def _resolve_dropped(items):
        for item in items:
            if item is not END_OF_STREAM and item[2] is not None and not item[2].done():
                item[2].set_result(None)

    def _landing(self, stream, arrived=None):
        """The future a queued frame carries: the ingest lane resolves it with the snapshot once the frame
        is in the memory (or with None when it is dropped); then the frame's lag is counted."""
        future = concurrent.futures.Future()
        stream.unlanded[future] = time.perf_counter() if arrived is None else arrived

        def landed(done):
            arrived = stream.unlanded.pop(done, None)
            if arrived is None or done.cancelled() or done.exception() is not None or done.result() is None:
                return
            lag = time.perf_counter() - arrived
            stream.ingest_lag.add(lag)
            if self.metrics is not None:
                self.metrics.ingest_lag.observe(lag)

        future.add_done_callback(landed)
        return future

    def push_frame(self, stream, frame, timestamp, wait=False, arrived=None):
        """A pushed frame (uint8 (H, W, 3)) at `timestamp` seconds, sampled at the session's fps (the first
        frame at or after each sample time k / fps is taken, as a camera source samples). Returns a future
        resolved once it is in the memory (with the snapshot) or dropped (None); `wait=False`: at once.
        `arrived` (perf_counter): when the frame reached the server, where its ingest lag starts (default now)."""
        timestamp = float(timestamp)
        future = concurrent.futures.Future()
        with self._lock:
            self._check_open(stream)
            if stream.source is not None:
                raise SessionError(409, "not_a_push_session", f"session {stream.id} reads its own "
                                   f"{stream.kind} source; frames can be pushed to push sessions only")
            if stream.state != "running" or stream.end_queued:
                raise SessionError(409, "session_not_running", f"session {stream.id} is {stream.state}")
            if stream.last_timestamp is not None and not timestamp > stream.last_timestamp:
                raise SessionError(400, "non_increasing_timestamp",
                                   f"timestamp {timestamp} is not after the previous frame's {stream.last_timestamp}")
            stream.last_timestamp = timestamp
            stream.last_active = time.monotonic()
            if stream.next_sample_t is not None and timestamp + 1e-6 < stream.next_sample_t:
                stream.frames_dropped += 1  # sampled faster than the session's fps
                if self.metrics is not None:
                    self.metrics.frames_dropped.labels(reason="fps").inc()
                future.set_result(None)
                return future
            stream.next_sample_t = (math.floor(timestamp * stream.fps + 1e-6) + 1) / stream.fps
            stream.frames_produced += 1
            landing = self._landing(stream, arrived)
            self._put_frame(stream, (frame, timestamp, landing), drop_oldest=True)
        if not wait:
            future.set_result(None)
            return future
        return landing

    def end(self, stream):
        """No more frames for `stream` (a push client said so): it ends once its queued frames are in."""
        with self._lock:
            if stream.state != "running" or stream.end_queued:
                return
            stream.end_queued = True
            stream.frames.put(END_OF_STREAM)

    def _check_open(self, stream):
        if not self.is_open(stream):
            raise SessionError(404, "session_not_found", f"no session {stream.id!r}")

    # --- frame source ---------------------------------------------------------------------------
    def _source_loop(self, stream):
        """Decode the source, pace it to the wall clock, feed the inbox; END_OF_STREAM at its end."""
        source = stream.source() if callable(stream.source) else stream.source
        drop_oldest = source.live if stream.drop_oldest is None else stream.drop_oldest
        stream.drop_oldest = drop_oldest
        frames = source.frames()
        wall0 = t0 = None
        try:
            while True:
                if self._leaving(stream):
                    return
                began = time.perf_counter()
                try:
                    frame, t = next(frames)
                except StopIteration:
                    break
                self.stats["frame_decode"].add(time.perf_counter() - began)
                if stream.frame_limit is not None and stream.frames_produced >= stream.frame_limit:
                    raise SessionError(413, "video_too_long", f"the video has more than {stream.frame_limit} "
                                       f"frames at {stream.fps:g} fps")
                if wall0 is None:
                    wall0, t0 = time.perf_counter(), t
                # play at video_fps x play_speed: the frame at stream time t is released at t / play_speed
                delay = wall0 + (t - t0) / stream.play_speed - time.perf_counter()
                if delay > 0 and self.stop_event.wait(delay):
                    return
                if not self._put_frame(stream, (frame, t, self._landing(stream)), drop_oldest):
                    return
                stream.frames_produced += 1
        finally:
            frames.close()
        if stream.end_is_failure and not stream.closed:
            raise SessionError(502, "source_stopped", f"the live source stopped after {stream.frames_produced} "
                               "frames (end of stream: the connection closed or the source stopped sending)")
        if not self._leaving(stream):
            self.end(stream)

    # --- ingest lane ----------------------------------------------------------------------------
    def _ingest_loop(self):
        while not self.stopped and (self.keep_running or not all(s.ended.is_set() for s in self.streams())):
            began = time.perf_counter()
            if self.step() >= GATHER_MIN_FRAMES and self.gather_s > 0:
                self.stop_event.wait(max(0.0, began + self.gather_s - time.perf_counter()))

    def step(self, timeout=POLL_S):
        """One tick of the ingest lane: at most one queued item from every running session, round robin
        (a session with a fast source or a backlog gets one frame per tick like the others), then the
        tick's frames are ingested. Waits up to `timeout` when nothing is queued. Returns the frames taken."""
        with self._lock:
            streams = [s for s in self._streams.values() if s.state == "running"]
            if streams:
                first = self._turn % len(streams)
                streams = streams[first:] + streams[:first]
                self._turn += 1
            batch = []  # (stream, (frame, t, future) or END_OF_STREAM)
            for stream in streams:
                item = stream.frames.get_nowait()
                if item is not None:
                    stream.busy += 1
                    batch.append((stream, item))
            if not batch and timeout and not self.stopped:
                self._lock.wait(timeout)
        self._ingest(batch)
        return sum(item is not END_OF_STREAM for _, item in batch)

    def _ingest(self, batch):
        """The tick's items, one per session: END_OF_STREAM ends its session; each frame goes in between the
        questions due before it and those due with it. With `batch_ingest` the tick's frames go in together
        (`batching.IngestBatcher`: one CLIP batch, one memory update of all the memories), else one session
        after another. A failed frame fails its session (on_error="session") or, after the tick's bookkeeping,
        stops the engine (on_error="stop")."""
        frames, first_error = [], None
        for stream, item in batch:
            batched = False
            try:
                if self.stopped:
                    pass
                elif item is END_OF_STREAM:
                    self._end(stream)
                elif not self.batch_ingest:
                    self._ingest_one(stream, *item)
                else:
                    self._before_frame(stream, item[1])
                    frames.append((stream, item))
                    batched = True  # done below, once the tick's frames are in
            except BaseException as error:  # noqa: BLE001 - handled by the failure policy
                first_error = self._frame_failed(stream, item, error) or first_error
            if not batched:
                self._done(stream)
        if frames:
            began = time.perf_counter()
            try:
                results = self._batcher.ingest([(s.id, s.session, frame, t) for s, (frame, t, _) in frames])
            except BaseException as error:  # noqa: BLE001 - the batch as a whole failed: each of its frames
                results = [error] * len(frames)
            elapsed = time.perf_counter() - began  # every frame of the tick is in the memory after all of it
            for (stream, item), result in zip(frames, results):
                try:
                    if isinstance(result, BaseException):
                        raise result
                    self._landed(stream, item[1], item[2], result, elapsed)
                except BaseException as error:  # noqa: BLE001 - handled by the failure policy
                    first_error = self._frame_failed(stream, item, error) or first_error
                finally:
                    self._done(stream)
        if batch and self._lone is not None:  # the idle answer lane keeps the lone prefix on the newest snapshot
            with self._lock:
                self._answer_wake.notify_all()
        if first_error is not None:
            raise first_error

    def _frame_failed(self, stream, item, error):
        """The failure policy for one item; returns the error to raise at the end of the tick (on_error="stop")."""
        if item is not END_OF_STREAM and item[2] is not None and not item[2].done():
            item[2].set_exception(error)
        if self.on_error == "stop":
            return error
        self.fail("frame handler", error, stream)
        return None

    def _ingest_one(self, stream, frame, t, future):
        """One session's frame on its own (`batch_ingest=False`): `StreamSession.add_frame`."""
        self._before_frame(stream, t)
        began = time.perf_counter()
        snapshot = stream.session.add_frame(frame, t)
        self._landed(stream, t, future, snapshot, time.perf_counter() - began)

    def _before_frame(self, stream, t):
        if stream.schedule is not None:
            before = stream.session.snapshot()
            self._due(stream, stream.schedule.before_frame(t, before), before)

    def _landed(self, stream, t, future, snapshot, elapsed):
        """The frame at `t` is in the memory (`snapshot`) after `elapsed` seconds: counters, its future, the
        questions due with it."""
        self.stats["encode_memory_update"].add(elapsed)
        if self.metrics is not None:
            self.metrics.frame_seconds.observe(elapsed)
            self.metrics.frames_ingested.inc()
        stream.frames_ingested += 1
        stream.stream_time = t
        if future is not None:
            future.set_result(snapshot)
        if stream.schedule is not None:
            self._due(stream, stream.schedule.after_frame(t), snapshot)
        if self.log_every and stream.frames_ingested % self.log_every == 0:
            self._progress(stream)

    def _end(self, stream):
        snapshot = stream.session.snapshot()
        if stream.schedule is not None:
            try:
                due = stream.schedule.at_end(snapshot)
            except EmptyStreamError as e:
                raise VideoReadError(f"{stream.source.name}: {e}") from None
            self._due(stream, due, snapshot)
        self._progress(stream, final=True)
        self.log.write("stream_end", session=stream.id, frames=stream.frames_ingested, dropped=stream.frames_dropped,
                       stream_time=stream.stream_time)
        with self._lock:
            if stream.state == "running":
                stream.state = "ended"
            stream.ended.set()
            self._lock.notify_all()
        self._put_work(stream, END_OF_STREAM)

    def _done(self, stream):
        with self._lock:
            stream.busy -= 1
            stream.last_active = time.monotonic()
            self._lock.notify_all()

    def _due(self, stream, questions, snapshot):
        now = time.perf_counter()
        for q in questions:
            self._put_work(stream, Due(q, snapshot, now))

    def _progress(self, stream, final=False):
        memory = getattr(stream.session, "memory", None)
        snapshot = stream.session.snapshot()
        self.log.write("progress", session=stream.id, final=final, frames=stream.frames_ingested,
                       produced=stream.frames_produced, dropped=stream.frames_dropped, stream_time=stream.stream_time,
                       queued=stream.frames.qsize(), memory_tokens=None if snapshot is None else snapshot.num_tokens,
                       state_bytes=None if memory is None else state_nbytes(memory), rss_bytes=rss_bytes())

    # --- the caller's question handler: the work queue ------------------------------------------
    def _put_work(self, stream, item):
        """Blocking put that gives up when stopping. True if the item went in."""
        while not self.stopped:
            try:
                stream.work.put(item, timeout=POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def submit(self, item, session_id=None):
        """For a question reader thread: hand a typed line (or a control message) to the question handler."""
        return self._put_work(self.stream(session_id), item)

    def next_work(self, timeout=POLL_S, session_id=None):
        """The question handler's next item (a `Due` question, a submitted item or a control message), or
        None after `timeout` (0: only what is queued now)."""
        try:
            return self.stream(session_id).work.get(timeout=timeout)
        except queue.Empty:
            return None

    # --- answer lane ----------------------------------------------------------------------------
    def ask(self, stream, question, max_tokens=None, temperature=None, on_text=None, snapshot=None, arrived=None):
        """Queue a question for the answer lane thread, on `snapshot` (None: the memory as it stands now).
        Returns the `QuestionJob` (its `future` gives an `AnswerResult`; `cancelled.set()` ends the answer
        early, e.g. when the client went away)."""
        with self._lock:
            self._check_open(stream)
            snapshot = stream.session.snapshot() if snapshot is None else snapshot
            if snapshot is None:
                raise SessionError(409, "no_frames_yet", f"session {stream.id} has no frames in memory yet")
            if self.max_pending_questions is not None and len(stream.questions) >= self.max_pending_questions:
                raise SessionError(429, "too_many_questions", f"session {stream.id} already has "
                                   f"{self.max_pending_questions} questions waiting")
            job = QuestionJob(question, snapshot, on_text, max_tokens, temperature)
            if arrived is not None:
                job.arrived = arrived
            if self.stopped:
                job.future.set_exception(SessionError(503, "stopping", "the engine is stopping"))
                return job
            stream.questions.append(job)
            stream.last_active = time.monotonic()
            self._answer_wake.notify_all()
        return job

    def answer(self, question, snapshot, due_at, on_text=None, time_label=None, extra=None, session_id=None):
        """Answer `question` from `snapshot` in the session's conversation, counting from `due_at`
        (perf_counter); `on_text(piece)` gets the answer as it is generated. Runs on the answer lane
        thread when there is one, else on this thread. Returns the answer record (`Answer.record`), or
        None when another role's error cut the answer short."""
        stream = self.stream(session_id)
        if self.answer_lane:
            job = self.ask(stream, question, on_text=on_text, snapshot=snapshot, arrived=due_at)
            while not job.future.done():
                concurrent.futures.wait([job.future], timeout=POLL_S)
        else:
            job = QuestionJob(question, snapshot, on_text, arrived=due_at)
            self._run_question(job, stream)
        if self.error is not None:
            return None
        result = job.future.result()  # raises what the answer raised
        record = result.answer.record(time=time_label, wait_s=result.wait_s, extra=extra)
        self.log.write("answer", **record)
        return record

    def _answer_loop(self):
        if self.max_batch > 1:
            self._batched_answer_loop()
            return
        while not self.stopped:
            stream, job = self._next_question()
            if stream is None:
                continue
            try:
                self._run_question(job, stream)
            finally:
                self._done(stream)

    def _next_question(self, skip=(), wait=True):
        """The next (stream, job) in round-robin order over the sessions, passing over those in `skip`, or
        (None, None): after POLL_S when `wait`, else at once."""
        with self._lock:
            streams = list(self._streams.values())
            for k in range(len(streams)):
                index = (self._answer_turn + k) % len(streams)
                stream = streams[index]
                if stream.questions and stream not in skip:
                    self._answer_turn = index + 1
                    stream.busy += 1
                    return stream, stream.questions.popleft()
            if wait:
                self._answer_wake.wait(POLL_S)
        return None, None

    def _questions_waiting(self, skip=()):
        """Whether a session outside `skip` has a question queued."""
        with self._lock:
            return any(stream.questions and stream not in skip for stream in self._streams.values())

    def _run_question(self, job, stream):
        """Answer one question; its result (or error) goes to `job.future`."""
        job.started = time.perf_counter()
        try:
            if job.cancelled.is_set():
                raise SessionError(499, "cancelled", "the client went away")
            session = stream.session
            if job.max_tokens is not None:  # per-question settings on the session's answer side
                session.max_new_tokens = job.max_tokens
            if job.temperature is not None:
                session.temperature = job.temperature
            answer = session.ask(job.question, snapshot=job.snapshot, on_text=job.on_text,
                                 should_stop=lambda: job.cancelled.is_set() or self.stopped)
            self._complete(job, answer)
        except BaseException as error:  # noqa: BLE001 - handed to the asker
            if not job.future.done():
                job.future.set_exception(error)

    def _complete(self, job, answer):
        """`job` answered (fully, or cut short by its cancel or a stop): stats, metrics, its future."""
        result = AnswerResult(answer, job.started - job.arrived, job.cancelled.is_set())
        if self.error is None:
            if answer.ttft_s is not None:
                self.stats["time_to_first_token"].add(answer.ttft_s)
            self.stats["answer_time"].add(answer.answer_s)
            self.stats["question_latency"].add(result.latency_s)
        if self.metrics is not None:
            self.metrics.questions.inc()
            self.metrics.latency.observe(result.latency_s)
            if result.ttft_s is not None:
                self.metrics.ttft.observe(result.ttft_s)
        job.future.set_result(result)

    # --- the answer lane with continuous batching -------------------------------------------------
    def _batched_answer_loop(self):
        """Questions of different sessions share prefill and decode steps of one `BatchDecoder`: every
        question that can start joins at the next step, one per session at a time (a session's next
        question reads the conversation its last answer left); a finished answer leaves and frees its
        slot. A question alone keeps the session's fast path (cached memory prefix, CUDA graphs); when
        another question arrives meanwhile, it moves into the batch with the tokens it has (checked every
        `check_every` tokens) and both go on there."""
        running = {}  # BatchRequest -> (stream, job, AnswerRun)
        try:
            while not self.stopped:
                took = False
                while not self.stopped:  # wait for a question only while nothing runs or was just taken
                    stream, job = self._next_question(skip={s for s, _, _ in running.values()},
                                                      wait=not (took or self._batch_busy()))
                    if stream is None:
                        break
                    took = True
                    self._start_question(stream, job, running)
                if self._batch_busy():
                    self._batch_step(running)
                elif not took and not self.stopped:
                    try:
                        self._refresh_lone_prefix()
                    except Exception as error:  # noqa: BLE001 -- lone questions go batched from now on
                        self._lone_off(error)
        finally:
            # stopping: the answers still running end with what they have (as a lone one does)
            for request in list(running):
                self._batch.cancel(request)
                self._end_batched(request, running)

    def _batch_busy(self):
        return self._batch is not None and not self._batch.idle

    def _lone_off(self, error):
        """The lone fast path failed (`error`, being handled): lone questions go batched from now on (logged)."""
        self.lone_fast_path, self._lone = False, None
        self.log.write("error", role="answer lane", error=f"the lone fast path is off: {type(error).__name__}: "
                       f"{error}", traceback=traceback.format_exc())

    def _batch_decoder(self, session):
        """The lane's `BatchDecoder` (built at the first batched question, on its session's model and sizes),
        or None when `session` cannot share it (another model, or not a `StreamSession`)."""
        if not hasattr(session, "batch_request"):
            return None
        if self._batch is None:
            from ..runtime.batch_decoder import BatchDecoder

            fast_path = getattr(session, "fast_path", None)
            # one batch for all sessions: its decode graphs are captured once per shape, whatever the sessions'
            # own fast paths (the server runs those off: one per session would not scale)
            cuda_graph = session.model.device.type == "cuda" if self.batch_graphs is None else self.batch_graphs
            self._batch = BatchDecoder(session.model, max_slots=self.max_batch, max_len=session.answer_len(),
                                       max_prefill_tokens=self.batch_prefill_tokens, cuda_graph=cuda_graph,
                                       strict=bool(fast_path is not None and fast_path.options.strict),
                                       on_fallback=None if fast_path is None else fast_path.fallbacks.record)
        return self._batch if self._batch.model is session.model else None

    def _build_lone(self, session):
        """The engine's fast-path decoder for lone questions (`lone_fast_path`): one `FastPath` of the model,
        its decode step and question sizes captured now; a part that cannot run falls back (logged). Built by
        `warm_up_answers` only: its captures must not run beside the ingest lane's GPU work, and its fusing
        re-points weights that graphs captured before would still read."""
        from ..model.memory import memory_num_tokens
        from ..runtime.fast_path import FastPath
        from ..runtime.options import FastPathOptions
        from .session import SUFFIX_SIZES

        wanted = session.model.device.type == "cuda" if self.lone_fast_path is None else self.lone_fast_path
        if not wanted or getattr(session, "fast", False) or not hasattr(session, "prefix_ids"):
            return
        # no torch.compile: 30-50 s on a 7B; the Triton step in a CUDA graph is the realtime CLI's fast path too.
        # compile_vision off: fusing then leaves the CLIP tower alone (the ingest lane's graphs read its weights)
        path = FastPath(session.model, FastPathOptions(enabled=True, compile_decode=False,
                                                       compile_vision=False)).fuse_weights()
        decoder = path.decoder(session.answer_len()).setup()
        decoder.warm_up_suffixes(session.prefix_ids(), memory_num_tokens(10**6, session.model.config),
                                 session.model.config.mm_hidden_size, sizes=SUFFIX_SIZES)
        decoder.capture_new_suffixes = False  # later sizes run eagerly: the ingest lane may use the GPU meanwhile
        self._lone = decoder
        self.log.write("lone_fast_path", decode=decoder.mode, fallbacks=dict(path.fallbacks.reasons))

    def _lone_decoder(self, session):
        """The engine's lone-question decoder when `session` (without a fast path of its own) can use it."""
        lone = self._lone
        if lone is None or getattr(session, "fast", False) or lone.model is not getattr(session, "model", None):
            return None
        return lone

    def _refresh_lone_prefix(self):
        """While the lane is idle and one session runs: keep the lone decoder's prefix (system text + memory) on
        that session's newest snapshot, so its next question prefills only its own tokens."""
        if self._lone is None:  # no lone decoder (off, or not CUDA): nothing to keep, no sessions to scan
            return
        with self._lock:
            running = [s for s in self._streams.values() if s.state == "running"]
        if len(running) != 1 or not hasattr(running[0].session, "prefix_ids"):
            return
        session = running[0].session
        snapshot = session.snapshot()
        if snapshot is None:
            return
        lone = self._lone_decoder(session)
        if lone is not None and not lone.prefix_matches(session.prefix_ids(), snapshot.tokens):
            lone.cache_prefix(session.prefix_ids(), snapshot.tokens)

    def warm_up_answers(self, session, graphs=True):
        """Before the engine starts: build, for `session`'s model and sizes, the lone fast path (when
        `lone_fast_path` says so) and then the answer batch, and (`graphs`) capture the batch's decode graph
        of every step shape, instead of at the first batched question and the first step of each shape.
        Returns the `BatchDecoder` (None: `session` cannot share one)."""
        if self._started or self._batch is not None:
            raise RuntimeError("warm_up_answers() runs before the engine starts and before the first question")
        try:  # first: fusing re-points weights in place, which graphs captured before would still read
            self._build_lone(session)
        except Exception as error:  # noqa: BLE001 -- lone questions go batched then
            self._lone_off(error)
        decoder = self._batch_decoder(session)
        if decoder is not None and graphs:
            decoder.warm_up()
        return decoder

    def _start_question(self, stream, job, running):
        """Start `job`: alone on the session's fast path when nothing else runs or waits (moving into the
        batch when another question comes), else into the batch; a session that cannot share the batch
        answers on this thread. A question that fails to start fails alone."""
        job.started = time.perf_counter()
        session = stream.session
        batched = False  # in the batch: the lane marks the session done when the answer ends, else here
        try:
            if job.cancelled.is_set():
                raise SessionError(499, "cancelled", "the client went away")
            decoder = self._batch_decoder(session)
            if decoder is None:
                self._run_question(job, stream)
                return
            run = session.begin(job.question, job.snapshot, job.on_text, job.max_tokens, job.temperature)

            def stop():
                return job.cancelled.is_set() or self.stopped

            alone = decoder.idle and not self._questions_waiting(skip=(stream,))
            movable = decoder.fits(len(run.ids) - 1 + run.snapshot.num_tokens, run.max_new_tokens)

            def hand_over():  # alone on a fast path: stop there when another question waits (it goes on batched)
                return stop() or movable and self._questions_waiting(skip=(stream,))
            lone = self._lone_decoder(session)
            if (lone is not None and decoder.cuda_graph and movable
                    and not lone.prefix_matches(run.ids, run.snapshot.tokens)):
                # its prefix holds another snapshot (several sessions run): refreshing it on this question's path is
                # a ~700-token eager prefill that the batch runs as one graph (a lone joiner's) instead
                lone = None
            if alone and (session.run_fast(run, hand_over) or lone is not None
                          and session.run_fast(run, hand_over, decoder=lone)):
                if run.done or stop() or not movable:
                    self._complete(job, session.finish(run))
                    return
            elif not movable:  # too long for a slot: answered alone, as without batching
                self._run_question(job, stream)
                return
            request = session.batch_request(run, decoder, should_stop=stop)
            decoder.add(request)
            running[request] = (stream, job, run)
            batched = True
        except BaseException as error:  # noqa: BLE001 - handed to the asker; the other answers go on
            if not job.future.done():
                job.future.set_exception(error)
        finally:
            if not batched:
                self._done(stream)

    def _batch_step(self, running):
        try:
            finished = self._batch.step()
        except BaseException as error:  # noqa: BLE001 - a broken batch fails its answers, not the lane
            for request, (stream, job, _) in list(running.items()):
                running.pop(request)
                if not job.future.done():
                    job.future.set_exception(error)
                self._done(stream)
            self._batch = None  # the next batched question builds a fresh one
            self.log.write("error", role="answer lane", error=f"{type(error).__name__}: {error}",
                           traceback=traceback.format_exc())
            return
        for request in finished:
            self._end_batched(request, running)

    def _end_batched(self, request, running):
        stream, job, run = running.pop(request)
        try:
            if request.finish_reason == "error":
                raise request.error
            self._complete(job, stream.session.finish(run))
        except BaseException as error:  # noqa: BLE001 - handed to the asker
            if not job.future.done():
                job.future.set_exception(error)
        finally:
            self._done(stream)

    # --- summary --------------------------------------------------------------------------------
    def counts(self):
        """How many sessions are in each state."""
        with self._lock:
            by_state = collections.Counter(s.state for s in self._streams.values())
        return {state: by_state.get(state, 0) for state in STATES}

    def summary(self):
        """{"sessions": {id: frame counts}, "latency_s": {role: stats}, "error": text or None}."""
        return {
            "sessions": {stream.id: stream.counts() for stream in self.streams()},
            "latency_s": {key: stats.summary() for key, stats in self.stats.items()},
            "error": None if self.error is None else
            f"{self.error[0]}: {type(self.error[1]).__name__}: {self.error[1]}",
        }
