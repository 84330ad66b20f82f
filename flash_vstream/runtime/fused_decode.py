"""One decode step of the LLaMA stack over fused projection weights (what `GreedyDecoder` captures on CUDA).

At batch 1 a decode step is seven matrix-vector products per layer, each reading its whole weight
matrix: the step is bound by memory bandwidth, and the small ones (4096 x 4096, 32 MB in bf16) reach
less of it than the large ones. `fuse_projections` stores q/k/v as one (3 * 4096, 4096) matrix and
gate/up as one (2 * 11008, 4096) matrix and points the model's own `nn.Linear` weights at row slices
of them: the same values and the same memory, every other code path (prefill, `generate`, training)
unchanged; `FastPath.fuse_weights()` does it, as a step of its own. `FusedDecodeStep` then runs a
layer as four products instead of seven, on CUDA as Triton matrix-vector kernels with the RMSNorms,
SiLU gating and residual adds folded in (triton_kernels.py).

It reads and writes the K/V tensors of the transformers `StaticCache` that the model's own forward
fills, so a prompt prefilled by the model continues here. Only the plain LLaMA layer is supported
(no projection biases, one tensor-parallel slice); `FusedDecodeStep` raises `NotImplementedError`
for anything else and the decoder keeps the model's own step.

Quantized weights (model/quantization.py: int8 per channel, int4 in groups) run the same step: fused the
same way, each product then reads a `QuantizedWeight` -- the Triton kernel straight from the int8 / int4
values and their scales, otherwise (CPU) a dequantized copy through `F.linear`.
"""

import torch.nn.functional as F
from torch import nn

from ..model.quantization import QuantizedLinear, QuantizedWeight, weight_of
from . import triton_kernels
from .fusing import fuse_linears, fused_tensors

LINEARS = (nn.Linear, QuantizedLinear)


def _check_supported(model):
    config = model.config
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        raise NotImplementedError("pretraining_tp > 1")
    head = getattr(model, "lm_head", None)
    if not isinstance(head, LINEARS) or head.bias is not None:
        raise NotImplementedError("the LM head is not a plain bias-free nn.Linear (or a quantized one)")
    for i, layer in enumerate(model.get_model().layers):
        projections = [getattr(getattr(layer, part, None), name, None) for part, names in (
            ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj", "down_proj")))
            for name in names]
        if not all(isinstance(p, LINEARS) for p in projections):
            raise NotImplementedError(f"layer {i} is not a plain LLaMA layer")
        if any(p.bias is not None for p in projections):
            raise NotImplementedError(f"layer {i} has projection biases")


def fuse_projections(model):
    """Fuse every layer's q/k/v and gate/up weights in place (same values, same memory; idempotent).
    Returns [(qkv (Nq + 2 Nkv, H), gate_up (2 I, H))] per layer. Quantized layers on CUDA also get the
    Triton kernels for their own forward (prefill, `generate`): `QuantizedLinear.kernels`."""
    _check_supported(model)
    for module in model.modules():
        if isinstance(module, QuantizedLinear) and triton_kernels.usable(module.qweight):
            module.kernels = triton_kernels
    fused = []
    for layer in model.get_model().layers:
        attn, mlp = layer.self_attn, layer.mlp
        fused.append((fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj], attn, "fused_qkv")[0],
                      fuse_linears([mlp.gate_proj, mlp.up_proj], mlp, "fused_gate_up")[0]))
    return fused


def fused_projections(model):
    """What `fuse_projections(model)` returned, read back without fusing anything -> [(qkv, gate_up)] per
    layer. Raises `NotImplementedError` for a layer the step does not model, `RuntimeError` when the
    weights are not (or no longer) fused: fusing re-points the model's parameters, so it is a step of its
    own (`FastPath.fuse_weights()`), never a side effect of building a decode step."""
    _check_supported(model)
    fused = []
    for i, layer in enumerate(model.get_model().layers):
        attn, mlp = layer.self_attn, layer.mlp
        qkv = fused_tensors([attn.q_proj, attn.k_proj, attn.v_proj], attn, "fused_qkv")
        gate_up = fused_tensors([mlp.gate_proj, mlp.up_proj], mlp, "fused_gate_up")
        if qkv is None or gate_up is None:
            raise RuntimeError(f"layer {i}'s q/k/v and gate/up weights are not fused: call "
                               "FastPath.fuse_weights() (or fuse_projections(model)) first")
        fused.append((qkv[0], gate_up[0]))
    return fused


class FusedDecodeStep:
    """`step(ids (1, 1), position (1,), mask (1, 1, 1, L), cache)` -> logits (1, vocab) of the next token,
    writing the token's K/V into `cache` (a `StaticCache` already filled by the model's prefill) at
    `position`. The same arithmetic as the model's forward for one token, with q/k/v and gate/up each
    one product.

    `triton`: run the products as `triton_kernels.gemv`, with each product's RMSNorm, SiLU gating and
    residual add folded into it (five kernels per layer with attention, instead of about nine once
    compiled). None = when the kernels can run on the model's device and the model's layers are SiLU-gated
    with LLaMA's RMSNorm; True for other layers raises `NotImplementedError`.

    The model's weights must be fused already (`fuse_projections`); building the step changes nothing.
    """

    def __init__(self, model, triton=None):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        self.model = model
        self.body = model.get_model()
        _check_supported(model)
        self._rotate = apply_rotary_pos_emb
        attn = self.body.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.q_size = attn.q_proj.out_features
        self.kv_size = attn.k_proj.out_features
        self.scaling = attn.scaling
        self.gqa = self.q_size != self.kv_size
        foldable = self._foldable()
        if triton and foldable is not True:
            raise NotImplementedError(f"the Triton step cannot fold in {foldable}")
        self.weights = fused_projections(model)
        if triton is None:
            triton = triton_kernels.usable(self.body.embed_tokens.weight) and foldable is True
        self.triton = bool(triton)

    def _foldable(self):
        """True when the Triton products can fold in this model's element-wise work (SiLU gating, LLaMA's
        RMSNorm: weight * x / rms(x)), else what they cannot."""
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        act = getattr(self.model.config, "hidden_act", None)
        if act != "silu":
            return f"the activation {act!r} (SiLU only)"
        norms = [self.body.norm] + [n for layer in self.body.layers
                                    for n in (layer.input_layernorm, layer.post_attention_layernorm)]
        odd = next((n for n in norms if not isinstance(n, LlamaRMSNorm)), None)
        return True if odd is None else f"a {type(odd).__name__} (LlamaRMSNorm only)"

    def _product(self, x, weight, norm=None, paired=False, residual=None):
        """weight @ norm(x) (+ residual), `norm` an RMSNorm module or None; `paired`: the weight is the fused
        [gate; up] and the result SiLU(gate) * up (the down projection's input)."""
        quantized = isinstance(weight, QuantizedWeight)
        if self.triton:
            eps = norm.variance_epsilon if norm is not None else 0.0
            if quantized:
                return triton_kernels.gemv(x, weight.qweight, None if norm is None else norm.weight, eps,
                                           residual=residual, scales=weight.scales, zeros=weight.zeros,
                                           group_size=weight.group_size, paired=paired).view(1, 1, -1)
            return triton_kernels.gemv(x, weight, None if norm is None else norm.weight, eps, residual=residual,
                                       paired=paired).view(1, 1, -1)
        x = x if norm is None else norm(x)
        y = F.linear(x, weight.dequantize(x.dtype) if quantized else weight)
        if paired:
            gate, up = y.chunk(2, dim=-1)
            y = self.body.layers[0].mlp.act_fn(gate) * up
        return y if residual is None else residual + y

    def __call__(self, ids, position, mask, cache):
        body, hd = self.body, self.head_dim
        hidden = body.embed_tokens(ids)  # (1, 1, H)
        cos, sin = body.rotary_emb(hidden, position.view(1, 1))
        for layer, (qkv_w, gate_up_w), kv in zip(body.layers, self.weights, cache.layers):
            qkv = self._product(hidden, qkv_w, norm=layer.input_layernorm)
            q, k, v = qkv.split((self.q_size, self.kv_size, self.kv_size), dim=-1)
            q = q.view(1, 1, -1, hd).transpose(1, 2)  # (1, heads, 1, hd)
            k = k.view(1, 1, -1, hd).transpose(1, 2)  # (1, kv heads, 1, hd)
            q, k = self._rotate(q, k, cos, sin)
            kv.keys.index_copy_(2, position, k)
            kv.values.index_copy_(2, position, v.view(1, 1, -1, hd).transpose(1, 2))
            attn = F.scaled_dot_product_attention(q, kv.keys, kv.values, attn_mask=mask, scale=self.scaling,
                                                  enable_gqa=self.gqa)  # (1, heads, 1, hd)
            attn = attn.transpose(1, 2).reshape(1, 1, -1)
            hidden = self._product(attn, weight_of(layer.self_attn.o_proj), residual=hidden)
            gated = self._product(hidden, gate_up_w, norm=layer.post_attention_layernorm, paired=True)
            hidden = self._product(gated, weight_of(layer.mlp.down_proj), residual=hidden)
        return self._product(hidden, weight_of(self.model.lm_head), norm=body.norm).view(1, -1)  # (1, vocab)
