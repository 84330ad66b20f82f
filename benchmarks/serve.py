"""Many live streams on one GPU: N real WebSocket clients against the real server, today's design beside it.

    python -m benchmarks.serve --output serve.json                                   # 7B-shaped random bf16, cuda
    python -m benchmarks.serve --output serve.json --model-path ckpt/Flash-VStream-7b
    python -m benchmarks.serve --output /tmp/s.json --preset tiny --device cpu --smoke   # CPU smoke (a test)

What runs. The server is the real app (`serve/api/app.py`, the engine behind it, uvicorn, WebSockets) in
this process, on a model built here: random weights of the real shapes (Vicuna-7B + CLIP ViT-L/14, as
`benchmarks/realtime/build.py` builds them; a word-level tokenizer of Vicuna's 32000 ids, so every id
decodes) or a checkpoint. Random weights never say EOS here (its lm_head row is zeroed, so its logit is 0
among random ones): every answer is `--answer-tokens` long. The clients are separate processes (spawned,
so they share no GIL with the server), each an asyncio loop of many clients; client i of N opens a push
session over HTTP, connects its WebSocket and sends the JPEG frames of assets/example.mp4 (decoded once at
1 fps, 320 px wide, looped, as the web page sends them) at 1 fps with its stream time, its frames phased
i/N of a second apart; after a warm-up it asks one question every `--question-interval` seconds (30),
staggered i/N of the interval apart and half a second after its own frame, `--answer-tokens` (64) each.

Per level N (1, 16, 64, 256, 512, 1024): ingest lag p50/p99 (a frame received by the server -> in its
session's memory; the server's per-session samples of the measured window, pooled), question -> first
token p50/p99 and answer time (measured by the client: `response.create` sent -> first delta / done),
frames dropped, questions refused or failed, GPU memory (peak allocated by torch), GPU busy fraction
(nvidia-smi's utilization.gpu sampled every 200 ms: the share of time a kernel ran), and the server process's
CPU per thread kind over the window (psutil: ms per ingested frame and per answer token, cores used). A level holds when
lag p99 <= 1 s, first token p99 <= 150 ms, nothing was dropped and every question was answered; it stops
early once it clearly falls behind (a frame waited > `--abort-lag` s, or a question > `--abort-wait` s),
and larger levels are skipped once one did not hold. N = 1 asks every `--single-interval` s (2) instead,
so its first token is over several questions: that is the single session's first token, set against the
CLI fast path's (`StreamSession(fast=True)`, as `cli_video_stream --fast on` runs it, answering after the
same frames) in the same run.

Baseline, in the same run: today's design -- one `StreamSession` per stream, served one at a time: one
thread ingests the frames (each its own CLIP forward and memory update) in arrival order, one thread
answers the questions (the stock `generate`, as the server ran with `--fast off`) in arrival order -- with
the same frames (decoded arrays, no JPEG or network: that favours the baseline) and the same question
schedule, N = 16, 64, ... until a level does not hold.

Prints a table and writes JSON (rewritten after every level).
"""

import argparse
import asyncio
import base64
import dataclasses
import io
import json
import math
import multiprocessing
import os
import queue
import shutil
import subprocess
import sys
import threading
import time

TARGET_LAG_S = 1.0
TARGET_TTFT_S = 0.150
QUESTION = "What is happening in the video right now, and what happened before it?"
LEVELS = (1, 16, 64, 256, 512, 1024)
# a client's questions fall half-way between two of its frames, as a question at a random time nearly always does
# (a frame's encode + update is ~2 % of the second); on the frame itself, every N = 1 question would meet its frame
QUESTION_OFFSET_S = 0.5
BASELINE_LEVELS = (16, 64, 256)
VOCAB_7B = 32000
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def log(*parts):
    print(*parts, flush=True)


def percentiles(values):
    from flash_vstream.utils.stats import percentile

    values = [v for v in values if v is not None]
    if not values:
        return {"n": 0, "p50": None, "p99": None, "max": None}
    return {"n": len(values), "p50": percentile(values, 50), "p99": percentile(values, 99), "max": max(values)}


# --- the model ----------------------------------------------------------------------------------------------
def word_tokenizer(vocab_size):
    """A word-level fast tokenizer of `vocab_size` ids (<unk> 0, <s> 1, </s> 2, the prompt's words, then
    filler words): random weights emit any id, and each must decode."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from flash_vstream.conversation import build_prompt

    words = []
    for word in build_prompt(QUESTION, "vicuna_v1").split() + ["<image>"]:
        if word not in words:
            words.append(word)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for word in words:
        vocab.setdefault(word, len(vocab))
    while len(vocab) < vocab_size:
        vocab[f"w{len(vocab)}"] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        pad_token="<unk>")
    tokenizer.padding_side = "right"
    return tokenizer


def build_model(args, device, dtype):
    """(model, tokenizer, image_processor, notes): a checkpoint, or random weights of the preset's shapes."""
    import torch

    from benchmarks.common import random_clip_tower
    from benchmarks.realtime.build import tiny_llm_config, tiny_vision_config, vicuna_7b_config, vit_l14_config
    from flash_vstream.model import VStreamLlamaForCausalLM

    notes = []
    if args.model_path:
        from flash_vstream.model.builder import load_pretrained_model

        tokenizer, model, processor, _ = load_pretrained_model(args.model_path, device=str(device), torch_dtype=dtype)
        model.eval().requires_grad_(False)
        return model, tokenizer, processor, notes
    if args.preset == "7b":
        config, vision = vicuna_7b_config(), vit_l14_config()
        tokenizer = word_tokenizer(VOCAB_7B)
        notes.append("random weights of Vicuna-7B / CLIP ViT-L/14 shapes; word-level tokenizer of 32000 ids")
    else:
        from flash_vstream.demo.tiny import TINY_CORPUS, train_tokenizer
        from transformers import AutoTokenizer

        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = AutoTokenizer.from_pretrained(train_tokenizer(TINY_CORPUS * 20, tmp, vocab_size=300))
        config, vision = tiny_llm_config(), tiny_vision_config()
        config.vocab_size = len(tokenizer)
        notes.append("the tiny demo shapes, random weights")
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = VStreamLlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=dtype)
    model.eval().requires_grad_(False)
    tower = random_clip_tower(vision, device, dtype, seed=args.seed + 1, select_layer=config.mm_vision_select_layer,
                              select_feature=config.mm_vision_select_feature)
    model.get_model().vision_tower = tower
    with torch.no_grad():  # EOS never wins an argmax among random logits: every answer has its full length
        model.lm_head.weight[tokenizer.eos_token_id].zero_()
    return model, tokenizer, tower.image_processor, notes


def example_frames(path, width=320, quality=80):
    """assets/example.mp4 at 1 fps: [(uint8 (H, W, 3) as sent, JPEG data URL)], decoded and encoded once."""
    import numpy as np
    from PIL import Image

    from flash_vstream.video_io import iter_frames

    out = []
    for frame, _ in iter_frames(path, fps=1.0):
        image = Image.fromarray(frame)
        image = image.resize((width, round(image.height * width / image.width)))
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=quality)
        data = buf.getvalue()
        sent = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # what the server decodes
        out.append((sent, "data:image/jpeg;base64," + base64.b64encode(data).decode()))
    if not out:
        raise ValueError(f"{path}: no frames")
    return out


def host_costs(bench, repeats=30):
    """Milliseconds of host work one frame costs the server before the GPU sees it: the JPEG decode (the
    server's I/O threads) and the CLIP preprocessing (the image processor, on the ingest lane's thread)."""
    from flash_vstream.mm_utils import process_images
    from flash_vstream.serve.api.inputs import decode_image

    data = base64.b64decode(bench.data_urls[0].split(",", 1)[1])
    frame = bench.arrays[0]
    aspect = bench.model.config.image_aspect_ratio

    def per_call_ms(fn):
        fn()
        started = time.perf_counter()
        for _ in range(repeats):
            fn()
        return round(1e3 * (time.perf_counter() - started) / repeats, 3)

    return {"cpu_count": os.cpu_count(), "jpeg_decode_ms": per_call_ms(lambda: decode_image(data, len(data) + 1)),
            "clip_preprocess_ms": per_call_ms(lambda: process_images([frame], bench.processor, aspect))}


# --- GPU sampling -------------------------------------------------------------------------------------------
class GpuSampler:
    """nvidia-smi's utilization.gpu every 200 ms while running (None off CUDA or without nvidia-smi)."""

    def __init__(self, device):
        self.samples, self.proc, self.thread = [], None, None
        if device.type != "cuda" or shutil.which("nvidia-smi") is None:
            return
        index = device.index if device.index is not None else 0
        self.proc = subprocess.Popen(["nvidia-smi", f"--id={index}", "--query-gpu=utilization.gpu",
                                      "--format=csv,noheader,nounits", "-lms", "200"],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                self.samples.append((time.monotonic(), float(line.strip())))
            except ValueError:
                pass

    def busy(self, start, end):
        values = [v for t, v in self.samples if start <= t <= end]
        return round(sum(values) / len(values) / 100, 3) if values else None

    def close(self):
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(5)


class ThreadSampler:
    """Where the server's threads spend the measured window: every `interval` s the stack of each thread is
    read (`sys._current_frames`); per thread kind (its name without a trailing number) the share of samples
    whose innermost frame is each function, and the innermost frame of this project's code above it."""

    def __init__(self, interval=0.02, top=8):  # 50 Hz: a sample holds the GIL ~0.5 ms for ~40 threads
        self.interval, self.top = interval, top
        self.counts, self.samples = {}, {}
        self._stop = threading.Event()
        self._thread = None

    @staticmethod
    def _where(frame):
        code = frame.f_code
        return f"{os.path.basename(code.co_filename)}:{code.co_name}"

    def _sample(self):
        me = threading.get_ident()
        while not self._stop.wait(self.interval):
            names = {t.ident: t.name for t in threading.enumerate()}
            for ident, frame in sys._current_frames().items():
                if ident == me or ident not in names:
                    continue
                kind = names[ident].rstrip("0123456789").rstrip("_- ") or names[ident]
                leaf, ours = self._where(frame), None
                outer = frame
                while outer is not None and ours is None:
                    path = outer.f_code.co_filename
                    if f"{os.sep}flash_vstream{os.sep}" in path or f"{os.sep}benchmarks{os.sep}" in path:
                        ours = self._where(outer)
                    outer = outer.f_back
                key = leaf if ours is None or ours == leaf else f"{leaf} <- {ours}"
                counts = self.counts.setdefault(kind, {})
                counts[key] = counts.get(key, 0) + 1
                self.samples[kind] = self.samples.get(kind, 0) + 1

    def start(self):
        self._thread = threading.Thread(target=self._sample, name="stack sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        """{thread kind: {"samples": n, "top": [[where, share], ...]}} (idle waits included)."""
        self._stop.set()
        self._thread.join(5)
        out = {}
        for kind, counts in sorted(self.counts.items()):
            n = self.samples[kind]
            top = sorted(counts.items(), key=lambda kv: -kv[1])[:self.top]
            out[kind] = {"samples": n, "top": [[where, round(c / n, 3)] for where, c in top]}
        return out


def thread_cpu_s():
    """{thread kind: CPU seconds (user + system) its threads used so far} of this process (psutil's per-thread
    times, by native id; a kind is a thread's name without its session or trailing number), or None."""
    try:
        import psutil
    except ImportError:
        return None
    names = {t.native_id: t.name for t in threading.enumerate()}
    out = {}
    for thread in psutil.Process().threads():
        name = names.get(thread.id, "native (torch, CUDA, ...)")
        kind = name.split(" (")[0].rstrip("0123456789").rstrip("_- ") or name
        out[kind] = out.get(kind, 0.0) + thread.user_time + thread.system_time
    return out


def host_cpu(before, after, frames, tokens, seconds):
    """Per thread kind: CPU ms per ingested frame and per answer token over a window, and the share of one core."""
    if before is None or after is None:
        return None
    out = {}
    for kind in sorted(after):
        used = after[kind] - before.get(kind, 0.0)
        if used > 0:
            out[kind] = {"cpu_s": round(used, 3), "cores": round(used / seconds, 3),
                         "ms_per_frame": round(1e3 * used / frames, 3) if frames else None,
                         "ms_per_token": round(1e3 * used / tokens, 3) if tokens else None}
    return out


def gpu_memory(device):
    import torch

    if device.type != "cuda":
        return None
    return {"peak_allocated_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 2),
            "reserved_gb": round(torch.cuda.memory_reserved(device) / 1e9, 2)}


# --- the clients (spawned processes: nothing but the standard library and websockets) ------------------------
def _client_worker(spec, results, stop):
    """One process of clients: `spec` names its sessions; puts one result dict on `results`."""
    try:
        results.put(asyncio.run(_clients(spec, stop)))
    except BaseException as error:  # noqa: BLE001 - reported by the level
        results.put({"error": f"{type(error).__name__}: {error}"})


async def _clients(spec, stop):
    outcomes = await asyncio.gather(*[_client(spec, sid, index, stop) for sid, index in spec["sessions"]],
                                    return_exceptions=True)
    out = {"questions": [], "frames_sent": 0, "errors": []}
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            out["errors"].append(f"{type(outcome).__name__}: {outcome}")
        else:
            out["questions"].extend(outcome["questions"])
            out["frames_sent"] += outcome["frames_sent"]
            out["errors"].extend(outcome["errors"])
    return out


async def _client(spec, session_id, index, stop):
    import websockets

    frames, n = spec["frames"], spec["n"]
    t0 = spec["t0"]  # wall clock (time.time) of frame 0 of client 0
    phase = index / n  # this client's frames and questions are phased i/N apart
    asks = [spec["ask_from"] + QUESTION_OFFSET_S + (phase + j) * spec["interval"] for j in range(spec["questions_each"])]
    asks = [a for a in asks if a < spec["ask_until"]]
    end = spec["end"]
    questions, errors, pending = {}, [], set()
    async with websockets.connect(f"{spec['ws']}/v1/sessions/{session_id}/ws", max_size=None, open_timeout=60,
                                  ping_interval=None, close_timeout=5) as ws:
        json.loads(await ws.recv())  # session.created

        async def receive():
            async for raw in ws:
                event = json.loads(raw)
                rid = event.get("response_id")
                now = time.time()
                if rid is None or rid not in questions:
                    if event.get("type") == "error":
                        errors.append(event.get("code"))
                    continue
                q = questions[rid]
                if event["type"] == "response.output_text.delta" and q["first_s"] is None:
                    q["first_s"] = now - q["sent"]
                elif event["type"] == "response.done":
                    q.update(done_s=now - q["sent"], server_ttft_s=event.get("ttft_s"), outcome="done")
                    pending.discard(rid)
                elif event["type"] == "error":
                    q.update(outcome=event.get("code") or "error")
                    pending.discard(rid)

        receiver = asyncio.create_task(receive())
        k, frames_sent = 0, 0
        try:
            while not stop.is_set():
                now = time.time()
                next_frame = t0 + phase + k
                next_ask = t0 + asks[0] if asks else math.inf
                if next_frame >= end and (not pending or now > end + spec["tail"]):
                    break
                wake = min(next_frame, next_ask)
                if wake > now:
                    await asyncio.sleep(min(wake - now, 0.25))
                    continue
                if next_ask <= next_frame:
                    rid = f"q{len(questions)}"
                    questions[rid] = {"sent": time.time(), "first_s": None, "done_s": None, "server_ttft_s": None,
                                      "outcome": "unanswered", "at": asks.pop(0)}
                    pending.add(rid)
                    await ws.send(json.dumps({"type": "response.create", "question": spec["question"],
                                              "response_id": rid, "max_tokens": spec["answer_tokens"]}))
                elif next_frame < end:
                    await ws.send(json.dumps({"type": "input_image.append", "timestamp": float(k),
                                              "image": frames[k % len(frames)]}))
                    k += 1
                    frames_sent += 1
                else:
                    await asyncio.sleep(0.05)  # frames are done; answers may still stream in
            await ws.send(json.dumps({"type": "session.close"}))
        finally:
            receiver.cancel()
    return {"questions": [dict(q, session=session_id) for q in questions.values()], "frames_sent": frames_sent,
            "errors": errors}


# --- the server in this process --------------------------------------------------------------------------------
class Server:
    """The real app on uvicorn in a thread of this process, over the model built here."""

    def __init__(self, model, tokenizer, processor, args):
        import uvicorn

        from flash_vstream.serve.api.state import ServerState, Settings
        from flash_vstream.serve.server import uvicorn_config

        settings = Settings(model_path="benchmark", model_id="benchmark", max_sessions=max(args.levels) + 8,
                            max_tokens=max(64, args.answer_tokens), max_pending_questions=4,
                            fast=args.server_fast, max_frame_bytes=2 * 2**20, io_threads=args.io_threads,
                            max_batch=args.max_batch)
        if args.memory_budget_gb:
            settings.memory_budget_bytes = int(args.memory_budget_gb * 1e9)
        self.state = ServerState(settings)
        self.state.attach(model, tokenizer, processor, context_len=2048)
        self.engine = self.state.engine
        self.server = uvicorn.Server(uvicorn_config(self.state, "127.0.0.1", 0, "warning"))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url, self.ws = f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}"

    def open_sessions(self, n):
        import concurrent.futures

        import requests

        def one(_):
            r = requests.post(self.url + "/v1/sessions", json={"source": {"type": "push"}, "fps": 1.0}, timeout=120)
            if r.status_code != 201:
                raise RuntimeError(f"POST /v1/sessions: {r.status_code} {r.text}")
            return r.json()["id"]

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            return list(pool.map(one, range(n)))

    def close(self):
        self.server.should_exit = True
        self.thread.join(15)
        self.state.close()


def warm_up_server(bench, sessions, frames):
    """Untimed: `sessions` sessions take `frames` frames each, then 1, 2, 4, ... of them ask at once, so the
    answer lane's batch shapes (and their CUDA graphs) exist before the levels measure."""
    engine, started = bench.server.engine, time.monotonic()
    streams = [engine.create({"type": "push"}, 1.0) for _ in range(sessions)]
    for k in range(frames):
        for future in [engine.push_frame(s, bench.arrays[k % len(bench.arrays)], float(k), wait=True)
                       for s in streams]:
            future.result(120)
    k = 1
    while True:
        for job in [engine.ask(s, QUESTION, bench.args.answer_tokens) for s in streams[:k]]:
            job.future.result(300)
        if k >= sessions:
            break
        k = min(2 * k, sessions)
    for s in streams:
        engine.remove_session(s.id)
    return {"sessions": sessions, "frames": frames, "seconds": round(time.monotonic() - started, 1)}


def run_level(bench, n, interval, warmup, questions_each, pool_ctx):
    """One load level against the server; returns its row."""
    from benchmarks.common import reset_peak

    args, server, engine = bench.args, bench.server, bench.server.engine
    log(f"[server] N={n}: opening sessions")
    started = time.monotonic()
    ids = server.open_sessions(n)
    workers = max(1, min(args.client_procs, n // 16 or 1))
    t0 = time.time() + 2.0 + n / 400  # room for the client processes to start and every client to connect
    ask_from = warmup
    ask_until = warmup + interval * questions_each + QUESTION_OFFSET_S
    end = t0 + ask_until
    stop = pool_ctx.Event()
    results = pool_ctx.Queue()
    base = dict(ws=server.ws, frames=bench.data_urls, n=n, t0=t0, interval=interval, ask_from=ask_from,
                ask_until=ask_until, questions_each=questions_each, end=end, tail=args.tail,
                question=QUESTION, answer_tokens=args.answer_tokens)
    procs = []
    for w in range(workers):
        spec = dict(base, sessions=[(sid, i) for i, sid in enumerate(ids) if i % workers == w])
        proc = pool_ctx.Process(target=_client_worker, args=(spec, results, stop), daemon=True)
        proc.start()
        procs.append(proc)
    # the measured window starts after the warm-up: lag samples of the warm-up are forgotten
    while time.time() < t0 + warmup:
        time.sleep(0.05)
    streams = [engine.get(sid) for sid in ids]
    for s in streams:
        s.ingest_lag.reset()
    dropped_before = sum(s.frames_dropped for s in streams)  # a late client's catch-up burst of the warm-up
    deferred_before = engine.questions_deferred
    engine.stats["encode_memory_update"].reset()
    reset_peak(bench.device)
    sampler = ThreadSampler().start() if args.sample_threads else None
    ingested_before, cpu_before = sum(s.frames_ingested for s in streams), thread_cpu_s()
    window = time.monotonic()
    aborted = None
    deadline = end + args.tail + 30  # clients that are still not done by then are stopped
    while any(p.is_alive() for p in procs) and aborted is None:
        time.sleep(0.2)
        if time.time() > deadline:
            aborted = "the clients were not done 30 s after the level's end"
        backlog = engine.ingest_backlog_s()
        if backlog > args.abort_lag:
            aborted = f"a frame waited {backlog:.1f} s for the ingest lane"
        waits = [time.perf_counter() - job.arrived for s in streams for job in list(s.questions)]
        if waits and max(waits) > args.abort_wait:
            aborted = f"a question waited {max(waits):.1f} s for the answer lane"
    if aborted:
        log(f"[server] N={n}: stopping early: {aborted}")
        stop.set()
    window_end = time.monotonic()
    cpu_after, ingested_window = thread_cpu_s(), sum(s.frames_ingested for s in streams) - ingested_before
    threads = sampler.stop() if sampler is not None else None
    outs = []
    for _ in procs:
        try:
            outs.append(results.get(timeout=60))
        except queue.Empty:
            outs.append({"error": "a client process gave no result"})
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.kill()
    lags = [x for s in streams for x in s.ingest_lag.samples()]
    dropped = sum(s.frames_dropped for s in streams) - dropped_before
    ingested = sum(s.frames_ingested for s in streams)
    for sid in ids:  # the clients closed theirs; any left (a client that failed) go now
        engine.remove_session(sid)
    questions = [q for o in outs for q in o.get("questions", [])]
    errors = [o["error"] for o in outs if "error" in o] + [e for o in outs for e in o.get("errors", [])]
    row = summarize("server", n, lags, questions, dropped, ingested, sum(o.get("frames_sent", 0) for o in outs),
                    errors, aborted, bench.gpu.busy(window, window_end), gpu_memory(bench.device),
                    time.monotonic() - started, interval)
    row["questions_deferred"] = engine.questions_deferred - deferred_before  # held back while ingest was behind
    row["ingest_s"] = engine.stats["encode_memory_update"].summary()  # the engine's encode + update, per frame
    row["threads"] = threads
    tokens = sum(args.answer_tokens for q in questions if q["outcome"] == "done")  # random weights: full length
    row["host_cpu"] = host_cpu(cpu_before, cpu_after, ingested_window, tokens, window_end - window)
    return row


def summarize(kind, n, lags, questions, dropped, ingested, sent, errors, aborted, busy, memory, seconds, interval):
    answered = [q for q in questions if q["outcome"] == "done"]
    refused = [q for q in questions if q["outcome"] not in ("done", "unanswered")]
    lag, first = percentiles(lags), percentiles([q["first_s"] for q in answered])
    holds = (aborted is None and not errors and lag["p99"] is not None and lag["p99"] <= TARGET_LAG_S
             and first["p99"] is not None and first["p99"] <= TARGET_TTFT_S and dropped == 0
             and len(answered) == len(questions) > 0)
    return {"kind": kind, "streams": n, "question_interval_s": interval, "holds": holds, "stopped_early": aborted,
            "ingest_lag_s": lag, "first_token_s": first,
            "server_first_token_s": percentiles([q.get("server_ttft_s") for q in answered]),
            "answer_s": percentiles([q["done_s"] for q in answered]),
            "questions": len(questions), "answered": len(answered), "refused_or_failed": len(refused),
            "refusals": sorted({q["outcome"] for q in refused}), "frames_sent": sent, "frames_ingested": ingested,
            "dropped_frames": dropped, "gpu_busy": busy, "gpu_memory": memory, "errors": errors[:5],
            "seconds": round(seconds, 1)}


# --- today's design: one StreamSession per stream, one at a time ---------------------------------------------------
def run_baseline(bench, n, interval, warmup, questions_each):
    """Frames and questions on today's schedule: one ingest thread, one answer thread, in arrival order."""
    from benchmarks.common import reset_peak
    from flash_vstream.runtime.cuda_utils import free_memory
    from flash_vstream.serve.session import StreamSession

    model, frames = bench.model, bench.arrays
    started = time.monotonic()
    sessions = [StreamSession(model, bench.tokenizer, bench.processor, max_new_tokens=bench.args.answer_tokens,
                              video_fps=1.0, fast=False) for _ in range(n)]
    t0 = time.perf_counter() + 0.5
    ask_until = warmup + interval * questions_each
    frame_times = sorted((t0 + i / n + k, i, k) for i in range(n) for k in range(int(ask_until) + 1)
                         if i / n + k < ask_until)
    ask_times = sorted((t0 + warmup + (i / n + j) * interval, i) for i in range(n) for j in range(questions_each)
                       if warmup + (i / n + j) * interval < ask_until)
    lags, questions, stop = [], [], threading.Event()
    lock = threading.Lock()
    aborted = []

    def ingest():
        for due, i, k in frame_times:
            if stop.is_set():
                return
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            sessions[i].add_frame(frames[k % len(frames)], float(k))
            now = time.perf_counter()
            if due >= t0 + warmup:
                lags.append(now - due)
            if now - due > bench.args.abort_lag:
                aborted.append(f"a frame waited {now - due:.1f} s")
                stop.set()

    def answer():
        for due, i in ask_times:
            if stop.is_set():
                return
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            if time.perf_counter() - due > bench.args.abort_wait:
                aborted.append(f"a question waited {time.perf_counter() - due:.1f} s")
                stop.set()
                return
            first = []
            sessions[i].ask(QUESTION, on_text=lambda piece: first or first.append(time.perf_counter()),
                            should_stop=stop.is_set)
            done = time.perf_counter()
            with lock:
                questions.append({"outcome": "done", "first_s": first[0] - due if first else None,
                                  "done_s": done - due, "server_ttft_s": None})

    reset_peak(bench.device)
    window = time.monotonic()
    threads = [threading.Thread(target=ingest, daemon=True), threading.Thread(target=answer, daemon=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    window_end = time.monotonic()
    total_questions = len(ask_times) if not aborted else len(questions)
    rows = questions + [{"outcome": "unanswered"}] * (total_questions - len(questions))
    ingested = sum(s.memory.frames_seen for s in sessions)
    sessions.clear()  # their memories: the next level's budget is taken from what is free
    free_memory(bench.device)
    return summarize("baseline", n, lags, rows, 0, ingested,
                     len(frame_times), [], aborted[0] if aborted else None, bench.gpu.busy(window, window_end),
                     gpu_memory(bench.device), time.monotonic() - started, interval)


# --- the CLI fast path's first token -----------------------------------------------------------------------------
def run_cli_first_token(bench, frames_in=20, questions=8):
    """One StreamSession with the fast path, as the realtime CLI runs it: warm up, take `frames_in` frames,
    then answer `questions` questions one after another; their time to first token."""
    from flash_vstream.runtime.cuda_utils import free_memory
    from flash_vstream.runtime.options import FastPathOptions
    from flash_vstream.serve.session import StreamSession

    options = FastPathOptions.from_cli("on" if bench.device.type == "cuda" else "auto",
                                       compile_decode=bench.args.cli_compile_decode)
    # one frame at a time runs the one-frame CUDA graph; the compiled batched CLIP path would only cost build time
    options = dataclasses.replace(options, compile_vision=False)
    started = time.monotonic()
    session = StreamSession(bench.model, bench.tokenizer, bench.processor, max_new_tokens=bench.args.answer_tokens,
                            video_fps=1.0, fast_path=options).warm_up()
    for k in range(frames_in):
        session.add_frame(bench.arrays[k % len(bench.arrays)], float(k))
    firsts = []
    for _ in range(questions):
        answer = session.ask(QUESTION)
        firsts.append(answer.ttft_s)
    out = {"first_token_s": percentiles(firsts), "fast": session.fast,
            "compile_decode": bool(bench.args.cli_compile_decode), "frames": frames_in,
            "seconds": round(time.monotonic() - started, 1)}
    del session  # its decoder's cache and graphs: the server's memory budget is taken from what is free after
    free_memory(bench.device)
    return out


# --- report ---------------------------------------------------------------------------------------------------
def ms(value):
    return "-" if value is None else f"{1e3 * value:.0f}"


def print_table(report):
    head = (f"{'run':<9}{'N':>6}{'lag p50':>9}{'lag p99':>9}{'ttft p50':>10}{'ttft p99':>10}{'answer p50':>12}"
            f"{'answered':>10}{'dropped':>9}{'GPU GB':>8}{'busy':>6}  holds")
    log(head + "\n" + "-" * len(head))
    for row in report["levels"] + report["baseline"]:
        memory = (row["gpu_memory"] or {}).get("peak_allocated_gb")
        busy = row["gpu_busy"]
        stopped = "" if not row["stopped_early"] else f" (stopped: {row['stopped_early']})"
        log(f"{row['kind']:<9}{row['streams']:>6}{ms(row['ingest_lag_s']['p50']):>9}{ms(row['ingest_lag_s']['p99']):>9}"
            f"{ms(row['first_token_s']['p50']):>10}{ms(row['first_token_s']['p99']):>10}"
            f"{ms(row['answer_s']['p50']):>12}{row['answered']:>5}/{row['questions']:<4}{row['dropped_frames']:>9}"
            f"{'-' if memory is None else memory:>8}{'-' if busy is None else f'{busy:.2f}':>6}  "
            f"{'yes' if row['holds'] else 'no'}{stopped}")
    log("(milliseconds; lag = frame received -> in memory; ttft = question sent -> first token, at the client)")
    s = report.get("single_session")
    if s:
        log(f"single session first token p50: server {ms(s['server_p50_s'])} ms, CLI fast path {ms(s['cli_p50_s'])} "
            f"ms, ratio {s['ratio']}")
    log(f"largest N that holds: server {report['largest_holding']['server']}, "
        f"baseline {report['largest_holding']['baseline']}")


def plot(report, path):
    """Latency against the number of streams: ingest lag and first token p50 / p99 of the server's levels and
    of today's design, the targets as lines. A figure on an Agg canvas of its own (no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.2))
    FigureCanvasAgg(fig)
    panels = (("ingest_lag_s", "ingest lag (frame received -> in memory)", TARGET_LAG_S),
              ("first_token_s", "question -> first token (at the client)", TARGET_TTFT_S))
    for k, (key, title, target) in enumerate(panels):
        ax = fig.add_subplot(1, 2, k + 1)
        for kind, rows, colour in (("batched server", report["levels"], "tab:blue"),
                                   ("one session at a time (today)", report["baseline"], "tab:grey")):
            rows = [r for r in rows if r[key]["p50"] is not None]
            if not rows:
                continue
            n = [r["streams"] for r in rows]
            style = "-" if len(rows) > 2 else ""  # two levels far apart: points, no line implying the way between
            ax.plot(n, [1e3 * r[key]["p50"] for r in rows], "o" + style, color=colour, label=f"{kind} p50")
            ax.plot(n, [1e3 * r[key]["p99"] for r in rows], "s" + style.replace("-", "--"), color=colour,
                    label=f"{kind} p99")
            for r in rows:
                if not r["holds"]:
                    ax.annotate("misses", (r["streams"], 1e3 * r[key]["p99"]), textcoords="offset points",
                                xytext=(4, 4), fontsize=7, color=colour)
        cli = (report.get("cli_fast_path") or {}).get("first_token_s", {}).get("p50")
        if key == "first_token_s" and cli:
            ax.plot([1], [1e3 * cli], "*", color="tab:green", ms=10, label="CLI fast path p50 (one session)")
        ax.axhline(1e3 * target, color="tab:red", lw=0.8, ls=":", label=f"target p99 {1e3 * target:g} ms")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent 1-fps streams")
        ax.set_ylabel("ms")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    device = report["environment"].get("device", "")
    a = report["args"]
    weights = "checkpoint" if a.get("model_path") else f"{a.get('preset')}-shaped random"
    fig.suptitle(f"benchmarks/serve.py on {device}: {weights} weights, a question every "
                 f"{a.get('question_interval'):g} s per stream, {a.get('answer_tokens')}-token answers", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write(report, path):
    from flash_vstream.utils.files import write_json

    holding = {kind: max([r["streams"] for r in report[key] if r["holds"]], default=None)
               for kind, key in (("server", "levels"), ("baseline", "baseline"))}
    report["largest_holding"] = holding
    write_json(path, report)


class Bench:
    """What one run holds: its arguments, the model, the frames, the server and the GPU sampler."""

    def __init__(self, args):
        self.args = args


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, help="the JSON report")
    p.add_argument("--preset", choices=("7b", "tiny"), default="7b")
    p.add_argument("--model-path", default=None, help="a checkpoint instead of random weights")
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.add_argument("--levels", default=",".join(map(str, LEVELS)), help="numbers of streams")
    p.add_argument("--baseline-levels", default=",".join(map(str, BASELINE_LEVELS)),
                   help="numbers of streams for today's design ('' for none)")
    p.add_argument("--question-interval", type=float, default=30.0, help="seconds between one stream's questions")
    p.add_argument("--single-interval", type=float, default=2.0, help="N=1: seconds between its questions")
    p.add_argument("--single-questions", type=int, default=8, help="N=1: questions asked")
    p.add_argument("--warmup", type=float, default=4.0, help="seconds of frames before the first question")
    p.add_argument("--tail", type=float, default=5.0, help="seconds after the last frame for answers to finish")
    p.add_argument("--answer-tokens", type=int, default=64)
    p.add_argument("--abort-lag", type=float, default=5.0, help="a level stops once a frame waited this long")
    p.add_argument("--abort-wait", type=float, default=10.0, help="... or a question waited this long")
    p.add_argument("--budget-s", type=float, default=None, help="skip the levels that would end past this")
    p.add_argument("--client-procs", type=int, default=8, help="client processes (at most)")
    p.add_argument("--io-threads", type=int, default=8, help="the server's pool that decodes images")
    p.add_argument("--server-fast", choices=("off", "auto", "on"), default=None,
                   help="the server's --fast (default: the server's own default)")
    p.add_argument("--memory-budget-gb", type=float, default=None, help="the server's --memory-budget-gb")
    p.add_argument("--max-batch", type=int, default=32,
                   help="the server's --max-batch: answers at once (1024 streams ask ~34 questions/s)")
    p.add_argument("--cli-compile-decode", action="store_true",
                   help="the CLI fast path with its torch.compile'd decode step (30-50 s to build on a 7B)")
    p.add_argument("--skip-cli", action="store_true", help="no CLI fast-path first token")
    p.add_argument("--sample-threads", action=argparse.BooleanOptionalAction, default=True,
                   help="sample the server's thread stacks every 20 ms in each level's window (where the time goes)")
    p.add_argument("--video", default=os.path.join(REPO, "assets", "example.mp4"), help="the frames sent")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="CPU smoke: levels 1,2, baseline 2, seconds-long levels")
    p.add_argument("--plot", default=None, help="also draw latency against N into this PNG (needs matplotlib)")
    p.add_argument("--replot", action="store_true",
                   help="no measuring: print the table of --output's JSON and draw --plot from it")
    args = p.parse_args(argv)
    if args.smoke:  # short levels; --levels / --baseline-levels given on the command line still count
        if args.levels == p.get_default("levels"):
            args.levels = "1,2"
        if args.baseline_levels == p.get_default("baseline_levels"):
            args.baseline_levels = "2"
        args.question_interval, args.single_interval, args.single_questions = 2.0, 1.0, 2
        args.warmup, args.tail, args.answer_tokens, args.client_procs = 1.5, 5.0, 4, 1
    args.levels = tuple(int(x) for x in args.levels.split(",") if x.strip())
    args.baseline_levels = tuple(int(x) for x in args.baseline_levels.split(",") if x.strip())
    if not args.levels or min(args.levels + args.baseline_levels + (1,)) < 1:
        raise SystemExit("--levels: numbers of streams >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.replot:
        with open(args.output) as f:
            report = json.load(f)
        print_table(report)
        if args.plot:
            plot(report, args.plot)
        return 0
    began = time.monotonic()
    import torch

    from benchmarks.common import environment
    from flash_vstream.serve.api.state import Settings

    if args.server_fast is None:
        args.server_fast = Settings(model_path="").fast
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    bench = Bench(args)
    bench.device = device
    report = {"benchmark": "serve", "environment": environment(device), "args": vars(args),
              "targets": {"streams": 256, "ingest_lag_p99_s": TARGET_LAG_S, "first_token_p99_s": TARGET_TTFT_S,
                          "dropped_frames": 0, "single_session_ratio": 1.2},
              "levels": [], "baseline": [], "single_session": None, "notes": []}
    bench.model, bench.tokenizer, bench.processor, notes = build_model(args, device, dtype)
    report["notes"] += notes
    frames = example_frames(args.video)
    bench.arrays, bench.data_urls = [a for a, _ in frames], [u for _, u in frames]
    report["frames"] = {"video": os.path.relpath(args.video), "distinct": len(frames),
                        "shape": list(frames[0][0].shape), "jpeg_data_url_bytes": len(frames[0][1])}
    report["host"] = host_costs(bench)
    bench.gpu = GpuSampler(device)
    if bench.gpu.proc is None and device.type == "cuda":
        report["notes"].append("no nvidia-smi: GPU busy fraction not measured")
    context = multiprocessing.get_context("spawn")  # never fork a process that holds CUDA
    bench.server = None

    def time_left():
        return math.inf if args.budget_s is None else args.budget_s - (time.monotonic() - began)

    def level_cost(n, interval, each):
        return 3.0 + n / 200 + args.warmup + interval * each + min(args.tail, 3.0)

    try:
        if not args.skip_cli:
            log("[cli] the fast path's first token, one session")
            report["cli_fast_path"] = run_cli_first_token(bench)
            write(report, args.output)
        for n in args.baseline_levels:
            if level_cost(n, args.question_interval, 1) > time_left():
                report["notes"].append(f"baseline N={n} skipped: out of time")
                break
            log(f"[baseline] N={n}")
            row = run_baseline(bench, n, args.question_interval, args.warmup, 1)
            report["baseline"].append(row)
            write(report, args.output)
            if not row["holds"]:
                break  # today's design fell behind: larger N would too
        bench.server = Server(bench.model, bench.tokenizer, bench.processor, args)
        log("[server] warm-up (untimed)")
        warmed = warm_up_server(bench, min(args.max_batch, 2 if args.smoke else 32), 3 if args.smoke else 30)
        report["server"] = {"fast": args.server_fast, "max_batch": args.max_batch, "warm_up": warmed,
                            "memory_budget": bench.server.engine.budget.describe(),
                            "session_bytes": bench.server.engine.session_bytes}
        for n in args.levels:
            interval, each = (args.single_interval, args.single_questions) if n == 1 else (args.question_interval, 1)
            if level_cost(n, interval, each) > time_left():
                report["notes"].append(f"server N={n} skipped: out of time")
                break
            row = run_level(bench, n, interval, args.warmup, each, context)
            report["levels"].append(row)
            if n == 1 and report.get("cli_fast_path"):
                server_p50, cli_p50 = row["first_token_s"]["p50"], report["cli_fast_path"]["first_token_s"]["p50"]
                report["single_session"] = {
                    "server_p50_s": server_p50, "cli_p50_s": cli_p50,
                    "server_side_p50_s": row["server_first_token_s"]["p50"],
                    "ratio": None if not (server_p50 and cli_p50) else round(server_p50 / cli_p50, 3)}
            write(report, args.output)
            log(f"[server] N={n}: lag p99 {ms(row['ingest_lag_s']['p99'])} ms, first token p99 "
                f"{ms(row['first_token_s']['p99'])} ms, answered {row['answered']}/{row['questions']}, dropped "
                f"{row['dropped_frames']}, holds: {row['holds']}")
            busy = {kind: v for kind, v in (row.get("host_cpu") or {}).items() if v["cores"] >= 0.01}
            if busy:
                log(f"[server] N={n}: host CPU per frame (ms) / cores: " + ", ".join(
                    f"{kind} {v['ms_per_frame']} / {v['cores']}" for kind, v in busy.items()))
            if not row["holds"] and n > 1:
                report["notes"].append(f"N={n} did not hold: larger levels skipped")
                break
    finally:
        bench.gpu.close()
        if bench.server is not None:
            bench.server.close()
    report["seconds"] = round(time.monotonic() - began, 1)
    write(report, args.output)
    print_table(report)
    if args.plot:
        plot(report, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
