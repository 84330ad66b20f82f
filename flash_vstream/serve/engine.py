"""The realtime engine: the process shell around synchronous `StreamSession`s (DESIGN §7).

The engine holds sessions keyed by id -- each a `Stream`: the `StreamSession` (its STAR memory on the
shared model), its frame source, its scripted `QuestionSchedule`, its queues and counters -- and runs
the roles around them:

  frame source      one thread per session; decodes the file / camera / URL and paces it to the wall
                    clock at `video_fps x play_speed`; puts frames into the session's bounded queue.
  frame handler     one thread for all sessions; each tick (`step`) takes at most one queued frame from
                    every session, round robin, and ingests them (CLIP encode + memory update + publish).
                    It is the one place that feeds frames to the model: where several sessions' frames
                    can later become one CLIP batch (`_ingest` gets the whole tick).
  question handler  the caller's thread(s); reads the session's work queue (`next_work`: questions the
                    schedule made due, lines a person typed, control messages) and answers with
                    `answer`, from a snapshot. The CLI runs one on its main thread; a server runs one
                    per session, so the answers of one session never wait for another's.

Why threads and not processes (the published CLI used three processes): torch releases the GIL
inside every kernel and PyAV while decoding, so the roles overlap on CPU and GPU; threads share the
model weights as they are and hand a snapshot over by reference, where the published design pickled
the model into another process and copied the whole, ever-growing frame buffer through a Manager
list on every update. On a CPU each role runs its own torch thread team; on a busy machine set
OMP_NUM_THREADS to about half the cores so the two teams do not spin against each other.

Who waits for whom: ingesting never waits for answers (the frame handler only publishes snapshots and
queues due questions); an answer takes a snapshot and never waits for the frame backlog. A session's
frame queue is bounded: a file or synthetic source blocks when it is full (no frame is ever dropped,
so a scripted run is deterministic), a live source (camera, URL) drops the oldest queued frame and
counts it. Every queue wait has a timeout (POLL_S); end of stream and stop travel as control
messages; the first error in any role stops every role (`error` holds it).

Scripted questions: a session's `QuestionSchedule` says which questions are due around each frame
(the rule `StreamSession.run_timeline` runs synchronously); the frame handler hands each due question
the exact snapshot it is due on and goes on ingesting, so the answers do not depend on timing.
"""

import dataclasses
import queue
import threading
import time
import traceback

from ..video_io import VideoReadError
from .session import EmptyStreamError, state_nbytes
from .telemetry import EventLog, role_stats, rss_bytes

POLL_S = 0.1  # every queue wait wakes at least this often to look at the stop flag
JOIN_TIMEOUT_S = 10.0
DEFAULT_SESSION = "main"  # the id of the session given to the constructor (the CLI's one session)
WORK_ROOM = 256  # a work queue's room beyond the scripted questions: lines a person types


class Control:
    """A control message travelling through a queue."""

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f"<{self.name}>"


END_OF_STREAM = Control("end of stream")
STOP = Control("stop")


@dataclasses.dataclass
class Due:
    """A scripted question that became due, with the snapshot it is answered from."""

    question: dict
    snapshot: object
    at: float  # perf_counter when it became due


class Stream:
    """One session as the engine holds it. Counters are written by the engine's threads only."""

    def __init__(self, session_id, session, source, schedule, play_speed, frame_queue_size, drop_oldest):
        if not play_speed > 0:
            raise ValueError(f"play_speed must be > 0 (inf: as fast as possible), got {play_speed}")
        self.id = session_id
        self.session = session  # StreamSession (or anything with add_frame / snapshot / ask)
        self.source = source  # sources.FrameSource
        self.schedule = schedule  # QuestionSchedule or None
        self.play_speed = float(play_speed)
        self.drop_oldest = source.live if drop_oldest is None else drop_oldest
        self.frames = queue.Queue(maxsize=frame_queue_size)  # source -> frame handler
        # frame handler and question reader -> question handler; never fills in practice: it holds
        # at most the scripted questions (already in memory) plus what a person types
        self.work = queue.Queue(maxsize=(len(schedule) if schedule else 0) + WORK_ROOM)
        self.ended = threading.Event()  # the frame handler took the end of this stream
        self.frames_produced = self.frames_ingested = self.frames_dropped = 0
        self.stream_time = None  # timestamp of the newest ingested frame

    def counts(self):
        return {"produced": self.frames_produced, "ingested": self.frames_ingested,
                "dropped": self.frames_dropped, "stream_time": self.stream_time}


def _one(name):
    return property(lambda self: getattr(self.stream(), name), doc=f"the one session's `{name}`")


class RealtimeEngine:
    """Sessions keyed by id, their source threads, one frame handler, and the question handlers' queues.

    `RealtimeEngine(session, source, ...)` is the one-session engine the CLI runs (id DEFAULT_SESSION);
    `RealtimeEngine()` then `add_session(id, session, source, ...)` holds several sessions, which may
    share one model. `play_speed`, `frame_queue_size` and `drop_oldest` are defaults for every session.
    The frame handler thread ends when every session it holds has ended (the CLI's lifetime); a server
    that keeps adding sessions would run `step` from its own loop instead (`add_session` works while the
    engine runs: the new session's source thread starts at once).
    """

    def __init__(self, session=None, source=None, play_speed=1.0, schedule=None, frame_queue_size=8,
                 drop_oldest=None, log=None, log_every=100):
        self.play_speed = play_speed  # defaults for add_session (checked there)
        self.frame_queue_size = frame_queue_size
        self.default_drop_oldest = drop_oldest  # None: drop when the source is live
        self.log = log or EventLog()
        self.log_every = log_every
        self.stop_event = threading.Event()
        self.error = None  # (role, exception, formatted traceback) of the first failure
        self._error_lock = threading.Lock()
        self.stats = role_stats()  # shared by all sessions
        self._streams = {}  # id -> Stream, in the order added
        self._streams_lock = threading.Lock()
        self._ready = threading.Event()  # set when a source queued something: wakes an idle frame handler
        self._turn = 0  # round robin: the tick's first session
        self._threads = []
        self._started = False
        if session is not None:
            self.add_session(DEFAULT_SESSION, session, source, schedule=schedule, drop_oldest=drop_oldest)

    # --- sessions -------------------------------------------------------------------------------
    def add_session(self, session_id, session, source, schedule=None, play_speed=None, frame_queue_size=None,
                    drop_oldest=None):
        """Hold `session` under `session_id`, fed from `source`; its source thread starts with the engine
        (at once when the engine runs already). Returns the `Stream`."""
        stream = Stream(session_id, session, source, schedule,
                        self.play_speed if play_speed is None else play_speed,
                        frame_queue_size or self.frame_queue_size,
                        self.default_drop_oldest if drop_oldest is None else drop_oldest)
        with self._streams_lock:
            if session_id in self._streams:
                raise ValueError(f"session {session_id!r} exists already")
            self._streams[session_id] = stream
            if self._started:
                self._start_source(stream)
        return stream

    def stream(self, session_id=None):
        """The `Stream` of `session_id` (None: of the one session of a one-session engine)."""
        with self._streams_lock:
            if session_id is not None:
                return self._streams[session_id]
            if len(self._streams) != 1:
                raise ValueError(f"the engine holds {len(self._streams)} sessions: name one")
            return next(iter(self._streams.values()))

    def streams(self):
        with self._streams_lock:
            return list(self._streams.values())

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
        with self._streams_lock:
            self._started = True
            self._start_thread("frame handler", self._handler_loop)
            for stream in self._streams.values():
                self._start_source(stream)
        return self

    def _start_thread(self, role, target, stream=None):
        name = role if stream is None else f"{role} ({stream.id})"
        thread = threading.Thread(target=self._guarded, args=(role, target, stream), name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _start_source(self, stream):
        self._start_thread("frame source", lambda: self._source_loop(stream), stream)

    def stop(self):
        """Ask every role to stop: the flag, plus a STOP message to wake queue readers at once."""
        self.stop_event.set()
        self._ready.set()
        for stream in self.streams():
            for q in (stream.frames, stream.work):
                try:
                    q.put_nowait(STOP)
                except queue.Full:
                    pass  # the reader sees the flag within POLL_S

    @property
    def stopped(self):
        return self.stop_event.is_set()

    def fail(self, role, error, stream=None):
        with self._error_lock:
            if self.error is None:
                self.error = (role, error, traceback.format_exc())
                where = {} if stream is None else {"session": stream.id}
                self.log.write("error", role=role, error=f"{type(error).__name__}: {error}",
                               traceback=self.error[2], **where)
        self.stop()

    def join(self, timeout=JOIN_TIMEOUT_S):
        deadline = time.monotonic() + timeout
        for thread in list(self._threads):
            thread.join(max(0.0, deadline - time.monotonic()))
        return [t.name for t in self._threads if t.is_alive()]

    def _guarded(self, role, target, stream=None):
        try:
            target()
        except BaseException as error:  # noqa: BLE001 - any failure of a role stops the others
            self.fail(role, error, stream)

    # --- queues ---------------------------------------------------------------------------------
    def _put(self, q, item):
        """Blocking put that gives up when stopping. True if the item went in."""
        while not self.stopped:
            try:
                q.put(item, timeout=POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _put_frame(self, stream, item):
        """Into the session's frame queue; a live source makes room by dropping the oldest queued frame."""
        if not stream.drop_oldest:
            put = self._put(stream.frames, item)
        else:
            put = False
            while not self.stopped:
                try:
                    stream.frames.put_nowait(item)
                    put = True
                    break
                except queue.Full:
                    try:
                        old = stream.frames.get_nowait()
                    except queue.Empty:
                        continue
                    if isinstance(old, Control):
                        return False  # STOP: we are stopping anyway
                    stream.frames_dropped += 1
        if put:
            self._ready.set()
        return put

    def submit(self, item, session_id=None):
        """For a question reader thread: hand a typed line (or a control message) to the question handler."""
        return self._put(self.stream(session_id).work, item)

    def next_work(self, timeout=POLL_S, session_id=None):
        """The question handler's next item (a `Due` question, a submitted item or a control message), or
        None after `timeout` (0: only what is queued now)."""
        try:
            return self.stream(session_id).work.get(timeout=timeout)
        except queue.Empty:
            return None

    # --- frame source ---------------------------------------------------------------------------
    def _source_loop(self, stream):
        frames = stream.source.frames()
        wall0 = t0 = None
        try:
            while not self.stopped:
                began = time.perf_counter()
                try:
                    frame, t = next(frames)
                except StopIteration:
                    break
                self.stats["frame_decode"].add(time.perf_counter() - began)
                if wall0 is None:
                    wall0, t0 = time.perf_counter(), t
                # play at video_fps x play_speed: the frame at stream time t is released at t / play_speed
                delay = wall0 + (t - t0) / stream.play_speed - time.perf_counter()
                if delay > 0 and self.stop_event.wait(delay):
                    break
                if not self._put_frame(stream, (frame, t)):
                    break
                stream.frames_produced += 1
            else:
                return
            if not self.stopped and self._put(stream.frames, END_OF_STREAM):
                self._ready.set()
        finally:
            frames.close()

    # --- frame handler --------------------------------------------------------------------------
    def _handler_loop(self):
        while not self.stopped and not all(s.ended.is_set() for s in self.streams()):
            self.step()

    def step(self, timeout=POLL_S):
        """One tick of the frame handler: at most one queued item from every running session, round robin
        (a session with a fast source or a backlog gets one frame per tick like the others), then the
        tick's frames are ingested. Waits up to `timeout` when nothing is queued. Returns the items taken."""
        self._ready.clear()  # before looking: a frame queued from here on sets it again
        streams = [s for s in self.streams() if not s.ended.is_set()]
        if streams:
            first = self._turn % len(streams)
            streams = streams[first:] + streams[:first]
            self._turn += 1
        batch = []  # (stream, frame, t)
        for stream in streams:
            try:
                item = stream.frames.get_nowait()
            except queue.Empty:
                continue
            if item is STOP:
                return len(batch)
            if item is END_OF_STREAM:
                self._end(stream)
            else:
                batch.append((stream, *item))
        self._ingest(batch)
        if not batch and not self.stopped:
            self._ready.wait(timeout)
        return len(batch)

    def _ingest(self, batch):
        """The tick's frames, one per session: questions due before each frame, the frame into its
        session's memory, questions due with it. Each session encodes its own frame today."""
        for stream, frame, t in batch:
            session, schedule = stream.session, stream.schedule
            if schedule is not None:
                before = session.snapshot()
                self._due(stream, schedule.before_frame(t, before), before)
            began = time.perf_counter()
            snapshot = session.add_frame(frame, t)
            self.stats["encode_memory_update"].add(time.perf_counter() - began)
            stream.frames_ingested += 1
            stream.stream_time = t
            if schedule is not None:
                self._due(stream, schedule.after_frame(t), snapshot)
            if self.log_every and stream.frames_ingested % self.log_every == 0:
                self._progress(stream)
            if self.stopped:
                return

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
        stream.ended.set()
        self._put(stream.work, END_OF_STREAM)

    def _due(self, stream, questions, snapshot):
        now = time.perf_counter()
        for q in questions:
            self._put(stream.work, Due(q, snapshot, now))

    def _progress(self, stream, final=False):
        memory = getattr(stream.session, "memory", None)
        snapshot = stream.session.snapshot()
        self.log.write("progress", session=stream.id, final=final, frames=stream.frames_ingested,
                       produced=stream.frames_produced, dropped=stream.frames_dropped, stream_time=stream.stream_time,
                       queued=stream.frames.qsize(), memory_tokens=None if snapshot is None else snapshot.num_tokens,
                       state_bytes=None if memory is None else state_nbytes(memory), rss_bytes=rss_bytes())

    # --- question handler -----------------------------------------------------------------------
    def answer(self, question, snapshot, due_at, on_text=None, time_label=None, extra=None, session_id=None):
        """Answer `question` from `snapshot` in the session's conversation, counting from `due_at`
        (perf_counter); `on_text(piece)` gets the answer as it is generated. Returns the answer record
        (`Answer.record`), or None when another role's error cut the answer short."""
        wait = time.perf_counter() - due_at
        answer = self.stream(session_id).session.ask(question, snapshot=snapshot, on_text=on_text,
                                                     should_stop=self.stop_event.is_set)
        if self.error is not None:
            return None
        self.stats["time_to_first_token"].add(answer.ttft_s)
        self.stats["answer_time"].add(answer.answer_s)
        self.stats["question_latency"].add(wait + answer.answer_s)
        record = answer.record(time=time_label, wait_s=wait, extra=extra)
        self.log.write("answer", **record)
        return record

    # --- summary --------------------------------------------------------------------------------
    def summary(self):
        """{"sessions": {id: frame counts}, "latency_s": {role: stats}, "error": text or None}."""
        return {
            "sessions": {stream.id: stream.counts() for stream in self.streams()},
            "latency_s": {key: stats.summary() for key, stats in self.stats.items()},
            "error": None if self.error is None else
            f"{self.error[0]}: {type(self.error[1]).__name__}: {self.error[1]}",
        }
