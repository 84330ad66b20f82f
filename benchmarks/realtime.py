"""Benchmark of the real-time path on one GPU, side by side with the stock stack and two baselines.

    python -m benchmarks.realtime --output-dir DIR                        # 7B-shaped, random bf16 weights
    python -m benchmarks.realtime --output-dir DIR --model-path ckpt/Flash-VStream-7b
    python -m benchmarks.realtime --output-dir DIR --preset tiny --device cpu     # smoke run (tests)

Random weights have the real shapes (Vicuna-7B: hidden 4096, 32 layers; CLIP ViT-L/14-224), so the
FLOPs and bytes are those of the real model; they are built directly on the device in bf16. One
process measures, in this order (each section records its status, notes and fallbacks; a failed
section does not stop the others, and bench.json is rewritten after every section):

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
  baseline_upstream_buffer  (b) the published design's per-update copy of an unbounded frame buffer.
  baseline_full_context     (a) every frame's 64 tokens in the prompt: prefill time until out of memory.
  extraction       batched CLIP frames/s at batch 64/128/256: stock vs fast encoder eager vs
                   regional torch.compile (one compiled graph shared by all layers and batch sizes).

Outputs: DIR/bench.json (every number, device, versions, per-section status), DIR/bench.png (latency
and memory against stream length, log x) and a table on stdout with the ratios and the targets of
issue 8. Timing: wall clock around each call with the device synchronised before and after (what a
user waits), median / p99 over repeats after warm-up.
"""

import argparse
import dataclasses
import faulthandler
import gc
import json
import os
import platform
import sys
import time
import traceback

import numpy as np
import torch
import torch._dynamo

from benchmarks.realtime_baselines import full_context, upstream_buffer_copy
from flash_vstream.constants import IMAGE_TOKEN_INDEX
from flash_vstream.eval_video.aggregate import write_atomic
from flash_vstream.runtime.cuda_utils import free_memory, sync
from flash_vstream.runtime.decoder import GreedyDecoder, prefix_through_image
from flash_vstream.model.language_model.configuration_vstream import PATCH_GRID
from flash_vstream.model.memory import STARMemory
from flash_vstream.runtime.vision import FastVisionEncoder
from flash_vstream.runtime.triton_kernels import usable

# CLIP ViT-L/14 at 224 px (openai/clip-vit-large-patch14's vision config)
VIT_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
               image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
# Vicuna-7B v1.5 (LLaMA-2-7B shape)
VICUNA_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5, mm_hidden_size=1024)
TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 image_size=32, patch_size=2, projection_dim=32, hidden_act="quick_gelu")
TINY_LLM = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-5, mm_hidden_size=32)

PRESETS = {
    "7b": dict(llm=VICUNA_7B, vision=VIT_L14, positions=(60, 600, 3600, 10800), window=50,
               batches=(64, 128, 256), extract_iters=10, frame_iters=30, repeats=3, stock_answer_repeats=2,
               answer_tokens=64, decode_steps=128,
               full_context_frames=(60, 300, 600, 1200, 1500, 1800, 2400, 3600, 10800),
               max_context_tokens=262_144, time_budget_s=450, fill_budget_s=60),
    "tiny": dict(llm=TINY_LLM, vision=TINY_CLIP, positions=(5, 20), window=3, batches=(2, 4), extract_iters=2,
                 frame_iters=3, repeats=1, stock_answer_repeats=1, answer_tokens=8, decode_steps=8,
                 full_context_frames=None, max_context_tokens=16_384, time_budget_s=300, fill_budget_s=30),
}
# Issue 8's targets on one H100
TARGETS = {"ttft_ms": 25.0, "ingest_p99_ms": 10.0, "decode_tokens_per_s": 175.0,
           "extraction_frames_per_s": 3000.0, "peak_mem_gb": 15.0}
# run in this order: the targets first, the slow optional compile last (bench.json is saved after each)
SECTIONS = ("clip_one_frame", "decode", "streaming", "baseline_upstream_buffer", "baseline_full_context",
            "extraction")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
QUESTION = "What is happening in the video right now, and what happened before it?"
SYNTHETIC_PROMPT = (60, 36)  # random-weight runs: length and <image> index of a vicuna_v1 prompt with QUESTION
COMPILE_MIN_TIME_S = 150  # don't start the CLIP compile with less budget left than this
EXTRACTION_RESERVE_S = 180  # the full-context baseline leaves this much of the budget to extraction


# --- small helpers ----------------------------------------------------------------------------------
def log(*parts):
    print(*parts, flush=True)


def timed_ms(device, fn, *args, **kwargs):
    """(milliseconds, result) of one call, the device idle before and drained after."""
    sync(device)
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    sync(device)
    return 1e3 * (time.perf_counter() - start), result


def stats(samples_ms):
    a = np.asarray(samples_ms, dtype=np.float64)
    if a.size == 0:
        return None
    return {"n": int(a.size), "p50": round(float(np.percentile(a, 50)), 3),
            "p99": round(float(np.percentile(a, 99)), 3),
            "mean": round(float(a.mean()), 3), "min": round(float(a.min()), 3), "max": round(float(a.max()), 3)}


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device):
    return round(torch.cuda.max_memory_allocated(device) / 1e9, 3) if device.type == "cuda" else None


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def first_divergence(a, b):
    """Index of the first differing token of two 1-D token lists (len of the shorter if one is a prefix)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


# --- what one run holds -------------------------------------------------------------------------------
@dataclasses.dataclass
class Bench:
    args: argparse.Namespace
    preset: dict
    device: torch.device
    dtype: torch.dtype
    report: "Report"
    deadline: float
    model: object = None
    tokenizer: object = None
    tower: object = None  # stock CLIPVisionTower
    fast_vision: FastVisionEncoder = None
    decoder: GreedyDecoder = None
    prompt_ids: torch.Tensor = None  # (L,) on the CPU, one <image>

    def time_left(self):
        return self.deadline - time.perf_counter()

    @property
    def prefix_ids(self):
        """The prompt through its <image>: what `GreedyDecoder.cache_prefix` keeps between questions."""
        return prefix_through_image(self.prompt_ids)

    @property
    def config(self):
        return self.model.config

    @property
    def image_size(self):
        return self.tower.config.image_size

    def new_memory(self):
        return STARMemory(self.config, attention_model=self.model.get_model().attention_model, seed=self.args.seed)

    def random_pixels(self, n=1):
        """Preprocessed (normalised) frames; decoding and resizing are not part of these numbers."""
        return torch.randn(n, 3, self.image_size, self.image_size, device=self.device, dtype=self.dtype)

    def random_features(self, n):
        return torch.randn(n, PATCH_GRID**2, self.config.mm_hidden_size, device=self.device, dtype=self.dtype)

    def new_decoder(self, memory_tokens, cuda_graph, compile_step, fused_step=None, triton_kernels=None):
        need = len(self.prompt_ids) - 1 + memory_tokens + max(self.args.answer_tokens, self.preset["decode_steps"]) + 2
        options = {"mode": self.args.decode_compile_mode} if self.args.decode_compile_mode else None
        return GreedyDecoder(self.model, max_cache_len=need, cuda_graph=cuda_graph, compile_step=compile_step,
                             compile_options=options, fused_step=fused_step, triton_kernels=triton_kernels)

    def get_decoder(self, memory_tokens):
        """The decoder the decode section found fastest (a default one if that section did not run)."""
        need = len(self.prompt_ids) - 1 + memory_tokens + self.args.answer_tokens + 1
        if self.decoder is None or self.decoder.max_cache_len < need:
            cuda = self.device.type == "cuda"
            self.decoder = self.new_decoder(memory_tokens, cuda, cuda and self.args.decode_compile != "off")
        return self.decoder

    def stock_generate(self, memory_tokens, max_new_tokens):
        ids = self.prompt_ids[None].to(self.device)
        return self.model.generate(ids, memory=[memory_tokens], max_new_tokens=max_new_tokens, do_sample=False,
                                   use_cache=True)


class Report:
    def __init__(self, output_dir):
        self.path = os.path.join(output_dir, "bench.json")
        self.data = {"meta": {}, "targets": dict(TARGETS), "sections": {}, "summary": []}

    def section(self, name):
        return self.data["sections"].setdefault(name, {"status": "pending", "notes": []})

    def save(self):
        write_atomic(self.path, json.dumps(self.data, indent=2, default=str))


# --- building -----------------------------------------------------------------------------------------
def environment(device):
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "device_type": device.type, "platform": platform.platform()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device=torch.cuda.get_device_name(device), capability=f"{props.major}.{props.minor}",
                    total_memory_gb=round(props.total_memory / 1e9, 2), multiprocessors=props.multi_processor_count,
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                    sdpa={"flash": torch.backends.cuda.flash_sdp_enabled(),
                          "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                          "cudnn": torch.backends.cuda.cudnn_sdp_enabled()})
    else:
        info.update(device=platform.processor() or "cpu", threads=torch.get_num_threads())
    return info


def build_language_model(b):
    from flash_vstream.model import VStreamConfig, VStreamLlamaForCausalLM

    args, notes = b.args, b.report.section("build")["notes"]
    if args.model_path:
        from flash_vstream.model.builder import load_pretrained_model

        tokenizer, model, _, _ = load_pretrained_model(args.model_path, device=str(b.device), torch_dtype=b.dtype,
                                                       attn_implementation="sdpa")
        if model.config.max_position_embeddings < args.max_context_tokens:
            notes.append(f"max_position_embeddings raised {model.config.max_position_embeddings} -> "
                         f"{args.max_context_tokens} for the full-context baseline (RoPE is not length-limited; "
                         "quality beyond the trained length is not the point there, time and memory are)")
            model.config.max_position_embeddings = args.max_context_tokens
    else:
        tokenizer = None
        config = VStreamConfig(**b.preset["llm"], max_position_embeddings=args.max_context_tokens,
                               mm_vision_tower=None, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                               tie_word_embeddings=False, memory_mode="paper")
        notes.append(f"random weights, max_position_embeddings={args.max_context_tokens} so that the full-context "
                     "baseline's long prompts stay within the config (RoPE itself has no length limit)")
        torch.manual_seed(args.seed)
        with torch.device(b.device):  # built in place on the device, in the bench dtype: never 7B fp32 on the host
            model = VStreamLlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=b.dtype)
    if args.memory_mode:
        model.config.memory_mode = args.memory_mode
    model.eval().requires_grad_(False)
    wrong = {f"{p.device} {p.dtype}" for p in model.parameters()
             if p.device.type != b.device.type or p.dtype != b.dtype}
    if wrong:
        notes.append(f"parameters came out as {sorted(wrong)}; moved to {b.device} {b.dtype}")
        model.to(device=b.device, dtype=b.dtype)
    # answers are forced to exactly --answer-tokens tokens: no EOS stops generation
    model.generation_config.eos_token_id = None
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = 0
    return tokenizer, model


def build_vision(b):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from flash_vstream.model.multimodal_encoder.clip_encoder import CLIPVisionTower

    notes = b.report.section("build")["notes"]
    tower = b.model.get_vision_tower() if b.args.model_path else None
    if tower is None or not tower.is_loaded:
        if b.args.model_path:
            notes.append("the checkpoint's vision tower is not available locally: "
                         "a random CLIP of the preset's shape is used")
        torch.manual_seed(b.args.seed + 1)
        with torch.device(b.device):
            clip = CLIPVisionModel._from_config(CLIPVisionConfig(**b.preset["vision"]), attn_implementation="sdpa",
                                                dtype=b.dtype)
        clip.eval().requires_grad_(False)
        tower = CLIPVisionTower("random-clip", select_layer=b.config.mm_vision_select_layer,
                                select_feature=b.config.mm_vision_select_feature, delay_load=True)
        tower.vision_tower = clip  # the stock forward, over the random tower
        tower.is_loaded = True
    if tower.hidden_size != b.config.mm_hidden_size:
        raise ValueError(f"vision width {tower.hidden_size} != mm_hidden_size {b.config.mm_hidden_size}")
    return tower


def prompt_ids(tokenizer, vocab_size, seed=0):
    """(L,) ids of a vicuna_v1 question with one <image>: real with a tokenizer, else random ids of that length."""
    if tokenizer is not None:
        from flash_vstream.eval_video.inference import build_prompt
        from flash_vstream.mm_utils import tokenizer_image_token

        return tokenizer_image_token(build_prompt(QUESTION, "vicuna_v1"), tokenizer, return_tensors="pt")
    length, image_at = SYNTHETIC_PROMPT
    ids = torch.randint(3, vocab_size, (length,), generator=torch.Generator().manual_seed(seed))
    ids[0], ids[image_at] = 1, IMAGE_TOKEN_INDEX
    return ids


def build(b):
    out = b.report.section("build")
    start = time.perf_counter()
    b.tokenizer, b.model = build_language_model(b)
    b.tower = build_vision(b)
    b.fast_vision = FastVisionEncoder(b.tower.vision_tower, b.tower.select_layer, b.tower.select_feature)
    b.prompt_ids = prompt_ids(b.tokenizer, b.config.vocab_size, b.args.seed)
    out.update(status="ok", seconds=round(time.perf_counter() - start, 1),
               llm_params=sum(p.numel() for p in b.model.parameters()),
               vision_params=sum(p.numel() for p in b.tower.parameters()),
               prompt_tokens=len(b.prompt_ids), weights="checkpoint" if b.args.model_path else "random",
               memory_mode=b.config.memory_mode, fast_vision_layers=len(b.fast_vision.layers),
               after_build_mem_gb=peak_gb(b.device))


# --- sections ------------------------------------------------------------------------------------------
def time_calls(b, fn, iters, warmup=3):
    for i in range(warmup):
        fn(i)
    return [timed_ms(b.device, fn, i)[0] for i in range(iters)]


def section_clip_one_frame(b, out):
    frames = [b.random_pixels(1) for _ in range(4)]  # rotate inputs
    iters = b.preset["frame_iters"]
    out["stock_ms"] = stats(time_calls(b, lambda i: b.tower(frames[i % 4]), iters))
    out["truncated_eager_ms"] = stats(time_calls(b, lambda i: b.fast_vision.eager(frames[i % 4]), iters))
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
    out["cuda_graph_ms"] = stats(time_calls(b, lambda i: b.fast_vision(frames[i % 4]), iters))
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
                    ("triton_compiled_cuda_graph", True, True, True, True))


def section_decode(b, out):
    device, answer, reps = b.device, b.args.answer_tokens, b.preset["repeats"]
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
    stock = {"ttft_ms": stats(first), "answer_ms": stats(full), "new_tokens": int(stock_out.shape[1])}
    stock["tokens_per_s"] = decode_rate(answer, stock["answer_ms"], stock["ttft_ms"])
    out["stock"] = stock
    stock_list = stock_out[0].tolist()
    b.report.save()

    # GreedyDecoder: static cache, then + CUDA graph of the step, then + compiled step
    best, best_rate, reference = None, -1.0, None
    for name, graph, compiled, fused, triton in DECODER_VARIANTS:
        if triton and not usable(b.model.lm_head.weight):
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
        decoder = b.new_decoder(int(tokens.shape[0]), cuda_graph=graph, compile_step=compiled, fused_step=fused,
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
        res.update(answer_ms=stats(answers), new_tokens=len(fast_list), decode_steps=steps,
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
    name, decoder = best
    b.decoder = decoder
    fast = {"variant": name, "mode": decoder.mode,
            "ttft_ms": stats([timed_ms(device, decoder.prefill, b.prompt_ids, tokens)[0] for _ in range(reps + 2)]),
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

    # as StreamSession.warm_up does: the heap built so far (compiled code, graphs) is frozen out of the
    # collector's scans; the full collection it replaces is timed
    started = time.perf_counter()
    gc.collect()
    entry["gc_full_collection_ms"] = round(1e3 * (time.perf_counter() - started), 2)
    gc.freeze()
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
                 ingest_ms={"stock": stats(stock_ms), "optimised": stats(fast_ms)},
                 update_ms=stats(update_ms), read_ms=stats(read_ms))

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
    entry.update(ttft_ms={"stock": stats(stock_first), "optimised": stats(fast_first),
                          "optimised_uncached": stats(cold_first)},
                 prefix_refresh_ms=stats(refresh),
                 answer_ms={"stock": stats(stock_full), "optimised": stats(fast_full)},
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


SECTION_FUNCTIONS = {
    "clip_one_frame": section_clip_one_frame,
    "decode": section_decode,
    "streaming": section_streaming,
    "extraction": section_extraction,
    "baseline_upstream_buffer": section_upstream_buffer,
    "baseline_full_context": section_full_context,
}


def run_section(b, name):
    out = b.report.section(name)
    if name in b.args.skip:
        out.update(status="skipped", reason="--skip")
        b.report.save()
        return
    if b.time_left() < 5:
        out.update(status="skipped", reason="time budget spent")
        b.report.save()
        return
    log(f"[{name}] ({b.time_left():.0f} s of budget left)")
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            SECTION_FUNCTIONS[name](b, out)
        out["status"] = "ok"
    except Exception as error:  # noqa: BLE001 -- one failed section must not lose the others
        out.update(status="failed", error=f"{type(error).__name__}: {error}"[:2000],
                   traceback=traceback.format_exc().splitlines()[-15:])
        log(f"[{name}] FAILED: {type(error).__name__}: {str(error)[:300]}")
    finally:
        out["seconds"] = round(time.perf_counter() - start, 1)
        free_memory(b.device)
        b.report.save()


# --- summary, table, plot -------------------------------------------------------------------------------
def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or d.get(k) is None:
            return None
        d = d[k]
    return d


def _ratio(num, den):
    return round(num / den, 2) if num is not None and den not in (None, 0) else None


def summarize(report):
    """Rows of the table: stock, optimised, baseline, ratios and the issue's targets."""
    s, rows = report.data["sections"], []

    def row(metric, stock, optimised, baseline=None, target=None, better="lower", note=""):
        if better == "lower":
            speedup, vs_base = _ratio(stock, optimised), _ratio(baseline, optimised)
            met = None if optimised is None or target is None else optimised <= target
        else:
            speedup, vs_base = _ratio(optimised, stock), _ratio(optimised, baseline)
            met = None if optimised is None or target is None else optimised >= target
        rows.append({"metric": metric, "stock": stock, "optimised": optimised, "baseline": baseline,
                     "speedup_vs_stock": speedup, "vs_baseline": vs_base, "target": target, "better": better,
                     "met": met, "note": note})

    for r in _get(s, "extraction", "rows") or []:
        row(f"extraction frames/s, batch {r['batch']}", r.get("stock_fps"), r.get("optimised_fps"),
            target=TARGETS["extraction_frames_per_s"], better="higher", note=r.get("optimised", ""))
    clip = s.get("clip_one_frame", {})
    row("one-frame CLIP ms (p50)", _get(clip, "stock_ms", "p50"), _get(clip, "optimised_ms", "p50"),
        note=clip.get("optimised", ""))
    dec = s.get("decode", {})
    row("decode tokens/s, batch 1", _get(dec, "stock", "tokens_per_s"), _get(dec, "optimised", "tokens_per_s"),
        target=TARGETS["decode_tokens_per_s"], better="higher",
        note=f"decode-only {_get(dec, 'optimised', 'decode_only_tokens_per_s')} tok/s; "
             f"{_get(dec, 'optimised', 'mode')}")
    for name, v in (dec.get("variants") or {}).items():
        row(f"  decode-only tokens/s: {name}", None, v.get("decode_only_tokens_per_s"), better="higher",
            note=f"{v.get('mode')}, setup {v.get('setup_ms')} ms")
    upstream = {r["frames"]: r.get("copy_ms") for r in _get(s, "baseline_upstream_buffer", "rows") or []}
    full = {r["frames"]: r for r in _get(s, "baseline_full_context", "rows") or []}
    for p in _get(s, "streaming", "positions") or []:
        at = p["position_frames"]
        label = "start" if at == 0 else _duration(at / _get(s, "streaming", "fps"))
        fc = full.get(at, {})
        fc_note = "" if not fc else f"full context: {fc.get('status')}"
        row(f"[{label}] ingest p99 ms (encode+update+read)", _get(p, "ingest_ms", "stock", "p99"),
            _get(p, "ingest_ms", "optimised", "p99"), baseline=upstream.get(at), target=TARGETS["ingest_p99_ms"],
            note="baseline: upstream buffer copy per update" if upstream.get(at) is not None else "")
        row(f"[{label}] memory update alone p99 ms", None, _get(p, "update_ms", "p99"))
        row(f"[{label}] question -> first token ms", _get(p, "ttft_ms", "stock", "p50"),
            _get(p, "ttft_ms", "optimised", "p50"), baseline=fc.get("ttft_ms"), target=TARGETS["ttft_ms"],
            note=fc_note)
        row(f"[{label}]   first token, prefix not cached ms", None, _get(p, "ttft_ms", "optimised_uncached", "p50"))
        row(f"[{label}]   prefix refresh after a frame ms", None, _get(p, "prefix_refresh_ms", "p50"),
            note="system text + memory into the KV cache, once per published frame")
        row(f"[{label}] question -> full answer ms", _get(p, "answer_ms", "stock", "p50"),
            _get(p, "answer_ms", "optimised", "p50"))
        row(f"[{label}] peak GPU memory GB", _get(p, "peak_mem_gb", "stock"), _get(p, "peak_mem_gb", "optimised"),
            baseline=fc.get("peak_mem_gb"), target=TARGETS["peak_mem_gb"], note=fc_note)
    later = [p for p in _get(s, "streaming", "positions") or [] if p["position_frames"] > 0]
    for key, name in (("ingest_ms", "ingest p99"), ("ttft_ms", "first token p50")):
        stat = "p99" if key == "ingest_ms" else "p50"
        values = [_get(p, key, "optimised", stat) for p in later]
        values = [v for v in values if v is not None]
        if len(values) >= 2:
            row(f"flatness of {name} (max/min over positions)", None, round(max(values) / min(values), 2),
                note="1.0 = flat from the first to the last position")
    fc = s.get("baseline_full_context", {})
    if fc.get("rows"):
        rows.append({"metric": "full context fits up to (frames)", "stock": None,
                     "optimised": None, "baseline": fc.get("fits_up_to_frames"), "speedup_vs_stock": None,
                     "vs_baseline": None, "target": None, "better": "", "met": None,
                     "note": (f"first out of memory at {fc['first_oom_frames']} frames" if fc.get("first_oom_frames")
                              else "no out-of-memory up to the largest size tried")})
    report.data["summary"] = rows
    return rows


def _duration(seconds):
    if seconds >= 3600:
        return f"{seconds / 3600:g} h"
    if seconds >= 60:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"


def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:,.2f}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def finish(report, output_dir, started):
    summarize(report)
    try:
        plot(report, os.path.join(output_dir, "bench.png"))
        report.data["meta"].pop("plot_error", None)
    except Exception as error:  # noqa: BLE001 -- the numbers matter more than the picture
        report.data["meta"]["plot_error"] = f"{type(error).__name__}: {error}"
    report.data["meta"]["duration_s"] = round(time.perf_counter() - started, 1)
    report.save()


def print_table(report):
    meta = report.data["meta"]
    log("")
    log(f"Flash-VStream benchmark: {meta.get('device')} | torch {meta.get('torch')} | transformers "
        f"{meta.get('transformers')} | preset {meta.get('preset')} | {meta.get('dtype')} | {meta.get('weights')}")
    header = ("metric", "stock", "optimised", "baseline", "x stock", "x base", "target", "met", "note")
    widths = (50, 10, 10, 10, 8, 8, 9, 4, 0)
    log("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for r in report.data["summary"]:
        target = None if r["target"] is None else ("<=" if r["better"] == "lower" else ">=") + _fmt(r["target"])
        cells = (r["metric"], _fmt(r["stock"]), _fmt(r["optimised"]), _fmt(r["baseline"]),
                 _fmt(r["speedup_vs_stock"]), _fmt(r["vs_baseline"]), target or "-", _fmt(r["met"]), r["note"])
        log("  ".join(str(c).ljust(w) for c, w in zip(cells, widths)))
    judged = [r["met"] for r in report.data["summary"] if r["met"] is not None]
    log(f"targets met: {sum(judged)} of {len(judged)} rows that have a target")
    statuses = {k: v.get("status") for k, v in report.data["sections"].items()}
    log("sections: " + ", ".join(f"{k}={v}" for k, v in statuses.items()))
    log("x stock: speed-up of optimised over stock; "
        "x base: baseline / optimised (times) or optimised / baseline (rates)")


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report.data["sections"]
    positions = [p for p in _get(s, "streaming", "positions") or [] if p["position_frames"] > 0]
    x = [p["position_frames"] for p in positions]
    fig, (lat, mem) = plt.subplots(1, 2, figsize=(14, 5.5))

    def series(ax, xs, ys, label, **style):
        pts = [(a, b) for a, b in zip(xs, ys) if b is not None]
        if pts:
            ax.plot(*zip(*pts), marker=style.pop("marker", "o"), label=label, **style)

    series(lat, x, [_get(p, "ingest_ms", "optimised", "p99") for p in positions], "ingest p99, optimised", color="C0")
    series(lat, x, [_get(p, "ingest_ms", "stock", "p99") for p in positions], "ingest p99, stock", color="C0",
           linestyle="--")
    series(lat, x, [_get(p, "ttft_ms", "optimised", "p50") for p in positions], "first token, optimised", color="C1")
    series(lat, x, [_get(p, "ttft_ms", "stock", "p50") for p in positions], "first token, stock", color="C1",
           linestyle="--")
    n = _get(s, "decode", "answer_tokens") or report.data["meta"].get("answer_tokens")
    series(lat, x, [_get(p, "answer_ms", "optimised", "p50") for p in positions], f"{n}-token answer, optimised",
           color="C2")
    series(lat, x, [_get(p, "answer_ms", "stock", "p50") for p in positions], f"{n}-token answer, stock",
           color="C2", linestyle="--")
    up = [r for r in _get(s, "baseline_upstream_buffer", "rows") or [] if r.get("copy_ms") is not None]
    series(lat, [r["frames"] for r in up], [r["copy_ms"] for r in up], "(b) upstream buffer copy / update",
           color="C3", marker="s")
    fc = _get(s, "baseline_full_context", "rows") or []
    ok = [r for r in fc if r.get("status") == "ok"]
    series(lat, [r["frames"] for r in ok], [r["ttft_ms"] for r in ok], "(a) full context, first token",
           color="C4", marker="s")
    oom = [r["frames"] for r in fc if r.get("status") == "oom"]
    for ax in (lat, mem):
        for frames in oom:
            ax.axvline(frames, color="C4", linestyle=":", linewidth=1)
        if oom:
            ax.text(oom[0], 0.95, " (a) out of memory", color="C4", transform=ax.get_xaxis_transform(), va="top")
    lat.axhline(TARGETS["ingest_p99_ms"], color="gray", linestyle=":", linewidth=1)
    lat.axhline(TARGETS["ttft_ms"], color="gray", linestyle="-.", linewidth=1)
    lat.set(xscale="log", yscale="log", xlabel="stream length (frames at 1 fps)", ylabel="ms",
            title="latency (targets: ingest p99 10 ms, first token 25 ms)")
    if lat.get_legend_handles_labels()[0]:
        lat.legend(fontsize=7)
    series(mem, x, [_get(p, "peak_mem_gb", "optimised") for p in positions], "optimised", color="C0")
    series(mem, x, [_get(p, "peak_mem_gb", "stock") for p in positions], "stock", color="C0", linestyle="--")
    ok_mem = [r for r in ok if r.get("peak_mem_gb") is not None]
    series(mem, [r["frames"] for r in ok_mem], [r["peak_mem_gb"] for r in ok_mem], "(a) full context", color="C4",
           marker="s")
    mem.axhline(TARGETS["peak_mem_gb"], color="gray", linestyle=":", linewidth=1)
    mem.set(xscale="log", xlabel="stream length (frames at 1 fps)", ylabel="peak GPU memory (GB)",
            title="peak GPU memory (target 15 GB)")
    if mem.get_legend_handles_labels()[0]:
        mem.legend(fontsize=7)
    else:
        mem.text(0.5, 0.5, "no GPU memory numbers on this device", ha="center", transform=mem.transAxes)
    meta = report.data["meta"]
    fig.suptitle(f"Flash-VStream real-time path: {meta.get('device')}, preset {meta.get('preset')}, "
                 f"{meta.get('dtype')}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- command line -----------------------------------------------------------------------------------------
def _ints(text):
    return tuple(int(x) for x in text.split(",") if x.strip())


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.realtime", description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", required=True)
    p.add_argument("--preset", choices=sorted(PRESETS), default="7b", help="model shapes and iteration counts")
    p.add_argument("--model-path", default=None, help="a real checkpoint instead of random weights")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--positions", type=_ints, default=None,
                   help="stream positions in frames (1 fps), e.g. 60,600,3600,10800")
    p.add_argument("--window", type=int, default=None, help="frames timed with real encoding at each position")
    p.add_argument("--batches", type=_ints, default=None, help="extraction batch sizes")
    p.add_argument("--answer-tokens", type=int, default=None, help="forced answer length (default 64; EOS ignored)")
    p.add_argument("--full-context-frames", type=_ints, default=None, help="frame counts of baseline (a)")
    p.add_argument("--max-context-tokens", type=int, default=None, help="cap of baseline (a); max_position_embeddings")
    p.add_argument("--memory-mode", choices=("paper", "upstream"), default=None, help="override config.memory_mode")
    p.add_argument("--clip-compile", choices=("auto", "on", "off"), default="auto", help="auto: on CUDA only")
    p.add_argument("--decode-compile", choices=("auto", "off"), default="auto",
                   help="auto: also try the torch.compile'd decode step inside the CUDA graph (CUDA only)")
    p.add_argument("--decode-compile-mode", default=None,
                   help="torch.compile mode of the decode step (e.g. max-autotune-no-cudagraphs; default: inductor's)")
    p.add_argument("--clip-compile-mode", default=None,
                   help="torch.compile mode of the batched CLIP layers (e.g. max-autotune-no-cudagraphs)")
    p.add_argument("--time-budget-s", type=float, default=None, help="sections shorten or skip past this")
    p.add_argument("--hard-limit-s", type=float, default=None,
                   help="watchdog: dump every thread's traceback and exit after this many seconds, even when "
                        "stuck inside CUDA (a hung graph capture or compile); default: time budget + 120 s")
    p.add_argument("--fill-budget-s", type=float, default=None, help="time to reach the last stream position")
    p.add_argument("--skip", type=lambda t: tuple(x for x in t.split(",") if x), default=(),
                   help=f"comma-separated sections: {','.join(SECTIONS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strict", action="store_true", help="exit 1 when a section failed")
    p.add_argument("--replot", action="store_true",
                   help="only redraw bench.png and reprint the table from OUTPUT_DIR/bench.json (no measuring)")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    for name in ("positions", "window", "batches", "answer_tokens", "max_context_tokens", "time_budget_s",
                 "fill_budget_s", "full_context_frames"):
        if getattr(args, name) is None:
            setattr(args, name, preset[name])
    if args.dtype is None:
        args.dtype = "bf16" if args.device.startswith("cuda") else "fp32"
    unknown = set(args.skip) - set(SECTIONS)
    if unknown:
        p.error(f"unknown --skip sections {sorted(unknown)}; known: {', '.join(SECTIONS)}")
    if args.window < 1 or args.answer_tokens < 1:
        p.error("--window and --answer-tokens must be >= 1")
    return args


def replot(output_dir):
    """Table and plot again from a bench.json (e.g. one fetched from a GPU machine without matplotlib)."""
    report = Report(output_dir)
    with open(report.path) as f:
        report.data = json.load(f)
    summarize(report)
    plot(report, os.path.join(output_dir, "bench.png"))
    report.data["meta"].pop("plot_error", None)
    report.save()
    print_table(report)
    return 0


def main(argv=None):
    args = parse_args(argv)
    if args.replot:
        return replot(args.output_dir)
    # A C-level watchdog thread: it fires even while the main thread is blocked in a CUDA call, so a
    # hang ends with tracebacks and the sections saved so far instead of an outside kill with nothing.
    faulthandler.dump_traceback_later(args.hard_limit_s or args.time_budget_s + 120, exit=True)
    try:
        return run(args, argv)
    finally:
        faulthandler.cancel_dump_traceback_later()


def run(args, argv=None):
    started = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    os.makedirs(args.output_dir, exist_ok=True)
    report = Report(args.output_dir)
    b = Bench(args=args, preset=PRESETS[args.preset], device=device, dtype=DTYPES[args.dtype], report=report,
              deadline=started + args.time_budget_s)
    report.data["meta"] = {**environment(device), "preset": args.preset, "dtype": args.dtype,
                           "weights": args.model_path or "random", "argv": sys.argv if argv is None else list(argv),
                           "started_unix": time.time(), "time_budget_s": args.time_budget_s,
                           "answer_tokens": args.answer_tokens, "positions": list(args.positions)}
    try:
        build(b)
    except Exception as error:  # noqa: BLE001 -- nothing to measure without the models
        report.section("build").update(status="failed", error=f"{type(error).__name__}: {error}",
                                       traceback=traceback.format_exc().splitlines()[-15:])
        report.save()
        log(f"build FAILED: {type(error).__name__}: {error}")
        return 1
    log(f"built in {report.data['sections']['build']['seconds']} s on {report.data['meta']['device']}")
    report.save()
    for name in SECTIONS:
        run_section(b, name)
        finish(report, args.output_dir, started)  # table data and plot so far: a killed run keeps them
    print_table(report)
    log(f"wrote {report.path} in {report.data['meta']['duration_s']} s")
    failed = [k for k, v in report.data["sections"].items() if v.get("status") == "failed"]
    if failed:
        log(f"FAILED sections: {', '.join(failed)}")
    return 1 if failed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
