"""`python -m flash_vstream.serve.server`: live video sessions, questions at any moment, an OpenAI-compatible
API and a web page, on one model (endpoints, events and errors: docs/serving.md).

    python -m flash_vstream.serve.server --model-path P [--host 127.0.0.1] [--port 8000] [--api-key KEY]
        [--media-root DIR] [--allow-remote-sources] [--max-sessions N] [--device cuda|cpu]
        [--vision-device cuda:1]

The process: uvicorn serves the app (`api/app.py`) at once, `GET /health` says `loading` while the model
loads on a background thread, and one line `listening on http://HOST:PORT` is printed once it says `ok`
(`--port 0` picks a free port; the line names it). The engine (`engine.py`) owns the model: an
ingest lane and an answer lane serve the sessions round robin. The API key (`--api-key` or
FLASH_VSTREAM_API_KEY) is never logged: uvicorn's access log is off and `api_key=` is cut out of every
log line.
"""

import argparse
import asyncio
import logging
import os
import re
import sys
import threading

from .api.app import create_app
from .api.state import ServerState, Settings

logger = logging.getLogger("flash_vstream.serve")


def build_parser():
    d = Settings(model_path="")
    p = argparse.ArgumentParser(prog="python -m flash_vstream.serve.server",
                                description="Serve live video sessions and questions about them over HTTP, "
                                            "WebSocket and an OpenAI-compatible API.")
    p.add_argument("--model-path", required=True)
    p.add_argument("--model-base", default=None, help="the LLM a stage-1 or LoRA checkpoint was trained on")
    p.add_argument("--model-name", default=None, help="the model id /v1/models shows (default: the folder name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0: a free port (the start-up line names it)")
    p.add_argument("--api-key", default=os.environ.get("FLASH_VSTREAM_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' (default: $FLASH_VSTREAM_API_KEY; none: open)")
    p.add_argument("--media-root", default=None, help="the only folder whose files requests may name")
    p.add_argument("--allow-remote-sources", action="store_true", help="accept rtsp:// and http(s):// sources")
    p.add_argument("--max-sessions", type=int, default=d.max_sessions)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--vision-device", default=None,
                   help="encode frames and keep the memories on this device (e.g. cuda:1), answer on --device "
                        "(e.g. cuda:0); default: beside the LLM")
    p.add_argument("--load-8bit", action="store_true", help="the LLM's linear layers in int8 (per output channel)")
    p.add_argument("--load-4bit", action="store_true", help="the LLM's linear layers in int4 (groups of 128)")
    p.add_argument("--max-frame-bytes", type=int, default=d.max_frame_bytes, help="largest pushed image")
    p.add_argument("--max-video-bytes", type=int, default=d.max_video_bytes, help="largest data-URL video")
    p.add_argument("--max-video-frames", type=int, default=d.max_video_frames,
                   help="most frames a one-shot video may give")
    p.add_argument("--max-question-chars", type=int, default=d.max_question_chars)
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="most answer tokens a request may ask for")
    p.add_argument("--max-pending-questions", type=int, default=d.max_pending_questions,
                   help="questions waiting per session before 429")
    p.add_argument("--idle-timeout", type=float, default=d.idle_timeout_s,
                   help="seconds without activity after which a session is closed")
    p.add_argument("--conv-mode", default=d.conv_mode)
    p.add_argument("--fast", choices=("off", "auto", "on"), default=d.fast,
                   help="the realtime fast path per session (CUDA graphs, static-cache decoder; each session builds "
                        "and compiles its own, 30-50 s on a 7B); off: the stock path")
    p.add_argument("--memory-budget-gb", type=float, default=None,
                   help="accelerator memory for sessions' memory state and answers' KV caches; a session or question "
                        "beyond it gets 429 (default on CUDA: free memory after loading less a headroom; CPU: none)")
    p.add_argument("--max-batch", type=int, default=d.max_batch,
                   help="answers run at once (continuous batching): the answer KV cache's slots")
    p.add_argument("--ingest-lag-target", type=float, default=d.ingest_lag_target_s,
                   help="seconds: new answers wait while a frame has waited longer than this to reach its memory")
    p.add_argument("--max-answer-defer", type=float, default=d.max_answer_defer_s,
                   help="seconds: the longest a new answer waits for the ingest lane to catch up")
    p.add_argument("--log-level", default="info")
    return p


def settings_from_args(args):
    for name in ("max_sessions", "max_batch", "max_frame_bytes", "max_video_bytes", "max_video_frames",
                 "max_question_chars", "max_tokens", "max_pending_questions"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if not args.idle_timeout > 0:
        raise ValueError("--idle-timeout must be > 0")
    if args.memory_budget_gb is not None and not args.memory_budget_gb > 0:
        raise ValueError("--memory-budget-gb must be > 0")
    if not args.ingest_lag_target > 0 or args.max_answer_defer < 0:
        raise ValueError("--ingest-lag-target must be > 0 and --max-answer-defer >= 0")
    if args.load_8bit and args.load_4bit:
        raise ValueError("choose one of --load-8bit / --load-4bit")
    if args.media_root is not None and not os.path.isdir(args.media_root):
        raise ValueError(f"--media-root {args.media_root}: not a folder")
    if args.vision_device is not None:
        from ..runtime.devices import default_device, vision_placement

        # a bad device: a clear error before anything loads
        vision_placement(default_device(args.device), args.vision_device)
    return Settings(model_path=args.model_path, model_base=args.model_base, model_id=args.model_name,
                    device=args.device, vision_device=args.vision_device, load_8bit=args.load_8bit,
                    load_4bit=args.load_4bit, api_key=args.api_key, media_root=args.media_root,
                    allow_remote_sources=args.allow_remote_sources, max_sessions=args.max_sessions,
                    max_frame_bytes=args.max_frame_bytes, max_video_bytes=args.max_video_bytes,
                    max_video_frames=args.max_video_frames, max_question_chars=args.max_question_chars,
                    max_tokens=args.max_tokens, default_max_tokens=min(64, args.max_tokens),
                    max_pending_questions=args.max_pending_questions, idle_timeout_s=args.idle_timeout,
                    conv_mode=args.conv_mode, fast=args.fast,
                    memory_budget_bytes=None if args.memory_budget_gb is None else int(args.memory_budget_gb * 1e9),
                    ingest_lag_target_s=args.ingest_lag_target, max_answer_defer_s=args.max_answer_defer,
                    max_batch=args.max_batch)


class RedactKeys(logging.Filter):
    """Cuts `api_key=...` out of log lines (uvicorn logs WebSocket paths with their query) and the key itself."""

    PATTERN = re.compile(r"(api_key=)[^&\s\"']+")

    def __init__(self, key):
        super().__init__()
        self.key = key

    def filter(self, record):
        message = record.getMessage()
        redacted = self.PATTERN.sub(r"\1<redacted>", message)
        if self.key:
            redacted = redacted.replace(self.key, "<redacted>")
        if redacted != message:
            record.msg, record.args = redacted, ()
        return True


def _log_config(level, key):
    handler = {"class": "logging.StreamHandler", "stream": "ext://sys.stderr", "formatter": "plain",
               "filters": ["redact"]}
    return {"version": 1, "disable_existing_loggers": False,
            "filters": {"redact": {"()": RedactKeys, "key": key}},
            "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
            "handlers": {"stderr": handler},
            "loggers": {name: {"handlers": ["stderr"], "level": level.upper(), "propagate": False}
                        for name in ("uvicorn", "uvicorn.error", "flash_vstream")}}


async def _serve(server, state, host):
    serving = asyncio.create_task(server.serve())
    while not server.started and not serving.done():
        await asyncio.sleep(0.05)
    if serving.done():
        return serving.result()
    port = server.servers[0].sockets[0].getsockname()[1]
    while not state.ready.is_set() and state.load_error is None and not serving.done():
        await asyncio.sleep(0.05)
    if state.load_error is not None:
        print(f"error: cannot load the model from {state.settings.model_path}: {state.load_error}",
              file=sys.stderr, flush=True)
        server.should_exit = True
    elif not serving.done():
        print(f"listening on http://{host}:{port}", flush=True)
    await serving


def uvicorn_config(state, host, port, log_level="info"):
    """How uvicorn serves the app of `state` (the benchmark serves its in-process model the same way)."""
    import uvicorn

    settings = state.settings
    # a WebSocket message holds one base64 image (4/3 of its bytes) plus the event's JSON. No permessage-deflate:
    # JPEG does not compress, and inflating every frame cost the event loop a tenth of its time at 128 streams
    ws_max = settings.max_frame_bytes * 4 // 3 + 64 * 1024
    return uvicorn.Config(create_app(state), host=host, port=port, access_log=False, ws="websockets",
                          ws_max_size=ws_max, ws_per_message_deflate=False,
                          log_config=_log_config(log_level, settings.api_key), timeout_graceful_shutdown=5)


def main(argv=None):
    import uvicorn

    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    state = ServerState(settings)
    server = uvicorn.Server(uvicorn_config(state, args.host, args.port, args.log_level))
    threading.Thread(target=_load_quietly, args=(state,), name="model loader", daemon=True).start()
    asyncio.run(_serve(server, state, args.host))
    return 1 if state.load_error is not None else 0


def _load_quietly(state):
    try:
        state.load()
    except BaseException:  # noqa: BLE001 - reported by /health and the start-up line
        logger.error("model load failed: %s", state.load_error)


if __name__ == "__main__":
    sys.exit(main())
