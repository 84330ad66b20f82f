"""The server's settings, its loaded model, its engine and its metrics: one object per app."""

import dataclasses
import os
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from ..engine import STATES
from .scheduler import (INGEST_LAG_TARGET_S, MAX_ANSWER_DEFER_S, MemoryBudget, ServerEngine, answer_pool_bytes,
                        default_budget_bytes, question_bytes, session_state_bytes, snapshot_bytes)

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0)


@dataclasses.dataclass
class Settings:
    model_path: str
    model_base: str | None = None
    model_id: str | None = None  # the name /v1/models shows (default: the model folder's name)
    device: str | None = None
    vision_device: str | None = None  # CLIP and the memories there, the LLM on `device` (runtime/devices.py)
    load_8bit: bool = False  # the LLM's linear layers in int8 / int4 (model/quantization.py)
    load_4bit: bool = False
    api_key: str | None = None
    media_root: str | None = None
    allow_remote_sources: bool = False
    max_sessions: int = 16
    max_frame_bytes: int = 8 * 2**20  # one pushed image
    max_video_bytes: int = 64 * 2**20  # a data-URL video in a chat completion
    max_video_frames: int = 1800  # frames a one-shot video may give at its fps
    max_question_chars: int = 4000
    max_tokens: int = 512  # the most answer tokens a request may ask for
    default_max_tokens: int = 64
    max_fps: float = 30.0
    max_pending_questions: int = 4  # per session
    inbox_size: int = 8  # frames waiting for the ingest lane, per session
    idle_timeout_s: float = 600.0
    io_threads: int = 8  # the pool that decodes images and runs blocking calls off the event loop
    conv_mode: str = "vicuna_v1"
    # the fast path (CUDA graphs, static-cache decoder) is one state per StreamSession: every session would build,
    # capture and compile its own (30-50 s on a 7B), so the server runs the stock path unless asked
    fast: str = "off"  # "off" | "auto" | "on"
    # accelerator bytes for sessions' memory state and answers' KV caches (None: the default, from free CUDA
    # memory after loading; no bound on a CPU); a session or question beyond it gets 429
    memory_budget_bytes: int | None = None
    ingest_lag_target_s: float = INGEST_LAG_TARGET_S  # new answers wait while a frame has waited longer
    max_answer_defer_s: float = MAX_ANSWER_DEFER_S  # ... but at most this long
    max_batch: int = 16  # answers the answer lane runs at once (continuous batching), the KV cache's slots
    # a busy ingest lane (a tick of many streams' frames) lets its next tick gather this long: fewer, larger ticks
    ingest_gather_s: float = 0.1

    def __post_init__(self):
        if self.model_id is None:
            self.model_id = os.path.basename(os.path.normpath(self.model_path)) or "flash-vstream"


class Metrics:
    """Prometheus metrics in a registry of this app's own (two apps in one process do not collide)."""

    def __init__(self, state):
        self.registry = CollectorRegistry()
        r = self.registry
        self.sessions_created = Counter("flash_vstream_sessions_created", "sessions opened", registry=r)
        self.sessions_failed = Counter("flash_vstream_sessions_failed", "sessions whose source or ingest failed",
                                       registry=r)
        self.frames_ingested = Counter("flash_vstream_frames_ingested", "frames encoded into a memory", registry=r)
        self.frames_dropped = Counter("flash_vstream_frames_dropped", "frames not ingested", ["reason"], registry=r)
        self.questions = Counter("flash_vstream_questions_answered", "questions answered", registry=r)
        self.latency = Histogram("flash_vstream_question_latency_seconds", "question arrival -> last token",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("flash_vstream_time_to_first_token_seconds", "question arrival -> first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.frame_seconds = Histogram("flash_vstream_frame_ingest_seconds", "one frame's encode + memory update",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.requests_rejected = Counter("flash_vstream_requests_rejected", "requests answered with an error",
                                         ["status"], registry=r)
        self.ingest_lag = Histogram("flash_vstream_ingest_lag_seconds", "a frame received -> in its session's memory",
                                    buckets=LAG_BUCKETS, registry=r)
        r.register(_LiveCollector(state))


class _LiveCollector:
    """Gauges read at scrape time: sessions by state, each session's lag and drops, the ingest backlog, the
    memory budget, deferred questions and accelerator memory."""

    def __init__(self, state):
        self.state = state

    def collect(self):
        engine = self.state.engine
        sessions = GaugeMetricFamily("flash_vstream_sessions", "open sessions by state", labels=["state"])
        counts = engine.counts() if engine is not None else dict.fromkeys(STATES, 0)
        for name in STATES:
            sessions.add_metric([name], counts[name])
        yield sessions
        if engine is not None:
            yield from self._scheduling(engine)
        gpu = GaugeMetricFamily("flash_vstream_gpu_memory_bytes", "accelerator memory allocated by torch "
                                "(0 without CUDA)", labels=["kind"])
        allocated = reserved = 0
        try:
            import torch

            if torch.cuda.is_available() and torch.cuda.is_initialized():
                allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
        except Exception:  # noqa: BLE001 - metrics never fail a scrape
            pass
        gpu.add_metric(["allocated"], allocated)
        gpu.add_metric(["reserved"], reserved)
        yield gpu

    @staticmethod
    def _scheduling(engine):
        lag = GaugeMetricFamily("flash_vstream_session_ingest_lag_seconds", "a session's frame received -> in "
                                "memory, over its last frames", labels=["session", "quantile"])
        dropped = GaugeMetricFamily("flash_vstream_session_dropped_frames", "frames a session dropped",
                                    labels=["session"])
        ingested = GaugeMetricFamily("flash_vstream_session_frames_ingested", "frames in a session's memory",
                                     labels=["session"])
        for stream in engine.streams():
            summary = stream.ingest_lag.summary()
            for quantile, key in (("0.5", "p50"), ("0.99", "p99"), ("1", "max")):
                if summary[key] is not None:
                    lag.add_metric([stream.id, quantile], summary[key])
            dropped.add_metric([stream.id], stream.frames_dropped)
            ingested.add_metric([stream.id], stream.frames_ingested)
        yield from (lag, dropped, ingested)
        yield GaugeMetricFamily("flash_vstream_ingest_backlog_seconds", "how long the oldest frame not yet in "
                                "memory has waited", value=engine.ingest_backlog_s())
        yield GaugeMetricFamily("flash_vstream_questions_deferred", "questions waiting for the ingest lane to "
                                "catch up", value=engine.deferred_count())
        budget = engine.budget.describe()
        memory = GaugeMetricFamily("flash_vstream_memory_budget_bytes", "the accelerator memory budget: its total "
                                   "(-1: unbounded), what sessions, the answers' KV cache and questions hold, what one "
                                   "session takes",
                                   labels=["kind"])
        memory.add_metric(["total"], -1 if budget["total_bytes"] is None else budget["total_bytes"])
        memory.add_metric(["sessions"], budget["sessions_bytes"])
        memory.add_metric(["answers"], budget["answers_bytes"])
        memory.add_metric(["questions"], budget["questions_bytes"])
        memory.add_metric(["per_session"], engine.session_bytes)
        yield memory
        yield GaugeMetricFamily("flash_vstream_memory_stack_rows", "rows of the sessions' shared memory stack "
                                "(it doubles when full and never shrinks)", value=engine.stack_capacity())
        refused = GaugeMetricFamily("flash_vstream_memory_budget_refused", "reservations the budget refused (429)",
                                    labels=["kind"])
        for kind in ("session", "question"):
            refused.add_metric([kind], budget["refused"].get(kind, 0))
        yield refused


class ServerState:
    """Settings + model + engine. `load()` (a background thread at start-up) fills in the model; until it
    is done `ready` is False and everything but /health and the page answers 503."""

    def __init__(self, settings):
        self.settings = settings
        self.engine = None
        self.tokenizer = self.model = self.image_processor = self.context_len = None
        self.load_error = None
        self.ready = threading.Event()
        self.started = int(time.time())
        self.metrics = Metrics(self)

    def load(self):
        try:
            from ...model.builder import load_pretrained_model

            from ...runtime.devices import default_device, vision_placement

            s = self.settings
            device, vision_device = vision_placement(default_device(s.device), s.vision_device)  # CLIP's card, if apart
            self.tokenizer, self.model, self.image_processor, self.context_len = load_pretrained_model(
                s.model_path, s.model_base, device=device, vision_device=vision_device, load_8bit=s.load_8bit,
                load_4bit=s.load_4bit)
            self.attach(self.model, self.tokenizer, self.image_processor, self.context_len)
        except BaseException as error:  # noqa: BLE001 - reported by /health and the start-up line
            self.load_error = f"{type(error).__name__}: {error}"
            raise

    def attach(self, model, tokenizer, image_processor, context_len=None):
        """Use an already loaded model (the CLI loads one; tests may pass theirs)."""
        from ..session import StreamSession

        s = self.settings
        self.model, self.tokenizer, self.image_processor, self.context_len = (model, tokenizer, image_processor,
                                                                            context_len)

        def make_stream(fps):
            return StreamSession(model, tokenizer, image_processor, conv_mode=s.conv_mode,
                                 max_new_tokens=s.max_tokens, video_fps=fps, context_len=context_len,
                                 fast={"off": False, "auto": None, "on": True}[s.fast])

        warm = make_stream(1.0)  # the session the answer lane warms up on; its context length is every session's
        config, dtype_bytes = model.config, model.get_model().mm_projector_dtype().itemsize
        total = s.memory_budget_bytes if s.memory_budget_bytes is not None else default_budget_bytes(model.device)
        context = warm.context_len
        # --fast on (auto on CUDA): every session builds a decoder of its own, whose cache is one answer slot
        per_session_fast = s.fast == "on" or (s.fast == "auto" and model.device.type == "cuda")
        decoder = answer_pool_bytes(config, dtype_bytes, 1, s.max_tokens, context) if per_session_fast else 0
        # the answer batch's slots, and on CUDA the engine's lone fast path (one slot) for sessions without their own
        slots = s.max_batch + (1 if model.device.type == "cuda" and not per_session_fast else 0)
        self.engine = ServerEngine(make_stream, max_sessions=s.max_sessions, inbox_size=s.inbox_size,
                                   max_pending_questions=s.max_pending_questions, idle_timeout_s=s.idle_timeout_s,
                                   metrics=self.metrics, budget=MemoryBudget(total), max_batch=s.max_batch,
                                   session_bytes=session_state_bytes(config, dtype_bytes) + decoder,
                                   outside_bytes=snapshot_bytes(config, dtype_bytes) + decoder,
                                   answer_pool_bytes=answer_pool_bytes(config, dtype_bytes, slots, s.max_tokens,
                                                                       context),
                                   question_bytes=lambda memory_tokens: question_bytes(config, dtype_bytes,
                                                                                        memory_tokens),
                                   ingest_lag_target_s=s.ingest_lag_target_s,
                                   max_answer_defer_s=s.max_answer_defer_s, gather_s=s.ingest_gather_s)
        # the answer lane's lone fast path and batch, built and captured before any frame or question (engine.py)
        self.engine.warm_up_answers(warm)
        self.engine.start()
        self.ready.set()

    def close(self):
        if self.engine is not None:
            self.engine.shutdown()
