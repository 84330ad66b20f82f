"""Questions answered from the live memory: each video played once through a `StreamSession`.

`stream`: the video's frames (decoded at `fps`, or read from its feature file) go into one session in time
order; every question is asked when the stream reaches its time -- once every frame with timestamp <= its
time is in the memory (the `QuestionSchedule` rule), and a question before the first frame waits for it.
Frames after the last question are never read. One pass per video, not one clip per question.

`clip` (the benchmarks' offline protocol): each question gets a fresh session fed the clip from 0 -- or
from `context_s` seconds before the question -- to the question time, then is asked.

Both answer through the session's public API (`add_frames` / `add_features`, `snapshot`, `ask`), so the
answers are the realtime engine's. Questions with choices also get the option the model finds most likely
after the prompt (`metrics.score_options`, per-token mean) from the same snapshot: a judge-free column
that a model collapsing to one letter cannot game.
"""

import os

import torch

from flash_vstream.serve.session import TIME_EPS, StreamSession

END = float("inf")  # the time of a question asked at the end of the video


class VideoInputError(RuntimeError):
    """The video of a query cannot be found or read; the message names it."""


def resolve_video(video_dir, name):
    """('frames', path) of a video file or ('features', path) of its feature file, for a video named
    as the annotation names it: `video_dir/name`, then its base name, each with or without a video
    extension, then `{stem}.safetensors` (features extracted at 1 fps)."""
    from flash_vstream.features import FEATURE_EXTENSION
    from flash_vstream.video_io import VIDEO_EXTENSIONS

    name = str(name)
    rel = os.path.normpath(name.lstrip("/")) if not os.path.isabs(name) else name
    bases = [os.path.join(video_dir, rel), os.path.join(video_dir, os.path.basename(rel))]
    for base in bases:
        if os.path.isfile(base) and base.lower().endswith(VIDEO_EXTENSIONS):
            return "frames", base
        for ext in VIDEO_EXTENSIONS:
            if os.path.isfile(base + ext):
                return "frames", base + ext
    for base in bases:
        stem = base if not base.lower().endswith(VIDEO_EXTENSIONS) else os.path.splitext(base)[0]
        if os.path.isfile(stem + FEATURE_EXTENSION):
            return "features", stem + FEATURE_EXTENSION
    raise VideoInputError(f"no video or feature file for {name!r} in {video_dir}")


def iter_inputs(source, start=0.0, end=None, fps=1.0, hidden_size=None, default_fps=1.0):
    """Yield (frame uint8 (H, W, 3) | feature (256, D), timestamp s) of a resolved source in [start, end]."""
    kind, path = source
    if kind == "frames":
        from flash_vstream.video_io import iter_frames

        yield from iter_frames(path, fps=fps, start=start, end=None if end in (None, END) else float(end))
        return
    from flash_vstream.features import frame_times, load_features_with_meta

    feature, meta = load_features_with_meta(path, hidden_size=hidden_size)  # (T, 256, D)
    for row, t in zip(feature, frame_times(meta, len(feature), default_fps)):
        if t < start - TIME_EPS:
            continue
        if end not in (None, END) and t > float(end) + TIME_EPS:
            break
        yield row, float(t)


def _input_errors_named(inputs, video):
    """`inputs`, with a read failure (missing, corrupt or truncated file) raised as VideoInputError."""
    from flash_vstream.features import FeatureLoadError
    from flash_vstream.video_io import VideoReadError

    try:
        yield from inputs
    except (FeatureLoadError, VideoReadError, OSError, ValueError) as exc:
        raise VideoInputError(f"video {video!r}: {type(exc).__name__}: {exc}") from exc


class Player:
    """Plays videos into `StreamSession`s of one model and answers queries; returns prediction records."""

    def __init__(self, model, tokenizer, image_processor, video_dir, fps=1.0, max_new_tokens=64,
                 conv_mode="vicuna_v1", encode_batch=16, loglik=True, fast=None):
        self.model, self.tokenizer, self.image_processor = model, tokenizer, image_processor
        self.video_dir, self.fps, self.encode_batch = video_dir, fps, encode_batch
        self.max_new_tokens, self.conv_mode, self.loglik, self.fast = max_new_tokens, conv_mode, loglik, fast
        self._fast_path = None  # shared by every session: one model's fast path is built once

    def session(self):
        if self._fast_path is None:
            s = StreamSession(self.model, self.tokenizer, self.image_processor, conv_mode=self.conv_mode,
                              max_new_tokens=self.max_new_tokens, fast=self.fast)
            self._fast_path = s.fast_path
            return s
        return StreamSession(self.model, self.tokenizer, self.image_processor, conv_mode=self.conv_mode,
                             max_new_tokens=self.max_new_tokens, fast_path=self._fast_path)

    def _inputs(self, video, start=0.0, end=None):
        source = resolve_video(self.video_dir, video)
        if source[0] == "frames" and self.image_processor is None:
            raise VideoInputError(f"{source[1]}: raw video needs the vision tower (mm_vision_tower not loaded)")
        return _input_errors_named(iter_inputs(source, start, end, self.fps, self.model.config.mm_hidden_size,
                                               self.model.config.video_fps), video)

    # --- one video, one pass -----------------------------------------------------------------------
    def play(self, video, queries, on_record):
        """Play `video` once and answer `queries` (time order) at their times; `on_record(record)` each.
        A video that cannot be read gives error records for the queries not yet answered."""
        session, buffer, pending = self.session(), [], list(queries)
        t_of = lambda q: END if q["time"] is None else q["time"]  # noqa: E731

        def flush():
            if buffer:
                self._ingest(session, buffer)
                buffer.clear()

        def answer_due(before):
            while pending and t_of(pending[0]) < before - TIME_EPS and (buffer or session.snapshot() is not None):
                flush()
                on_record(self._ask(session, pending.pop(0)))

        try:
            last = max(t_of(q) for q in pending)
            for x, t in self._inputs(video, 0.0, last):
                answer_due(t)
                buffer.append((x, t))
                if len(buffer) >= self.encode_batch:
                    flush()
        except VideoInputError as exc:  # this video's input is bad: the queries not yet answered are error lines
            for q in pending:
                on_record(error_record(q, str(exc)))
            return
        flush()
        while pending and session.snapshot() is not None:  # the stream ended: the rest see all of it
            on_record(self._ask(session, pending.pop(0)))
        for q in pending:  # the stream ended before its first frame
            on_record(error_record(q, "the video has no frame at or before the question time"))

    # --- one clip per question --------------------------------------------------------------------
    def clip(self, query, context_s=None):
        """A fresh session fed [max(0, time - context_s) or 0, time], then asked; the record."""
        end = END if query["time"] is None else query["time"]
        start = 0.0 if context_s is None or end == END else max(0.0, end - float(context_s))
        session, buffer = self.session(), []
        try:
            for x, t in self._inputs(query["video"], start, end):
                buffer.append((x, t))
                if len(buffer) >= self.encode_batch:
                    self._ingest(session, buffer)
                    buffer.clear()
            self._ingest(session, buffer)
        except VideoInputError as exc:
            return error_record(query, str(exc))
        if session.snapshot() is None:
            return error_record(query, "the clip has no frame")
        return self._ask(session, query)

    # --- shared steps -----------------------------------------------------------------------------
    def _ingest(self, session, items):
        if not items:
            return
        xs, times = [x for x, _ in items], [t for _, t in items]
        if isinstance(xs[0], torch.Tensor):
            session.add_features(torch.stack(xs), times)  # (n, 256, D)
        else:
            session.add_frames(xs, times)

    def _ask(self, session, query):
        snapshot = session.snapshot()
        reply = session.ask(query["prompt"], snapshot=snapshot)
        record = base_record(query)
        record.update(answer=reply.text, stream_time=snapshot.stream_time, frames_seen=snapshot.frames_seen,
                      memory_tokens=snapshot.num_tokens, new_tokens=reply.new_tokens)
        if self.loglik and query.get("choices"):
            k = self._choose(session, snapshot, query["prompt"], query["choices"])
            record.update(loglik_index=k, loglik_option=query["choices"][k])
        return record

    @torch.inference_mode()
    def _choose(self, session, snapshot, prompt, choices):
        from flash_vstream.eval_video.metrics import score_options
        from flash_vstream.mm_utils import expand_image_tokens, tokenizer_image_token

        ids = tokenizer_image_token(session.prompt(prompt, history=[]), self.tokenizer, return_tensors="pt")
        ids = expand_image_tokens(ids, snapshot.num_tokens).to(self.model.device)  # (L + N - 1,)
        scorer = lambda batch: self.model(input_ids=batch, memory=[snapshot.tokens] * len(batch))  # noqa: E731
        return score_options(scorer, self.tokenizer, ids, [str(c) for c in choices], normalize="mean")


def base_record(query):
    """The benchmark's identifiers of a query, as every prediction line carries them."""
    return {"key": query["key"], "video": query["video"], "question": query["question"], "time": query["time"],
            **{k: v for k, v in query["ids"].items() if v is not None}, "gt": query["gt"]}


def error_record(query, error):
    return {**base_record(query), "error": error}
