"""The server's face of the engine (`serve/engine.py`): sessions created from requests, by generated id.

`ServerEngine` is the one `Engine` set up as the server runs it -- a failure fails its session only,
an answer lane thread answers the sessions' questions round robin, the ingest lane runs until the
server stops -- plus what only a server needs: a bound on sessions, ids, the request's source turned
into a frame source, idle sessions reaped, client connections counted.
"""

import math
import secrets
import time

from ..engine import Engine, SessionError
from ..sources import FrameSource, open_source


class ServerEngine(Engine):
    """Owns the model and the lanes; the web layer calls these methods from any thread."""

    def __init__(self, make_stream, max_sessions=16, inbox_size=8, max_pending_questions=4, idle_timeout_s=600.0,
                 metrics=None, open_source_fn=open_source):
        super().__init__(inbox_size=inbox_size, on_error="session", answer_lane=True, keep_running=True,
                         max_pending_questions=max_pending_questions, metrics=metrics)
        self.make_stream = make_stream  # fps -> a new StreamSession on the shared model
        self.max_sessions = int(max_sessions)
        self.idle_timeout_s = float(idle_timeout_s)
        self.open_source = open_source_fn
        self._reserved = 0  # sessions being built (their StreamSession) that count against max_sessions

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
        with self._lock:
            if len(self._streams) + self._reserved >= self.max_sessions:
                raise SessionError(429, "too_many_sessions", f"at most {self.max_sessions} sessions at once")
            self._reserved += 1  # the slot is taken before the (slower) construction
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
                stream = self.add_session(f"sess_{secrets.token_hex(8)}", session, frames, play_speed=play_speed,
                                          fps=float(fps), public=public, hidden=hidden, frame_limit=frame_limit,
                                          end_is_failure=end_is_failure)
        finally:
            with self._lock:
                self._reserved -= 1
        if self.metrics is not None:
            self.metrics.sessions_created.inc()
        return stream

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

