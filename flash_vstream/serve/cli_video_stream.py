"""`python -m flash_vstream.serve.cli_video_stream`: ask questions about a video stream while it plays.

The command line on top of the engine (engine.py): one `StreamSession` fed by a source thread and
the frame handler, and the question handler on the main thread, which answers typed (interactive) or
scripted questions from a snapshot and streams the answer token by token. This file holds what a
person sees: the arguments, the presentation, the scripted and interactive front ends.

Scripted mode (`--questions Q.jsonl`, lines `{"time": s, "question": "..."}`): a question is due
once every frame with timestamp <= time is in the memory (or at the end of the stream, if it ends
first; the rule is `QuestionSchedule`'s); the frame handler hands that exact snapshot to the question
handler and goes on ingesting, so the answers do not depend on timing. Answer lines (stdout, or
`--output A.jsonl`):
  {"time", "question", "answer", "frames_seen", "memory_tokens", "stream_time", "latency_s",
   "ttft_s", "answer_s", "new_tokens", ...extra keys of the question line}
latency_s / ttft_s count from when the question was due; answer_s from when generation began.

Interactive mode: a reader thread hands each typed line to the question handler, which answers from
the latest snapshot (never waiting for the frame backlog); /status, /reset, /help, /quit or Ctrl-D.

`--log-file` is JSON Lines: `start`, `progress` (every `--log-every` frames: frames, drops, queue
depth, memory tokens and state bytes, process RSS), `answer`, `stream_end`, `error` (with the
traceback) and, last, `summary` with per-role latencies {count, mean, p50, p99, max} in seconds.
The same summary is printed to stderr at exit.

Exit status: 0 at the end of the stream (or /quit, Ctrl-D); 1 when a role failed; 2 for bad
arguments; 130 on Ctrl-C.
"""

import argparse
import dataclasses
import gc
import json
import sys
import threading
import time

from ..features import FeatureLoadError
from ..video_io import VideoReadError
from .engine import END_OF_STREAM, POLL_S, STOP, Control, Due, Engine
from .session import QuestionSchedule, StreamSession
from .sources import open_source
from .telemetry import EventLog, format_summary

QUIT_COMMANDS = ("/quit", "/exit")
EOF = Control("end of input")


@dataclasses.dataclass
class _Typed:
    text: str
    at: float


# ------------------------------------------------------------------------------ question handler

class _Answerer:
    """The question handler's presentation: show the answer as it streams, write the record."""

    def __init__(self, engine, out, output_file=None, jsonl_stdout=False):
        self.engine, self.out = engine, out
        self.output_file = output_file
        self.jsonl_stdout = jsonl_stdout
        self.plot_records = []
        self.answered = 0

    def _print(self, piece):
        self.out.write(piece)
        self.out.flush()

    def answer(self, question, snapshot, due_at, time_label=None, extra=None, stream=False):
        """Answer from `snapshot`; returns the record, or None when a stop cut the answer short."""
        if stream:
            self.out.write(f"ASSISTANT (stream {snapshot.stream_time:.1f}s, {_frames(snapshot.frames_seen)}): ")
            self.out.flush()
        record = self.engine.answer(question, snapshot, due_at, on_text=self._print if stream else None,
                                    time_label=time_label, extra=extra)
        if stream:
            self.out.write("\n")
            self.out.flush()
        if record is None:
            return None
        self.answered += 1
        self.plot_records.append(snapshot.plot_record(record["time"], question))
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
        if isinstance(item, Due):
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
    out, session, ended = answerer.out, engine.session, engine.stream().ended
    out.write(banner + "\n")
    reader = threading.Thread(target=_read_lines, args=(stdin, engine), name="question reader", daemon=True)
    reader.start()

    def prompt():
        out.write("USER: ")
        out.flush()

    def wait_for_snapshot():
        while engine.error is None and not engine.stopped:
            snapshot = session.snapshot()
            if snapshot is not None or ended.is_set():
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
                pending = engine.next_work(timeout=0)
                if pending is None or pending is EOF or pending is STOP or not isinstance(pending, _Typed):
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
    p.add_argument("--load-8bit", action="store_true", help="the LLM's linear layers in int8 (per output channel)")
    p.add_argument("--load-4bit", action="store_true", help="the LLM's linear layers in int4 (groups of 128)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--vision-device", default=None,
                   help="encode frames and keep the memory on this device (e.g. cuda:1), answer on --device "
                        "(e.g. cuda:0); default: beside the LLM")
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
    from ..mm_utils import get_model_name_from_path
    from ..model.builder import load_pretrained_model
    from ..runtime.devices import default_device, vision_placement

    device, vision_device = vision_placement(default_device(args.device), args.vision_device)
    where = device if vision_device is None else f"{device}, vision on {vision_device}"
    print(f"loading {args.model_path} on {where} ...", file=sys.stderr, flush=True)
    tokenizer, model, image_processor, context_len = load_pretrained_model(
        args.model_path, args.model_base, get_model_name_from_path(args.model_path), load_8bit=args.load_8bit,
        load_4bit=args.load_4bit, device=device, vision_device=vision_device)
    from ..runtime.options import FastPathOptions

    fast_path = FastPathOptions.from_cli(args.fast, args.compile_decode).resolve(model.device)  # resolved once
    print(f"fast path: {fast_path.summary()}", file=sys.stderr, flush=True)
    session = StreamSession(model, tokenizer, image_processor, conv_mode=args.conv_mode,
                            temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                            conversation=args.conversation, video_fps=args.video_fps, context_len=context_len,
                            seed=args.seed, fast_path=fast_path)
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
        if args.vision_device is not None:
            from ..runtime.devices import default_device, vision_placement

            # a bad device: a clear error before anything loads
            vision_placement(default_device(args.device), args.vision_device)
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
    if session.fast:
        # process-wide, so the entry point's call: what is built by now (model, compiled code, graphs) lives
        # as long as the process; frozen out of the collector's generations, it is not walked by a full
        # collection during the stream (those walks were ingest outliers on a 7B; see docs/benchmarks.md)
        gc.collect()
        gc.freeze()

    log = EventLog(args.log_file)
    output_file = open(args.output, "w", encoding="utf-8") if args.output else None
    engine = answerer = None
    code = 1
    try:
        schedule = QuestionSchedule(questions) if questions is not None else None
        engine = Engine(session, source, play_speed=args.play_speed, schedule=schedule,
                        inbox_size=args.frame_queue_size, log=log, log_every=args.log_every)
        log.write("start", argv=list(sys.argv[1:] if argv is None else argv), device=device,
                  placement=session.placement.describe(),
                  source=source.describe(), live=source.live, drop_oldest=engine.drop_oldest,
                  mode="scripted" if schedule is not None else "interactive")
        answerer = _Answerer(engine, stdout, output_file,
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
            totals = engine.summary()
            summary = {"frames": engine.stream().counts(), "latency_s": totals["latency_s"], "error": totals["error"]}
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
