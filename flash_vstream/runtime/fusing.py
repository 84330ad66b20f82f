"""Fusing several `nn.Linear`s that read the same input into one matrix, in place.

Used by the fast decode step (q/k/v and gate/up of each LLaMA layer) and the fast CLIP encoder (q/k/v
of each layer), always as a step of its own (`FastPath.fuse_weights()`, `FastVisionEncoder.fuse_weights()`):
it re-points the model's parameters, and CUDA graphs captured before it would read freed memory. One
large product reads its weights closer to the memory bandwidth than three small ones, and costs one
launch instead of three.

Quantized layers (`model.quantization.QuantizedLinear`) fuse the same way: their int8 / packed int4
values, scales and zeros all have one row per output, so each is concatenated along its rows, and the
fused weight comes back as one `QuantizedWeight`.
"""

import torch
from torch import nn


def _is_fused(parts, fused):
    """Whether `parts` (tensors) are consecutive row slices of `fused`, in order."""
    start = 0
    for part in parts:
        if part.shape[1:] != fused.shape[1:] or start + part.shape[0] > fused.shape[0] or \
                part.data_ptr() != fused[start].data_ptr():
            return False
        start += part.shape[0]
    return start == fused.shape[0]


def _quantized(linears, name):
    """Whether `linears` are quantized layers (all of them, of one scheme) or plain ones (all)."""
    from ..model.quantization import QuantizedLinear

    kinds = {isinstance(linear, QuantizedLinear) for linear in linears}
    if len(kinds) > 1:
        raise ValueError(f"{name}: some of the layers to fuse are quantized and some are not")
    if kinds == {True} and len({(linear.bits, linear.group_size, linear.in_features) for linear in linears}) > 1:
        raise ValueError(f"{name}: the quantized layers to fuse differ in bits, group size or inputs")
    return kinds == {True}


def _kinds(linears, name):
    """The tensors fused and how the result is returned: (names, quantized)."""
    if _quantized(linears, name):
        return ("qweight", "scales") + (("zeros",) if linears[0].bits == 4 else ()), True
    has_bias = all(linear.bias is not None for linear in linears)
    if not has_bias and any(linear.bias is not None for linear in linears):
        raise ValueError(f"{name}: some of the layers to fuse have a bias and some do not")
    return (("weight", "bias") if has_bias else ("weight",)), False


def _result(tensors, kinds, quantized, linears):
    if quantized:
        from ..model.quantization import QuantizedWeight

        return QuantizedWeight(**dict(zip(kinds, tensors)), group_size=linears[0].group_size), None
    return tensors[0], tensors[1] if len(tensors) > 1 else None


def fused_tensors(linears, owner, name):
    """(weight, bias or None) of `fuse_linears(linears, owner, name)` when the modules still point into
    them, else None. Reads only: nothing is fused here."""
    return _cached(linears, owner, name, *_kinds(linears, name))


def _cached(linears, owner, name, kinds, quantized):
    cached = [getattr(owner, f"{name}_{kind}", None) for kind in kinds]
    if all(c is not None and _is_fused([getattr(linear, kind) for linear in linears], c)
           for c, kind in zip(cached, kinds)):
        return _result(cached, kinds, quantized, linears)
    return None


def forget_fused(model):
    """Drop every fused tensor `fuse_linears` kept on `model`'s modules (plain attributes) -> how many.

    `model.to(device)` moves parameters and buffers only: after it the modules hold new tensors and the
    fused ones stay where they were (a bf16 7B moved to the CPU kept 13 GB on the GPU). Fuse again after
    moving a model (`FastPath.fuse_weights()`)."""
    dropped = 0
    for module in model.modules():
        for key, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and key not in module._parameters and key not in module._buffers:
                delattr(module, key)
                dropped += 1
    return dropped


def fuse_linears(linears, owner, name):
    """Point these `nn.Linear`s' weights (and biases, if all have one) at consecutive row slices of one new
    tensor each -> (weight (sum of outputs, inputs), bias (sum of outputs,) or None). For quantized layers
    -> (`QuantizedWeight` of the fused qweight, scales and zeros, None).

    The same values and the same memory: the old tensors are freed, and the modules keep working for
    every other code path. The fused tensors are kept as plain attributes `owner.<name>_weight` and
    `owner.<name>_bias` (not parameters or buffers: `state_dict` is unchanged). Idempotent while the
    modules still point into them; after a reload or `.to()` replaced a weight, they are built again.
    """
    kinds, quantized = _kinds(linears, name)
    cached = _cached(linears, owner, name, kinds, quantized)
    if cached is not None:
        return cached
    fused = []
    with torch.inference_mode(False), torch.no_grad():  # ordinary tensors: the model may be trained later
        for kind in kinds:
            tensor = torch.cat([getattr(linear, kind).detach() for linear in linears], dim=0)
            start = 0
            for linear in linears:
                old = getattr(linear, kind)
                rows = old.shape[0]
                part = tensor[start:start + rows]  # a quantized layer's tensors are buffers: no Parameter
                setattr(linear, kind, part if quantized else nn.Parameter(part, requires_grad=old.requires_grad))
                start += rows
            setattr(owner, f"{name}_{kind}", tensor)
            fused.append(tensor)
    return _result(fused, kinds, quantized, linears)
