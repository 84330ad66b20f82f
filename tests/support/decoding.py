"""Tiny decoders and the `generate` reference the fast-decoder tests compare against."""

import torch

from flash_vstream.demo.tiny import tiny_vstream_model


def reference(model, ids, memory, max_new_tokens, eos_token_id):
    """`model.generate` greedy, new tokens only; `eos_token_id=None` generates exactly max_new_tokens."""
    model.generation_config.eos_token_id = eos_token_id
    try:
        with torch.no_grad():
            if memory is None:
                out = model.generate(ids[None], max_new_tokens=max_new_tokens, do_sample=False)
                return out[:, ids.numel():]  # text-only generate returns the prompt too
            return model.generate(ids[None], memory=[memory], max_new_tokens=max_new_tokens, do_sample=False)
    finally:
        model.generation_config.eos_token_id = 2


def fresh_model(seed=0, **overrides):
    """A tiny model of its own (fusing rewrites the weights' storage: keep the shared fixture untouched)."""
    return tiny_vstream_model(seed, **overrides)


def step_logits(decoders, ids, memory, steps):
    """Each decoder's next-token logits from its own step function, after prefilling `ids` + `memory`
    and decoding `steps` tokens: the steps compared over the same cache contents."""
    logits = []
    with torch.inference_mode():
        for decoder in decoders:
            decoder.prefill(ids, memory)
            decoder.decode(steps)
            logits.append(decoder._step_fn(decoder._ids, decoder._pos, decoder._mask(decoder._pos)))
    return logits
