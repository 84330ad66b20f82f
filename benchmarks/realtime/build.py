"""What the realtime benchmark measures: the models, their inputs and the fast path over them.

Random weights have the real shapes (Vicuna-7B: hidden 4096, 32 layers; CLIP ViT-L/14-224), so the
FLOPs and bytes are those of the real model; they are built directly on the device in the bench
dtype. The tiny preset takes its shapes from `flash_vstream.demo.tiny`. Every decoder and fast CLIP
encoder the sections time is built by `new_decoder` / `new_fast_vision` below.
"""

import argparse
import dataclasses
import time

import torch

from benchmarks.common import VIT_L14, peak_gb, random_clip_tower
from flash_vstream.constants import IMAGE_TOKEN_INDEX
from flash_vstream.model.language_model.configuration_vstream import PATCH_GRID
from flash_vstream.model.memory import STARMemory
from flash_vstream.runtime.decoder import GreedyDecoder, prefix_through_image
from flash_vstream.runtime.fast_path import FastPath
from flash_vstream.runtime.options import FastPathOptions
from flash_vstream.runtime.vision import FastVisionEncoder

# Vicuna-7B v1.5 (LLaMA-2-7B shape)
VICUNA_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5, mm_hidden_size=1024)


def vicuna_7b_config():
    from flash_vstream.model import VStreamConfig

    return VStreamConfig(**VICUNA_7B, mm_vision_tower=None, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         tie_word_embeddings=False, memory_mode="paper")


def vit_l14_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(**VIT_L14)


def tiny_llm_config():
    from flash_vstream.demo.tiny import tiny_vstream_config

    return tiny_vstream_config(vocab_size=512, clip_dir=None, memory_mode="paper")


def tiny_vision_config():
    from flash_vstream.demo.tiny import tiny_clip_config

    return tiny_clip_config()


# llm / vision: the config builders of random-weight runs; the rest: stream positions and iteration counts
PRESETS = {
    "7b": dict(llm=vicuna_7b_config, vision=vit_l14_config, positions=(60, 600, 3600, 10800), window=50,
               batches=(64, 128, 256), extract_iters=10, frame_iters=30, repeats=3, stock_answer_repeats=2,
               answer_tokens=64, decode_steps=128,
               full_context_frames=(60, 300, 600, 1200, 1500, 1800, 2400, 3600, 10800),
               max_context_tokens=262_144, time_budget_s=450, fill_budget_s=60),
    "tiny": dict(llm=tiny_llm_config, vision=tiny_vision_config, positions=(5, 20), window=3, batches=(2, 4),
                 extract_iters=2, frame_iters=3, repeats=1, stock_answer_repeats=1, answer_tokens=8, decode_steps=8,
                 full_context_frames=None, max_context_tokens=16_384, time_budget_s=300, fill_budget_s=30),
}
QUESTION = "What is happening in the video right now, and what happened before it?"
SYNTHETIC_PROMPT = (60, 36)  # random-weight runs: length and <image> index of a vicuna_v1 prompt with QUESTION


@dataclasses.dataclass
class Bench:
    """What one run holds: its arguments, the models built once, the report and the time budget."""

    args: argparse.Namespace
    preset: dict
    device: torch.device
    dtype: torch.dtype
    report: object  # report.Report: bench.json, rewritten after every section
    deadline: float  # time.perf_counter() past which sections shorten or skip
    # the entry point's heap freeze before each ingest window -> ms of the full collection it ran;
    # gc.freeze() is process-wide, so only the entry point (__main__) passes one; None: no freeze
    freeze_heap: object = None
    model: object = None
    tokenizer: object = None
    tower: object = None  # stock CLIPVisionTower
    fast_path: FastPath = None  # builds every decoder and the fast encoder timed (strict unless --no-strict)
    fast_vision: FastVisionEncoder = None
    decoder: GreedyDecoder = None  # the one the decode section found fastest
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
        """Preprocessed (normalised) frames (n, 3, S, S); decoding and resizing are not part of these numbers."""
        return torch.randn(n, 3, self.image_size, self.image_size, device=self.device, dtype=self.dtype)

    def random_features(self, n):
        return torch.randn(n, PATCH_GRID**2, self.config.mm_hidden_size, device=self.device, dtype=self.dtype)

    def get_decoder(self, memory_tokens):
        """The decoder the decode section found fastest (a default one if that section did not run)."""
        need = len(self.prompt_ids) - 1 + memory_tokens + self.args.answer_tokens + 1
        if self.decoder is None or self.decoder.max_cache_len < need:
            cuda = self.device.type == "cuda"
            self.decoder = new_decoder(self, memory_tokens, cuda, cuda and self.args.decode_compile != "off")
        return self.decoder

    def stock_generate(self, memory_tokens, max_new_tokens):
        ids = self.prompt_ids[None].to(self.device)
        return self.model.generate(ids, memory=[memory_tokens], max_new_tokens=max_new_tokens, do_sample=False,
                                   use_cache=True)


# --- the fast path: every decoder and fast encoder the sections time is built here -------------------------
def new_decoder(b, memory_tokens, cuda_graph, compile_step, fused_step=None, triton_kernels=None):
    """A `GreedyDecoder` whose cache holds the prompt, `memory_tokens` and the longest answer timed."""
    need = len(b.prompt_ids) - 1 + memory_tokens + max(b.args.answer_tokens, b.preset["decode_steps"]) + 2
    # fused_step / triton_kernels None: the fast path's own choice
    changes = {"cuda_graph": cuda_graph, "compile_decode": compile_step, "pad_suffix": cuda_graph}
    if fused_step is not None:
        changes["fused_weights"] = fused_step
    if triton_kernels is not None:
        changes["triton"] = triton_kernels
    return b.fast_path.new_decoder(need, **changes)


def new_fast_path(b):
    """The fast path over the bench's model and tower: its options resolved once (logged, and in the build
    section), its weights fused as an announced step before anything is captured. Strict by default: a part
    that cannot run raises (its section fails, naming what and why); --no-strict falls back and notes it."""
    cuda = b.device.type == "cuda"
    compile_clip = b.args.clip_compile == "on" or (b.args.clip_compile == "auto" and cuda)
    options = FastPathOptions(enabled=True, compile_decode="auto" if b.args.decode_compile != "off" else False,
                              compile_vision=compile_clip, strict=b.args.strict,
                              decode_compile_mode=b.args.decode_compile_mode,
                              vision_compile_mode=b.args.clip_compile_mode)
    return FastPath(b.model, options, tower=b.tower).fuse_weights()


def new_fast_vision(b):
    """The fast CLIP encoder over the stock tower's own weights (same select layer and feature), built only:
    the sections capture its graph and compile it themselves, timing each."""
    return b.fast_path.vision(prepare=False)


# --- building -----------------------------------------------------------------------------------------------
def build_language_model(b):
    from flash_vstream.model import VStreamLlamaForCausalLM

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
        config = b.preset["llm"]()
        config.max_position_embeddings = args.max_context_tokens
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
    """The checkpoint's CLIP tower when it is available locally, else a random one of the preset's shape."""
    notes = b.report.section("build")["notes"]
    tower = b.model.get_vision_tower() if b.args.model_path else None
    if tower is None or not tower.is_loaded:
        if b.args.model_path:
            notes.append("the checkpoint's vision tower is not available locally: "
                         "a random CLIP of the preset's shape is used")
        tower = random_clip_tower(b.preset["vision"](), b.device, b.dtype, seed=b.args.seed + 1,
                                  select_layer=b.config.mm_vision_select_layer,
                                  select_feature=b.config.mm_vision_select_feature)
    if tower.hidden_size != b.config.mm_hidden_size:
        raise ValueError(f"vision width {tower.hidden_size} != mm_hidden_size {b.config.mm_hidden_size}")
    return tower


def prompt_ids(tokenizer, vocab_size, seed=0):
    """(L,) ids of a vicuna_v1 question with one <image>: real with a tokenizer, else random ids of that length."""
    if tokenizer is not None:
        from flash_vstream.conversation import build_prompt
        from flash_vstream.mm_utils import tokenizer_image_token

        return tokenizer_image_token(build_prompt(QUESTION, "vicuna_v1"), tokenizer, return_tensors="pt")
    length, image_at = SYNTHETIC_PROMPT
    ids = torch.randint(3, vocab_size, (length,), generator=torch.Generator().manual_seed(seed))
    ids[0], ids[image_at] = 1, IMAGE_TOKEN_INDEX
    return ids


def build(b):
    """Models, the fast encoder and the prompt into `b`; the build section of bench.json says what was built."""
    out = b.report.section("build")
    start = time.perf_counter()
    b.tokenizer, b.model = build_language_model(b)
    b.tower = build_vision(b)
    b.fast_path = new_fast_path(b)
    b.fast_vision = new_fast_vision(b)
    b.prompt_ids = prompt_ids(b.tokenizer, b.config.vocab_size, b.args.seed)
    out.update(status="ok", seconds=round(time.perf_counter() - start, 1),
               llm_params=sum(p.numel() for p in b.model.parameters()),
               vision_params=sum(p.numel() for p in b.tower.parameters()),
               prompt_tokens=len(b.prompt_ids), weights="checkpoint" if b.args.model_path else "random",
               memory_mode=b.config.memory_mode, fast_vision_layers=len(b.fast_vision.layers),
               fast_path=b.fast_path.describe(),
               after_build_mem_gb=peak_gb(b.device))
