"""`python -m flash_vstream.serve.cli_video_stream`: ask questions about a video stream while it plays.

Three roles run at once (DESIGN §7) around one synchronous `StreamSession` (session.py):

  frame source    thread; decodes the file / camera / URL at `--video_fps` and paces it to the wall
                  clock at `video_fps x play_speed`; puts frames into a bounded queue.
  frame handler   thread; CLIP-encodes each frame, updates the STAR memory, publishes a snapshot
                  (the <= 681 memory tokens, frames seen, stream time) under the session's lock.
  question handler  the main thread; answers typed (interactive) or scripted questions from a
                  snapshot, streaming the answer token by token.

Why threads and not processes (the published CLI used three processes): torch releases the GIL
inside every kernel and PyAV while decoding, so the roles overlap on CPU and GPU; threads share the
model weights as they are and hand a snapshot over by reference, where the published design pickled
the model into another process and copied the whole, ever-growing frame buffer through a Manager
list on every update. Python-level work (tokenising, the k-means bookkeeping) is small. On a CPU
each role runs its own torch thread team; on a busy machine set OMP_NUM_THREADS to about half the
cores so the two teams do not spin against each other.

Who waits for whom: ingesting never waits for answers (the handler only publishes); an interactive
answer takes the latest snapshot and never waits for the frame backlog. The frame queue is bounded:
a file or synthetic source blocks when it is full (no frame is ever dropped, so a scripted run is
deterministic), a live source (camera, URL) drops the oldest queued frame and counts it. Every
queue wait has a timeout; end of stream and stop travel as control messages; the first error in
any role stops the others, is shown, and gives exit status 1.

Scripted mode (`--questions Q.jsonl`, lines `{"time": s, "question": "..."}`): a question is due
once every frame with timestamp <= time is in the memory (or at the end of the stream, if it ends
first); the handler hands that exact snapshot to the question handler and goes on ingesting, so
the answers do not depend on timing. Answer lines (stdout, or `--output A.jsonl`):
  {"time", "question", "answer", "frames_seen", "memory_tokens", "stream_time", "latency_s",
   "ttft_s", "answer_s", "new_tokens", ...extra keys of the question line}
latency_s / ttft_s count from when the question was due; answer_s from when generation began.

`--log-file` is JSON Lines: `start`, `progress` (every `--log-every` frames: frames, drops, queue
depth, memory tokens and state bytes, process RSS), `answer`, `stream_end`, `error` (with the
traceback) and, last, `summary` with per-role latencies {count, mean, p50, p99, max} in seconds.
The same summary is printed to stderr at exit.

Exit status: 0 at the end of the stream (or /quit, Ctrl-D); 1 when a role failed; 2 for bad
arguments; 130 on Ctrl-C.
"""

import argparse
import dataclasses
import datetime
import json
import os
import queue
import random
import sys
import threading
import time
import traceback

from ..video_io import FeatureLoadError, VideoReadError
from .session import QuestionSchedule, StreamSession, state_nbytes
from .sources import open_source

POLL_S = 0.1  # every queue wait wakes at least this often to look at the stop flag
JOIN_TIMEOUT_S = 10.0
QUIT_COMMANDS = ("/quit", "/exit")
STATS = {  # key in the log -> label in the printed summary
    "frame_decode": "frame decode (source)",
    "encode_memory_update": "encode + memory update",
    "time_to_first_token": "time to first token",
    "answer_time": "answer time",
    "question_latency": "question latency (due -> answered)",
}


class _Control:
    """A control message travelling through a queue."""

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f"<{self.name}>"


END_OF_STREAM = _Control("end of stream")
STOP = _Control("stop")
EOF = _Control("end of input")


@dataclasses.dataclass
class _Due:
    question: dict
    snapshot: object
    at: float  # perf_counter when it became due


@dataclasses.dataclass
class _Typed:
    text: str
    at: float


class LatencyStats:
    """count / mean / max exactly; p50 / p99 over all samples up to `capacity`, then over a uniform
    reservoir sample, so a stream of any length keeps this bounded."""

    def __init__(self, capacity=8192, seed=0):
        self.count, self.total, self.max = 0, 0.0, 0.0
        self.capacity = capacity
        self._samples = []
        self._rng = random.Random(seed)

    def add(self, seconds):
        if seconds is None:
            return
        self.count += 1
        self.total += seconds
        self.max = max(self.max, seconds)
        if len(self._samples) < self.capacity:
            self._samples.append(seconds)
        else:
            slot = self._rng.randrange(self.count)
            if slot < self.capacity:
                self._samples[slot] = seconds

    def summary(self):
        if not self.count:
            return {"count": 0, "mean": None, "p50": None, "p99": None, "max": None}
        ordered = sorted(self._samples)

        def pct(q):  # linear interpolation between closest ranks
            pos = q * (len(ordered) - 1)
            lo = int(pos)
            hi = min(lo + 1, len(ordered) - 1)
            return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

        return {"count": self.count, "mean": self.total / self.count, "p50": pct(0.5), "p99": pct(0.99),
                "max": self.max}


class EventLog:
    """JSON Lines event log (`--log-file`); writes from any thread, one flushed line per event."""

    def __init__(self, path=None):
        self._file = open(path, "w", encoding="utf-8") if path else None
        self._lock = threading.Lock()
        self._t0 = time.perf_counter()

    def write(self, event, **fields):
        if self._file is None:
            return
        line = {"event": event, "wall": datetime.datetime.now().isoformat(timespec="milliseconds"),
                "elapsed_s": round(time.perf_counter() - self._t0, 6), **fields}
        text = json.dumps(line, default=str)
        with self._lock:
            self._file.write(text + "\n")
            self._file.flush()

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None


def rss_bytes():
    """Resident set size of this process now (Linux); peak RSS elsewhere; None if unknown."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024
    except (ImportError, OSError):
        return None


class RealtimeEngine:
    """The process shell: the source and frame-handler threads around a `StreamSession`, plus the
    queue the question handler (the caller's thread) reads from with `next_work`."""

    def __init__(self, session, source, play_speed=1.0, schedule=None, frame_queue_size=8, drop_oldest=None,
                 log=None, log_every=100):
        if not play_speed > 0:
            raise ValueError(f"play_speed must be > 0 (inf: as fast as possible), got {play_speed}")
        self.session = session
        self.source = source
        self.play_speed = float(play_speed)
        self.schedule = schedule
        self.drop_oldest = source.live if drop_oldest is None else drop_oldest
        self.log = log or EventLog()
        self.log_every = log_every
        self.frames = queue.Queue(maxsize=frame_queue_size)  # source -> frame handler
        # frame handler and question reader -> question handler; never fills in practice: it holds
        # at most the scripted questions (already in memory) plus what a person types
        self.work = queue.Queue(maxsize=(len(schedule) if schedule else 0) + 256)
        self.stop_event = threading.Event()
        self.ended = threading.Event()
        self.error = None  # (role, exception, formatted traceback) of the first failure
        self._error_lock = threading.Lock()
        self.stats = {key: LatencyStats() for key in STATS}
        self.frames_produced = self.frames_ingested = self.frames_dropped = 0
        self.stream_time = None  # timestamp of the newest ingested frame
        self._threads = []

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self):
        # daemon threads: a source stuck inside a blocking network read must not keep the process
        # alive after a stop; every loop otherwise ends on the stop flag within POLL_S
        for name, target in (("frame source", self._source_loop), ("frame handler", self._handler_loop)):
            thread = threading.Thread(target=self._guarded, args=(name, target), name=name, daemon=True)
            self._threads.append(thread)
            thread.start()
        return self

    def stop(self):
        """Ask every role to stop: the flag, plus a STOP message to wake queue readers at once."""
        self.stop_event.set()
        for q in (self.frames, self.work):
            try:
                q.put_nowait(STOP)
            except queue.Full:
                pass  # the reader sees the flag within POLL_S

    @property
    def stopped(self):
        return self.stop_event.is_set()

    def fail(self, role, error):
        with self._error_lock:
            if self.error is None:
                self.error = (role, error, traceback.format_exc())
                self.log.write("error", role=role, error=f"{type(error).__name__}: {error}",
                               traceback=self.error[2])
        self.stop()

    def join(self, timeout=JOIN_TIMEOUT_S):
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return [t.name for t in self._threads if t.is_alive()]

    def _guarded(self, role, target):
        try:
            target()
        except BaseException as error:  # noqa: BLE001 - any failure of a role stops the others
            self.fail(role, error)

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

    def _put_frame(self, item):
        if not self.drop_oldest:
            return self._put(self.frames, item)
        while not self.stopped:  # live: make room by dropping the oldest queued frame
            try:
                self.frames.put_nowait(item)
                return True
            except queue.Full:
                try:
                    old = self.frames.get_nowait()
                except queue.Empty:
                    continue
                if isinstance(old, _Control):
                    return False  # STOP: we are stopping anyway
                self.frames_dropped += 1
        return False

    def submit(self, item):
        """For the question reader thread: hand a typed line (or EOF) to the question handler."""
        return self._put(self.work, item)

    def next_work(self, timeout=POLL_S):
        """The question handler's next item (a due question, a typed line or a control message), or
        None after `timeout`."""
        try:
            return self.work.get(timeout=timeout)
        except queue.Empty:
            return None

    # --- roles ----------------------------------------------------------------------------------
    def _source_loop(self):
        frames = self.source.frames()
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
                delay = wall0 + (t - t0) / self.play_speed - time.perf_counter()
                if delay > 0 and self.stop_event.wait(delay):
                    break
                if not self._put_frame((frame, t)):
                    break
                self.frames_produced += 1
            else:
                return
            if not self.stopped:
                self._put(self.frames, END_OF_STREAM)
        finally:
            frames.close()

    def _handler_loop(self):
        session, schedule = self.session, self.schedule
        while not self.stopped:
            try:
                item = self.frames.get(timeout=POLL_S)
            except queue.Empty:
                continue
            if item is STOP:
                return
            if item is END_OF_STREAM:
                snapshot = session.snapshot()
                if schedule is not None and len(schedule):
                    if snapshot is None:
                        raise VideoReadError(f"{self.source.name}: the stream ended before its first frame")
                    self._due(schedule.remaining(), snapshot)
                self._progress(final=True)
                self.log.write("stream_end", frames=self.frames_ingested, dropped=self.frames_dropped,
                               stream_time=self.stream_time)
                self.ended.set()
                self._put(self.work, END_OF_STREAM)
                return
            frame, t = item
            if schedule is not None and session.snapshot() is not None:
                self._due(schedule.due_before(t), session.snapshot())
            began = time.perf_counter()
            snapshot = session.add_frame(frame, t)
            self.stats["encode_memory_update"].add(time.perf_counter() - began)
            self.frames_ingested += 1
            self.stream_time = t
            if schedule is not None:
                self._due(schedule.due_at(t), snapshot)
            if self.log_every and self.frames_ingested % self.log_every == 0:
                self._progress()

    def _due(self, questions, snapshot):
        now = time.perf_counter()
        for q in questions:
            self._put(self.work, _Due(q, snapshot, now))

    def _progress(self, final=False):
        memory = getattr(self.session, "memory", None)
        snapshot = self.session.snapshot()
        self.log.write("progress", final=final, frames=self.frames_ingested, produced=self.frames_produced,
                       dropped=self.frames_dropped, stream_time=self.stream_time, queued=self.frames.qsize(),
                       memory_tokens=None if snapshot is None else snapshot.num_tokens,
                       state_bytes=None if memory is None else state_nbytes(memory), rss_bytes=rss_bytes())

    # --- summary --------------------------------------------------------------------------------
    def summary(self):
        return {
            "frames": {"produced": self.frames_produced, "ingested": self.frames_ingested,
                       "dropped": self.frames_dropped, "stream_time": self.stream_time},
            "latency_s": {key: stats.summary() for key, stats in self.stats.items()},
            "error": None if self.error is None else
            f"{self.error[0]}: {type(self.error[1]).__name__}: {self.error[1]}",
        }


def format_summary(summary):
    lines = [f"{'latency (s)':<36}{'count':>7}{'mean':>10}{'p50':>10}{'p99':>10}{'max':>10}"]
    for key, label in STATS.items():
        s = summary["latency_s"][key]
        if s["count"]:
            lines.append(f"{label:<36}{s['count']:>7}{s['mean']:>10.4f}{s['p50']:>10.4f}{s['p99']:>10.4f}"
                         f"{s['max']:>10.4f}")
        else:
            lines.append(f"{label:<36}{0:>7}{'-':>10}{'-':>10}{'-':>10}{'-':>10}")
    f = summary["frames"]
    stream_time = "-" if f["stream_time"] is None else f"{f['stream_time']:.1f}s"
    lines.append(f"frames: {f['ingested']} ingested, {f['dropped']} dropped (live source lagging), "
                 f"stream time {stream_time}; questions answered: {summary.get('answered', 0)}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ question handler

class _Answerer:
    """The question handler's side: ask, stream, record, write."""

    def __init__(self, engine, session, out, output_file=None, jsonl_stdout=False):
        self.engine, self.session, self.out = engine, session, out
        self.output_file = output_file
        self.jsonl_stdout = jsonl_stdout
        self.plot_records = []
        self.answered = 0

    def _print(self, piece):
        self.out.write(piece)
        self.out.flush()

    def answer(self, question, snapshot, due_at, time_label=None, extra=None, stream=False):
        """Answer from `snapshot`; returns the record, or None when a stop cut the answer short."""
        wait = time.perf_counter() - due_at
        if stream:
            self.out.write(f"ASSISTANT (stream {snapshot.stream_time:.1f}s, {_frames(snapshot.frames_seen)}): ")
            self.out.flush()
        answer = self.session.ask(question, snapshot=snapshot, on_text=self._print if stream else None,
                                  should_stop=self.engine.stop_event.is_set)
        if stream:
            self.out.write("\n")
            self.out.flush()
        if self.engine.error is not None:
            return None
        stats = self.engine.stats
        stats["time_to_first_token"].add(answer.ttft_s)
        stats["answer_time"].add(answer.answer_s)
        stats["question_latency"].add(wait + answer.answer_s)
        record = answer.record(time=time_label, wait_s=wait, extra=extra)
        self.answered += 1
        self.plot_records.append(snapshot.plot_record(record["time"], question))
        self.engine.log.write("answer", **record)
        line = json.dumps(record, ensure_ascii=False)
        if self.output_file is not None:
            self.output_file.write(line + "\n")
            self.output_file.flush()
        if self.jsonl_stdout:
            self.out.write(line + "\n")
            self.out.flush()
        elif not stream:
            self.out.write(f"[{record['time']:.1f}s | {record['frames_seen']} frames | {record['memory_tokens']} "
                           f"tokens | {record['latency_s']:.2f}s] Q: {question}\nA: {record['answer']}\n")
            self.out.flush()
        return record


def _frames(n):
    return f"{n} frame" if n == 1 else f"{n} frames"


def run_scripted(engine, answerer):
    """Answer each scripted question with the snapshot the frame handler tagged for it."""
    while True:
        if engine.error is not None:
            return 1
        item = engine.next_work()
        if item is None:
            continue
        if item is END_OF_STREAM:
            return 0
        if item is STOP:
            return 1 if engine.error is not None else 0
        if isinstance(item, _Due):
            answerer.answer(item.question["question"], item.snapshot, item.at, time_label=item.question["time"],
                            extra=item.question)


def _read_lines(stream, engine):
    """The question reader (a daemon thread: a blocking read of a terminal cannot be interrupted
    portably). Each line goes to the question handler; EOF (Ctrl-D) ends the input."""
    try:
        for line in iter(stream.readline, ""):
            if not engine.submit(_Typed(line.rstrip("\r\n"), time.perf_counter())):
                return
            if line.strip() in QUIT_COMMANDS:
                return
    except (OSError, ValueError):
        pass  # stdin closed under us: same as EOF
    engine.submit(EOF)


def run_interactive(engine, answerer, stdin, banner):
    out, session = answerer.out, answerer.session
    out.write(banner + "\n")
    reader = threading.Thread(target=_read_lines, args=(stdin, engine), name="question reader", daemon=True)
    reader.start()

    def prompt():
        out.write("USER: ")
        out.flush()

    def wait_for_snapshot():
        while engine.error is None and not engine.stopped:
            snapshot = session.snapshot()
            if snapshot is not None or engine.ended.is_set():
                return snapshot
            engine.stop_event.wait(POLL_S / 2)
        return None

    def handle(item):
        """Answer a typed line; False when the user asked to quit."""
        if item is EOF or item.text.strip() in QUIT_COMMANDS:
            return False
        text = item.text.strip()
        if text == "/status":
            snap = session.snapshot()
            out.write(f"[{engine.frames_ingested} frames ingested, {engine.frames_dropped} dropped, stream time "
                      f"{'-' if snap is None else f'{snap.stream_time:.1f}s'}, "
                      f"{0 if snap is None else snap.num_tokens} memory tokens]\n")
        elif text == "/reset":
            session.reset_conversation()
            out.write("[conversation cleared]\n")
        elif text == "/help":
            out.write("[type a question and press Enter; /status, /reset (forget the conversation), "
                      "/quit or Ctrl-D]\n")
        elif text:
            snapshot = wait_for_snapshot()
            if snapshot is None:
                if engine.error is None:
                    out.write("[no frames in memory: nothing to answer from]\n")
                return True
            answerer.answer(text, snapshot, item.at, stream=True)
        return True

    prompt()
    while True:
        if engine.error is not None:
            out.write("\n")
            return 1
        item = engine.next_work()
        if item is None:
            continue
        if item is STOP:
            return 1 if engine.error is not None else 0
        if item is END_OF_STREAM:
            snap = session.snapshot()
            out.write(f"\n[stream ended at {snap.stream_time:.1f}s after {snap.frames_seen} frames; "
                      "answering pending questions]\n" if snap is not None else "\n[stream ended]\n")
            out.flush()
            while engine.error is None:
                try:
                    pending = engine.work.get_nowait()
                except queue.Empty:
                    break
                if pending is EOF or pending is STOP or not isinstance(pending, _Typed):
                    break
                if pending.text.strip():
                    out.write(f"USER: {pending.text.strip()}\n")
                if not handle(pending):
                    break
            return 1 if engine.error is not None else 0
        if item is EOF or isinstance(item, _Typed):
            if not handle(item):
                out.write("\n[bye]\n")
                out.flush()
                return 0
            prompt()


# ------------------------------------------------------------------------------ command line

def load_questions(path):
    """Scripted questions: JSON Lines `{"time": s, "question": "..."}` (or one JSON list of them)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        items = json.loads(text)
    else:
        items = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not JSON: {e}") from None
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ValueError(f"{path}: question {i + 1} is not an object")
    try:
        QuestionSchedule(items)  # validates
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return items


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m flash_vstream.serve.cli_video_stream",
        description="Play a video (or a live stream) into the STAR memory and ask questions at any moment.")
    p.add_argument("--model-path", required=True)
    p.add_argument("--model-base", default=None, help="the LLM a stage-1 or LoRA checkpoint was trained on")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--video-file", help="a video file (or URL) played at video_fps x play_speed")
    src.add_argument("--video-source",
                     help="a live source: camera index (0) or device path (/dev/video0), a stream URL "
                          "(rtsp://, http(s)://, .m3u8), or synthetic[:WxH] (seeded random frames)")
    p.add_argument("--conv-mode", default="vicuna_v1")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy (the published CLI defaulted to 0.2; its script passed 0.0)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--conversation", choices=("fresh", "continue"), default="fresh",
                   help="answer each question in a new conversation, or continue the previous ones")
    p.add_argument("--video_fps", "--video-fps", dest="video_fps", type=float, default=1.0,
                   help="frames per stream second taken from the source")
    p.add_argument("--play_speed", "--play-speed", dest="play_speed", type=float, default=1.0,
                   help="stream seconds per wall second (inf: as fast as the frame handler goes)")
    p.add_argument("--start", type=float, default=0.0, help="start the file at this second")
    p.add_argument("--end", type=float, default=None, help="end the stream at this second")
    p.add_argument("--max-frames", type=int, default=None, help="end the stream after this many frames")
    p.add_argument("--video-backend", choices=("pyav", "decord"), default="pyav")
    p.add_argument("--frame-queue-size", type=int, default=8)
    p.add_argument("--questions", default=None, help="scripted mode: JSON Lines {\"time\": s, \"question\": ...}")
    p.add_argument("--output", default=None, help="write answers here as JSON Lines (default in scripted mode: stdout)")
    p.add_argument("--memory-plot", default=None, help="write a PNG timeline of the memory at each question")
    p.add_argument("--log-file", default=None, help="JSON Lines event log with a latency summary at the end")
    p.add_argument("--log-every", type=int, default=100, help="log a progress event every N frames")
    p.add_argument("--load-8bit", action="store_true")
    p.add_argument("--load-4bit", action="store_true")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0, help="memory k-means seed (and synthetic source seed)")
    p.add_argument("--fast", choices=("auto", "on", "off"), default="auto",
                   help="CLIP CUDA graph + static-cache greedy decoder with the memory prefix kept in the KV "
                        "cache (auto: on CUDA); same answers, lower latency")
    p.add_argument("--no-compile-decode", dest="compile_decode", action="store_false",
                   help="fast path: skip torch.compile of the decode step (~40 s at start on a 7B; ~25%% "
                        "fewer tokens/s without it)")
    p.add_argument("--video_max_frames", type=int, default=None,
                   help="accepted for the published script; no effect (the published CLI ignored it too)")
    return p


def _load_session(args):
    import torch

    from ..mm_utils import get_model_name_from_path
    from ..model.builder import load_pretrained_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"loading {args.model_path} on {device} ...", file=sys.stderr, flush=True)
    tokenizer, model, image_processor, context_len = load_pretrained_model(
        args.model_path, args.model_base, get_model_name_from_path(args.model_path), load_8bit=args.load_8bit,
        load_4bit=args.load_4bit, device=device)
    session = StreamSession(model, tokenizer, image_processor, conv_mode=args.conv_mode,
                            temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                            conversation=args.conversation, video_fps=args.video_fps, context_len=context_len,
                            seed=args.seed, fast=None if args.fast == "auto" else args.fast == "on",
                            compile_decode=args.compile_decode)
    if session.fast:
        print("preparing the fast path (CUDA graphs; compiling the decode step) ...", file=sys.stderr, flush=True)
        session.warm_up()
    return session, device


def _show_error(engine):
    role, error, trace = engine.error
    print(f"error: {role} failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
    if not isinstance(error, (VideoReadError, FeatureLoadError)):
        print(trace, file=sys.stderr, flush=True)


def main(argv=None, stdin=None, stdout=None):
    args = build_parser().parse_args(argv)
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    try:
        if args.play_speed <= 0:
            raise ValueError(f"--play_speed must be > 0 (inf for as fast as possible), got {args.play_speed}")
        if args.frame_queue_size < 1:
            raise ValueError("--frame-queue-size must be >= 1")
        questions = load_questions(args.questions) if args.questions else None
        source = open_source(video_file=args.video_file, video_source=args.video_source, video_fps=args.video_fps,
                             start=args.start, end=args.end, max_frames=args.max_frames, backend=args.video_backend,
                             seed=args.seed)
    except (ValueError, OSError, VideoReadError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2

    try:
        session, device = _load_session(args)
    except Exception as e:  # noqa: BLE001 - any loader failure: say what and stop
        print(f"error: cannot load the model from {args.model_path}: {type(e).__name__}: {e}", file=sys.stderr,
              flush=True)
        return 1

    log = EventLog(args.log_file)
    output_file = open(args.output, "w", encoding="utf-8") if args.output else None
    engine = answerer = None
    code = 1
    try:
        schedule = QuestionSchedule(questions) if questions is not None else None
        engine = RealtimeEngine(session, source, play_speed=args.play_speed, schedule=schedule,
                                frame_queue_size=args.frame_queue_size, log=log, log_every=args.log_every)
        log.write("start", argv=list(sys.argv[1:] if argv is None else argv), device=device,
                  source=source.describe(), live=source.live, drop_oldest=engine.drop_oldest,
                  mode="scripted" if schedule is not None else "interactive")
        answerer = _Answerer(engine, session, stdout, output_file,
                             jsonl_stdout=schedule is not None and output_file is None)
        engine.start()
        if schedule is not None:
            print(f"playing {source.describe()} at {args.video_fps:g} fps x {args.play_speed:g}; "
                  f"{len(schedule)} scripted questions", file=sys.stderr, flush=True)
            code = run_scripted(engine, answerer)
        else:
            banner = (f"Flash-VStream: playing {source.describe()} at {args.video_fps:g} fps x {args.play_speed:g}. "
                      "Type a question at any moment and press Enter; /status, /quit or Ctrl-D to end.")
            code = run_interactive(engine, answerer, stdin, banner)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr, flush=True)
        code = 130
    except Exception as error:  # noqa: BLE001 - the question handler failed: stop the other roles
        if engine is None:
            raise
        engine.fail("question handler", error)
    finally:
        if engine is not None:
            engine.stop()
            stuck = engine.join()
            if engine.error is not None:
                _show_error(engine)
                code = 1
            summary = engine.summary()
            summary["answered"] = 0 if answerer is None else answerer.answered
            summary["exit_code"] = code
            if stuck:
                summary["threads_still_running"] = stuck
            print(format_summary(summary), file=sys.stderr, flush=True)
            if args.memory_plot and answerer is not None and answerer.plot_records:
                from .memory_plot import plot_memory_timeline

                plot_memory_timeline(answerer.plot_records, args.memory_plot, stream_end=engine.stream_time,
                                     title=f"STAR memory at each question: {source.describe()}")
                print(f"memory plot: {args.memory_plot}", file=sys.stderr, flush=True)
            log.write("summary", **summary)
        if output_file is not None:
            output_file.close()
        log.close()
    return code


if __name__ == "__main__":
    sys.exit(main())
