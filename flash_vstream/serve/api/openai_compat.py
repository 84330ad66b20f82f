"""`POST /v1/chat/completions`, OpenAI's shape, so the `openai` client works unchanged.

The question is the text of the last user message (earlier turns and system messages are not used:
each answer is asked fresh against the memory). What it is asked about:
- `"session_id"` (top level; the `openai` client sends it with `extra_body`): that live session's memory
  as it stands when the request arrives;
- otherwise the message's `video_url` / `image_url` parts, in order: a path under --media-root, a
  `data:` URL, or (with --allow-remote-sources) an http(s) URL. They are read at the model's fps into a
  one-shot session on the same engine (counted against --max-sessions, not listed) that is deleted after.

`"stream": true` answers with server-sent `chat.completion.chunk` events and `data: [DONE]`; the last
chunk carries `finish_reason`, `usage` and `flash_vstream` (what the answer saw).
"""

import asyncio
import contextlib
import json
import os
import tempfile
import time
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from ...mm_utils import tokenizer_image_token
from ...video_io import VideoReadError, iter_frames
from . import inputs
from .app import question_args, wait_job
from .scheduler import SessionError

ONE_SHOT_TIMEOUT_S = 600.0


def _last_user_content(body):
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise SessionError(400, "invalid_request", "'messages' must be a non-empty list")
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return message.get("content")
    raise SessionError(400, "invalid_request", "'messages' has no user message")


def _split_content(content):
    """A message's content -> (text, [("video" | "image", url)])."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise SessionError(400, "invalid_request", "a message's 'content' must be a string or a list of parts")
    texts, media = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in ("video_url", "image_url"):
            inner = part.get(kind)
            url = inner.get("url") if isinstance(inner, dict) else inner
            if not isinstance(url, str) or not url:
                raise SessionError(400, "invalid_request", f"a {kind} part needs {{\"{kind}\": {{\"url\": ...}}}}")
            media.append((kind.split("_")[0], url))
        else:
            raise SessionError(400, "invalid_request", f"unknown content part {kind!r}; known: text, video_url, "
                               "image_url")
    return "\n".join(texts), media


def _prepare_media(state, media, scratch):
    """Check every part now (so a bad one is a 400 before anything runs) -> [("video", path) | ("image", array)]."""
    s = state.settings
    items = []
    for kind, url in media:
        if kind == "image":
            if url.lower().startswith(("http://", "https://")):
                raise SessionError(400, "invalid_request", "image_url takes a data URL or a media-root path")
            items.append(("image", inputs.image_from_url(url, s.max_frame_bytes, s.media_root)))
        elif url.startswith("data:"):
            mime, data = inputs.decode_data_url(url, s.max_video_bytes, ("video/", "application/octet-stream"))
            path = os.path.join(scratch, f"video{len(items)}")
            with open(path, "wb") as f:
                f.write(data)
            items.append(("video", path))
        elif "://" in url:
            items.append(("video", inputs.remote_url(url, s.allow_remote_sources)))
        else:
            items.append(("video", inputs.media_path(url, s.media_root)))
    return items


def _media_frames(items, fps):
    """A callable giving (frame, seconds) over all parts in order: each image one frame, each video its frames
    at `fps`, the timeline continuing across parts."""

    def frames():
        offset = 0.0
        for kind, value in items:
            if kind == "image":
                yield value, offset
                offset += 1.0 / fps
                continue
            last = None
            for frame, t in iter_frames(value, fps=fps):
                last = offset + t
                yield frame, last
            offset = (offset if last is None else last) + 1.0 / fps

    return frames


def _chat_error(session):
    error = session.failure
    if isinstance(error, SessionError):
        return error
    if isinstance(error, VideoReadError):
        return SessionError(400, "invalid_video", str(error))
    return SessionError(500, "ingest_failed", session.error or "the video could not be read")


def add_openai_routes(app, state):
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        s = state.settings
        body = await inputs.json_body(request, s.max_video_bytes * 4 // 3 + 2**20)
        text, media = _split_content(_last_user_content(body))
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
        temperature = body.get("temperature")
        question, max_tokens, temperature = question_args(state, {
            "question": text, "max_tokens": max_tokens, "temperature": 0.0 if temperature is None else temperature})
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise SessionError(400, "invalid_request", "'stream' must be true or false")
        session_id = body.get("session_id")
        engine = state.engine

        async with contextlib.AsyncExitStack() as stack:
            if session_id is not None:
                if media:
                    raise SessionError(400, "invalid_request", "ask about a live session (session_id) or about "
                                       "media parts, not both")
                session = engine.get(str(session_id))
            elif not media:
                raise SessionError(400, "no_video", "the last user message has no video_url or image_url part, "
                                   "and there is no session_id")
            else:
                scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="flash_vstream_chat_"))
                items = await asyncio.to_thread(_prepare_media, state, media, scratch)
                fps = float(state.model.config.video_fps or 1.0)
                source = {"type": "media", "_open": {"frames": _media_frames(items, fps), "play_speed": 0,
                                                     "max_frames_limit": s.max_video_frames}}
                session = await asyncio.to_thread(engine.create, source, fps, True)
                stack.push_async_callback(asyncio.to_thread, _delete_quietly, engine, session.id)
                await asyncio.to_thread(session.ended.wait, ONE_SHOT_TIMEOUT_S)
                if session.state == "failed":
                    raise _chat_error(session)
            prompt_tokens = _prompt_tokens(state, session, question)
            if not stream:
                job = engine.ask(session, question, max_tokens, temperature)
                result = await wait_job(job)
                return JSONResponse(_completion(state, result, prompt_tokens, max_tokens))
            loop, pieces = asyncio.get_running_loop(), asyncio.Queue()
            job = engine.ask(session, question, max_tokens, temperature,
                             on_text=lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece))
            # the one-shot session must outlive this block: the generator deletes it
            cleanup = stack.pop_all()
        return StreamingResponse(_sse(state, job, pieces, max_tokens, prompt_tokens, cleanup),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _delete_quietly(engine, session_id):
    try:
        engine.delete(session_id)
    except SessionError:
        pass


def _prompt_tokens(state, session, question):
    """Prompt text tokens + the memory tokens that stand in for <image>."""
    snapshot = session.session.snapshot()
    ids = tokenizer_image_token(session.session.prompt(question), state.tokenizer)
    return len(ids) - 1 + (0 if snapshot is None else snapshot.num_tokens)


def _finish_reason(result, max_tokens):
    return "length" if result.answer.new_tokens >= max_tokens else "stop"


def _extras(state, result, prompt_tokens):
    a = result.answer
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": a.new_tokens,
             "total_tokens": prompt_tokens + a.new_tokens}
    seen = {"frames_seen": a.frames_seen, "stream_time": a.stream_time, "memory_tokens": a.memory_tokens,
            "ttft_s": None if result.ttft_s is None else round(result.ttft_s, 6),
            "latency_s": round(result.latency_s, 6)}
    return usage, seen


def _completion(state, result, prompt_tokens, max_tokens):
    usage, seen = _extras(state, result, prompt_tokens)
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": state.settings.model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.answer.text},
                         "finish_reason": _finish_reason(result, max_tokens)}],
            "usage": usage, "flash_vstream": seen}


async def _sse(state, job, pieces, max_tokens, prompt_tokens, cleanup):
    base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": state.settings.model_id}

    def chunk(delta, finish_reason=None, **extra):
        return "data: " + json.dumps({**base, "choices": [{"index": 0, "delta": delta,
                                                            "finish_reason": finish_reason}], **extra}) + "\n\n"

    try:
        answer = asyncio.ensure_future(asyncio.wrap_future(job.future))
        answer.add_done_callback(lambda _: pieces.put_nowait(None))  # after every delta (same loop, FIFO)
        yield chunk({"role": "assistant", "content": ""})
        while (piece := await pieces.get()) is not None:
            yield chunk({"content": piece})
        try:
            result = answer.result()
        except SessionError as e:
            yield "data: " + json.dumps({"error": {"code": e.code, "message": e.message}}) + "\n\n"
        except Exception as e:  # noqa: BLE001 - the answer failed after the stream began: say so in the stream
            message = f"{type(e).__name__}: {e}"
            yield "data: " + json.dumps({"error": {"code": "answer_failed", "message": message}}) + "\n\n"
        else:
            usage, seen = _extras(state, result, prompt_tokens)
            yield chunk({}, _finish_reason(result, max_tokens), usage=usage, flash_vstream=seen)
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()  # a client that went away stops the answer; a finished one is unaffected
        await cleanup.aclose()
