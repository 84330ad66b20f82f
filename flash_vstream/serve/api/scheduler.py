"""The engine behind the server: one model, many live sessions, two lanes that own the model's work.

Each served session is state -- a `StreamSession` (its own STAR memory), a bounded inbox of frames, a
queue of questions and counters -- and the `Engine` owns every call into the model:

  ingest lane   one thread; takes one frame from the next session that has frames, round robin, and
                runs `StreamSession.add_frame` (CLIP encode + memory update + publish).
  answer lane   one thread; takes one question from the next session that has questions, round robin,
                and runs `StreamSession.ask` on the snapshot taken when the question arrived.

So an answer (seconds) never holds up any session's ingest, a session that sends many frames or
questions gets its turn like the others and no more, and the model is driven from exactly two places,
which is where a later version can batch (one CLIP batch over the sessions' next frames, one decode
step over the sessions' answers). Source sessions (file, URL, camera) run one reader thread each that
decodes the source and feeds the inbox; the reader is the only per-session thread.

Back pressure: an inbox holds at most `inbox_size` frames. A file source waits for room (every frame
of a file is ingested); a live source (URL, camera) and pushed frames push out the oldest queued frame
and count it as dropped. Every wait has a timeout; closing a session wakes its reader.

Callbacks (`on_text`, futures) run on the lanes' threads; the async side hands them to its event loop.
"""

import collections
import concurrent.futures
import dataclasses
import math
import secrets
import threading
import time

from ..sources import open_source

POLL_S = 0.1  # every wait wakes at least this often to look at the stop flag
STATES = ("running", "ended", "failed")


class SessionError(Exception):
    """A request the session cannot take now; `status` is the HTTP status that says why."""

    def __init__(self, status, code, message):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclasses.dataclass
class QuestionJob:
    question: str
    max_tokens: int
    temperature: float
    snapshot: object  # the MemorySnapshot current when the question arrived
    on_text: object = None  # on_text(piece), on the answer lane's thread
    arrived: float = dataclasses.field(default_factory=time.perf_counter)
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)
    started: float | None = None


@dataclasses.dataclass
class AnswerResult:
    answer: object  # session.Answer
    wait_s: float  # arrival -> the lane took the question
    cancelled: bool

    @property
    def ttft_s(self):
        return None if self.answer.ttft_s is None else self.wait_s + self.answer.ttft_s

    @property
    def latency_s(self):
        return self.wait_s + self.answer.answer_s


class ServedSession:
    """One live stream as the server sees it. Mutable fields change under the engine's lock."""

    def __init__(self, session_id, stream, source, fps, hidden=False):
        self.id = session_id
        self.stream = stream  # StreamSession
        self.source = source  # the request's source object, e.g. {"type": "push"}
        self.fps = float(fps)
        self.hidden = hidden  # a one-shot chat completion's session: not listed
        self.state = "running"
        self.error = None
        self.failure = None  # the exception that failed the session
        self.created = time.time()
        self.last_active = time.monotonic()
        self.inbox = collections.deque()  # (frame, timestamp, future or None)
        self.questions = collections.deque()  # QuestionJob
        self.dropped_frames = 0
        self.last_timestamp = None  # newest timestamp offered (pushed frames must increase)
        self.next_sample_t = None  # pushed frames before this stream time are sampled away
        self.source_done = False  # the reader reached the end of the source
        self.finished = threading.Event()  # state left "running" and the inbox is drained
        self.closed = False
        self.connections = 0  # open WebSockets
        self.busy = 0  # frames or answers a lane is running now
        self.reader = None  # the source's thread

    @property
    def kind(self):
        return self.source.get("type", "push")

    def describe(self):
        snapshot = self.stream.snapshot() if self.stream is not None else None
        return {
            "id": self.id,
            "object": "session",
            "state": self.state,
            "source": dict(self.source),
            "fps": self.fps,
            "frames_seen": 0 if snapshot is None else snapshot.frames_seen,
            "stream_time": 0.0 if snapshot is None else snapshot.stream_time,
            "memory_tokens": 0 if snapshot is None else snapshot.num_tokens,
            "dropped_frames": self.dropped_frames,
            "error": self.error,
            "created": int(self.created),
        }


class Engine:
    """Owns the model and the lanes; the web layer calls these methods from any thread."""

    def __init__(self, make_stream, max_sessions=16, inbox_size=8, max_pending_questions=4, idle_timeout_s=600.0,
                 metrics=None, open_source_fn=open_source):
        self.make_stream = make_stream  # fps -> a new StreamSession on the shared model
        self.max_sessions = int(max_sessions)
        self.inbox_size = int(inbox_size)
        self.max_pending_questions = int(max_pending_questions)
        self.idle_timeout_s = float(idle_timeout_s)
        self.metrics = metrics
        self.open_source = open_source_fn
        self.sessions = {}
        self._lock = threading.Condition()
        self._ingest_ring = collections.deque()  # ids of sessions with frames waiting, each at most once
        self._answer_ring = collections.deque()  # ids of sessions with questions waiting, each at most once
        self._stop = threading.Event()
        self._threads = []

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self):
        for name, target in (("ingest lane", self._ingest_loop), ("answer lane", self._answer_loop)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self, timeout=10.0):
        self._stop.set()
        with self._lock:
            for session in list(self.sessions.values()):
                self._close_locked(session)
            self._lock.notify_all()
        for thread in self._threads:
            thread.join(timeout)

    # --- sessions -------------------------------------------------------------------------------
    def create(self, source, fps, hidden=False):
        """A new session; its reader starts for file / url / camera sources. `source` is validated
        (paths resolved) by the caller; `source["_open"]` kwargs go to `open_source`."""
        with self._lock:
            if len(self.sessions) >= self.max_sessions:
                raise SessionError(429, "too_many_sessions", f"at most {self.max_sessions} sessions at once")
            session_id = f"sess_{secrets.token_hex(8)}"
            public = {k: v for k, v in source.items() if not k.startswith("_")}
            session = ServedSession(session_id, None, public, fps, hidden=hidden)
            self.sessions[session_id] = session  # reserve the slot before the (slower) construction
        try:
            session.stream = self.make_stream(fps)
        except BaseException:
            with self._lock:
                self.sessions.pop(session_id, None)
            raise
        if self.metrics is not None:
            self.metrics.sessions_created.inc()
        if session.kind != "push":
            session.reader = threading.Thread(target=self._read_source, args=(session, source["_open"]),
                                              name=f"source {session_id}", daemon=True)
            session.reader.start()
        return session

    def get(self, session_id):
        with self._lock:
            session = self.sessions.get(session_id)
            if session is None:
                raise SessionError(404, "session_not_found", f"no session {session_id!r}")
            return session  # looking at a session is not activity: frames, questions and WebSockets are

    def list(self):
        with self._lock:
            return [s for s in self.sessions.values() if not s.hidden]

    def delete(self, session_id):
        """Close and forget a session: its memory goes with the last reference (a lane running one of
        its frames or answers finishes that first)."""
        with self._lock:
            session = self.sessions.pop(session_id, None)
            if session is None:
                raise SessionError(404, "session_not_found", f"no session {session_id!r}")
            self._close_locked(session)
            self._lock.notify_all()
        if session.reader is not None and session.reader is not threading.current_thread():
            session.reader.join(5.0)
        return session

    def _close_locked(self, session):
        session.closed = True
        if session.state == "running":
            session.state = "ended"
        for _, _, future in session.inbox:
            if future is not None and not future.done():
                future.set_result(None)
        session.inbox.clear()
        for job in session.questions:
            job.cancelled.set()
            if not job.future.done():
                job.future.set_exception(SessionError(409, "session_closed", "the session was closed"))
        session.questions.clear()
        session.finished.set()

    def connect(self, session, delta):
        with self._lock:
            session.connections += delta
            session.last_active = time.monotonic()

    def reap_idle(self, now=None):
        """Delete sessions with nothing to do and no client for `idle_timeout_s`. Returns their ids."""
        now = time.monotonic() if now is None else now
        with self._lock:
            idle = [s.id for s in self.sessions.values()
                    if now - s.last_active > self.idle_timeout_s and not s.connections and not s.busy
                    and not s.inbox and not s.questions and (s.kind == "push" or s.state != "running")]
        for session_id in idle:
            try:
                self.delete(session_id)
            except SessionError:
                pass
        return idle

    def counts(self):
        with self._lock:
            by_state = collections.Counter(s.state for s in self.sessions.values())
            return {state: by_state.get(state, 0) for state in STATES}

    # --- frames ---------------------------------------------------------------------------------
    def offer_frame(self, session, frame, timestamp, wait=False):
        """A pushed frame (uint8 (H, W, 3)) at `timestamp` seconds. Returns a future resolved once it is in
        the memory (with the snapshot) or dropped (None); a frame sampled away resolves at once."""
        timestamp = float(timestamp)
        future = concurrent.futures.Future()
        with self._lock:
            self._check_open(session)
            if session.kind != "push":
                raise SessionError(409, "not_a_push_session", f"session {session.id} reads its own "
                                   f"{session.kind} source; frames can be pushed to push sessions only")
            if session.state != "running":
                raise SessionError(409, "session_not_running", f"session {session.id} is {session.state}")
            if session.last_timestamp is not None and not timestamp > session.last_timestamp:
                raise SessionError(400, "non_increasing_timestamp",
                                   f"timestamp {timestamp} is not after the previous frame's "
                                   f"{session.last_timestamp}")
            session.last_timestamp = timestamp
            session.last_active = time.monotonic()
            if session.next_sample_t is not None and timestamp + 1e-6 < session.next_sample_t:
                session.dropped_frames += 1  # sampled faster than the session's fps
                if self.metrics is not None:
                    self.metrics.frames_dropped.labels(reason="fps").inc()
                future.set_result(None)
                return future
            # the first frame at or after each sample time k / fps is taken (as a camera source samples)
            session.next_sample_t = (math.floor(timestamp * session.fps + 1e-6) + 1) / session.fps
            self._enqueue_frame_locked(session, (frame, timestamp, future if wait else None), drop_oldest=True)
        if not wait:
            future.set_result(None)
        return future

    def _enqueue_frame_locked(self, session, item, drop_oldest):
        while len(session.inbox) >= self.inbox_size:
            if not drop_oldest:
                return False
            _, _, old = session.inbox.popleft()  # the ingest lane lags: the oldest frame goes
            session.dropped_frames += 1
            if self.metrics is not None:
                self.metrics.frames_dropped.labels(reason="backlog").inc()
            if old is not None and not old.done():
                old.set_result(None)
        session.inbox.append(item)
        if session.id not in self._ingest_ring:
            self._ingest_ring.append(session.id)
        self._lock.notify_all()
        return True

    def _check_open(self, session):
        if session.closed or self.sessions.get(session.id) is not session:
            raise SessionError(404, "session_not_found", f"no session {session.id!r}")

    def _read_source(self, session, open_kwargs):
        """The reader thread of a file / url / camera session: decode, pace, feed the inbox."""
        play_speed = float(open_kwargs.pop("play_speed", 1.0))
        max_frames = open_kwargs.pop("max_frames_limit", None)
        # a live stream has no natural end: a camera or stream URL that stops sending (a killed server reads as
        # a clean end of stream) fails its session; a URL the client marked `"live": false` may end
        end_fails = open_kwargs.pop("end_is_failure", False)
        try:
            factory = open_kwargs.pop("frames", None)  # a callable giving (frame, t) (a one-shot's media)
            if factory is not None:
                frames, live = factory(), False
            else:
                source = self.open_source(video_fps=session.fps, **open_kwargs)
                frames, live = source.frames(), source.live
            wall0 = t0 = None
            produced = 0
            try:
                for frame, t in frames:
                    if session.closed:
                        return
                    produced += 1
                    if max_frames is not None and produced > max_frames:
                        raise SessionError(413, "video_too_long", f"the video has more than {max_frames} frames "
                                           f"at {session.fps:g} fps")
                    if play_speed > 0:  # the frame at stream time t is due at t / play_speed
                        if wall0 is None:
                            wall0, t0 = time.monotonic(), t
                        delay = wall0 + (t - t0) / play_speed - time.monotonic()
                        if delay > 0 and self._stop.wait(delay):
                            return
                    if not self._feed(session, frame, t, live=live):
                        return
            finally:
                frames.close()
            if end_fails and not session.closed:
                raise SessionError(502, "source_stopped", f"the live source stopped after {produced} frames "
                                   "(end of stream: the connection closed or the source stopped sending)")
            with self._lock:
                session.source_done = True
                self._maybe_finish_locked(session)
        except BaseException as error:  # noqa: BLE001 - any failure of the source ends its session
            self.fail(session, error)

    def _feed(self, session, frame, t, live):
        """Into the inbox: a live source drops the oldest queued frame, a file waits for room."""
        with self._lock:
            while not session.closed and not self._stop.is_set():
                if live or len(session.inbox) < self.inbox_size:
                    self._enqueue_frame_locked(session, (frame, t, None), drop_oldest=True)
                    session.last_active = time.monotonic()
                    return True
                self._lock.wait(POLL_S)
        return False

    def fail(self, session, error):
        """End `session` as failed with the reason (the memory stays, for questions, until deleted)."""
        reason = error.message if isinstance(error, SessionError) else f"{type(error).__name__}: {error}"
        with self._lock:
            if session.closed:
                return
            session.state = "failed"
            session.error = reason
            session.failure = error
            for _, _, future in session.inbox:
                if future is not None and not future.done():
                    future.set_result(None)
            session.inbox.clear()
            session.finished.set()
            self._lock.notify_all()
        if self.metrics is not None:
            self.metrics.sessions_failed.inc()

    def _maybe_finish_locked(self, session):
        if session.source_done and not session.inbox and not session.busy and session.state == "running":
            session.state = "ended"
            session.finished.set()
            self._lock.notify_all()

    def end(self, session):
        """No more frames (a push client said so, or its stream is over)."""
        with self._lock:
            session.source_done = True
            self._maybe_finish_locked(session)

    # --- questions ------------------------------------------------------------------------------
    def ask(self, session, question, max_tokens, temperature=0.0, on_text=None):
        """Queue a question on the memory as it stands now. Returns the `QuestionJob` (its `future` gives an
        `AnswerResult`; `cancelled.set()` ends the answer early, e.g. when the client went away)."""
        with self._lock:
            self._check_open(session)
            snapshot = session.stream.snapshot()
            if snapshot is None:
                raise SessionError(409, "no_frames_yet", f"session {session.id} has no frames in memory yet")
            if len(session.questions) >= self.max_pending_questions:
                raise SessionError(429, "too_many_questions", f"session {session.id} already has "
                                   f"{self.max_pending_questions} questions waiting")
            job = QuestionJob(question, int(max_tokens), float(temperature), snapshot, on_text)
            session.questions.append(job)
            session.last_active = time.monotonic()
            if session.id not in self._answer_ring:
                self._answer_ring.append(session.id)
            self._lock.notify_all()
        return job

    # --- the lanes ------------------------------------------------------------------------------
    def _next(self, ring, queue_of):
        """The next (session, item) in round-robin order, or (None, None) after POLL_S."""
        with self._lock:
            while not self._stop.is_set():
                while ring:
                    session = self.sessions.get(ring.popleft())
                    if session is None or not queue_of(session):
                        continue
                    item = queue_of(session).popleft()
                    if queue_of(session):
                        ring.append(session.id)  # more waiting: back of the line
                    session.busy += 1
                    return session, item
                self._lock.wait(POLL_S)
        return None, None

    def _done(self, session):
        with self._lock:
            session.busy -= 1
            session.last_active = time.monotonic()
            self._maybe_finish_locked(session)
            self._lock.notify_all()

    def _ingest_loop(self):
        while not self._stop.is_set():
            session, item = self._next(self._ingest_ring, lambda s: s.inbox)
            if session is None:
                continue
            frame, t, future = item
            try:
                began = time.perf_counter()
                snapshot = session.stream.add_frame(frame, t)
                if self.metrics is not None:
                    self.metrics.frame_seconds.observe(time.perf_counter() - began)
                    self.metrics.frames_ingested.inc()
                if future is not None:
                    future.set_result(snapshot)
            except BaseException as error:  # noqa: BLE001 - a frame the model cannot take fails its session only
                if future is not None and not future.done():
                    future.set_exception(error)
                self.fail(session, error)
            finally:
                self._done(session)

    def _answer_loop(self):
        while not self._stop.is_set():
            session, job = self._next(self._answer_ring, lambda s: s.questions)
            if session is None:
                continue
            job.started = time.perf_counter()
            try:
                if job.cancelled.is_set():
                    raise SessionError(499, "cancelled", "the client went away")
                stream = session.stream
                # per-question settings on the session's answer side (only this lane asks)
                stream.max_new_tokens, stream.temperature = job.max_tokens, job.temperature
                answer = stream.ask(job.question, snapshot=job.snapshot, on_text=job.on_text,
                                    should_stop=job.cancelled.is_set)
                result = AnswerResult(answer, job.started - job.arrived, job.cancelled.is_set())
                if self.metrics is not None:
                    self.metrics.questions.inc()
                    self.metrics.latency.observe(result.latency_s)
                    if result.ttft_s is not None:
                        self.metrics.ttft.observe(result.ttft_s)
                job.future.set_result(result)
            except BaseException as error:  # noqa: BLE001 - handed to the asker; the lane goes on
                if not job.future.done():
                    job.future.set_exception(error)
            finally:
                self._done(session)
