"""Projector from CLIP space (mm_hidden_size) to the LLM width: `linear`, `mlp{N}x_gelu`, `identity`."""

import re

from torch import nn


def build_vision_projector(projector_type, input_dim, output_dim):
    if projector_type == "linear":
        return nn.Linear(input_dim, output_dim)
    if projector_type == "identity":
        if input_dim != output_dim:
            raise ValueError(f"identity projector needs equal widths, got {input_dim} -> {output_dim}")
        return nn.Identity()
    match = re.fullmatch(r"mlp(\d+)x_gelu", projector_type)
    if match is None:
        raise ValueError(f"unknown mm_projector_type {projector_type!r}: use linear, identity or mlp<N>x_gelu")
    layers = [nn.Linear(input_dim, output_dim)]  # state-dict names: 0, 2, 4, ...
    for _ in range(int(match.group(1)) - 1):
        layers += [nn.GELU(), nn.Linear(output_dim, output_dim)]
    return nn.Sequential(*layers)
