"""The six sections of the realtime benchmark, in the order they run (each writes its part of bench.json).

  clip_one_frame   one-frame CLIP latency: stock `CLIPVisionTower` forward (all 24 layers, every hidden
                   state kept) vs the fast encoder (stops at the selected layer) eager and as a CUDA graph.
  decode           question -> first token, -> 64-token answer and decode tokens/s at batch 1: stock HF
                   `generate` (dynamic cache) vs `GreedyDecoder` (static cache + CUDA-graphed decode step),
                   and whether both give the same tokens.
  streaming        at the stream start and at 1 min, 10 min, 1 h, 3 h (positions are reached by feeding
                   random features to the memory, one frame per update; real encoding is timed in a
                   window of frames at each position): per-frame encode + memory update (+ snapshot read)
                   p50/p99 stock vs optimised, the memory update alone, question -> first token and -> full
                   answer from the snapshot there (optimised: over the prompt prefix the session keeps in the
                   KV cache; also without it, and the prefix refresh a frame costs), and peak GPU memory.
  vision_split     (--vision-device cuda:1) ingest and answers at once, CLIP + memory beside the LLM vs on
                   their own card (split.py).
  baseline_upstream_buffer  (b) the published design's per-update copy of an unbounded frame buffer.
  baseline_full_context     (a) every frame's 64 tokens in the prompt: prefill time until out of memory.
  extraction       batched CLIP frames/s at batch 64/128/256: stock vs fast encoder eager vs
                   regional torch.compile (one compiled graph shared by all layers and batch sizes).
  quantized        (--quantized int8,int4) the decode and streaming sections again over the LLM quantized
                   from the same weights (model/quantization.py): the bf16 model goes to the CPU as the
                   source, each scheme is quantized layer by layer onto the GPU from a copy of it; last,
                   so that the peak memory it records is the quantized path's alone.

Each section records its status, notes and fallbacks; a failed section does not stop the others.
"""

import copy
import dataclasses
import time
import traceback

import numpy as np
import torch
import torch._dynamo

from benchmarks.common import log, peak_gb, repeat_ms, reset_peak, timed_ms
from benchmarks.realtime.baselines import full_context, upstream_buffer_copy
from benchmarks.realtime.build import new_decoder, new_fast_path
from benchmarks.realtime.split import section_vision_split
from flash_vstream.runtime.cuda_utils import free_memory, sync
from flash_vstream.runtime.fused_decode import fused_projections
from flash_vstream.runtime.fusing import forget_fused
from flash_vstream.runtime.triton_kernels import usable
from flash_vstream.utils.stats import summary as _summary

# run in this order: the targets first, the slow optional compile last (bench.json is saved after each)
SECTIONS = ("clip_one_frame", "decode", "streaming", "vision_split", "baseline_upstream_buffer",
            "baseline_full_context", "extraction", "quantized")
COMPILE_MIN_TIME_S = 150  # don't start the CLIP compile with less budget left than this
EXTRACTION_RESERVE_S = 180  # the full-context baseline leaves this much of the budget to extraction


def record_failure(out, error, label):
    """Marks a section (or one scheme of it) failed in its JSON entry, with the error and the traceback's end,
    and says so in the log: the run goes on with the others."""
    out.update(status="failed", error=f"{type(error).__name__}: {error}"[:2000],
               traceback=traceback.format_exc().splitlines()[-15:])
    log(f"{label} FAILED: {type(error).__name__}: {str(error)[:300]}")


def summary(samples_ms):
    """{n, mean, min, max, p50, p99} of milliseconds, to the microsecond (None for no samples)."""
    return _summary(samples_ms, digits=3)


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def first_divergence(a, b):
    """Index of the first differing token of two 1-D token lists (len of the shorter if one is a prefix)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def section_clip_one_frame(b, out):
    frames = [b.random_pixels(1) for _ in range(4)]  # rotate inputs
    iters = b.preset["frame_iters"]
    out["stock_ms"] = summary(repeat_ms(b.device, lambda i: b.tower(frames[i % 4]), iters))
    out["truncated_eager_ms"] = summary(repeat_ms(b.device, lambda i: b.fast_vision.eager(frames[i % 4]), iters))
    x = b.random_pixels(2)
    out["truncated_vs_stock_rel_err"] = rel_err(b.fast_vision.eager(x), b.tower(x))
    out["optimised"], out["optimised_ms"] = "truncated_eager", out["truncated_eager_ms"]
    if b.device.type != "cuda":
        out["notes"].append("CUDA graph skipped: not a CUDA device")
        return
    error = b.fast_vision.capture(b.image_size)
    if error:
        out["notes"].append(f"CUDA graph capture failed, eager used: {error}")
        return
    out["cuda_graph_ms"] = summary(repeat_ms(b.device, lambda i: b.fast_vision(frames[i % 4]), iters))
    out["graph_vs_eager_rel_err"] = rel_err(b.fast_vision(frames[0]), b.fast_vision.eager(frames[0]))
    out["optimised"], out["optimised_ms"] = "cuda_graph", out["cuda_graph_ms"]


def snapshot_tokens(b, frames=30):
    """Memory tokens of a memory fed `frames` random frames in one chunk (681 at the released sizes)."""
    memory = b.new_memory()
    memory.update(b.random_features(frames))
    return memory.read()


# decoder variants, simplest first: what each optimisation buys
# (name, CUDA graph, compiled step, fused weights, Triton products)
DECODER_VARIANTS = (("static_cache_eager", False, False, False, False), ("cuda_graph", True, False, False, False),
                    ("compiled_cuda_graph", True, True, False, False),
                    ("fused_compiled_cuda_graph", True, True, True, False),
                    ("triton_cuda_graph", True, False, True, True),
                    ("triton_compiled_cuda_graph", True, True, True, True))
# the quantized rows: the Triton products reading int8 / int4 (the other steps dequantize every weight)
QUANTIZED_VARIANTS = DECODER_VARIANTS[-2:]


def section_decode(b, out, variants=DECODER_VARIANTS):
    device, answer, reps = b.device, b.args.answer_tokens, b.preset["repeats"]
    if b.args.decode_variants:  # --decode-variants: only those
        variants = [v for v in variants if v[0] in b.args.decode_variants] or variants[-1:]
    tokens = snapshot_tokens(b)
    out.update(memory_tokens=int(tokens.shape[0]), prompt_tokens=len(b.prompt_ids) - 1 + int(tokens.shape[0]),
               answer_tokens=answer, variants={}, compile_mode=b.args.decode_compile_mode or "default")
    # stock: HF generate, default (dynamic) cache
    b.stock_generate(tokens, 2)  # warm-up
    first = [timed_ms(device, b.stock_generate, tokens, 1)[0] for _ in range(reps)]
    full, stock_out = [], None
    for _ in range(b.preset["stock_answer_repeats"]):
        ms, stock_out = timed_ms(device, b.stock_generate, tokens, answer)
        full.append(ms)
    stock = {"ttft_ms": summary(first), "answer_ms": summary(full), "new_tokens": int(stock_out.shape[1])}
    stock["tokens_per_s"] = decode_rate(answer, stock["answer_ms"], stock["ttft_ms"])
    out["stock"] = stock
    stock_list = stock_out[0].tolist()
    b.report.save()

    # GreedyDecoder: static cache, then + CUDA graph of the step, then + compiled step
    best, best_rate, reference = None, -1.0, None
    for name, graph, compiled, fused, triton in variants:
        if triton and not usable(b.model.get_model().embed_tokens.weight):
            out["notes"].append(f"{name} skipped: Triton does not run on {device}")
            continue
        if graph and device.type != "cuda":
            out["notes"].append(f"{name} skipped: not a CUDA device")
            continue
        if compiled and b.args.decode_compile == "off":
            out["notes"].append(f"{name} skipped: --decode-compile off")
            continue
        if compiled and b.time_left() < COMPILE_MIN_TIME_S:
            out["notes"].append(f"{name} skipped: {b.time_left():.0f} s left of the time budget")
            continue
        decoder = new_decoder(b, int(tokens.shape[0]), cuda_graph=graph, compile_step=compiled, fused_step=fused,
                                triton_kernels=triton)
        setup_ms, _ = timed_ms(device, decoder.setup)
        res = {"mode": decoder.mode, "setup_ms": round(setup_ms, 1), "errors": decoder.errors,
               "max_cache_len": decoder.max_cache_len}
        out["variants"][name] = res
        for attempt, error in decoder.errors.items():
            out["notes"].append(f"{name}: {attempt} step failed ({error[:200]}); fell back to {decoder.mode}")
        slow = decoder.mode == "eager" and device.type == "cuda"  # ~30 ms a token: keep it short
        n = 1 if slow else reps
        answers, fast_out = [], None
        for _ in range(n):
            ms, fast_out = timed_ms(device, decoder.generate, b.prompt_ids, tokens, answer)
            answers.append(ms)
        steps = min(b.preset["decode_steps"], 32) if slow else b.preset["decode_steps"]
        rates = []
        for _ in range(n):
            decoder.prefill(b.prompt_ids, tokens)
            ms, _ = timed_ms(device, decoder.decode, steps)
            rates.append(steps / (ms / 1e3))
        fast_list = fast_out[0].tolist()
        reference = fast_list if reference is None else reference
        res.update(answer_ms=summary(answers), new_tokens=len(fast_list), decode_steps=steps,
                   decode_only_tokens_per_s=round(float(np.median(rates)), 2),
                   tokens_equal_stock=fast_list == stock_list,
                   first_divergence_vs_stock=first_divergence(stock_list, fast_list),
                   tokens_equal_static_cache_eager=fast_list == reference)
        log(f"  {name} ({decoder.mode}): setup {res['setup_ms']:.0f} ms, answer {res['answer_ms']['p50']:.0f} ms, "
            f"decode {res['decode_only_tokens_per_s']} tokens/s")
        if res["decode_only_tokens_per_s"] > best_rate:
            if best is not None and "compiled" in best[1].mode:
                torch._dynamo.reset()  # the discarded compiled step must not keep its static cache alive
            best, best_rate = (name, decoder), res["decode_only_tokens_per_s"]
        elif "compiled" in decoder.mode:
            torch._dynamo.reset()
        del decoder
        free_memory(device)
        b.report.save()
    if best is None:
        raise RuntimeError(f"no decoder variant ran on {device}: {'; '.join(out['notes'])}")
    name, decoder = best
    b.decoder = decoder
    fast = {"variant": name, "mode": decoder.mode,
            "ttft_ms": summary([timed_ms(device, decoder.prefill, b.prompt_ids, tokens)[0] for _ in range(reps + 2)]),
            **{k: out["variants"][name][k] for k in ("answer_ms", "new_tokens", "decode_only_tokens_per_s")}}
    fast["tokens_per_s"] = decode_rate(answer, fast["answer_ms"], fast["ttft_ms"]) or fast["decode_only_tokens_per_s"]
    out["optimised"] = fast
    out["tokens_equal_stock"] = out["variants"][name]["tokens_equal_stock"]
    if not out["tokens_equal_stock"]:
        out["notes"].append(f"optimised and stock answers differ from token "
                            f"{out['variants'][name]['first_divergence_vs_stock']}: other kernels round differently "
                            f"in {b.args.dtype} and random weights have near-tied logits (the fp32 CPU test checks "
                            "exact equality)")
    free_memory(device)


def decode_rate(answer_tokens, answer_ms, first_ms):
    """Tokens/s of the decode phase: (n - 1) tokens over (answer time - first-token time), medians."""
    if answer_ms is None or first_ms is None or answer_tokens < 2:
        return None
    decode_ms = answer_ms["p50"] - first_ms["p50"]
    return round((answer_tokens - 1) / (decode_ms / 1e3), 2) if decode_ms > 0 else None


class Filler:
    """Feeds random features to a memory, one frame per update (the streaming path), to reach a position.

    If one-frame updates would not reach the last position within the fill budget, chunks of
    FALLBACK_CHUNK frames are fed instead (recorded in the notes; a chunk takes the offline k-means
    path, which costs more per call but far less per frame): the memory is bounded, so its cost per
    frame at a position does not depend on how it got there, only its cluster weights and times do.
    """

    BANK = 256  # random frames generated at a time
    FALLBACK_CHUNK = 64

    def __init__(self, b, memory, total_frames, notes):
        self.b, self.memory, self.notes = b, memory, notes
        self.total = total_frames
        self.chunk = 1
        self.fed_ms = 0.0
        self._bank, self._next = None, 0
        self._probed = False

    def _features(self, n):
        if self._bank is None or self._next + n > self.BANK:
            self._bank, self._next = self.b.random_features(self.BANK), 0
        self._next += n
        return self._bank[self._next - n:self._next]  # (n, 256, D)

    def fill_to(self, target):
        start = time.perf_counter()
        if not self._probed and self.memory.frames_seen < target:
            self._probe(target)
        while self.memory.frames_seen < target:
            self.memory.update(self._features(min(self.chunk, target - self.memory.frames_seen)))
        self._bank = None  # not resident while the position is measured (peak memory)
        sync(self.b.device)
        self.fed_ms += 1e3 * (time.perf_counter() - start)

    def _probe(self, target):
        """Time some one-frame updates; choose the chunk that keeps the whole fill within budget."""
        self._probed = True
        n = min(200, target - self.memory.frames_seen)
        ms, _ = timed_ms(self.b.device, lambda: [self.memory.update(self._features(1)) for _ in range(n)])
        per_frame = ms / max(n, 1)
        projected_s = per_frame * self.total / 1e3
        budget = self.b.args.fill_budget_s
        if projected_s > budget:
            self.chunk = self.FALLBACK_CHUNK
            self.notes.append(f"fill: {per_frame:.2f} ms per one-frame update would take {projected_s:.0f} s for "
                              f"{self.total} frames; fed in chunks of {self.chunk} frames instead")
        self.per_frame_ms = round(per_frame, 3)


def measure_position(b, memory, position, out):
    """One stream position: ingest windows (stock, optimised), update alone, questions, peak memory."""
    device, window, fps = b.device, b.args.window, b.config.video_fps
    entry = {"position_frames": position, "frames_seen": memory.frames_seen,
             "stream_time_s": memory.frames_seen / fps,
             "resident_gb": round(torch.cuda.memory_allocated(device) / 1e9, 3) if device.type == "cuda" else None}
    pixels = [b.random_pixels(1) for _ in range(4)]

    def ingest_stock(px):
        # as StreamSession.add_frame does it: CLIPVisionTower forward, timestamp list, update, snapshot read
        features = b.tower(px)  # (1, 256, D)
        memory.update(features.to(b.dtype), [memory.frames_seen / fps])
        return memory.read()

    def ingest_fast(px):
        memory.update(b.fast_vision(px))  # timestamps from the frame counter, on the device
        return memory.read()

    if b.freeze_heap is not None:  # as the realtime CLI does after warming up (see Bench.freeze_heap)
        entry["gc_full_collection_ms"] = b.freeze_heap()
    reset_peak(device)
    stock_ms = [timed_ms(device, ingest_stock, pixels[i % 4])[0] for i in range(window)]
    peak_stock = peak_gb(device)
    reset_peak(device)
    fast_ms = [timed_ms(device, ingest_fast, pixels[i % 4])[0] for i in range(window)]
    peak_fast = peak_gb(device)
    features = b.random_features(window)
    update_ms = [timed_ms(device, memory.update, features[i:i + 1])[0] for i in range(window)]
    del features
    read_ms = [timed_ms(device, memory.read)[0] for _ in range(5)]
    tokens = memory.read()  # the snapshot the questions are answered from
    entry.update(memory_tokens=int(tokens.shape[0]), frames_after=memory.frames_seen,
                 ingest_ms={"stock": summary(stock_ms), "optimised": summary(fast_ms)},
                 update_ms=summary(update_ms), read_ms=summary(read_ms))

    answer, reps = b.args.answer_tokens, b.preset["repeats"]
    stock_answer_reps = b.preset["stock_answer_repeats"]
    if b.time_left() < 60:
        reps, stock_answer_reps = 1, 1
        out["notes"].append(f"position {position}: little time left, one repeat per question")
    reset_peak(device)
    stock_first = [timed_ms(device, b.stock_generate, tokens, 1)[0] for _ in range(reps)]
    stock_full = [timed_ms(device, b.stock_generate, tokens, answer)[0] for _ in range(stock_answer_reps)]
    peak_stock = max(filter(None, [peak_stock, peak_gb(device)]), default=None)
    decoder = b.get_decoder(int(tokens.shape[0]))
    decoder.prefill(b.prompt_ids, tokens)  # warm: a new cache length or decoder must not be timed here
    reset_peak(device)
    # a question right after a frame, before the session re-ran the prefix: the whole prompt
    cold_first = [timed_ms(device, decoder.prefill, b.prompt_ids, tokens)[0] for _ in range(reps)]
    uncached_answer = decoder.generate(b.prompt_ids, tokens, answer)[0].tolist()
    # what the session runs after each published frame: system text + memory into the cache
    refresh = [timed_ms(device, decoder.cache_prefix, b.prefix_ids, tokens)[0] for _ in range(reps)]
    decoder.prefill(b.prompt_ids, tokens)  # warm: the first question of a suffix size captures its graph
    # a question over the cached prefix: its own ~15 tokens, then the answer
    fast_first = [timed_ms(device, decoder.prefill, b.prompt_ids, tokens)[0] for _ in range(reps)]
    fast_full = []
    for _ in range(reps):
        ms, cached_answer = timed_ms(device, decoder.generate, b.prompt_ids, tokens, answer)
        fast_full.append(ms)
    entry["cached_prefix_answer_equal_uncached"] = cached_answer[0].tolist() == uncached_answer
    if not decoder.prefix_matches(b.prompt_ids, tokens):
        raise RuntimeError("the cached prefix was not kept across questions")
    peak_fast = max(filter(None, [peak_fast, peak_gb(device)]), default=None)
    entry.update(ttft_ms={"stock": summary(stock_first), "optimised": summary(fast_first),
                          "optimised_uncached": summary(cold_first)},
                 prefix_refresh_ms=summary(refresh),
                 answer_ms={"stock": summary(stock_full), "optimised": summary(fast_full)},
                 peak_mem_gb={"stock": peak_stock, "optimised": peak_fast}, decoder_mode=decoder.mode)
    ingest, ttft, ans = entry["ingest_ms"], entry["ttft_ms"], entry["answer_ms"]
    log(f"  position {position:>6} (frames {entry['frames_seen']}): ingest p99 {ingest['stock']['p99']:.2f} / "
        f"{ingest['optimised']['p99']:.2f} ms, first token {ttft['stock']['p50']:.1f} / {ttft['optimised']['p50']:.1f}"
        f" ms (uncached prefix {ttft['optimised_uncached']['p50']:.1f}, refresh {entry['prefix_refresh_ms']['p50']:.1f})"
        f" ms, answer {ans['stock']['p50']:.0f} / {ans['optimised']['p50']:.0f} ms, peak {peak_stock} / {peak_fast} GB"
        " (stock / optimised)")
    return entry


def section_streaming(b, out):
    positions = sorted(set(b.args.positions))
    if b.device.type == "cuda" and not b.fast_vision.graphed:  # the clip section may have been skipped
        error = b.fast_vision.capture(b.image_size)
        if error:
            out["notes"].append(f"CLIP CUDA graph failed, eager encoder used: {error[:200]}")
    out.update(window_frames=b.args.window, positions=[], fps=b.config.video_fps,
               encoder="cuda_graph" if b.fast_vision.graphed else "truncated_eager",
               stock_ingest="CLIPVisionTower forward + STARMemory.update(features, [timestamp]) + read()",
               optimised_ingest="FastVisionEncoder (batch-1 CUDA graph) + STARMemory.update(features) + read()",
               optimised_question="GreedyDecoder.prefill over the prefix (system text + memory) that "
                                  "cache_prefix ran after the frame; uncached: the whole prompt")
    # stream start: a fresh memory, real encoding from the first frame
    out["positions"].append(measure_position(b, b.new_memory(), 0, out))
    b.report.save()
    memory = b.new_memory()
    filler = Filler(b, memory, total_frames=max(positions, default=0), notes=out["notes"])
    for position in positions:
        if b.time_left() < 30:
            out["notes"].append(f"position {position} skipped: time budget")
            continue
        if memory.frames_seen > position:
            out["notes"].append(f"position {position}: measured at frame {memory.frames_seen} (the previous "
                                "position's windows ran past it)")
        filler.fill_to(position)
        out["positions"].append(measure_position(b, memory, position, out))
        out["fill_ms_total"] = round(filler.fed_ms, 1)
        out["fill_chunk"] = filler.chunk
        out["fill_one_frame_update_ms"] = getattr(filler, "per_frame_ms", None)
        b.report.save()


def extraction_fps(b, encode, batch, inputs, iters):
    for i in range(2):
        encode(inputs[i % 2])
    ms, _ = timed_ms(b.device, lambda: [encode(inputs[i % 2]) for i in range(iters)])
    return round(batch * iters / (ms / 1e3), 1)


def section_extraction(b, out):
    iters = b.preset["extract_iters"]
    rows = []
    out["rows"] = rows
    for batch in b.args.batches:
        inputs = [b.random_pixels(batch) for _ in range(2)]
        rows.append({"batch": batch, "stock_fps": extraction_fps(b, b.tower, batch, inputs, iters),
                     "truncated_fps": extraction_fps(b, b.fast_vision.eager, batch, inputs, iters)})
        log(f"  extraction batch {batch}: stock {rows[-1]['stock_fps']} / truncated {rows[-1]['truncated_fps']} "
            "frames/s")
        del inputs
        b.report.save()
    want = b.args.clip_compile == "on" or (b.args.clip_compile == "auto" and b.device.type == "cuda")
    if not want:
        out["notes"].append(f"torch.compile skipped (--clip-compile {b.args.clip_compile}, device {b.device.type})")
    elif b.time_left() < COMPILE_MIN_TIME_S:
        out["notes"].append(f"torch.compile skipped: {b.time_left():.0f} s left of the time budget")
        want = False
    variants = [("compiled", False)]  # (column, Triton kernels): what the compile buys, then the Triton kernels
    if usable(b.fast_vision.patch_weight):
        variants.append(("compiled_triton", True))
    for column, triton in variants if want else ():
        try:
            b.fast_vision.compile(mode=b.args.clip_compile_mode, triton=triton)
            out["compile_mode"] = b.args.clip_compile_mode or "default"
            x = b.random_pixels(max(2, min(b.args.batches)))
            ms, y = timed_ms(b.device, b.fast_vision, x)
            out[column] = {"compile_s": round(ms / 1e3, 1), "vs_stock_rel_err": rel_err(y, b.tower(x))}
            for row in rows:
                inputs = [b.random_pixels(row["batch"]) for _ in range(2)]
                row[f"{column}_fps"] = extraction_fps(b, b.fast_vision, row["batch"], inputs, iters)
                del inputs
        except Exception as error:  # noqa: BLE001 -- compile is optional: record and keep eager numbers
            out["notes"].append(f"{column} failed: {type(error).__name__}: {str(error)[:500]}")
        b.fast_vision.uncompile()
    for row in rows:
        best = max(("truncated_fps", "compiled_fps", "compiled_triton_fps"), key=lambda k: row.get(k) or 0)
        row["optimised"], row["optimised_fps"] = best.removesuffix("_fps"), row[best]
        log(f"  extraction batch {row['batch']}: optimised ({row['optimised']}) {row['optimised_fps']} frames/s")
    free_memory(b.device)


def section_upstream_buffer(b, out):
    deadline = time.perf_counter() + max(10.0, min(60.0, b.time_left() - 60))
    out.update(upstream_buffer_copy(b.args.positions, b.config.mm_hidden_size, b.config.spatial_pool**2,
                                    deadline=deadline, log=log))


def section_full_context(b, out):
    frames = b.args.full_context_frames or b.args.positions
    deadline = b.deadline - (EXTRACTION_RESERVE_S if "extraction" not in b.args.skip else 10)
    result = full_context(b.model, b.prompt_ids, frames, b.config.spatial_pool**2, b.args.max_context_tokens,
                          repeats=2, deadline=deadline, log=log)
    out["notes"].extend(result.pop("notes"))
    out.update(result)
    out["prefill"] = ("prompt embeddings concatenated around the projected frame tokens + model forward "
                      "(default dynamic cache, SDPA) + argmax; features precomputed, CLIP not counted")


def section_quantized(b, out):
    """The decode and streaming measurements over each --quantized scheme (see the module docstring)."""
    from flash_vstream.model.quantization import quantize_model, quantized_bytes

    schemes, device = b.args.quantized, b.device
    b.decoder = None  # the bf16 decoders, caches and compiled steps go first
    torch._dynamo.reset()
    source = b.model.to("cpu")  # in place: the bf16 weights leave the GPU; later sections would need them back
    # the fused q/k/v and gate/up tensors are plain attributes that .to() leaves on the GPU (the first H200 run's
    # quantized rows counted them: 26.7 GB peak for a 6.9 GB int8 LLM)
    out["fused_tensors_dropped"] = forget_fused(source)
    free_memory(device)
    out.update(schemes={}, source="the bench's bf16 LLM, on the CPU; each scheme quantized from a copy",
               resident_before_gb=round(torch.cuda.memory_allocated(device) / 1e9, 3) if device.type == "cuda" else None)
    for scheme in schemes:
        entry = out["schemes"][scheme] = {"status": "pending", "notes": []}
        b.report.save()
        try:
            model = copy.deepcopy(source)
            reset_peak(device)
            ms, _ = timed_ms(device, quantize_model, model, scheme, device)
            entry.update(quantize_s=round(ms / 1e3, 1), quantize_peak_gb=peak_gb(device),
                         llm_gb=round(quantized_bytes(model) / 1e9, 3), layers=model.quantization["layers"])
            log(f"  {scheme}: quantized in {entry['quantize_s']} s, LLM {entry['llm_gb']} GB, "
                f"peak while quantizing {entry['quantize_peak_gb']} GB")
            q = dataclasses.replace(b, model=model, decoder=None)
            q.fast_path = new_fast_path(q)
            # what the decode step reads: {bits of the fused q/k/v and gate/up weights}, and the resident memory
            if q.fast_path.describe()["decode_weights_fused"]:  # on CUDA; the CPU smoke run does not fuse
                entry["fused_weight_bits"] = sorted({w.bits for pair in fused_projections(model) for w in pair})
            entry["resident_gb"] = round(torch.cuda.memory_allocated(device) / 1e9, 3) if device.type == "cuda" else None
            entry["decode"] = {"notes": []}
            # off CUDA (the smoke run) the plain static-cache loop, over the dequantizing forward
            section_decode(q, entry["decode"], variants=QUANTIZED_VARIANTS if device.type == "cuda"
                           else DECODER_VARIANTS[:1])
            b.report.save()
            if "streaming" not in b.args.skip:
                entry["streaming"] = {"notes": []}
                section_streaming(q, entry["streaming"])
            entry["status"] = "ok"
        except Exception as error:  # noqa: BLE001 -- one scheme failing must not lose the other
            record_failure(entry, error, f"  {scheme}")
        finally:
            q = model = None
            torch._dynamo.reset()
            free_memory(device)
            b.report.save()
    b.model = source  # on the CPU: nothing after this section uses the GPU model
    failed = [k for k, v in out["schemes"].items() if v["status"] != "ok"]
    if failed:
        raise RuntimeError(f"quantized schemes failed: {failed}")


SECTION_FUNCTIONS = {
    "clip_one_frame": section_clip_one_frame,
    "decode": section_decode,
    "streaming": section_streaming,
    "vision_split": section_vision_split,  # --vision-device: split.py
    "extraction": section_extraction,
    "baseline_upstream_buffer": section_upstream_buffer,
    "baseline_full_context": section_full_context,
    "quantized": section_quantized,
}


def skip_reason(b, name):
    """Why section `name` does not run in this invocation, or None."""
    if name in b.args.skip:
        return "--skip"
    if name == "quantized" and not b.args.quantized:
        return "no --quantized schemes"
    if name == "vision_split" and b.args.vision_device is None:
        return "no --vision-device"
    if b.time_left() < 5:
        return "time budget spent"
    return None


def run_section(b, name):
    out = b.report.section(name)
    reason = skip_reason(b, name)
    if reason is not None:
        out.update(status="skipped", reason=reason)
        b.report.save()
        return
    log(f"[{name}] ({b.time_left():.0f} s of budget left)")
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            SECTION_FUNCTIONS[name](b, out)
        out["status"] = "ok"
    except Exception as error:  # noqa: BLE001 -- one failed section must not lose the others
        record_failure(out, error, f"[{name}]")
    finally:
        out["seconds"] = round(time.perf_counter() - start, 1)
        free_memory(b.device)
        b.report.save()
