"""The fast greedy decoder (runtime/decoder.py) and the fused decode step against `generate`."""

import pytest
import torch

from flash_vstream.constants import IMAGE_TOKEN_INDEX
from flash_vstream.demo.tiny import tiny_vstream_model
from flash_vstream.runtime.decoder import GreedyDecoder, greedy_generate
from flash_vstream.runtime.fused_decode import fuse_projections
from support.decoding import fresh_model as _fresh_model, reference as _reference, step_logits as _step_logits


@pytest.fixture(scope="module")
def tiny_model():
    return tiny_vstream_model(seed=0)


@pytest.mark.parametrize("with_memory", [True, False])
def test_fast_decoder_equals_generate(tiny_model, with_memory):
    torch.manual_seed(1)
    ids = torch.tensor([1, 45, 9, 120, IMAGE_TOKEN_INDEX, 17, 33, 4, 250] if with_memory else [1, 45, 9, 120, 17, 33])
    memory = torch.randn(681, 32) if with_memory else None
    decoder = GreedyDecoder(tiny_model, max_cache_len=800)
    assert decoder.mode == "eager"

    forced = _reference(tiny_model, ids, memory, 30, None)
    assert forced.shape == (1, 30)
    assert torch.equal(decoder.generate(ids, memory, max_new_tokens=30), forced)

    # an EOS that the greedy answer reaches at step >= 3 must end both answers at the same token
    tokens = forced[0].tolist()
    stop = next(i for i in range(3, 30) if tokens[i] not in tokens[:i])
    eos = tokens[stop]
    reference = _reference(tiny_model, ids, memory, 30, eos)
    assert reference.shape[1] == stop + 1
    assert torch.equal(decoder.generate(ids, memory, max_new_tokens=30, eos_token_id=eos), reference)


def test_fast_decoder_serves_several_questions(tiny_model):
    """One decoder, several prompts of different lengths and memories: the static cache is reset each time."""
    torch.manual_seed(2)
    decoder = GreedyDecoder(tiny_model, max_cache_len=1024)
    prompts = [(torch.tensor([1, 7, IMAGE_TOKEN_INDEX, 8, 9]), torch.randn(681, 32)),
               (torch.tensor([1, IMAGE_TOKEN_INDEX, 4]), torch.randn(81, 32)),
               (torch.tensor([1, 7, IMAGE_TOKEN_INDEX, 8, 9, 10, 11]), torch.randn(150, 32))]
    for ids, memory in prompts:
        expected = _reference(tiny_model, ids, memory, 8, None)
        assert torch.equal(decoder.generate(ids, memory, max_new_tokens=8), expected)
        first = decoder.prefill(ids, memory)
        assert first.item() == expected[0, 0].item()
    ids, memory = prompts[1]
    assert torch.equal(greedy_generate(tiny_model, ids, memory, max_new_tokens=5),
                       _reference(tiny_model, ids, memory, 5, None))
    with pytest.raises(ValueError):
        decoder.generate(prompts[0][0], prompts[0][1], max_new_tokens=400)  # 685 + 400 > 1024


@pytest.mark.parametrize("pad_suffix", [False, True])
def test_cached_prefix_answers_like_a_full_prefill(tiny_model, pad_suffix):
    """The system text + memory kept in the cache: questions run only their own tokens (padded to a bucket
    from static buffers, as the CUDA graph runs them, or as they are), give the tokens `generate` gives,
    and leave the prefix intact for the next question; a new memory is never answered from the old prefix."""
    torch.manual_seed(4)
    decoder = GreedyDecoder(tiny_model, max_cache_len=1024, pad_suffix=pad_suffix)
    prefix = torch.tensor([1, 45, 9, IMAGE_TOKEN_INDEX])
    memory = torch.randn(681, 32)
    assert decoder.cache_prefix(prefix, memory) == 3 + 681
    questions = [torch.tensor([17, 33, 4, 250]), torch.tensor([88, 2, 61]), torch.tensor([17, 33, 4, 250]),
                 torch.arange(40, 80)]  # 40 tokens: a second bucket
    for question in questions:
        ids = torch.cat([prefix, question])
        assert decoder.prefix_matches(ids, memory)
        expected = _reference(tiny_model, ids, memory, 12, None)
        assert torch.equal(decoder.generate(ids, memory, max_new_tokens=12), expected)
    assert decoder.prefix_matches(torch.cat([prefix, questions[0]]), memory)  # answers did not clobber it
    assert sorted(decoder._suffix) == ([32, 64] if pad_suffix else [])

    newer = memory.clone()  # same values, another snapshot: identity decides, never a stale cache
    ids = torch.cat([prefix, questions[1]])
    assert not decoder.prefix_matches(ids, newer)
    other = torch.randn(681, 32)
    assert torch.equal(decoder.generate(ids, other, max_new_tokens=6), _reference(tiny_model, ids, other, 6, None))
    assert not decoder.prefix_matches(ids, memory)  # the full prefill overwrote the prefix's slots
    assert not decoder.prefix_matches(torch.tensor([1, 46, 9, IMAGE_TOKEN_INDEX, 5]), other)

    with pytest.raises(ValueError, match="<image>"):
        decoder.cache_prefix(torch.tensor([1, IMAGE_TOKEN_INDEX, 5]), memory)  # must end at the placeholder
    decoder.cache_prefix(prefix, memory)
    with pytest.raises(ValueError, match="no <image>"):
        decoder.prefill(torch.cat([prefix, torch.tensor([IMAGE_TOKEN_INDEX])]), memory)


def test_compiled_decode_step_traces_and_matches(tiny_model):
    """The step the GPU run compiles traces through transformers' modules and the static cache (dynamo
    with the eager backend: the trace alone, quick on CPU) and still gives `generate`'s tokens."""
    torch.manual_seed(3)
    ids, memory = torch.tensor([1, 45, IMAGE_TOKEN_INDEX, 17, 33]), torch.randn(681, 32)
    decoder = GreedyDecoder(tiny_model, max_cache_len=768, compile_step=True, compile_options={"backend": "eager"})
    decoder.setup()
    assert decoder.mode == "compiled_eager", decoder.errors
    assert torch.equal(decoder.generate(ids, memory, max_new_tokens=10), _reference(tiny_model, ids, memory, 10, None))


@pytest.mark.parametrize("kv_heads", [4, 2])  # plain attention, and grouped-query attention
def test_fused_decode_step_equals_generate(kv_heads):
    """The fused-weight step (what the GPU graph captures) gives `generate`'s tokens, compiled (dynamo
    trace, eager backend) or not, and fusing changes neither the model's values nor its parameter count."""
    model = _fresh_model(4, num_key_value_heads=kv_heads)
    assert model.get_model().layers[0].self_attn.k_proj.out_features == 64 // 4 * kv_heads
    ids, memory = torch.tensor([1, 45, IMAGE_TOKEN_INDEX, 17, 33]), torch.randn(681, 32)
    reference = _reference(model, ids, memory, 12, None)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fuse_projections(model)  # a step of its own (FastPath.fuse_weights()), before any fused decoder
    for compiled in (False, True):
        decoder = GreedyDecoder(model, max_cache_len=768, fused_step=True, compile_step=compiled,
                                compile_options={"backend": "eager"})
        decoder.setup()
        assert decoder.mode == ("fused_compiled_eager" if compiled else "fused_eager"), decoder.errors
        assert torch.equal(decoder.generate(ids, memory, max_new_tokens=12), reference)
    # the step's logits themselves, against the model's forward over the same prefilled cache
    plain, fused = (GreedyDecoder(model, max_cache_len=768, fused_step=f) for f in (False, True))
    logits = _step_logits((plain, fused), ids, memory, 3)
    assert fused.mode == "fused_eager" and plain.mode == "eager"
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)
    attn = model.get_model().layers[1].self_attn
    assert attn.k_proj.weight.data_ptr() == attn.fused_qkv_weight[attn.q_proj.out_features].data_ptr()
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in state.items()}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert torch.equal(_reference(model, ids, memory, 12, None), reference)  # the model's own forward too


@pytest.mark.parametrize("fused", [False, True])
def test_decoder_is_freed_without_the_collector(fused):
    """No reference cycle through the decoder: after `gc.freeze()` (the realtime CLI's, after warm-up) a cycle would
    never be collected, and a dropped decoder would keep its KV cache for good."""
    import gc
    import weakref

    model = _fresh_model(8)
    if fused:
        fuse_projections(model)
    decoder = GreedyDecoder(model, max_cache_len=256, fused_step=fused, compile_step=fused,
                            compile_options={"backend": "eager"})
    decoder.setup()
    decoder.generate(torch.tensor([1, 45, 17, 33]), max_new_tokens=3)
    assert decoder.mode == ("fused_compiled_eager" if fused else "eager"), decoder.errors
    ref = weakref.ref(decoder)
    gc.disable()
    try:
        del decoder
        assert ref() is None
    finally:
        gc.enable()


def test_fusing_is_idempotent_and_follows_reloaded_weights():
    model = _fresh_model(5)
    first = fuse_projections(model)
    again = fuse_projections(model)
    assert all(a[0] is b[0] and a[1] is b[1] for a, b in zip(first, again))  # nothing copied twice
    mlp = model.get_model().layers[0].mlp
    mlp.up_proj.weight = torch.nn.Parameter(torch.randn_like(mlp.up_proj.weight))  # e.g. a reload
    third = fuse_projections(model)
    assert third[0][1] is not first[0][1] and torch.equal(third[0][1][mlp.gate_proj.out_features:],
                                                          mlp.up_proj.weight)
    assert third[1][1] is first[1][1]


def test_fused_step_refuses_a_layer_it_does_not_model():
    from flash_vstream.runtime.fused_decode import FusedDecodeStep

    biased = _fresh_model(6, attention_bias=True)
    with pytest.raises(NotImplementedError, match="biases"):
        FusedDecodeStep(biased)
    decoder = GreedyDecoder(biased, max_cache_len=768, fused_step=True)
    decoder.setup()  # off CUDA only the first choice is tried: its failure is recorded, the model's step runs
    assert decoder.mode == "eager" and "biases" in decoder.errors["fused"]
    ids = torch.tensor([1, 45, 17, 33])
    assert torch.equal(decoder.generate(ids, max_new_tokens=5), _reference(biased, ids, None, 5, None))


def test_suffix_warm_up_prepares_sizes_and_leaves_no_prefix(tiny_model):
    torch.manual_seed(6)
    decoder = GreedyDecoder(tiny_model, max_cache_len=1024, pad_suffix=True)
    prefix, memory = torch.tensor([1, 45, 9, IMAGE_TOKEN_INDEX]), torch.randn(681, 32)
    decoder.warm_up_suffixes(prefix, 681, 32)
    assert sorted(decoder._suffix) == [32, 64]
    ids = torch.cat([prefix, torch.tensor([17, 33, 4])])
    assert not decoder.prefix_matches(ids, memory)  # the zeros prefix is gone
    decoder.cache_prefix(prefix, memory)
    assert torch.equal(decoder.generate(ids, memory, max_new_tokens=6), _reference(tiny_model, ids, memory, 6, None))


def test_graphed_steps_never_read_the_device_from_the_host(tiny_model, monkeypatch):
    """What the CUDA graphs capture (the decode step, a question over a cached prefix) must not read a
    tensor on the host: that is a sync, which aborts a capture. Checked on the CPU by making every host
    read of a tensor raise while those functions run."""
    torch.manual_seed(5)
    decoder = GreedyDecoder(tiny_model, max_cache_len=1024, pad_suffix=True)
    prefix, memory = torch.tensor([1, 45, 9, IMAGE_TOKEN_INDEX]), torch.randn(681, 32)
    decoder.cache_prefix(prefix, memory)
    with torch.inference_mode():
        decoder._run_suffix(torch.tensor([17, 33, 4]), 3 + 681)  # buffers exist (set-up reads are allowed)

    def no_host_read(*args, **kwargs):
        raise AssertionError("host read of a tensor inside a captured function")

    with monkeypatch.context() as patch:
        for name in ("__bool__", "item", "tolist", "__int__", "__float__"):
            patch.setattr(torch.Tensor, name, no_host_read)
        with torch.inference_mode():
            decoder._suffix_forward(32)
            decoder._step()
    with pytest.raises(AssertionError, match="host read"):  # the check itself bites
        with monkeypatch.context() as patch, torch.inference_mode():
            patch.setattr(torch.Tensor, "__bool__", no_host_read)
            tiny_model(input_ids=torch.tensor([[1, 5, 7]]))  # several ids: forward looks for <image> (a read)
