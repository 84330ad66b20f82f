"""The server's face of the engine (`serve/engine.py`): sessions created from requests, by generated id.

`ServerEngine` is the one `Engine` set up as the server runs it -- a failure fails its session only,
an answer lane thread answers the sessions' questions, the ingest lane runs until the server stops --
plus what only a server needs: a bound on sessions, ids, the request's source turned into a frame
source, idle sessions reaped, client connections counted, and the two scheduling rules below.

Memory budget (admission control). The accelerator holds the weights, every session's STAR memory state
and the answers' KV cache. `MemoryBudget` counts bytes against one total: a
session reserves its state (`session_state_bytes`: its row of the memory stack -- frame buffer, keys,
temporal centroids, abstract slots, spatial frames -- and one published snapshot) when it is created and
gives its snapshot back when it is deleted. The ingest lane keeps the sessions' memories in one shared
stack that doubles when full and never shrinks (model/memory.py `MemoryStack`), so the sessions hold
the stack's rows -- at least its capacity, doubled as often as the open sessions need -- and a session
whose row needs the stack to grow is admitted only if the growth fits: for one tick the old and the new
stack exist together (1.5x the new rows); the answer lane's KV cache (`answer_pool_bytes`: `max_batch` slots of
continuous batching) is reserved once, when the engine starts; a question reserves its prompt's embeddings
(`question_bytes`) from the moment it is accepted until its answer ends. A session or question that
would pass the total is refused with 429 `memory_budget_exceeded` -- the request fails, never the GPU.
The default total on CUDA is the free memory once the model is loaded, less a headroom for activations
(CLIP batches, prefill) and the allocator's slack; on a CPU there is no default bound.

Ingest first. Answers and frames share one GPU; a frame that waits is lag a viewer sees, an answer
that starts a little later is not. A new question is handed to the answer lane at once while every
session's oldest waiting frame is younger than `ingest_lag_target_s`; while some frame is older (the
ingest lane is behind), new questions wait (`deferred`), up to `max_answer_defer_s` each, so the
answers do not add to the GPU's work until the ingest lane caught up. A question is answered from the
memory as it stood when it arrived, deferred or not.
"""

import collections
import math
import secrets
import threading
import time

from ...runtime.batch_decoder import kv_bytes_per_token
from ...runtime.decoder import round_up
from ..engine import POLL_S, Engine, QuestionJob, SessionError
from ..session import PROMPT_ROOM
from ..sources import FrameSource, open_source

HEADROOM_FRACTION = 0.10  # CUDA default budget: free memory after loading less this share of the device ...
HEADROOM_MIN_BYTES = 4 * 2**30  # ... and at least this much (activations of a CLIP batch, prefill, fragments)
INGEST_LAG_TARGET_S = 0.75  # three quarters of the 1-s lag a 1-fps viewer notices: room to catch up
MAX_ANSWER_DEFER_S = 1.0
DISPATCH_POLL_S = 0.005  # how often held-back questions are looked at


def session_state_bytes(config, dtype_bytes):
    """Bytes one session's STAR memory holds -- its row of a memory stack (model/memory.py `MemoryStack`:
    every size fixed, whatever the stream's length) -- plus one published snapshot of its tokens.
    `dtype_bytes`: the element size frames are stored in (the projector's dtype); cluster points, keys and
    abstract slots are fp32, times fp64, retrieved frames buffer indices."""
    d = config.mm_hidden_size
    spa, tem, abs_ = config.spatial_pool**2, config.temporal_pool**2 * d, config.abstract_pool**2
    n_buff, k, head = config.buffer_frames, config.temporal_frames + 1, 0
    if config.memory_mode == "upstream":  # retrieval reads the stream's first frames, kept apart
        head = config.temporal_frames
    frames = (n_buff + config.spatial_frames + head) * (spa * d * dtype_bytes + 8)  # grids and their times
    keys = n_buff * (tem * 4 + 4)  # the buffer's flattened 4x4 grids (fp32) and their squared norms
    temporal = k * (tem * 4 + 4 + 3 * 8)  # centroids (+ a spare row), weights, 3 times
    abstract = config.abstract_frames * abs_ * d * 4
    retrieved = config.retrieved_frames * 8
    return frames + keys + temporal + abstract + retrieved + snapshot_bytes(config, dtype_bytes)


def snapshot_bytes(config, dtype_bytes):
    """One published snapshot: the memory tokens of a long stream."""
    from ...model.memory import memory_num_tokens

    return memory_num_tokens(10**6, config) * config.mm_hidden_size * dtype_bytes


def stack_rows(capacity, sessions):
    """(rows, peak rows) of a memory stack of `capacity` rows (0: none yet) once `sessions` memories are in
    it: it doubles while full and never shrinks; while it grows, the old and the new rows exist together."""
    if capacity == 0:
        return sessions, sessions  # the first stack is made for the memories at hand
    rows = capacity
    while rows < sessions:
        rows *= 2
    return rows, rows + rows // 2 if rows > capacity else rows


def answer_pool_bytes(config, dtype_bytes, max_batch, max_new_tokens, context_len):
    """The answer lane's KV cache: `max_batch` slots (runtime/batch_decoder.py), each of the positions one
    answer takes at most (a long stream's memory, PROMPT_ROOM of prompt text, `max_new_tokens`), rounded up
    to a multiple of 256 (the decoders align their caches to a divisor of it, CACHE_ALIGN)."""
    from ...model.memory import memory_num_tokens

    positions = min(context_len, memory_num_tokens(10**6, config) + PROMPT_ROOM + max_new_tokens)
    return max_batch * round_up(positions, 256) * kv_bytes_per_token(config, dtype_bytes)


def question_bytes(config, dtype_bytes, memory_tokens):
    """What a question holds beside its slot of the answer pool, from its arrival to its answer's end: its
    prompt's embeddings (the memory projected into the LLM's width and up to PROMPT_ROOM of text)."""
    return (PROMPT_ROOM + memory_tokens) * config.hidden_size * dtype_bytes


def default_budget_bytes(device):
    """CUDA: the free memory now (the model loaded) less the headroom; None elsewhere (no bound)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return max(0, free - max(HEADROOM_MIN_BYTES, int(HEADROOM_FRACTION * total)))


class MemoryBudget:
    """Reservations of accelerator bytes against `total_bytes` (None: unbounded, still counted)."""

    def __init__(self, total_bytes=None):
        if total_bytes is not None and total_bytes < 0:
            raise ValueError(f"a memory budget is >= 0 bytes, got {total_bytes}")
        self.total_bytes = total_bytes
        self._held = {}  # key -> (kind, bytes)
        self._lock = threading.Lock()
        self.refused = collections.Counter()  # kind -> reservations refused

    def reserve(self, key, kind, nbytes, what, peak=None, check=True):
        """Hold `nbytes` under `key` (replacing what it held), or raise 429 naming `what` when they -- or
        `peak`, bytes needed for a moment -- do not fit beside the rest. check=False: hold without looking
        (giving bytes back)."""
        with self._lock:
            used = sum(b for k, (_, b) in self._held.items() if k != key)
            need = max(nbytes, peak or 0)
            if check and self.total_bytes is not None and used + need > self.total_bytes:
                self.refused[kind] += 1
                held = self._held.get(key, (kind, 0))[1]
                raise SessionError(429, "memory_budget_exceeded",
                                   f"{what} needs {(need - held) / 2**20:.1f} MiB more accelerator memory; "
                                   f"{max(0, self.total_bytes - used - held) / 2**20:.1f} MiB of the "
                                   f"{self.total_bytes / 2**20:.1f} MiB budget are free")
            self._held[key] = (kind, int(nbytes))

    def release(self, key):
        with self._lock:
            self._held.pop(key, None)

    def used(self, kind=None):
        with self._lock:
            return sum(b for k, b in self._held.values() if kind is None or k == kind)

    def describe(self):
        with self._lock:
            by_kind = collections.Counter()
            for kind, nbytes in self._held.values():
                by_kind[kind] += nbytes
        return {"total_bytes": self.total_bytes, "sessions_bytes": by_kind["session"],
                "answers_bytes": by_kind["answers"], "questions_bytes": by_kind["question"],
                "refused": dict(self.refused)}


class ServerEngine(Engine):
    """Owns the model and the lanes; the web layer calls these methods from any thread.

    `budget`: a MemoryBudget; `session_bytes`: what a session holds -- its memory row plus `outside_bytes`
    outside the stack (its snapshot; with a fast path per session, that decoder's cache too); `answer_pool_bytes`: the answer
    lane's KV cache, reserved at once; `question_bytes(memory_tokens)`: what a question reserves (None:
    nothing); `max_batch`: the answers the lane runs at once (continuous batching)."""

    def __init__(self, make_stream, max_sessions=16, inbox_size=8, max_pending_questions=4, idle_timeout_s=600.0,
                 metrics=None, open_source_fn=open_source, budget=None, session_bytes=0, outside_bytes=0,
                 answer_pool_bytes=0,
                 question_bytes=None, ingest_lag_target_s=INGEST_LAG_TARGET_S, max_answer_defer_s=MAX_ANSWER_DEFER_S,
                 **engine_options):
        super().__init__(inbox_size=inbox_size, on_error="session", answer_lane=True, keep_running=True,
                         max_pending_questions=max_pending_questions, metrics=metrics, **engine_options)
        self.make_stream = make_stream  # fps -> a new StreamSession on the shared model
        self.max_sessions = int(max_sessions)
        self.idle_timeout_s = float(idle_timeout_s)
        self.open_source = open_source_fn
        self._reserved = 0  # sessions being built (their StreamSession) that count against max_sessions
        self.budget = budget if budget is not None else MemoryBudget()
        total = self.budget.total_bytes
        if total is not None and answer_pool_bytes + session_bytes > total:
            raise ValueError(f"the memory budget ({total / 2**20:.1f} MiB) does not hold the answers' KV cache "
                             f"({answer_pool_bytes / 2**20:.1f} MiB) and one session ({session_bytes / 2**20:.1f} MiB)")
        self.budget.reserve("answer_pool", "answers", answer_pool_bytes, "the answers' KV cache")
        self.session_bytes, self.outside_bytes = int(session_bytes), int(outside_bytes)
        self.question_bytes = question_bytes
        if not ingest_lag_target_s > 0 or max_answer_defer_s < 0:
            raise ValueError("ingest_lag_target_s must be > 0 and max_answer_defer_s >= 0")
        self.ingest_lag_target_s = float(ingest_lag_target_s)
        self.max_answer_defer_s = float(max_answer_defer_s)
        self._deferred = collections.deque()  # (stream, QuestionJob) waiting for the ingest lane to catch up
        self._wake = threading.Event()  # a question was deferred
        self.questions_deferred = 0  # how many questions ever waited

    def start(self):
        super().start()
        self._start_thread("scheduler", self._dispatch_loop)
        return self

    def stop(self):
        super().stop()
        with self._lock:
            for _, job in self._deferred:
                if not job.future.done():
                    job.future.set_exception(SessionError(503, "stopping", "the engine is stopping"))
            self._deferred.clear()

    def shutdown(self, timeout=10.0):
        """Close every session, stop the lanes and wait for them."""
        with self._lock:
            for stream in list(self._streams.values()):
                self._close_locked(stream)
        self.stop()
        self.join(timeout)

    def create(self, source, fps, hidden=False):
        """A new session; its source thread starts for file / url / camera / media sources. `source` is
        validated (paths resolved) by the caller; `source["_open"]` says how to open it (`open_source`
        kwargs, or `frames`: a callable giving (frame, t)) and how to play it."""
        stream_id = f"sess_{secrets.token_hex(8)}"
        with self._lock:
            if len(self._streams) + self._reserved >= self.max_sessions:
                raise SessionError(429, "too_many_sessions", f"at most {self.max_sessions} sessions at once")
            self._hold_memories(len(self._streams) + self._reserved + 1, "a new session")
            self._reserved += 1  # the slot is taken before the (slower) construction
        stream = None
        try:
            session = self.make_stream(fps)
            options = dict(source.get("_open", {}))
            play_speed = float(options.pop("play_speed", 1.0)) or math.inf  # 0: as fast as the source gives
            frame_limit = options.pop("max_frames_limit", None)
            end_is_failure = options.pop("end_is_failure", False)
            factory = options.pop("frames", None)
            if source.get("type", "push") == "push":
                frames = None
            elif factory is not None:
                frames = FrameSource("media", "request", live=False, _open=factory)
            else:
                frames = lambda: self.open_source(video_fps=fps, **options)  # noqa: E731 - opened by its thread
            public = {k: v for k, v in source.items() if not k.startswith("_")}
            with self._lock:
                stream = self.add_session(stream_id, session, frames, play_speed=play_speed,
                                          fps=float(fps), public=public, hidden=hidden, frame_limit=frame_limit,
                                          end_is_failure=end_is_failure)
        finally:
            with self._lock:
                self._reserved -= 1
                if stream is None:
                    self._hold_memories(len(self._streams) + self._reserved)
        if self.metrics is not None:
            self.metrics.sessions_created.inc()
        return stream

    def remove_session(self, stream_id):
        stream = super().remove_session(stream_id)
        with self._lock:
            self._hold_memories(len(self._streams) + self._reserved)
        return stream

    def stack_capacity(self):
        """Rows of the memory stacks the ingest lane keeps for the sessions (0: none yet, or no batching)."""
        batcher = getattr(self, "_batcher", None)
        return sum(stack.capacity for stack in batcher.stacks()) if batcher is not None else 0

    def _hold_memories(self, sessions, what=None):
        """The budget holds the memory rows and snapshots of `sessions` sessions; `what`: a session asks to
        come in (429 when it does not fit), else bytes are given back."""
        row = self.session_bytes - self.outside_bytes
        rows, peak = stack_rows(self.stack_capacity(), sessions)
        self.budget.reserve("memories", "session", rows * row + sessions * self.outside_bytes, what,
                            peak=peak * row + sessions * self.outside_bytes, check=what is not None)

    def get(self, session_id):
        with self._lock:
            stream = self._streams.get(session_id)
            if stream is None:
                raise SessionError(404, "session_not_found", f"no session {session_id!r}")
            return stream  # looking at a session is not activity: frames, questions and WebSockets are

    def list(self):
        with self._lock:
            return [s for s in self._streams.values() if not s.hidden]

    def delete(self, session_id):
        stream = self.remove_session(session_id)
        if stream is None:
            raise SessionError(404, "session_not_found", f"no session {session_id!r}")
        return stream

    def connect(self, stream, delta):
        with self._lock:
            stream.connections += delta
            stream.last_active = time.monotonic()

    def reap_idle(self, now=None):
        """Delete sessions with nothing to do and no client for `idle_timeout_s`. Returns their ids."""
        now = time.monotonic() if now is None else now
        with self._lock:
            idle = [s.id for s in self._streams.values()
                    if now - s.last_active > self.idle_timeout_s and not s.connections and not s.busy
                    and not s.frames and not s.questions and (s.kind == "push" or s.state != "running")]
        for session_id in idle:
            self.remove_session(session_id)
        return idle

    # --- questions: admission and ingest first ---------------------------------------------------
    def ask(self, stream, question, max_tokens=None, temperature=None, on_text=None, snapshot=None, arrived=None):
        """As `Engine.ask`, after the memory budget took the question, and held back while the ingest lane
        is behind (see the module's docstring). Returns the `QuestionJob` the caller waits on."""
        arrived = time.perf_counter() if arrived is None else arrived
        behind = self.ingest_backlog_s() > self.ingest_lag_target_s  # before the lock: it scans every session
        with self._lock:
            self._check_open(stream)
            snapshot = stream.session.snapshot() if snapshot is None else snapshot
            if snapshot is None:
                raise SessionError(409, "no_frames_yet", f"session {stream.id} has no frames in memory yet")
            waiting = len(stream.questions) + sum(s is stream for s, _ in self._deferred)
            if self.max_pending_questions is not None and waiting >= self.max_pending_questions:
                raise SessionError(429, "too_many_questions", f"session {stream.id} already has "
                                   f"{self.max_pending_questions} questions waiting")
            key = f"question_{secrets.token_hex(8)}"
            if self.question_bytes is not None:
                self.budget.reserve(key, "question", self.question_bytes(snapshot.num_tokens), "a question")
            try:
                if self._deferred or behind:
                    job = QuestionJob(question, snapshot, on_text, max_tokens, temperature, arrived=arrived)
                    self._deferred.append((stream, job))
                    self.questions_deferred += 1
                    self._wake.set()
                else:
                    job = super().ask(stream, question, max_tokens, temperature, on_text, snapshot, arrived)
            except BaseException:
                self.budget.release(key)
                raise
        job.future.add_done_callback(lambda _: self.budget.release(key))
        return job

    def ingest_backlog_s(self, now=None):
        """Seconds the oldest frame not yet in any running session's memory has waited (0: none waits)."""
        now = time.perf_counter() if now is None else now
        with self._lock:
            streams = [s for s in self._streams.values() if s.state == "running"]
        oldest = [t for t in (s.oldest_unlanded() for s in streams) if t is not None]  # outside the lock
        return max(0.0, now - min(oldest)) if oldest else 0.0

    def deferred_count(self):
        with self._lock:
            return len(self._deferred)

    def _dispatch_loop(self):
        """Hands deferred questions to the answer lane, oldest first, once the ingest lane caught up or a
        question waited `max_answer_defer_s`. It looks every DISPATCH_POLL_S while questions wait -- not at
        every wake-up of the engine's lock, which every frame sends -- and scans the sessions outside the lock."""
        while not self.stopped:
            if not self.deferred_count():
                self._wake.wait(POLL_S)
                self._wake.clear()
                continue
            now = time.perf_counter()
            caught_up = self.ingest_backlog_s(now) <= self.ingest_lag_target_s
            with self._lock:
                while self._deferred and (caught_up or
                                          now - self._deferred[0][1].arrived >= self.max_answer_defer_s):
                    self._release(*self._deferred.popleft())
            self.stop_event.wait(DISPATCH_POLL_S)

    def _release(self, stream, held):
        """Hand a deferred job to the answer lane: the lane's job answers, `held` (what the caller waits
        on) takes its outcome; a cancel of `held` reaches the lane's job (they share the event)."""
        closed = not self.is_open(stream)
        if closed or held.cancelled.is_set():
            if not held.future.done():
                held.future.set_exception(SessionError(409, "session_closed", "the session was closed") if closed
                                          else SessionError(499, "cancelled", "the client went away"))
            return
        try:
            job = Engine.ask(self, stream, held.question, held.max_tokens, held.temperature, held.on_text,
                             held.snapshot, held.arrived)
        except SessionError as error:
            held.future.set_exception(error)
            return
        job.cancelled = held.cancelled  # under the engine's lock: the lane has not taken the job yet

        def settle(done):
            if held.future.done():
                return
            error = done.exception()
            if error is not None:
                held.future.set_exception(error)
            else:
                held.future.set_result(done.result())

        job.future.add_done_callback(settle)
