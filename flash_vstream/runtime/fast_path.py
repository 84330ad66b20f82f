"""`FastPath(model, options)`: how the model runs fast, as one explicit object.

It changes how, never what, is computed. From resolved `FastPathOptions` it builds and owns:
- the greedy decoder (decoder.py: static KV cache, decode step in a CUDA graph, compiled, over fused
  weights with Triton products, as the options say) -- `decoder(max_cache_len)`;
- the CLIP encoder stopped at the selected layer (vision.py: one frame as a CUDA graph, batches through
  the compiled fused path) -- `vision()`;
- the one side stream every graph capture warms up on (cuBLAS keeps a workspace per stream it has run
  on, for the life of the process), and the record of what fell back.

Fusing weights re-points the model's parameters (same values, same memory), so it is a step of its
own, `fuse_weights()`, logged, called before anything is captured; building a decoder or an encoder
never changes a parameter. With `strict` a part that cannot run raises `FastPathError` naming it and
why; otherwise the next simpler way runs, and the fallback is recorded (`describe()["fallbacks"]`)
and logged once. Two `FastPath`s share nothing.
"""

import logging

import torch

from .cuda_utils import free_memory
from .decoder import GreedyDecoder, round_up
from .fused_decode import fuse_projections
from .options import FastPathError, FastPathOptions
from .vision import FastVisionEncoder

logger = logging.getLogger(__name__)
DECODER_SWITCHES = ("cuda_graph", "compile_decode", "fused_weights", "triton", "pad_suffix")


class Fallbacks:
    """What fell back and why ({part: reason}), each logged once; strict: raises instead.
    Its own small object, so the decoders it is handed to do not hold the `FastPath` (no reference cycle:
    the realtime session freezes the heap, and frozen cycles are never collected)."""

    def __init__(self, strict):
        self.strict = bool(strict)
        self.reasons = {}

    def record(self, part, reason):
        if self.strict:
            raise FastPathError(part, reason)
        if self.reasons.get(part) != reason:
            logger.warning("fast path: %s fell back: %s", part, reason)
        self.reasons[part] = reason


class FastPath:
    """The fast path of one model (`VStreamLlamaForCausalLM`) and/or one CLIP tower.

    model: the language model (None: vision only, e.g. feature extraction); tower: the `CLIPVisionTower`
    (default: the model's); options: `FastPathOptions` (default: all "auto"), resolved here for the
    device when they are not already.
    """

    def __init__(self, model=None, options=None, tower=None):
        if model is None and tower is None:
            raise ValueError("FastPath needs a model or a vision tower")
        self.model = model
        self.tower = tower if tower is not None else model.get_vision_tower()
        self.device = torch.device(model.device if model is not None else self.tower.device)
        self.options = (options or FastPathOptions()).resolve(self.device)
        self.fallbacks = Fallbacks(self.options.strict)
        self.weights_fused = False  # fuse_weights() ran
        self._decode_fused = None  # whether the decode step can read fused weights (None: not fused yet)
        self._streams = {}  # device -> the side stream all captures there warm up on, made at the first one
        self._decoder = None
        self._vision = None
        self._vision_prepared = False
        logger.info("fast path on %s: %s", self.device, self.options.summary())

    @property
    def enabled(self):
        return self.options.enabled

    def warmup_stream(self, device=None):
        """The one side stream this path's graph captures on `device` (default: the model's) warm up on (CUDA
        only); a tower on another card (`--vision-device`) gets one of its own there."""
        device = self.device if device is None else torch.device(device)
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    # --- weights ------------------------------------------------------------------------------------
    def fuse_weights(self):
        """Fuse, in place, what the chosen paths read fused: each LLaMA layer's q/k/v and gate/up
        (`fused_weights`) and each kept CLIP layer's q/k/v (`compile_vision`: the batched path). Same
        values, same memory, `state_dict` unchanged; logged. Call it before building decoders or capturing
        graphs (a graph holds the old weights' addresses). Idempotent; returns self."""
        if self.weights_fused:
            return self
        self.weights_fused = True
        o = self.options
        if o.fused_weights and self.model is not None:
            try:
                fuse_projections(self.model)
                self._decode_fused = True
                logger.info("fast path: fused the q/k/v and gate/up weights of %d LLaMA layers in place",
                            len(self.model.get_model().layers))
            except NotImplementedError as error:
                self._decode_fused = False
                self.fallbacks.record("fused_weights", f"{error}; the decode step uses the model's own projections")
        if o.compile_vision and self._tower_loaded():
            encoder = self._vision_encoder()
            encoder.fuse_weights()
            logger.info("fast path: fused the q/k/v weights of %d CLIP layers in place", len(encoder.layers))
        free_memory(self.device)  # the unfused weights' blocks
        return self

    # --- decoding -----------------------------------------------------------------------------------
    def decoder(self, max_cache_len):
        """The path's greedy decoder (owned: built at the first call, rebuilt when a longer cache is asked
        for). Not set up yet: `setup()` (or the first prefill) compiles and captures."""
        if self._decoder is None or self._decoder.max_cache_len < round_up(max_cache_len):
            self._decoder = None  # the old cache goes before the new one is allocated
            self._decoder = self.new_decoder(max_cache_len)
        return self._decoder

    def new_decoder(self, max_cache_len, **changes):
        """A decoder the caller owns (e.g. the benchmark's variants), with this path's choices or with
        `changes` to the decode switches (cuda_graph, compile_decode, fused_weights, triton, pad_suffix),
        validated like the options. It shares this path's warm-up stream and fallback record."""
        unknown = set(changes) - set(DECODER_SWITCHES)
        if unknown:
            raise ValueError(f"new_decoder changes only {DECODER_SWITCHES}, not {sorted(unknown)}")
        if self.model is None:
            raise RuntimeError("this FastPath has no language model")
        o = self.options.replace(**changes).resolve(self.device) if changes else self.options
        if not o.enabled:
            raise RuntimeError("the fast path is off: answers come from model.generate")
        fused = o.fused_weights
        if fused and not self._decode_fused:
            if self._decode_fused is None:
                raise RuntimeError("a decode step over fused weights: call FastPath.fuse_weights() first (with "
                                   "fused_weights on): it re-points the model's q/k/v and gate/up weights")
            fused = False  # fusing fell back (recorded by fuse_weights)
        compile_options = {"backend": o.compile_backend}
        if o.decode_compile_mode:
            compile_options["mode"] = o.decode_compile_mode
        return GreedyDecoder(self.model, max_cache_len=max_cache_len, cuda_graph=o.cuda_graph,
                             compile_step=o.compile_decode, compile_options=compile_options,
                             warmup_steps=o.warmup_steps, check_every=o.check_every, pad_suffix=o.pad_suffix,
                             fused_step=fused, triton_kernels=fused and o.triton, strict=o.strict,
                             on_fallback=self.fallbacks.record,
                             warmup_stream=self.warmup_stream() if o.cuda_graph else None)

    # --- vision -------------------------------------------------------------------------------------
    def _tower_loaded(self):
        return self.tower is not None and getattr(self.tower, "is_loaded", True)

    def _vision_encoder(self):
        if self._vision is None:
            if not self._tower_loaded():
                raise RuntimeError("this FastPath has no loaded vision tower")
            tower = self.tower
            self._vision = FastVisionEncoder(
                tower.vision_tower, tower.select_layer, tower.select_feature, strict=self.options.strict,
                warmup_stream=self.warmup_stream(tower.device) if self.options.cuda_graph else None)
        return self._vision

    def vision(self, prepare=True):
        """The path's CLIP encoder (owned, built once). `prepare`: as the options say -- the batched path
        compiled, with the Triton kernels when `triton` (`compile_vision`, after `fuse_weights()`), and the
        one-frame forward captured as a CUDA graph (`cuda_graph`). prepare=False: built only (the
        benchmark runs and times those steps itself)."""
        if not self.options.enabled:
            raise RuntimeError("the fast path is off: frames go through the tower's own forward")
        encoder = self._vision_encoder()
        if prepare and not self._vision_prepared:
            o = self.options
            if o.compile_vision and not encoder.fused_weights:
                raise RuntimeError("compile_vision: call FastPath.fuse_weights() first (it re-points the "
                                   "CLIP layers' q/k/v weights)")
            self._vision_prepared = True
            if o.compile_vision:
                encoder.compile(mode=o.vision_compile_mode, triton=o.triton, backend=o.compile_backend)
            if o.cuda_graph:
                error = encoder.capture(self.tower.config.image_size)  # strict: raises
                if error:
                    self.fallbacks.record("vision cuda_graph", f"one frame runs eagerly; {error[:300]}")
        return encoder

    # --- what runs ------------------------------------------------------------------------------------
    def describe(self):
        """What runs, for logs and the benchmark report: the resolved options, the decoder's step (once set
        up), the vision paths, whether weights were fused, and every fallback with its reason."""
        decoder, vision = self._decoder, self._vision
        if vision is None:
            vision_paths = None
        else:
            batched = "compiled" if vision.compiled else "fused" if vision.fused_weights else "eager"
            vision_paths = {"one_frame": "cuda_graph" if vision.graphed else "eager",
                            "batched": batched + ("+triton" if vision.triton else "")}
        return {"device": str(self.device), "options": self.options.as_dict(), "summary": self.options.summary(),
                "weights_fused": self.weights_fused, "decode_weights_fused": bool(self._decode_fused),
                "decode": None if decoder is None else (decoder.mode if decoder.ready else "not set up"),
                "vision": vision_paths, "fallbacks": dict(self.fallbacks.reasons)}
