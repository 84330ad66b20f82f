"""Weight-only int8 and int4 for the language model's linear layers (`load_pretrained_model(load_8bit=...)`).

At batch 1 a decode step reads every weight once and is bound by memory bandwidth: fewer bytes per
weight are fewer milliseconds per token. Two schemes, weights only (activations stay in the model's
dtype):

- int8: symmetric, one scale per output channel: w[r] = scale[r] * q[r], q in [-127, 127]. The scale
  factors out of each row's sum, so a matrix-vector product multiplies by it once at the end.
- int4: asymmetric in groups of `group_size` (128) consecutive input columns: w = q * scale + zero,
  q in [0, 15], zero = the group's minimum. Two values a byte, within a group: its byte c holds the
  group's column c in the low nibble and column c + group_size / 2 in the high one (each half of a group
  then multiplies a contiguous slice of the input).

Quantized: each LLaMA layer's q/k/v/o and gate/up/down projections and the LM head. Kept in the model's
dtype: the token embedding (a lookup, not read whole per token), the norms, the projector, the Semantic
Attention and CLIP (small, and their error would reach every memory token).

`QuantizedLinear.forward` runs anywhere by dequantizing to the input's dtype and `F.linear` (slow, plain
torch: the CPU tests, the stock path). This package stays free of the runtime: the fast path hands
each layer its kernels (`kernels`: runtime.triton_kernels, whose `gemv` takes one token and `qmatmul`
several), which `runtime.fused_decode.fuse_projections` does on CUDA, and its decode step reads the same
tensors, fused per layer like the full-precision weights.

`quantize_model` converts a loaded model in place, layer by layer, each layer's weights moved to the
target device only to be quantized there: the full-precision model never has to fit on the GPU.
"""

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

SCHEMES = {"int8": 8, "int4": 4}
GROUP_SIZE = 128
LLAMA_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """What the kernels read of one quantized (N, K) weight.

    qweight: int8 (N, K) (int8) or uint8 (N, K / 2) (int4, two values a byte);
    scales: (N,) fp32 (int8) or (N, K / group_size) in the model's dtype (int4); zeros: int4 only, like scales.
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor = None
    group_size: int = None

    @property
    def bits(self):
        return 8 if self.qweight.dtype == torch.int8 else 4

    @property
    def shape(self):
        n, width = self.qweight.shape
        return (n, width if self.bits == 8 else 2 * width)

    def dequantize(self, dtype=torch.float32):
        """The (N, K) weight these values stand for, computed in fp32 and cast to `dtype`."""
        if self.bits == 8:
            return (self.qweight.float() * self.scales.float()[:, None]).to(dtype)
        n, k = self.shape
        packed = self.qweight.view(n, k // self.group_size, self.group_size // 2)  # (N, groups, G / 2)
        q = torch.cat((packed & 15, packed >> 4), dim=-1)  # (N, groups, G): low nibbles first half, high second
        w = q.float() * self.scales.float()[..., None] + self.zeros.float()[..., None]  # (N, groups, G)
        return w.view(n, k).to(dtype)


def group_size_for(in_features, group_size=GROUP_SIZE):
    """The int4 group size used for `in_features` inputs: `group_size`, or the whole row when it is
    narrower (tiny models); it must divide the row and be a power of two >= 32 (the kernels' tiles)."""
    size = min(group_size, in_features)
    if size < 32 or size & (size - 1) or in_features % size:
        raise ValueError(f"int4 groups of {size} do not divide {in_features} inputs "
                         "(a power of two >= 32 dividing the row is needed)")
    return size


def quantize_weight(weight, bits, group_size=GROUP_SIZE, dtype=None):
    """(N, K) float weight -> `QuantizedWeight` on the weight's device. Rounded to nearest; int4 scales and
    zeros stored in `dtype` (default: the weight's), which the reference dequantization then uses."""
    w = weight.detach().float()
    n, k = w.shape
    dtype = dtype or weight.dtype
    if bits == 8:
        scales = w.abs().amax(dim=1).clamp_min(1e-12) / 127  # (N,)
        q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
        return QuantizedWeight(q.contiguous(), scales.contiguous())
    if bits != 4:
        raise ValueError(f"weight-only quantization is 8 or 4 bits, not {bits}")
    size = group_size_for(k, group_size)
    groups = w.view(n, k // size, size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)  # (N, groups)
    scales = ((high - low) / 15).clamp_min(1e-12).to(dtype)
    zeros = low.to(dtype)
    # round against the stored (possibly bf16) scale and zero: what every reader dequantizes with
    q = torch.round((groups - zeros.float()[..., None]) / scales.float()[..., None]).clamp_(0, 15).to(torch.uint8)
    first, second = q.view(n, k // size, size).chunk(2, dim=-1)  # (N, groups, G / 2): each group's halves
    packed = (first | (second << 4)).reshape(n, k // 2)  # (N, K / 2)
    return QuantizedWeight(packed.contiguous(), scales.contiguous(), zeros.contiguous(), size)


class QuantizedLinear(nn.Module):
    """A bias-free `nn.Linear` whose weight is stored quantized (buffers `qweight`, `scales`, and `zeros`
    for int4; `state_dict` holds those). `forward(x)` -> x @ W.T in x's dtype."""

    def __init__(self, quantized, name=""):
        super().__init__()
        self.out_features, self.in_features = quantized.shape
        self.bits, self.group_size, self.name = quantized.bits, quantized.group_size, name
        self.register_buffer("qweight", quantized.qweight)
        self.register_buffer("scales", quantized.scales)
        self.register_buffer("zeros", quantized.zeros)
        self.bias = None  # what the fused decode step checks on every projection
        # a module with gemv / qmatmul over these tensors (runtime.triton_kernels), set by the fast path on
        # CUDA; None: dequantize and F.linear
        self.kernels = None

    @classmethod
    def from_linear(cls, linear, bits, group_size=GROUP_SIZE, device=None, name=""):
        if linear.bias is not None:
            raise ValueError(f"{name or 'a linear layer'}: quantized layers have no bias")
        weight = linear.weight.detach().to(device or linear.weight.device)
        return cls(quantize_weight(weight, bits, group_size), name)

    def quantized(self):
        """The `QuantizedWeight` over this module's current buffers (fusing re-points them)."""
        return QuantizedWeight(self.qweight, self.scales, self.zeros, self.group_size)

    def forward(self, x):
        weight, kernels = self.quantized(), self.kernels
        if kernels is not None and x.is_cuda:
            if x.numel() == self.in_features:  # one token: the matrix-vector kernel
                return kernels.gemv(x, weight.qweight, scales=weight.scales, zeros=weight.zeros,
                                    group_size=weight.group_size).view(*x.shape[:-1], self.out_features)
            return kernels.qmatmul(x, weight.qweight, weight.scales, weight.zeros, weight.group_size)
        return F.linear(x, weight.dequantize(x.dtype))

    def extra_repr(self):
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}{group}"


def weight_of(linear):
    """What a product reads for this layer: its weight tensor, or a `QuantizedWeight`."""
    return linear.quantized() if isinstance(linear, QuantizedLinear) else linear.weight


def quantize_model(model, scheme, device=None, group_size=GROUP_SIZE):
    """Quantize the LLM's projections and LM head of a `VStreamLlamaForCausalLM` (or `LlamaForCausalLM`) in
    place, `scheme` "int8" or "int4". One layer at a time: its weights go to `device` (default: where they
    are), are quantized there and their full-precision copies dropped, then the layer's other tensors
    (norms) follow; the rest of the model (embeddings, projector, Semantic Attention) is moved to `device`
    at the end. Returns the model; `model.quantization` records the scheme (for logs and reports)."""
    if scheme not in SCHEMES:
        raise ValueError(f"quantization scheme must be one of {sorted(SCHEMES)}, not {scheme!r}")
    bits = SCHEMES[scheme]
    body = model.get_model() if hasattr(model, "get_model") else model.model
    with torch.no_grad():
        for i, layer in enumerate(body.layers):
            for path in LLAMA_PROJECTIONS:
                _replace(layer, path, bits, group_size, device, f"model.layers.{i}.{path}")
            if device is not None:
                layer.to(device)
        _replace(model, "lm_head", bits, group_size, device, "lm_head")
        if device is not None:
            model.to(device)
    model.quantization = {"scheme": scheme, "group_size": group_size if bits == 4 else None,
                          "layers": len(body.layers) * len(LLAMA_PROJECTIONS) + 1}
    return model


def _replace(owner, path, bits, group_size, device, name):
    parent_path, _, attr = path.rpartition(".")
    parent = owner.get_submodule(parent_path) if parent_path else owner
    linear = getattr(parent, attr)
    if isinstance(linear, QuantizedLinear):
        raise ValueError(f"{name} is quantized already")
    if not isinstance(linear, nn.Linear):
        raise ValueError(f"{name} is a {type(linear).__name__}, not an nn.Linear: cannot quantize it")
    setattr(parent, attr, QuantizedLinear.from_linear(linear, bits, group_size, device, name))
    del linear  # the full-precision weight goes with the module (a tied LM head stays with the embedding)


def quantized_bytes(model):
    """Bytes of the model's parameters and buffers (what the quantized weights occupy)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
