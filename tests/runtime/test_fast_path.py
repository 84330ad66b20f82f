"""`FastPathOptions` (validated, resolved once) and `FastPath` (fusing announced, strict raises, owned state)."""

import logging

import pytest
import torch

from flash_vstream.constants import IMAGE_TOKEN_INDEX
from flash_vstream.runtime import cuda_utils, decoder, fast_path, fused_decode, fusing, options, triton_kernels, vision
from flash_vstream.runtime.decoder import GreedyDecoder
from flash_vstream.runtime.fast_path import FastPath
from flash_vstream.runtime.options import FastPathError, FastPathOptions
from flash_vstream.runtime.vision import FastVisionEncoder
from support.decoding import fresh_model, reference

ON = dict(enabled=True)  # the fast path's own code on the CPU: static-cache decoder, truncated CLIP encoder
PROMPT, MEMORY_TOKENS = torch.tensor([1, 45, IMAGE_TOKEN_INDEX, 17, 33]), 681


@pytest.mark.parametrize("field,value", [("cuda_graph", "yes"), ("triton", 1), ("enabled", None),
                                         ("compile_vision", "on"), ("strict", "auto"), ("compile_backend", "tvm"),
                                         ("decode_compile_mode", "fastest"), ("warmup_steps", 0),
                                         ("check_every", True)])
def test_options_reject_unknown_values(field, value):
    with pytest.raises(ValueError, match=field):
        FastPathOptions(**{field: value})
    with pytest.raises(ValueError, match="--fast"):
        FastPathOptions.from_cli("maybe")


def test_resolve_makes_every_switch_concrete():
    auto = FastPathOptions()
    assert not auto.resolved
    cpu = auto.resolve("cpu")  # auto: the fast path is a CUDA thing
    assert cpu.resolved and cpu == FastPathOptions.off()
    on_cpu = FastPathOptions(**ON).resolve(torch.device("cpu"))
    assert on_cpu.enabled and not any((on_cpu.cuda_graph, on_cpu.compile_decode, on_cpu.fused_weights,
                                       on_cpu.triton, on_cpu.compile_vision, on_cpu.pad_suffix))
    assert on_cpu.resolve("cpu") == on_cpu  # resolving twice changes nothing
    gpu = auto.resolve("cuda")  # resolving reads no device state: checkable without a GPU
    assert gpu.enabled and gpu.cuda_graph and gpu.compile_decode and gpu.fused_weights and gpu.compile_vision
    assert gpu.pad_suffix and gpu.triton == (triton_kernels.triton is not None)
    assert not FastPathOptions(compile_decode=False).resolve("cuda").compile_decode  # explicit choices stay
    assert FastPathOptions.from_cli("on", compile_decode=False).resolve("cuda").compile_decode is False
    assert FastPathOptions.from_cli("off").resolve("cuda") == FastPathOptions.off()
    assert "cuda_graph=on" in gpu.summary() and "strict=off" in gpu.summary()
    with pytest.raises(ValueError, match="needs a CUDA device"):
        FastPathOptions(cuda_graph=True, **ON).resolve("cpu")


def test_resolve_rejects_triton_where_it_cannot_run(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="Triton does not run on cpu"):
        FastPathOptions(triton=True, **ON).resolve("cpu")
    monkeypatch.setattr(triton_kernels, "triton", None)
    assert FastPathOptions().resolve("cuda").triton is False  # auto: not installed -> off
    with pytest.raises(ValueError, match="not installed"):
        FastPathOptions(triton=True).resolve("cuda")


def _params(model):
    return {name: p.data_ptr() for name, p in model.named_parameters()}


def test_fusing_is_announced_not_a_side_effect(caplog):
    """Building the path, its decoder and describing it change no parameter; `fuse_weights()` does,
    logged, with the same values; the fused decode step then runs and answers like `generate`."""
    model = fresh_model(31)
    memory = torch.randn(MEMORY_TOKENS, 32)
    expected = reference(model, PROMPT, memory, 8, None)
    before, state = _params(model), {k: v.clone() for k, v in model.state_dict().items()}
    path = FastPath(model, FastPathOptions(fused_weights=True, **ON))
    assert path.describe()["weights_fused"] is False
    with pytest.raises(RuntimeError, match="fuse_weights"):
        path.decoder(768)  # a fused step before fusing: refused, not fused behind the caller's back
    plain = GreedyDecoder(model, max_cache_len=768, fused_step=True).setup()  # the step alone never fuses
    assert plain.mode == "eager" and "not fused" in plain.errors["fused"]
    assert _params(model) == before
    with caplog.at_level(logging.INFO, logger="flash_vstream.runtime.fast_path"):
        assert path.fuse_weights() is path
    assert any("fused the q/k/v and gate/up weights of 2 LLaMA layers" in r.getMessage() for r in caplog.records)
    after = _params(model)
    attn = model.get_model().layers[0].self_attn
    assert after["model.layers.0.self_attn.k_proj.weight"] != before["model.layers.0.self_attn.k_proj.weight"]
    assert attn.k_proj.weight.data_ptr() == attn.fused_qkv_weight[attn.q_proj.out_features].data_ptr()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    path.fuse_weights()  # idempotent: nothing re-fused
    assert _params(model) == after
    dec = path.decoder(768).setup()
    assert dec.mode == "fused_eager", dec.errors
    assert torch.equal(dec.generate(PROMPT, memory, max_new_tokens=8), expected)
    described = path.describe()
    assert described["decode"] == "fused_eager" and described["weights_fused"] and described["fallbacks"] == {}
    assert described["options"]["fused_weights"] is True and described["options"]["cuda_graph"] is False


def test_strict_names_what_failed_where_non_strict_falls_back(caplog):
    """A model the fused step does not model (projection biases): strict raises `FastPathError` naming
    the part and the reason; non-strict records it once, logs it once and answers with the model's step."""
    biased = fresh_model(32, attention_bias=True)
    strict = FastPath(biased, FastPathOptions(fused_weights=True, strict=True, **ON))
    with pytest.raises(FastPathError, match="fused_weights failed: .*biases") as raised:
        strict.fuse_weights()
    assert raised.value.part == "fused_weights"

    lenient = FastPath(biased, FastPathOptions(fused_weights=True, **ON))
    with caplog.at_level(logging.WARNING, logger="flash_vstream.runtime.fast_path"):
        lenient.fuse_weights()
        lenient.fallbacks.record("fused_weights", lenient.fallbacks.reasons["fused_weights"])  # the same again
    assert "biases" in lenient.describe()["fallbacks"]["fused_weights"]
    assert sum("fused_weights fell back" in r.getMessage() for r in caplog.records) == 1
    dec = lenient.decoder(256).setup()
    assert dec.mode == "eager" and not dec.fused_step
    ids = torch.tensor([1, 45, 17, 33])
    assert torch.equal(dec.generate(ids, max_new_tokens=5), reference(biased, ids, None, 5, None))

    # the decoder itself: the step it was asked for fails (weights not fused) -> raised, or the model's step
    unfused = fresh_model(33)
    with pytest.raises(FastPathError, match="decode step 'fused' .*not fused"):
        GreedyDecoder(unfused, max_cache_len=256, fused_step=True, strict=True).setup()
    told = []
    lax = GreedyDecoder(unfused, max_cache_len=256, fused_step=True, on_fallback=lambda *a: told.append(a)).setup()
    assert lax.mode == "eager" and told and told[0][0] == "decode step" and "not fused" in told[0][1]


def test_strict_graph_capture_raises_off_cuda(tiny_clip_dir):
    """The one-frame CLIP graph cannot be captured off CUDA: strict says so, non-strict keeps eager."""
    from transformers import CLIPVisionModel

    clip = CLIPVisionModel.from_pretrained(tiny_clip_dir).eval()
    with pytest.raises(FastPathError, match="vision cuda_graph"):
        FastVisionEncoder(clip, strict=True).capture(32)
    lenient = FastVisionEncoder(clip)
    assert lenient.capture(32) is not None and not lenient.graphed


@pytest.fixture
def tower(tiny_clip_dir):
    from flash_vstream.model.multimodal_encoder.clip_encoder import CLIPVisionTower

    return CLIPVisionTower(tiny_clip_dir).eval()


def test_vision_through_the_fast_path(tower):
    """The batched path compiled (dynamo trace, eager backend) only after the announced fusing; the
    features are the tower's, one frame bit for bit."""
    path = FastPath(tower=tower, options=FastPathOptions(compile_vision=True, compile_backend="eager", **ON))
    core = getattr(tower.vision_tower, "vision_model", tower.vision_tower)  # transformers 5: the model itself
    q_before = core.encoder.layers[0].self_attn.q_proj.weight.data_ptr()
    with pytest.raises(RuntimeError, match="fuse_weights"):
        path.vision()
    assert core.encoder.layers[0].self_attn.q_proj.weight.data_ptr() == q_before
    encoder = path.fuse_weights().vision()
    assert encoder is path.vision() and encoder.compiled and encoder.fused_weights
    assert path.describe()["vision"] == {"one_frame": "eager", "batched": "compiled"}
    pixels = torch.randn(3, 3, 32, 32)
    stock = tower(pixels)
    torch.testing.assert_close(encoder(pixels), stock, rtol=1e-5, atol=1e-5)
    assert torch.equal(encoder(pixels[:1]), tower(pixels[:1]))
    with pytest.raises(RuntimeError, match="no language model"):
        path.decoder(256)
    with pytest.raises(RuntimeError, match="fast path is off"):
        FastPath(tower=tower, options=FastPathOptions.off()).vision()


def test_two_fast_paths_share_nothing(tower):
    """Each path owns its decoder, encoder, warm-up stream and fallback record; the runtime modules hold
    no module-level mutable state (no caches behind the objects' backs)."""
    model = fresh_model(34)
    a, b = (FastPath(model, FastPathOptions(**ON), tower=tower) for _ in range(2))
    assert a.decoder(256) is a.decoder(256) and a.decoder(256) is not b.decoder(256)
    assert a.decoder(1024).max_cache_len == 1024 and b.decoder(256).max_cache_len == 256  # a larger one replaces
    assert a.vision() is a.vision() and a.vision() is not b.vision()
    a.fallbacks.record("question graph", "a reason")
    assert b.describe()["fallbacks"] == {} and a.describe()["fallbacks"] == {"question graph": "a reason"}
    assert a.fallbacks is not b.fallbacks and a._streams == {} and b._streams == {}  # no graphs: no stream
    for module in (cuda_utils, decoder, fast_path, fused_decode, fusing, options, triton_kernels, vision):
        mutable = [name for name, value in vars(module).items()
                   if not name.startswith("__") and isinstance(value, (dict, list, set, torch.cuda.Stream))]
        assert mutable == [], (module.__name__, mutable)
    with pytest.raises(ValueError, match="new_decoder changes only"):
        a.new_decoder(256, strict=True)


def test_new_decoder_variants_are_validated_and_unowned():
    model = fresh_model(35)
    path = FastPath(model, FastPathOptions(**ON))
    with pytest.raises(ValueError, match="needs a CUDA device"):
        path.new_decoder(256, cuda_graph=True)
    with pytest.raises(RuntimeError, match="fuse_weights"):
        path.new_decoder(256, fused_weights=True)  # this path's options fuse nothing
    variant = path.new_decoder(256, compile_decode=True)
    assert variant is not path.decoder(256) and variant.compile_step and path.decoder(256).compile_step is False
    assert isinstance(FastPath(model, FastPathOptions.off()).describe(), dict)
    with pytest.raises(RuntimeError, match="fast path is off"):
        FastPath(model, FastPathOptions.off()).decoder(256)


def test_model_does_not_import_the_runtime():
    """model <- runtime <- apps: nothing under flash_vstream/model/ imports the runtime."""
    import pathlib

    from support import REPO

    offenders = [str(p) for p in pathlib.Path(REPO, "flash_vstream", "model").rglob("*.py")
                 if "runtime" in "".join(line for line in p.read_text().splitlines() if "import" in line)]
    assert offenders == []


def test_stream_session_takes_a_fast_path(tiny_model_dir):
    """The realtime session builds its encoder and decoder through the path it is given (options or a
    `FastPath`), and refuses the path given twice."""
    from flash_vstream.model.builder import load_pretrained_model
    from flash_vstream.serve.session import StreamSession

    tokenizer, model, image_processor, context_len = load_pretrained_model(tiny_model_dir, device="cpu")
    path = FastPath(model, FastPathOptions.from_cli("on"))
    session = StreamSession(model, tokenizer, image_processor, max_new_tokens=4, context_len=context_len,
                            fast_path=path)
    assert session.fast and session.fast_path is path
    session.add_features(torch.randn(2, 256, model.config.mm_hidden_size))
    answer = session.ask("what is in the video?")
    assert answer.new_tokens >= 1 and session._decoder is path.decoder(1)  # the path's own decoder
    assert path.describe()["decode"] == "eager"
    stock = StreamSession(model, tokenizer, image_processor, max_new_tokens=4, context_len=context_len,
                          fast_path=FastPathOptions.off())
    assert not stock.fast and stock.fast_path is not path
    with pytest.raises(ValueError, match="not both"):
        StreamSession(model, tokenizer, image_processor, fast=True, fast_path=path)
