"""`FastPathOptions`: every switch of the GPU fast path in one validated place, resolved once.

A switch is True, False or "auto". `resolve(device)` turns each "auto" into what that device can run
(once, by the entry point, which logs `summary()`), and rejects explicit requests the device cannot
honour (a CUDA graph off CUDA, Triton where it cannot run). `FastPath` (fast_path.py) runs exactly the
resolved choices; with `strict` a part that fails raises `FastPathError` instead of falling back.
"""

import dataclasses
import os

AUTO = "auto"
SWITCHES = ("enabled", "cuda_graph", "compile_decode", "fused_weights", "triton", "compile_vision", "pad_suffix")
COMPILE_BACKENDS = ("inductor", "eager", "aot_eager")  # eager / aot_eager: the trace alone (CPU tests)
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CLI_FAST = ("auto", "on", "off")  # the realtime CLI's --fast


class FastPathError(RuntimeError):
    """A fast-path part that could not run in strict mode: `part` names it, the message says why."""

    def __init__(self, part, reason):
        super().__init__(f"fast path: {part} failed: {reason}")
        self.part, self.reason = part, reason


def _triton_installed():
    from . import triton_kernels

    return triton_kernels.triton is not None


@dataclasses.dataclass(frozen=True)
class FastPathOptions:
    """What the fast path runs. Each switch: True, False or "auto" (what `resolve` picks on the device).

    enabled         the fast path at all: the static-cache greedy decoder (and the kept prompt prefix)
                    instead of `generate`, the CLIP encoder stopped at the selected layer; auto: on CUDA
    cuda_graph      the decode step, the question after a kept prefix and the one-frame CLIP forward
                    captured as CUDA graphs; auto: on CUDA (True elsewhere is an error)
    compile_decode  `torch.compile` of the decode step (inside its graph); auto: with cuda_graph
    fused_weights   the decode step over fused q/k/v and gate/up matrices (`FusedDecodeStep`), and the
                    batched CLIP path's fused q/k/v: `FastPath.fuse_weights()` re-points the weights;
                    auto: with cuda_graph
    triton          Triton kernels where a chosen path has them (the fused decode step's products, the
                    batched CLIP attention and fc1); auto: when Triton runs on the device (CUDA)
    compile_vision  regional `torch.compile` of the batched CLIP path (extraction); auto: on CUDA
    pad_suffix      questions after a kept prefix padded to 32-token buckets (one graph each); auto: with
                    cuda_graph
    strict          a part that fails raises `FastPathError` (naming it and why) instead of falling back
    compile_backend / decode_compile_mode / vision_compile_mode: what `torch.compile` gets
    """

    enabled: object = AUTO
    cuda_graph: object = AUTO
    compile_decode: object = AUTO
    fused_weights: object = AUTO
    triton: object = AUTO
    compile_vision: object = AUTO
    pad_suffix: object = AUTO
    strict: bool = False
    compile_backend: str = "inductor"
    decode_compile_mode: object = None
    vision_compile_mode: object = None
    warmup_steps: int = 3
    check_every: int = 16

    def __post_init__(self):
        for name in SWITCHES:
            value = getattr(self, name)
            if not (value is True or value is False or value == AUTO):
                raise ValueError(f"FastPathOptions.{name} must be True, False or {AUTO!r}, got {value!r}")
        if not isinstance(self.strict, bool):
            raise ValueError(f"FastPathOptions.strict must be True or False, got {self.strict!r}")
        if self.compile_backend not in COMPILE_BACKENDS:
            raise ValueError(f"FastPathOptions.compile_backend must be one of {COMPILE_BACKENDS}, "
                             f"got {self.compile_backend!r}")
        for name in ("decode_compile_mode", "vision_compile_mode"):
            if getattr(self, name) not in COMPILE_MODES:
                raise ValueError(f"FastPathOptions.{name} must be one of {COMPILE_MODES}, got {getattr(self, name)!r}")
        for name in ("warmup_steps", "check_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"FastPathOptions.{name} must be an integer >= 1, got {value!r}")

    @classmethod
    def from_cli(cls, fast="auto", compile_decode=True, strict=False):
        """The realtime CLI's `--fast auto|on|off` and `--no-compile-decode` (compile_decode=False)."""
        if fast not in CLI_FAST:
            raise ValueError(f"--fast must be one of {CLI_FAST}, got {fast!r}")
        if fast == "off":
            return cls.off()
        return cls(enabled=True if fast == "on" else AUTO, compile_decode=AUTO if compile_decode else False,
                   compile_vision=False, strict=strict)  # a stream encodes one frame at a time: no batched path

    @classmethod
    def off(cls):
        """The stock path: `generate` and the tower's own forward."""
        return cls(**{name: False for name in SWITCHES})

    @property
    def resolved(self):
        return all(getattr(self, name) != AUTO for name in SWITCHES)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def resolve(self, device):
        """Every "auto" made concrete for `device` -> a resolved copy (resolving a resolved one checks it
        against the device again). Raises ValueError for an explicit choice the device cannot run."""
        import torch

        device = torch.device(device)
        on_cuda = device.type == "cuda"

        def pick(name, auto):
            value = getattr(self, name)
            return bool(auto) if value == AUTO else value

        enabled = pick("enabled", on_cuda)
        if not enabled:
            return self.replace(**{name: False for name in SWITCHES})
        cuda_graph = pick("cuda_graph", on_cuda)
        if cuda_graph and not on_cuda:
            raise ValueError(f"FastPathOptions.cuda_graph=True needs a CUDA device, not {device}")
        triton_runs = _triton_installed() and (on_cuda or os.environ.get("TRITON_INTERPRET") == "1")
        triton = pick("triton", _triton_installed() and on_cuda)
        if triton and not triton_runs:
            why = "(not installed)" if not _triton_installed() else \
                "(off CUDA only in Triton's interpreter: TRITON_INTERPRET=1 before Triton is imported)"
            raise ValueError(f"FastPathOptions.triton=True: Triton does not run on {device} {why}")
        return self.replace(enabled=True, cuda_graph=cuda_graph, compile_decode=pick("compile_decode", cuda_graph),
                            fused_weights=pick("fused_weights", cuda_graph), triton=triton,
                            compile_vision=pick("compile_vision", on_cuda), pad_suffix=pick("pad_suffix", cuda_graph))

    def as_dict(self):
        return dataclasses.asdict(self)

    def summary(self):
        """One line for logs: the switches, on/off/auto, then strict."""
        word = {True: "on", False: "off", AUTO: "auto"}
        parts = [f"{name}={word[getattr(self, name)]}" for name in SWITCHES]
        if self.compile_decode is not False and self.decode_compile_mode:
            parts.append(f"decode_compile_mode={self.decode_compile_mode}")
        if self.compile_backend != "inductor":
            parts.append(f"compile_backend={self.compile_backend}")
        return " ".join(parts + [f"strict={'on' if self.strict else 'off'}"])
