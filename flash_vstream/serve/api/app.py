"""The FastAPI app: auth, error shapes, health, metrics, models, sessions, frames and questions.

Routes are plain handlers over `Request` (bodies parsed by `inputs.py`), so every failure answers in
the contract's shape `{"error": {"code", "message"}}` with its status -- FastAPI's own 422 validation
responses never appear. The WebSocket and the OpenAI-compatible routes live in their own modules.
"""

import asyncio
import concurrent.futures
import contextlib
import hmac
import logging
import os
import threading
import time

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles

from . import inputs
from .scheduler import SessionError

STATIC_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "static")
JSON_LIMIT = 64 * 1024  # bodies of session and question requests
OPEN_PATHS = ("/", "/health", "/index.html")  # no key needed (the page asks for it itself)
ANSWER_TIMEOUT_S = 600.0
FRAME_TIMEOUT_S = 60.0
REAP_EVERY_S = 5.0
logger = logging.getLogger("flash_vstream.serve")


def error_response(status, code, message, state=None):
    if state is not None:
        state.metrics.requests_rejected.labels(status=str(status)).inc()
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def key_matches(state, presented):
    key = state.settings.api_key
    return key is None or (presented is not None and hmac.compare_digest(presented.encode(), key.encode()))


def bearer(headers):
    value = headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def session_source(state, body):
    """The request's `source` -> (public source dict with `_open` kwargs for `open_source`)."""
    s = state.settings
    source = body.get("source", {"type": "push"})
    if not isinstance(source, dict):
        raise SessionError(400, "invalid_request", "'source' must be an object")
    kind = source.get("type")
    if kind == "push":
        return {"type": "push"}
    if kind == "file":
        path = inputs.media_path(source.get("path"), s.media_root)
        speed = inputs.number(source.get("play_speed", 1.0), "source.play_speed", 0, 1000)
        return {"type": "file", "path": source["path"], "play_speed": speed,
                "_open": {"video_file": path, "play_speed": speed}}
    if kind == "url":
        url = inputs.remote_url(source.get("url"), s.allow_remote_sources)
        live = source.get("live", True)
        if not isinstance(live, bool):
            raise SessionError(400, "invalid_request", "'source.live' must be true or false")
        return {"type": "url", "url": url, "live": live,
                "_open": {"video_source": url, "play_speed": 0, "end_is_failure": live}}
    if kind == "camera":
        index = source.get("index", 0)
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise SessionError(400, "invalid_request", "'source.index' must be a camera index >= 0")
        return {"type": "camera", "index": index,
                "_open": {"video_source": str(index), "play_speed": 0, "end_is_failure": True}}
    raise SessionError(400, "invalid_source", "'source.type' must be one of push, file, url, camera")


def question_args(state, body):
    """(question, max_tokens, temperature) of a question body, checked against the limits."""
    s = state.settings
    question = inputs.text(body.get("question"), "question", s.max_question_chars)
    max_tokens = body.get("max_tokens")
    max_tokens = s.default_max_tokens if max_tokens is None else max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= s.max_tokens:
        raise SessionError(400, "invalid_request", f"'max_tokens' must be an integer in [1, {s.max_tokens}]")
    temperature = inputs.number(body.get("temperature", 0.0), "temperature", 0, 2)
    return question, max_tokens, float(temperature)


def answer_fields(result):
    a = result.answer
    return {"frames_seen": a.frames_seen, "stream_time": a.stream_time, "memory_tokens": a.memory_tokens,
            "ttft_s": None if result.ttft_s is None else round(result.ttft_s, 6),
            "latency_s": round(result.latency_s, 6)}


async def wait_job(job, timeout=ANSWER_TIMEOUT_S):
    """The job's AnswerResult; a client that goes away (cancellation) cancels the answer."""
    try:
        return await asyncio.wait_for(asyncio.wrap_future(job.future), timeout)
    except (asyncio.CancelledError, asyncio.TimeoutError):
        job.cancelled.set()
        raise


def create_app(state):
    app = FastAPI(title="Flash-VStream", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan(state))
    app.state.server = state

    @app.middleware("http")
    async def guard(request, call_next):
        path = request.url.path
        if path not in OPEN_PATHS and not path.startswith("/static/"):
            if not key_matches(state, bearer(request.headers)):
                return error_response(401, "unauthorized", "a valid 'Authorization: Bearer <key>' header is needed",
                                      state)
            if not state.ready.is_set() and path != "/metrics":
                return error_response(503, "not_ready", "the model is still loading", state)
        return await call_next(request)

    @app.exception_handler(SessionError)
    async def session_error(request, error):
        return error_response(error.status, error.code, error.message, state)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, error):
        codes = {404: "not_found", 405: "method_not_allowed"}
        return error_response(error.status_code, codes.get(error.status_code, "http_error"), str(error.detail),
                              state)

    @app.exception_handler(Exception)
    async def internal_error(request, error):
        logger.exception("unhandled error on %s", request.url.path)
        return error_response(500, "internal_error", f"{type(error).__name__}: {error}", state)

    @app.get("/health")
    async def health():
        if state.load_error is not None:
            return JSONResponse({"status": "error", "error": state.load_error}, status_code=503)
        return {"status": "ok" if state.ready.is_set() else "loading"}

    @app.get("/metrics")
    async def metrics():
        # off the event loop: with many sessions the per-session gauges take a while, and every stream's frames and
        # answers go through this loop
        text = await asyncio.to_thread(generate_latest, state.metrics.registry)
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    @app.get("/")
    async def page():
        return FileResponse(os.path.join(STATIC_DIR, "index.html"))

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/v1/models")
    async def models():
        s = state.settings
        return {"object": "list", "data": [{"id": s.model_id, "object": "model", "created": state.started,
                                            "owned_by": "flash-vstream",
                                            "max_tokens": s.max_tokens}]}

    @app.post("/v1/sessions", status_code=201)
    async def create_session(request: Request):
        body = await inputs.json_body(request, JSON_LIMIT)
        fps = inputs.number(body.get("fps", 1.0), "fps", 0, state.settings.max_fps)
        if not fps > 0:
            raise SessionError(400, "invalid_request", "'fps' must be > 0")
        source = session_source(state, body)
        session = await asyncio.to_thread(state.engine.create, source, fps)
        logger.info("session %s opened (%s)", session.id, session.kind)
        return JSONResponse(session.describe(), status_code=201)

    @app.get("/v1/sessions")
    async def list_sessions():
        data = await asyncio.to_thread(lambda: [s.describe() for s in state.engine.list()])  # off the loop, as /metrics
        return {"object": "list", "data": data}

    @app.get("/v1/sessions/{session_id}")
    async def get_session(session_id: str):
        return state.engine.get(session_id).describe()

    @app.get("/v1/sessions/{session_id}/memory")
    async def session_memory(session_id: str):
        """What the memory holds now: the times of its temporal centroids (with the frames each stands for
        and their span), retrieved and spatial frames -- the page draws its timeline from this."""
        session = state.engine.get(session_id)
        snapshot = session.session.snapshot()
        if snapshot is None:
            return {"object": "session.memory", "frames_seen": 0, "stream_time": 0.0, "memory_tokens": 0,
                    "timestamps": {"temporal": [], "retrieved": [], "spatial": []}, "temporal_weights": [],
                    "temporal_spans": []}
        return {"object": "session.memory", "frames_seen": snapshot.frames_seen,
                "stream_time": snapshot.stream_time, "memory_tokens": snapshot.num_tokens,
                "timestamps": snapshot.timestamps, "temporal_weights": list(snapshot.temporal_weights),
                "temporal_spans": [list(span) for span in snapshot.temporal_spans]}

    @app.delete("/v1/sessions/{session_id}")
    async def delete_session(session_id: str):
        session = await asyncio.to_thread(state.engine.delete, session_id)
        logger.info("session %s closed", session_id)
        return {"id": session.id, "object": "session.deleted", "deleted": True}

    @app.post("/v1/sessions/{session_id}/frames")
    async def push_frame(session_id: str, request: Request):
        arrived = time.perf_counter()  # the frame's ingest lag counts from here
        s = state.settings
        session = state.engine.get(session_id)
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type == "application/json":
            body = inputs.parse_json_object(await inputs.read_body(request, s.max_frame_bytes * 4 // 3 + JSON_LIMIT))
            image = body.get("image")
            if not isinstance(image, str):
                raise SessionError(400, "invalid_request", "'image' must be a data URL string")
            timestamp = inputs.number(body.get("timestamp"), "timestamp", 0)
            _, data = inputs.decode_data_url(image, s.max_frame_bytes, ("image/",))
        elif content_type in ("image/jpeg", "image/png", "image/webp"):
            raw = request.query_params.get("timestamp")
            try:
                timestamp = inputs.number(float(raw), "timestamp", 0)
            except (TypeError, ValueError):
                raise SessionError(400, "invalid_request", "an image body needs ?timestamp=SECONDS") from None
            data = await inputs.read_body(request, s.max_frame_bytes)
        else:
            raise SessionError(400, "unsupported_media_type", "send image/jpeg or image/png with ?timestamp=, "
                               "or JSON {\"image\": data URL, \"timestamp\": s}")
        frame = await asyncio.to_thread(inputs.decode_image, data, s.max_frame_bytes)
        future = state.engine.push_frame(session, frame, timestamp, wait=True, arrived=arrived)
        try:
            await asyncio.wait_for(asyncio.wrap_future(future), FRAME_TIMEOUT_S)
        except asyncio.TimeoutError:
            pass  # still queued: the counts say what is in memory now
        if session.state == "failed":
            raise SessionError(409, "session_failed", f"session {session.id} failed: {session.error}")
        described = session.describe()
        return {"frames_seen": described["frames_seen"], "stream_time": described["stream_time"],
                "dropped_frames": described["dropped_frames"]}

    @app.post("/v1/sessions/{session_id}/questions")
    async def ask(session_id: str, request: Request):
        session = state.engine.get(session_id)
        question, max_tokens, temperature = question_args(state, await inputs.json_body(request, JSON_LIMIT))
        job = state.engine.ask(session, question, max_tokens, temperature)
        result = await wait_job(job)
        return {"answer": result.answer.text, **answer_fields(result)}

    from .openai_compat import add_openai_routes
    from .websocket import add_websocket_route

    add_openai_routes(app, state)
    add_websocket_route(app, state)

    return app


def lifespan(state):
    """Start-up and shutdown of the app: the idle-session reaper runs while the app serves."""

    @contextlib.asynccontextmanager
    async def run(app):
        async def reap():
            while True:
                await asyncio.sleep(min(REAP_EVERY_S, state.settings.idle_timeout_s / 4))
                if state.engine is not None:
                    for session_id in await asyncio.to_thread(state.engine.reap_idle):
                        logger.info("session %s closed after %.0f s idle", session_id, state.settings.idle_timeout_s)

        # blocking work (image decoding, session creation, joins) runs on a pool of a fixed size, all of it
        # started now: the process's thread count does not drift with the load
        size = state.settings.io_threads
        pool = concurrent.futures.ThreadPoolExecutor(size, thread_name_prefix="flash-vstream-io")
        barrier = threading.Barrier(size)
        for future in [pool.submit(barrier.wait, 10.0) for _ in range(size)]:
            future.result()
        asyncio.get_running_loop().set_default_executor(pool)
        task = asyncio.create_task(reap())
        try:
            yield
        finally:
            task.cancel()
            await asyncio.to_thread(state.close)

    return run
