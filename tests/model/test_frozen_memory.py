"""The training split of the memory (frozen part in the data loader, Semantic Attention batched in forward)
gives what `STARMemory.update` gives on the whole clip: tokens and gradients, paper and upstream modes."""

import pytest
import torch
from torch import nn

from flash_vstream.model.language_model.configuration_vstream import VStreamConfig
from flash_vstream.model.memory import STARMemory, SemanticAttention, abstract_memory, frozen_memory, memory_num_tokens

D = 16
CLIPS = (1, 25, 26, 60, 400)  # one frame (an image), below / at / above the 25 temporal slots, past the buffer


def released_config(mode):
    # released memory sizes (spatial 1x8x8, temporal 25x4x4, abstract 25x1, retrieved 3, buffer 300), a narrow D
    return VStreamConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=64, mm_hidden_size=D, memory_mode=mode)


def clips(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 256, D, generator=generator) for n in lengths]


def trained_parts(seed=1):
    torch.manual_seed(seed)
    attention = SemanticAttention(D, 32)
    projector = nn.Sequential(nn.Linear(D, 24), nn.GELU(), nn.Linear(24, 24))
    return attention, projector


def reference(config, attention, features, seed=0):
    return [STARMemory(config, attention_model=attention, seed=seed).update(x).read() for x in features]


@pytest.mark.parametrize("mode", ["paper", "upstream"])
def test_split_tokens_equal_whole_clip_update(mode):
    config = released_config(mode)
    attention, _ = trained_parts()
    features = clips(CLIPS)
    with torch.no_grad():
        expected = reference(config, attention, features, seed=3)
        got = abstract_memory([frozen_memory(x, config, seed=3) for x in features], attention, config)
    for n, want, have in zip(CLIPS, expected, got):
        assert have.shape == want.shape == (memory_num_tokens(n, config), D)
        torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-6, msg=f"{mode}, {n} frames")
    assert [len(t) for t in got][-1] == 681
    assert len(got[0]) == (81 if mode == "paper" else 64)  # an image: a one-frame clip


@pytest.mark.parametrize("mode", ["paper", "upstream"])
def test_each_sample_alone_equals_the_batch(mode):
    # padding and masking in the batched attention leave every sample as it is on its own
    config = released_config(mode)
    attention, _ = trained_parts()
    frozen = [frozen_memory(x, config) for x in clips(CLIPS, seed=5)]
    with torch.no_grad():
        batch = abstract_memory(frozen, attention, config)
        alone = [abstract_memory([f], attention, config)[0] for f in frozen]
    for a, b in zip(batch, alone):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["paper", "upstream"])
def test_split_gradients_equal_whole_clip_update(mode):
    # gradients of the Semantic Attention and of the projector through the spliced memory tokens
    config = released_config(mode)
    features = clips(CLIPS, seed=7)
    readout = torch.randn(sum(memory_num_tokens(n, config) for n in CLIPS), 24,
                          generator=torch.Generator().manual_seed(8))

    def grads(build):
        attention, projector = trained_parts()
        tokens = build(attention)
        loss = (projector(torch.cat(tokens)) * readout).sum()
        loss.backward()
        named = dict(attention.named_parameters(prefix="attention")) | dict(projector.named_parameters(prefix="proj"))
        return {k: p.grad for k, p in named.items() if p.grad is not None}

    want = grads(lambda attention: reference(config, attention, features))
    have = grads(lambda attention: abstract_memory([frozen_memory(x, config) for x in features], attention, config))
    assert set(have) == set(want) >= {"attention.q_proj.weight", "attention.k_proj.bias", "proj.0.weight"}
    for name in want:
        torch.testing.assert_close(have[name], want[name], rtol=1e-4, atol=1e-5, msg=name)
    assert want["attention.q_proj.weight"].abs().sum() > 0


def test_frozen_part_needs_no_weights_and_no_grad():
    config = released_config("paper")
    frozen = frozen_memory(clips([60])[0].requires_grad_(), config)
    assert all(not t.requires_grad for t in frozen.values())
    assert frozen["tokens"].shape == (681 - 25, D)  # temporal 400 + retrieved 192 + spatial 64
    assert frozen["abstract"].shape == (25, 1, D) and frozen["abstract_inputs"].shape == (35, 1, D)
    short = frozen_memory(clips([1])[0], released_config("upstream"))  # upstream: one frame is spatial only
    assert short["abstract"].shape == (0, 1, D) and short["tokens"].shape == (64, D)



def test_frozen_part_checks_its_timestamps():
    """Timestamps given as a tensor are checked against the frames like any others."""
    with pytest.raises(ValueError, match="60 frames but 59 timestamps"):
        frozen_memory(clips([60])[0], released_config("paper"), timestamps=torch.arange(59.0))
