"""Where the realtime model's parts run: the vision side and the language side, on one device or on two.

With `--vision-device` (e.g. `--device cuda:0 --vision-device cuda:1`) frames are encoded and
remembered on one card and questions answered on the other:

  vision device   the CLIP tower (and `FastVisionEncoder`, which runs on the tower's own weights) and
                  the STAR memory state, with the Semantic Attention that updates its abstract part
  LLM device      the LLM, the projector (`mm_projector`), the decoder's KV cache and kept prefix

The memory crosses once per published frame, as its (N <= 681, D) readout: device to device
(`Placement.hand_over`, `.to(device, non_blocking=True)`), never through host memory.

Why the projector stays with the LLM: the readout is 4x narrower before it (D = 1024) than after it
(hidden = 4096), and the answer side (`embed_with_memory`, the decoder's `cache_prefix`) takes memory
tokens, so it runs unchanged. Why the Semantic Attention goes with the memory: `STARMemory` is one
state machine on one device (model/memory.py); its abstract update is two 1024 -> 32 projections per
frame, nothing beside CLIP, and leaving it on the LLM device would add a second crossing per frame
(the pooled frame there, the abstract slots back). The memory uses a frozen copy of the module on the
vision device; the model's own module (the one in the state dict) stays where the model is.

Both devices must be of one type (two CUDA devices, or the CPU twice): the fast path's switches are
resolved once for one device type (runtime/options.py).
"""

import copy
import itertools

import torch

FLAG = "--vision-device"


def default_device(requested=None):
    """The device a command runs on: the one asked for, else CUDA when there is one, else the CPU."""
    return requested or ("cuda" if torch.cuda.is_available() else "cpu")


def parse_device(text, flag=FLAG):
    """'cpu', 'cuda' or 'cuda:N' -> torch.device (cuda: with its index). ValueError naming `flag` for a string that
    is not a device, a device type this project does not run on, or a CUDA device that is not there."""
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{flag} {text!r}: not a device (expected cpu, cuda or cuda:N)") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"{flag} {text!r}: only cpu and cuda devices are supported, not {device.type}")
    if not torch.cuda.is_available():
        raise ValueError(f"{flag} {text!r}: CUDA is not available on this machine")
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if device.index is None else device.index
    if index >= count:
        raise ValueError(f"{flag} {text!r}: this machine shows {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    return torch.device("cuda", index)


def check_pair(llm, vision, flag=FLAG):
    """ValueError unless the LLM's and the vision side's devices are of one type (see the module docstring)."""
    llm, vision = torch.device(llm), torch.device(vision)
    if llm.type != vision.type:
        raise ValueError(f"{flag} {vision}: the LLM is on {llm}; both sides must be CUDA devices or both the CPU "
                         "(the fast path is resolved for one device type)")


def vision_placement(device, vision_device):
    """The CLI's and the server's `--device` and `--vision-device` strings, checked before anything loads ->
    (LLM device, vision device) strings for `load_pretrained_model(device=..., vision_device=...)`; the vision
    device None when not given (the tower beside the LLM)."""
    if vision_device is None:
        return device, None
    vision = parse_device(vision_device)
    llm = parse_device(device, "--device")
    check_pair(llm, vision)
    return str(llm), str(vision)


def place_vision(model, device):
    """Move the model's loaded CLIP tower to `device` (its dtype kept); returns the tower.
    Any device, `meta` included (placement checks without memory)."""
    tower = model.get_vision_tower()
    if tower is None or not tower.is_loaded:
        raise ValueError(f"{FLAG} {device}: the model has no loaded vision tower to place (features-only model)")
    return tower.to(device=torch.device(device))


def module_devices(model):
    """{part: device string} of a VStream model: where each part of the realtime path runs."""
    inner = model.get_model()
    tower = model.get_vision_tower()

    def of(module):  # a quantized layer (model/quantization.py) holds buffers only
        return str(next(itertools.chain(module.parameters(), module.buffers())).device)

    return {"vision_tower": of(tower) if tower is not None and tower.is_loaded else None,
            "embed_tokens": of(inner.embed_tokens), "layers": of(inner.layers), "lm_head": of(model.lm_head),
            "mm_projector": of(inner.mm_projector), "attention_model": of(inner.attention_model)}


class Placement:
    """The two devices of one stream: `vision` (CLIP, the STAR memory) and `llm` (LLM, projector, decoder).

    `Placement.of(model)` reads them off a model: the LLM's device, and the loaded tower's (the LLM's when the
    model has no tower: precomputed features are then remembered beside the LLM)."""

    def __init__(self, llm, vision):
        self.llm, self.vision = torch.device(llm), torch.device(vision)
        # the LLM-side end of the hand-over: a stream no answer runs on, so the copy never queues behind an
        # answer's kernels on the LLM's current stream (a cross-device copy waits for both sides' streams)
        self._handoff = torch.cuda.Stream(self.llm) if self.split and self.llm.type == "cuda" else None

    @classmethod
    def of(cls, model):
        tower = model.get_vision_tower()
        vision = tower.device if tower is not None and tower.is_loaded else model.device
        return cls(model.device, vision)

    @property
    def split(self):
        return self.vision != self.llm

    def describe(self):
        return {"llm": str(self.llm), "vision": str(self.vision), "split": self.split}

    def memory_attention(self, model):
        """The Semantic Attention the stream's memory updates with, on the vision device: the model's own module
        on one device, else a frozen copy of it there (inference: the weights do not change under it)."""
        own = model.get_model().attention_model
        if not self.split:
            return own
        return copy.deepcopy(own).requires_grad_(False).to(self.vision)

    def hand_over(self, tokens):
        """(N, D) memory tokens from the vision device -> (N, D) on the LLM device, their values in place when this
        returns (the reader may be another thread). Between two devices: one device-to-device copy."""
        if not self.split:
            if tokens.is_cuda:
                torch.cuda.current_stream(tokens.device).synchronize()
            return tokens
        if self._handoff is None:  # the CPU side of a test placement (e.g. meta -> cpu has no values to copy)
            return tokens.to(self.llm)
        with torch.cuda.stream(self._handoff):
            # runs on the vision device's current stream (after the memory update), waits for the idle hand-over
            # stream on the LLM side; the new tensor's block belongs to the hand-over stream
            out = tokens.to(self.llm, non_blocking=True)  # (N, D)
        self._handoff.synchronize()  # the hand-over stream waited for the copy: the values are there
        # answers read it on the LLM's default stream: the allocator must not reuse the block before that is done
        out.record_stream(torch.cuda.default_stream(self.llm))
        return out
