"""The synchronous core of the realtime engine: one stream's memory and the questions asked about it.

`StreamSession` ingests frames (or precomputed CLIP features) one at a time into a `STARMemory` --
the same `update` offline evaluation calls, with chunks of one frame -- and after each call
publishes an immutable `MemorySnapshot`: the memory tokens (a fresh tensor from `STARMemory.read()`),
the number of frames they were built from, the stream time and the memory's timestamps. Questions
are answered from a snapshot with `model.generate(..., memory=[snapshot.tokens])`; the reader never
touches the frame buffer. `QuestionSchedule` says which scripted questions are due as frames arrive.

Nothing here sleeps, starts threads or lets a clock decide anything (clocks only measure): the same
frames and questions give the same snapshots and, at temperature 0 (greedy), the same answers.
The process shell (`engine.py`) calls the ingest side and the answer side from two
threads; the only state they share is the published snapshot, swapped under a lock.

The fast path (`fast=True`; the default on CUDA) changes how, never what, is computed:
- one frame is encoded by `FastVisionEncoder` (stops at the selected CLIP layer; a CUDA graph);
- greedy answers come from a `GreedyDecoder` (static KV cache, CUDA-graphed decode step), and every
  answer runs as prefix + question: the prompt through `<image>` (system text + memory) is kept in the
  decoder's cache by `cache_prefix`, so a question prefills only its own tokens. After each published
  frame the ingest side refreshes that prefix when the decoder is free, which takes the ~700-token
  prefill off the question's path; when it could not (an answer was running), the question runs it
  first. Either way the same two calls compute the answer, so timing never changes a token.
Sampling (temperature > 0) and templates whose stop string is not EOS use `model.generate`.
"""

import bisect
import contextlib
import dataclasses
import functools
import threading
import time

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from ..conversation import build_prompt, conv_templates
from ..mm_utils import KeywordsStoppingCriteria, process_images, tokenizer_image_token
from ..runtime.decoder import prefix_through_image
from ..runtime.devices import Placement
from ..runtime.fast_path import FastPath
from ..runtime.vision import FastVisionEncoder
from ..runtime.options import FastPathOptions
from ..model.memory import STARMemory, memory_num_tokens

TIME_EPS = 1e-6  # seconds: a question at t and a frame at t are simultaneous (the frame counts)
CONVERSATION_MODES = ("fresh", "continue")
PROMPT_ROOM = 256  # fast path: cache room for the prompt text (system, question, history) beside memory + answer
SUFFIX_SIZES = (32, 64, 128, 256)  # fast path: question lengths (after the memory) captured as graphs at warm-up


@dataclasses.dataclass(frozen=True)
class MemorySnapshot:
    """What a question is answered from: the memory after `frames_seen` frames. Never mutated."""

    tokens: torch.Tensor  # (N <= 681, D) memory tokens in readout order, on the model's device
    frames_seen: int
    stream_time: float  # seconds: timestamp of the newest frame in the memory
    timestamps: dict  # {"temporal": [...], "retrieved": [...], "spatial": [...]} seconds, readout order
    temporal_weights: list  # frames each temporal centroid stands for
    temporal_spans: list  # (first, last) seconds of the frames each temporal centroid stands for

    @property
    def num_tokens(self):
        return int(self.tokens.shape[0])

    def plot_record(self, time, question):
        """One entry for `memory_plot.plot_memory_timeline`."""
        return {"time": float(time), "question": question, "frames_seen": self.frames_seen,
                "stream_time": self.stream_time, "timestamps": self.timestamps,
                "weights": self.temporal_weights, "spans": [list(s) for s in self.temporal_spans]}


@dataclasses.dataclass(frozen=True)
class Answer:
    question: str
    text: str
    frames_seen: int
    stream_time: float
    memory_tokens: int
    new_tokens: int
    ttft_s: float | None  # ask() -> first generated token (None: nothing was generated)
    answer_s: float  # ask() -> last generated token

    def record(self, time=None, wait_s=0.0, extra=None):
        """The scripted-mode answer line. `wait_s`: how long the question waited (due -> ask())
        behind earlier answers; `latency_s` and `ttft_s` count from when it was due."""
        out = dict(extra or {})
        out.update({
            "time": self.stream_time if time is None else float(time),
            "question": self.question,
            "answer": self.text,
            "frames_seen": self.frames_seen,
            "memory_tokens": self.memory_tokens,
            "stream_time": self.stream_time,
            "latency_s": round(wait_s + self.answer_s, 6),
            "ttft_s": None if self.ttft_s is None else round(wait_s + self.ttft_s, 6),
            "answer_s": round(self.answer_s, 6),
            "new_tokens": self.new_tokens,
        })
        return out


class _TextStreamer(BaseStreamer):
    """Receives generated ids from `generate`, times the first one and hands text pieces to `on_text`.

    Text is decoded from all ids so far and the new suffix emitted, so multi-token characters and
    sentencepiece word boundaries come out right; a trailing partial UTF-8 character waits.
    """

    def __init__(self, tokenizer, on_text=None, skip_prompt=True):
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.ids = []
        self.first_token_time = None
        self._emitted = ""
        self._prompt_seen = not skip_prompt  # generate() pushes the prompt first; the fast path does not

    def put(self, value):
        if not self._prompt_seen:  # the prompt (empty with inputs_embeds), not an answer token
            self._prompt_seen = True
            return
        ids = value.reshape(-1).tolist()  # a host read: the tokens exist from here on
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()
        self.ids.extend(ids)
        self._emit(final=False)

    def end(self):
        self._emit(final=True)

    def _emit(self, final):
        if self.on_text is None:
            return
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):
            return
        if text.startswith(self._emitted) and len(text) > len(self._emitted):
            self.on_text(text[len(self._emitted):])
            self._emitted = text


class _StopWhen(StoppingCriteria):
    """Ends generation early when `should_stop()` turns true (the shell stops on another role's error)."""

    def __init__(self, should_stop):
        self.should_stop = should_stop

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), bool(self.should_stop()), dtype=torch.bool, device=input_ids.device)


@dataclasses.dataclass(eq=False)
class AnswerRun:
    """One answer in progress, between `StreamSession.begin` and `StreamSession.finish`: the prompt, the
    snapshot it is answered from, its settings, the streamer its text goes out through and the tokens so
    far. It may start on the fast path and go on in the engine's batch (`batch_request`)."""

    question: str
    snapshot: MemorySnapshot
    ids: torch.Tensor  # (L,) prompt ids on the CPU, one <image>
    max_new_tokens: int
    temperature: float
    on_text: object  # on_text(piece) or None
    start: float  # perf_counter at begin()
    tokens: list = dataclasses.field(default_factory=list)  # new ids so far (an EOS included)
    done: bool = False  # the fast path reached EOS or max_new_tokens (False: not run there, or stopped early)
    _streamer: object = None

    def streamer(self, tokenizer, skip_prompt):
        """The run's one `_TextStreamer`, made at the first call (`skip_prompt`: for `generate`, which
        pushes the prompt first); later calls return it, so text goes on where it left off."""
        if self._streamer is None:
            self._streamer = _TextStreamer(tokenizer, self.on_text, skip_prompt=skip_prompt)
        return self._streamer


class StreamSession:
    """One video stream: frames in, memory snapshots out, questions answered from snapshots.

    Ingest side (one caller at a time): `add_frame`, `add_frames`, `add_features`.
    Answer side (one caller at a time, may be another thread): `snapshot`, `ask`, `reset_conversation`.

    `conversation="fresh"` answers every question in a new conversation (as the published CLI did);
    `"continue"` keeps the earlier questions and answers in the prompt. There is one `<image>` slot,
    in the first user turn, and it always holds the memory of the snapshot being asked: the whole
    history is re-read against the newest memory. Old turns are dropped when the prompt would not
    fit the context with `max_new_tokens` to spare.

    The fast path is a `runtime.FastPath`: pass one (or `FastPathOptions`) as `fast_path`, or let
    `fast` (None: on CUDA) and `compile_decode` build its options (`FastPathOptions.from_cli`).
    """

    def __init__(self, model, tokenizer, image_processor=None, conv_mode="vicuna_v1", temperature=0.0,
                 top_p=None, max_new_tokens=512, conversation="fresh", video_fps=None, context_len=None, seed=0,
                 fast=None, compile_decode=True, fast_path=None):
        if conversation not in CONVERSATION_MODES:
            raise ValueError(f"conversation must be one of {CONVERSATION_MODES}, got {conversation!r}")
        if conv_mode not in conv_templates:
            raise ValueError(f"unknown conv_mode {conv_mode!r}; known: {sorted(conv_templates)}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.conv_mode = conv_mode
        self.temperature = float(temperature)
        self.top_p = top_p
        self.max_new_tokens = int(max_new_tokens)
        self.conversation = conversation
        self.video_fps = float(video_fps or model.config.video_fps)
        self.context_len = int(context_len or getattr(model.config, "tokenizer_model_max_length", None) or 2048)
        # frames are encoded and remembered on the tower's device, answered on the LLM's (runtime/devices.py)
        self.placement = Placement.of(model)
        self.memory = STARMemory(model.config, attention_model=self.placement.memory_attention(model), seed=seed)
        self._dtype = model.get_model().mm_projector_dtype()
        self._history = []  # [(question, answer)] of the continuing conversation
        self._snapshot = None
        self._lock = threading.Lock()
        self._stop_text = self._stop_string()
        if fast_path is None:
            fast_path = FastPathOptions.from_cli({None: "auto", True: "on", False: "off"}[
                None if fast is None else bool(fast)], compile_decode=bool(compile_decode))
        elif fast is not None or not compile_decode:
            raise ValueError("give the fast path either as fast_path or as fast / compile_decode, not both")
        # resolved once for the model's device; owns the encoder, the decoder and their warm-up stream
        self.fast_path = fast_path if isinstance(fast_path, FastPath) else FastPath(model, fast_path)
        self.fast = self.fast_path.enabled
        self.compile_decode = self.fast_path.options.compile_decode
        self._vision = None  # FastVisionEncoder (the fast path's), at the first frame
        self._stock_vision = None  # FastVisionEncoder over the tower for batch_encoder without the fast path
        self._decoder = None  # GreedyDecoder (the fast path's), at the first greedy answer (or warm_up)
        self._decoder_lock = threading.Lock()  # the decoder's cache is one state: one user at a time
        self._prefix_ids = None
        self._memory_bound = memory_num_tokens(10**6, model.config)  # the tokens a long stream's memory reaches

    def warm_up(self):
        """Build the fast path now (CLIP graph capture; decode-step compile and capture, 30-50 s on a 7B with
        `compile_decode`) instead of at the first frame and question. Freezing the heap afterwards
        (`gc.freeze()`) is process-wide, so it is the entry point's call (the realtime CLI makes it)."""
        if not self.fast:
            return self
        if self.image_processor is not None and self._tower_loaded():
            self._fast_vision()
        if self._uses_decoder():
            with self._decoder_lock:
                decoder = self._get_decoder().setup()
                decoder.warm_up_suffixes(self.prefix_ids(), self._memory_bound, self.model.config.mm_hidden_size,
                                         sizes=SUFFIX_SIZES)
                # later sizes run eagerly: capturing while the ingest thread uses the GPU could fail
                decoder.capture_new_suffixes = False
        return self

    # --- ingest side ----------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, frames):
        """uint8 (H, W, 3) frames (or PIL images) -> CLIP patch features (T, 256, D)."""
        return self.encode_pixels(self.preprocess(frames))

    def preprocess(self, frames):
        """uint8 (H, W, 3) frames (or PIL images) -> normalised pixels (T, 3, S, S) on the CPU, as the config says.
        The batched ingest (`batching.py`) preprocesses each session's frame alone, then encodes them together."""
        if self.image_processor is None:
            raise RuntimeError("raw frames need the vision tower and its image processor; this model was loaded "
                               "without them (see mm_vision_tower); feed precomputed features instead")
        return process_images(frames, self.image_processor, self.model.config.image_aspect_ratio)  # (T, 3, S, S)

    @torch.inference_mode()
    def encode_pixels(self, pixels):
        """(T, 3, S, S) pixels -> (T, 256, D): the fast path's encoder when it is on (one frame: its CUDA graph),
        else the tower's own forward (and its error when the tower is missing)."""
        if not (self.fast and self._tower_loaded()):
            return self.model.encode_images([pixels])[0]  # (T, 256, D)
        return self._fast_vision()(pixels)  # (T, 256, D)

    def batch_encoder(self):
        """(B, 3, S, S) frames of several streams -> (B, 256, D) in one forward (the batched ingest), as a callable
        that does not hold the session (the batched ingest keeps one per model for all its sessions). The fast
        path: its encoder (batches through its batched path). Otherwise the tower's own modules with the patch
        embedding frame by frame, so that each frame's features are those `encode_pixels` gives it alone."""
        if self.fast and self._tower_loaded():
            return self._fast_vision()
        if not self._tower_loaded():
            model = self.model
            return lambda pixels: model.encode_images([pixels])[0]  # its error: the tower is not loaded
        if self._stock_vision is None:
            tower = self.model.get_vision_tower()
            self._stock_vision = FastVisionEncoder(tower.vision_tower, tower.select_layer, tower.select_feature)
        return functools.partial(self._stock_vision.eager, per_frame_embedding=True)

    def _tower_loaded(self):
        tower = self.model.get_vision_tower()
        return tower is not None and tower.is_loaded

    def _fast_vision(self):
        if self._vision is None:
            # one frame as a CUDA graph when the path has them (a failure: eager, recorded; strict: raised)
            self._vision = self.fast_path.fuse_weights().vision()
        return self._vision

    def add_frame(self, frame, timestamp=None):
        """Encode one frame, update the memory with it, publish and return the new snapshot."""
        return self.add_features(self.encode([frame]), None if timestamp is None else [timestamp])

    def add_frames(self, frames, timestamps=None):
        """Several frames, encoded together, then fed to the memory one frame at a time."""
        return self.add_features(self.encode(list(frames)), timestamps)

    @torch.inference_mode()
    def add_features(self, features, timestamps=None):
        """Feed precomputed features (n, 256, D) (or one frame (256, D)) one frame at a time, as a
        stream does; `timestamps`: n seconds (default: frame counter / video_fps). Publishes once."""
        features, timestamps = self.prepare_features(features, timestamps)
        for i in range(len(timestamps)):
            self.memory.update(features[i:i + 1], timestamps[i:i + 1])  # (1, 256, D): one frame per update
        return self._publish(timestamps[-1]) if timestamps else self.snapshot()

    def prepare_features(self, features, timestamps=None):
        """(n, 256, D) or (256, D) features and n timestamps (None: frame counter / video_fps) -> the features on
        the memory's device in the projector's dtype (n, 256, D) and the timestamps as n floats."""
        if features.dim() == 2:
            features = features[None]  # (1, 256, D)
        n = features.shape[0]
        if timestamps is None:
            timestamps = [(self.memory.frames_seen + i) / self.video_fps for i in range(n)]
        timestamps = [float(t) for t in timestamps]
        if len(timestamps) != n:
            raise ValueError(f"{n} frames but {len(timestamps)} timestamps")
        return features.to(device=self.placement.vision, dtype=self._dtype), timestamps  # the memory's device

    def _publish(self, stream_time, tokens=None, described=None):
        """Publish the memory as the new snapshot. `tokens` and `described` (`STARMemory.describe()`): what the
        batched ingest read for this session already (None: read them here)."""
        tokens = self.memory.read() if tokens is None else tokens
        times, weights, spans = self.memory.describe() if described is None else described
        # (N, D) a fresh tensor (later updates never touch it), on the LLM's device; the reader may run on another
        # thread: the values exist before it is handed over
        tokens = self.placement.hand_over(tokens)
        snapshot = MemorySnapshot(tokens=tokens, frames_seen=self.memory.frames_seen, stream_time=stream_time,
                                  timestamps=times, temporal_weights=weights, temporal_spans=spans)
        with self._lock:
            self._snapshot = snapshot
        self._refresh_prefix(snapshot)
        return snapshot

    def _refresh_prefix(self, snapshot):
        """Fast path: run the prompt prefix over the new memory now, unless an answer holds the decoder."""
        if not (self.fast and self._uses_decoder()) or not self._decoder_lock.acquire(blocking=False):
            return
        try:
            self._get_decoder().cache_prefix(self.prefix_ids(), snapshot.tokens)
        finally:
            self._decoder_lock.release()

    # --- answer side ----------------------------------------------------------------------------
    def snapshot(self):
        """The latest published snapshot (None before the first frame)."""
        with self._lock:
            return self._snapshot

    def reset_conversation(self):
        self._history = []

    def prompt(self, question, history=None):
        """The prompt text for `question` after `history` [(q, a)], `<image>` in the first user turn."""
        return build_prompt(question, self.conv_mode, history=self._history if history is None else history)

    def _stop_string(self):
        conv = conv_templates[self.conv_mode]
        stop = conv.sep2 or conv.sep
        # the tokenizer's EOS already ends generation when the stop string is EOS (vicuna_v1: "</s>")
        return None if not stop.strip() or stop == self.tokenizer.eos_token else stop

    def _prompt_ids(self, question, num_tokens, max_new_tokens=None):
        history = list(self._history) if self.conversation == "continue" else []
        max_new_tokens = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        while True:
            ids = tokenizer_image_token(self.prompt(question, history), self.tokenizer, return_tensors="pt")
            if not history or len(ids) - 1 + num_tokens + max_new_tokens <= self.context_len:
                return ids
            history = history[1:]  # the oldest exchange no longer fits

    def prefix_ids(self):
        """(P,) the prompt through its `<image>`: the same for every question (the image sits in the first
        user turn, and `tokenizer_image_token` tokenizes the text on each side of it separately)."""
        if self._prefix_ids is None:
            self._prefix_ids = prefix_through_image(
                tokenizer_image_token(self.prompt(""), self.tokenizer, return_tensors="pt"))
        return self._prefix_ids

    def _uses_decoder(self, temperature=None):
        """Whether greedy answers at `temperature` (default: the session's) come from the fast path's decoder."""
        return (self.temperature if temperature is None else temperature) == 0 and self._stop_text is None

    def answer_len(self):
        """Cache positions an answer of this session takes at most: the memory of a long stream, room for the
        prompt text and `max_new_tokens`, within the context (the fast decoder's and a batch slot's size)."""
        return min(self.context_len, self._memory_bound + PROMPT_ROOM + self.max_new_tokens)

    def _get_decoder(self):
        if self._decoder is None:
            size = self.answer_len()
            # fusing (when the path's decode step reads fused weights) is announced and logged by the path
            self._decoder = self.fast_path.fuse_weights().decoder(size)
        return self._decoder

    def begin(self, question, snapshot=None, on_text=None, max_new_tokens=None, temperature=None):
        """Start an answer to `question` from `snapshot` (default: the latest) -> its `AnswerRun` (the prompt
        built, nothing generated yet). `max_new_tokens` / `temperature`: this question's (default: the
        session's). `ask` runs one to the end; the engine's answer lane may run it in a batch instead."""
        start = time.perf_counter()
        snapshot = self.snapshot() if snapshot is None else snapshot
        if snapshot is None:
            raise RuntimeError("no frames in memory yet: nothing to answer from")
        max_new_tokens = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        temperature = self.temperature if temperature is None else float(temperature)
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        ids = self._prompt_ids(question, snapshot.num_tokens, max_new_tokens)  # (L,) on the CPU
        return AnswerRun(question, snapshot, ids, max_new_tokens, temperature, on_text, start)

    @torch.inference_mode()
    def ask(self, question, snapshot=None, on_text=None, should_stop=None, max_new_tokens=None, temperature=None):
        """Answer `question` from `snapshot` (default: the latest). `on_text(piece)` receives the answer
        as it is generated; `should_stop()` may end generation early. Greedy when temperature is 0.
        `max_new_tokens` / `temperature`: this question's (default: the session's)."""
        run = self.begin(question, snapshot, on_text, max_new_tokens, temperature)
        if self.run_fast(run, should_stop):
            return self.finish(run)
        streamer = run.streamer(self.tokenizer, skip_prompt=True)
        ids = run.ids[None].to(self.model.device)  # (1, L)
        stopping = []
        if self._stop_text is not None:
            stopping.append(KeywordsStoppingCriteria([self._stop_text], self.tokenizer, ids[:, :0]))
        if should_stop is not None:
            stopping.append(_StopWhen(should_stop))
        kwargs = {"max_new_tokens": run.max_new_tokens, "streamer": streamer, "use_cache": True}
        if run.temperature > 0:
            kwargs.update(do_sample=True, temperature=run.temperature)
            if self.top_p is not None:
                kwargs["top_p"] = self.top_p
        else:
            kwargs["do_sample"] = False
        if stopping:
            kwargs["stopping_criteria"] = StoppingCriteriaList(stopping)
        out = self.model.generate(ids, memory=[run.snapshot.tokens], **kwargs)  # (1, new tokens)
        run.tokens = out[0].tolist()
        return self.finish(run)

    def run_fast(self, run, should_stop=None, decoder=None):
        """Answer `run` on the fast path when it can take it (greedy, the stop string is EOS, prompt and answer
        fit the decoder's cache) -> whether it ran. `should_stop()` may end it early: then `run.tokens` holds
        the tokens so far and the run can go on elsewhere (the engine moves it into the batch). `decoder`: a
        `GreedyDecoder` on this session's model to run on instead of the session's own (the engine's shared
        one, when the session has no fast path); its caller owns it."""
        if not ((self.fast or decoder is not None) and self._uses_decoder(run.temperature)):
            return False
        with self._decoder_lock if decoder is None else contextlib.nullcontext():
            decoder = self._get_decoder() if decoder is None else decoder
            if len(run.ids) - 1 + run.snapshot.num_tokens + run.max_new_tokens >= decoder.max_cache_len:
                return False
            self._fast_generate(decoder, run, should_stop)
        return True

    def batch_request(self, run, decoder, should_stop=None):
        """`run` as a `BatchRequest` for `decoder` (a `runtime.BatchDecoder` on this session's model): its
        prompt -- and the tokens it has so far, when it moves over from the fast path -- embedded with its
        memory; the tokens it gets stream through the run. Raises ValueError naming the question when the
        snapshot or the prompt cannot be embedded, or when they do not fit a slot."""
        from ..runtime.batch_decoder import BatchRequest

        name = f"question {run.question[:80]!r}"
        ids = run.ids if not run.tokens else torch.cat([run.ids, torch.tensor(run.tokens, dtype=run.ids.dtype)])
        embeds = decoder.embed(ids, run.snapshot.tokens, name=name)  # (L - 1 + N [+ tokens so far], hidden)
        streamer = run.streamer(self.tokenizer, skip_prompt=False)
        stop_text = self._stop_text

        def on_tokens(tokens):
            run.tokens.extend(tokens)
            streamer.put(torch.tensor(tokens))
            # a template whose stop string is not EOS: it ends the answer once it appears (checked on the tail)
            return stop_text is not None and stop_text in self.tokenizer.decode(run.tokens[-8:])

        request = BatchRequest(embeds, run.max_new_tokens - len(run.tokens), eos_token_id=self.tokenizer.eos_token_id,
                               temperature=run.temperature, top_p=self.top_p if run.temperature > 0 else None,
                               on_tokens=on_tokens, should_stop=should_stop, name=name)
        if not decoder.fits(request.prompt_len, request.max_new_tokens):
            raise ValueError(f"{name}: {request.prompt_len} prompt tokens and {request.max_new_tokens} answer tokens "
                             f"do not fit a batch slot of {decoder.max_len} positions")
        return request

    def finish(self, run):
        """The `Answer` of a run that ended (completed, or cut short by `should_stop`)."""
        streamer = run.streamer(self.tokenizer, skip_prompt=False)
        streamer.end()
        return self._answer(run.tokens, run.question, run.snapshot, streamer, run.start)

    def _fast_generate(self, decoder, run, should_stop):
        """Greedy tokens from the decoder into `run.tokens`: prefix (kept or run now) + question, then the
        decode step in chunks of `check_every` tokens, each handed to the streamer. Same tokens as `generate`."""
        ids, snapshot, streamer = run.ids, run.snapshot, run.streamer(self.tokenizer, skip_prompt=False)
        if not decoder.prefix_matches(ids, snapshot.tokens):
            decoder.cache_prefix(self.prefix_ids(), snapshot.tokens)
        streamer.put(decoder.prefill(ids, snapshot.tokens))
        eos = self.tokenizer.eos_token_id
        tokens = decoder.tokens()
        while len(tokens) < run.max_new_tokens and eos not in tokens:
            if should_stop is not None and should_stop():
                break
            decoder.decode(min(decoder.check_every, run.max_new_tokens - len(tokens)), eos)
            new = decoder.tokens()
            streamer.put(torch.tensor(new[len(tokens):]))
            tokens = new
        if eos in tokens:
            tokens = tokens[:tokens.index(eos) + 1]
        run.tokens = tokens
        run.done = eos in tokens or len(tokens) >= run.max_new_tokens

    def _answer(self, new_ids, question, snapshot, streamer, start):
        end = time.perf_counter()
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True).strip()
        if self._stop_text is not None and self._stop_text in text:
            text = text[:text.index(self._stop_text)].strip()
        if self.conversation == "continue":
            self._history.append((question, text))
        ttft = None if streamer.first_token_time is None else streamer.first_token_time - start
        return Answer(question=question, text=text, frames_seen=snapshot.frames_seen, stream_time=snapshot.stream_time,
                      memory_tokens=snapshot.num_tokens, new_tokens=len(new_ids), ttft_s=ttft, answer_s=end - start)

    # --- a whole scripted timeline, synchronously -------------------------------------------------
    def run_timeline(self, frames, questions, on_answer=None):
        """Play `frames` [(frame, timestamp)] and answer scripted `questions` [{"time", "question", ...}]
        when the stream reaches their time (the rule of `QuestionSchedule`; the engine runs the same
        rule on threads). Returns the answer records in schedule order."""
        schedule = QuestionSchedule(questions)
        records = []

        def answer(due):
            for item in due:
                record = self.ask(item["question"]).record(time=item["time"], extra=item)
                records.append(record)
                if on_answer is not None:
                    on_answer(record, self.snapshot())

        for frame, t in frames:
            answer(schedule.before_frame(t, self.snapshot()))
            self.add_frame(frame, t)
            answer(schedule.after_frame(t))
        answer(schedule.at_end(self.snapshot()))
        return records


class EmptyStreamError(RuntimeError):
    """The stream ended before its first frame while scripted questions were waiting."""


class QuestionSchedule:
    """Scripted questions in stream-time order (ties keep file order).

    A question at time T is due once every frame with timestamp <= T is in the memory: right after
    a frame at T is ingested (`due_at`), or when the first frame after T arrives, before it is
    ingested (`due_before`), or at the end of the stream (`remaining`).

    The rule as a driver calls it, once per frame, in this order (`StreamSession.run_timeline` and the
    engine's frame handler both do): `before_frame(t, snapshot)`, ingest the frame, `after_frame(t)`;
    at the end of the stream `at_end(snapshot)`. Each returns the questions due at that point, to be
    answered from the snapshot current there.
    """

    def __init__(self, questions):
        items = [dict(q) for q in questions]
        for i, q in enumerate(items):
            if not isinstance(q.get("question"), str) or not q["question"].strip():
                raise ValueError(f"question {i}: 'question' must be a non-empty string")
            t = q.get("time")
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not t >= 0 or t == float("inf"):
                raise ValueError(f"question {i}: 'time' must be a number of seconds >= 0, got {t!r}")
            q["time"] = float(t)
        order = sorted(range(len(items)), key=lambda i: items[i]["time"])  # stable
        self._items = [items[i] for i in order]
        self._times = [q["time"] for q in self._items]
        self._next = 0

    def __len__(self):
        return len(self._items) - self._next

    def _pop_until(self, index):
        due = self._items[self._next:index]
        self._next = max(self._next, index)
        return due

    def due_before(self, t):
        """Questions strictly before a frame at `t` (call before ingesting it)."""
        return self._pop_until(bisect.bisect_left(self._times, t - TIME_EPS))

    def due_at(self, t):
        """Questions at or before a frame at `t` (call after ingesting it)."""
        return self._pop_until(bisect.bisect_right(self._times, t + TIME_EPS))

    def remaining(self):
        return self._pop_until(len(self._items))

    def before_frame(self, t, snapshot):
        """Due before the frame at `t` is ingested, answered from `snapshot` (the memory so far). Nothing
        before the first frame: with no memory yet, those questions come due with it (`after_frame`)."""
        return [] if snapshot is None else self.due_before(t)

    def after_frame(self, t):
        """Due once the frame at `t` is in the memory."""
        return self.due_at(t)

    def at_end(self, snapshot):
        """The rest, when the stream ends. EmptyStreamError when questions wait and no frame ever came."""
        if snapshot is None and len(self):
            raise EmptyStreamError("the stream ended before its first frame")
        return self.remaining()


def state_nbytes(obj, _depth=0):
    """Bytes held by the tensors of a state object (its attributes, lists, tuples, dicts); modules
    and configs are skipped. Used to log that the memory state stays the same size."""
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, STARMemory):
        return obj.nbytes  # its row of a memory stack
    if _depth > 4 or isinstance(obj, torch.nn.Module):
        return 0
    if isinstance(obj, dict):
        return sum(state_nbytes(v, _depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_nbytes(v, _depth + 1) for v in obj)
    if _depth == 0 and hasattr(obj, "__dict__"):
        return sum(state_nbytes(v, _depth + 1) for v in vars(obj).values())
    return 0
