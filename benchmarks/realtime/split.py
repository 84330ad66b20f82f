"""The `vision_split` section (`--vision-device cuda:1`): ingest and answers at the same time, with CLIP and the
STAR memory beside the LLM ("one_device", as without the flag) against CLIP and the memory on their own card
("split", runtime/devices.py), in the same run.

Each layout at one stream position (the memory filled with random features to min(600, the last --positions)
frames, so that it holds its full 681 tokens):
  quiet   per-frame ingest alone (fast CLIP encoder -- a CUDA graph on CUDA -- then `STARMemory.update`, then the
          readout handed to the LLM's card by `Placement.hand_over`, which waits for it, as the session's publish
          does), and question -> first token alone
  busy    an answer thread answering back to back while an ingest thread takes frames back to back (the worst
          case of a stream: no pause between frames): each frame's ingest and each answer's first token and
          full time. An answer runs as the session's fast path does: the prompt prefix over the newest snapshot
          (`cache_prefix`, when the memory changed since the last one), the question, then the decode step in
          chunks of `check_every` tokens with a host read between them. The session's refresh of the prefix on
          the ingest thread after each frame is left out: here the answer thread runs it.
Reported per layout: p50/p99 of each, and split / one_device ratios of the busy p99s.
"""

import copy
import threading
import time

import torch

from benchmarks.common import log
from flash_vstream.model.language_model.configuration_vstream import PATCH_GRID
from flash_vstream.model.memory import STARMemory
from flash_vstream.runtime.cuda_utils import sync
from flash_vstream.runtime.devices import Placement, check_pair, parse_device
from flash_vstream.runtime.fast_path import FastPath
from flash_vstream.utils.stats import summary

BUSY_ANSWERS = {"7b": 16, "tiny": 2}  # answers timed while frames are ingested, per layout
FILL_CHUNK = 64  # frames per update while filling the memory to the position (the offline path; bounded state)


def _ms(samples):
    return summary(samples, digits=3)


class _Layout:
    """The vision side of one layout: a CLIP tower and its fast encoder, a memory and the placement."""

    def __init__(self, b, vision):
        self.placement = Placement(b.device, vision)
        if vision == b.device:
            self.tower, self.encoder = b.tower, b.fast_vision
            if b.device.type == "cuda" and not self.encoder.graphed:  # the clip section may have been skipped
                self.encoder.capture(b.image_size)
        else:
            self.tower = copy.deepcopy(b.tower).to(vision)  # the same random weights, on the vision card
            # vision only: the LLM's path is built already; one frame at a time needs no batched (compiled) path
            path = FastPath(options=b.fast_path.options.replace(compile_vision=False), tower=self.tower)
            self.encoder = path.vision()  # one frame captured as a CUDA graph on the vision card
            self.path = path
        self.memory = STARMemory(b.config, attention_model=self.placement.memory_attention(b.model), seed=b.args.seed)
        self.vision = vision
        self.dtype = b.dtype
        self.pixels = [torch.randn(1, 3, b.image_size, b.image_size, device=vision, dtype=b.dtype) for _ in range(4)]

    def fill(self, frames, dim):
        generator = torch.Generator(device=self.vision).manual_seed(0)
        while self.memory.frames_seen < frames:
            n = min(FILL_CHUNK, frames - self.memory.frames_seen)
            self.memory.update(torch.randn(n, PATCH_GRID**2, dim, device=self.vision, dtype=self.dtype,
                                           generator=generator))
        sync(self.vision)

    def ingest(self, i):
        """One frame: encode, update, readout on the LLM's card -> (ms, tokens)."""
        start = time.perf_counter()
        self.memory.update(self.encoder(self.pixels[i % len(self.pixels)]))
        tokens = self.placement.hand_over(self.memory.read())  # waits for the values (the session's publish)
        return 1e3 * (time.perf_counter() - start), tokens


def _answer(b, decoder, tokens, answer_tokens):
    """One answer as the session's fast path runs it -> (first-token ms, answer ms)."""
    start = time.perf_counter()
    if not decoder.prefix_matches(b.prompt_ids, tokens):
        decoder.cache_prefix(b.prefix_ids, tokens)
    decoder.prefill(b.prompt_ids, tokens).tolist()  # host read: the first token exists
    first = time.perf_counter()
    done = 1
    while done < answer_tokens:
        step = min(decoder.check_every, answer_tokens - done)
        decoder.decode(step)
        decoder.tokens()  # the host read between chunks (the session checks for EOS there)
        done += step
    return 1e3 * (first - start), 1e3 * (time.perf_counter() - start)


def measure_layout(b, layout, position, answers, window):
    dim = b.config.mm_hidden_size
    layout.fill(position, dim)
    for i in range(3):  # warm: graph replays, allocator
        _, tokens = layout.ingest(i)
    decoder = b.get_decoder(int(tokens.shape[0]))
    _answer(b, decoder, tokens, b.args.answer_tokens)  # warm: a new cache length must not be timed
    quiet_ingest = [layout.ingest(i)[0] for i in range(window)]
    _, tokens = layout.ingest(0)
    quiet = [_answer(b, decoder, tokens, b.args.answer_tokens) for _ in range(max(1, answers // 2))]
    # re-running the prefix over a new memory (what a question after a frame costs)
    fresh = []
    for i in range(max(1, answers // 2)):
        _, tokens = layout.ingest(i)
        fresh.append(_answer(b, decoder, tokens, b.args.answer_tokens))

    latest = {"tokens": tokens}
    busy_ingest, failure = [], []
    stop = threading.Event()

    @torch.inference_mode()  # thread-local: the section's own does not reach this thread
    def ingest_loop():
        i = 0
        try:
            while not stop.is_set():
                ms, latest["tokens"] = layout.ingest(i)  # swapped whole: the reader takes one or the other
                busy_ingest.append(ms)
                i += 1
        except Exception as error:  # noqa: BLE001 -- re-raised on the measuring thread
            failure.append(error)

    thread = threading.Thread(target=ingest_loop, name="ingest", daemon=True)
    thread.start()
    try:
        busy = [_answer(b, decoder, latest["tokens"], b.args.answer_tokens) for _ in range(answers)]
    finally:
        stop.set()
        thread.join(timeout=60)
    if failure:
        raise failure[0]
    return {"frames_seen": layout.memory.frames_seen, "memory_tokens": int(tokens.shape[0]),
            "memory_device": str(layout.vision), "handover": "device to device" if layout.placement.split else "none",
            "quiet": {"ingest_ms": _ms(quiet_ingest), "ttft_ms": _ms([a for a, _ in quiet]),
                      "ttft_new_memory_ms": _ms([a for a, _ in fresh]), "answer_ms": _ms([t for _, t in quiet])},
            "busy": {"ingest_ms": _ms(busy_ingest), "ttft_ms": _ms([a for a, _ in busy]),
                     "answer_ms": _ms([t for _, t in busy]), "frames": len(busy_ingest), "answers": len(busy)}}


def section_vision_split(b, out):
    vision = parse_device(b.args.vision_device)
    check_pair(b.device, vision)
    position = min(600, max(b.args.positions))
    answers = BUSY_ANSWERS.get(b.args.preset, 8)
    out.update(position_frames=position, answer_tokens=b.args.answer_tokens, llm_device=str(b.device),
               vision_device=str(vision), layouts={})
    for name, device in (("one_device", b.device), ("split", vision)):
        layout = _Layout(b, device)
        out["layouts"][name] = entry = measure_layout(b, layout, position, answers, b.args.window)
        b.report.save()
        q, busy = entry["quiet"], entry["busy"]
        log(f"  {name} (CLIP + memory on {device}): ingest p99 quiet {q['ingest_ms']['p99']:.2f} / busy "
            f"{busy['ingest_ms']['p99']:.2f} ms, first token p50 quiet {q['ttft_ms']['p50']:.1f} / busy "
            f"{busy['ttft_ms']['p50']:.1f} ms (p99 {busy['ttft_ms']['p99']:.1f}), {busy['frames']} frames "
            f"during {busy['answers']} answers")
        del layout
    one, split = out["layouts"]["one_device"]["busy"], out["layouts"]["split"]["busy"]
    out["split_over_one_device"] = {
        "busy_ingest_p99": round(split["ingest_ms"]["p99"] / one["ingest_ms"]["p99"], 3),
        "busy_ttft_p50": round(split["ttft_ms"]["p50"] / one["ttft_ms"]["p50"], 3),
        "busy_ttft_p99": round(split["ttft_ms"]["p99"] / one["ttft_ms"]["p99"], 3),
        "busy_frames_per_answer": round((split["frames"] / split["answers"]) / (one["frames"] / one["answers"]), 3)}
