"""The benchmark on the tiny preset (CPU, seconds), and the fast greedy decoder against `generate`."""

import json
import os
import subprocess

import pytest
import torch

from flash_vstream import bench
from flash_vstream.constants import IMAGE_TOKEN_INDEX
from flash_vstream.demo.tiny import tiny_vstream_config
from flash_vstream.model import VStreamLlamaForCausalLM
from flash_vstream.model.fast_generate import GreedyDecoder, greedy_generate


def test_bench_tiny_cpu_end_to_end(tmp_path):
    out = tmp_path / "bench"
    code = bench.main(["--preset", "tiny", "--device", "cpu", "--output-dir", str(out), "--positions", "5,20",
                       "--window", "2", "--answer-tokens", "4", "--strict"])
    assert code == 0
    report = json.loads((out / "bench.json").read_text())
    assert {"meta", "targets", "sections", "summary"} <= set(report)
    for key in ("device", "torch", "transformers", "preset", "dtype", "duration_s"):
        assert key in report["meta"]
    assert report["targets"]["ttft_ms"] == 25.0 and report["targets"]["peak_mem_gb"] == 15.0
    sections = report["sections"]
    assert set(bench.SECTIONS) | {"build"} == set(sections)
    assert all(s["status"] == "ok" for s in sections.values()), {k: s.get("error") for k, s in sections.items()}

    clip = sections["clip_one_frame"]
    assert clip["stock_ms"]["p50"] > 0 and clip["optimised_ms"]["p50"] > 0
    assert clip["truncated_vs_stock_rel_err"] < 1e-6  # the fast encoder returns what CLIPVisionTower returns

    decode = sections["decode"]
    assert decode["memory_tokens"] == 681
    assert decode["stock"]["new_tokens"] == decode["optimised"]["new_tokens"] == 4  # EOS ignored: forced length
    assert decode["tokens_equal_stock"]

    streaming = sections["streaming"]
    assert [p["position_frames"] for p in streaming["positions"]] == [0, 5, 20]
    for p in streaming["positions"]:
        assert p["frames_seen"] >= p["position_frames"]
        for key in ("ingest_ms", "ttft_ms", "answer_ms"):
            assert p[key]["stock"]["n"] >= 1 and p[key]["optimised"]["p99"] > 0
        assert p["update_ms"]["n"] == 2
        assert p["ttft_ms"]["optimised_uncached"]["n"] >= 1 and p["prefix_refresh_ms"]["p50"] > 0
        assert p["cached_prefix_answer_equal_uncached"]  # fp32 on the CPU: exactly the same answer
        assert set(p["peak_mem_gb"]) == {"stock", "optimised"}  # None on CPU
    assert streaming["positions"][-1]["memory_tokens"] == 681

    upstream = sections["baseline_upstream_buffer"]["rows"]
    assert [r["frames"] for r in upstream] == [5, 20]
    assert upstream[1]["buffer_bytes"] == 20 * 64 * 32 * 2 and upstream[1]["copy_ms"] > 0
    full = sections["baseline_full_context"]
    assert [r["frames"] for r in full["rows"]] == [5, 20] and all(r["status"] == "ok" for r in full["rows"])
    assert full["rows"][1]["tokens"] == 20 * 64
    extraction = sections["extraction"]["rows"]
    assert [r["batch"] for r in extraction] == [2, 4] and all(r["optimised_fps"] > 0 for r in extraction)

    metrics = [r["metric"] for r in report["summary"]]
    assert "decode tokens/s, batch 1" in metrics and any("ingest p99" in m for m in metrics)
    png = out / "bench.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_benchmark_script_runs_selected_sections(tmp_path):
    """scripts/benchmark.sh passes its flags through; skipped sections are recorded as such."""
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "benchmark.sh")
    skip = "decode,streaming,baseline_full_context,extraction"
    result = subprocess.run(["bash", script, str(tmp_path), "--preset", "tiny", "--device", "cpu", "--positions", "3",
                             "--strict", "--skip", skip], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "one-frame CLIP ms" in result.stdout
    report = json.loads((tmp_path / "bench.json").read_text())
    statuses = {k: v["status"] for k, v in report["sections"].items()}
    assert statuses == {"build": "ok", "clip_one_frame": "ok", "baseline_upstream_buffer": "ok",
                        **{k: "skipped" for k in skip.split(",")}}
    assert (tmp_path / "bench.png").exists()
    with pytest.raises(SystemExit):
        bench.parse_args(["--output-dir", str(tmp_path), "--skip", "nonsense"])


@pytest.fixture(scope="module")
def tiny_model():
    config = tiny_vstream_config(vocab_size=300, clip_dir=None, clip_hidden=32)
    torch.manual_seed(0)
    model = VStreamLlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    return model.eval()


def _reference(model, ids, memory, max_new_tokens, eos_token_id):
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


def _fresh_model(seed=0, **overrides):
    """A tiny model of its own (fusing rewrites the weights' storage: keep the shared fixture untouched)."""
    torch.manual_seed(seed)
    config = tiny_vstream_config(vocab_size=300, clip_dir=None, clip_hidden=32)
    for key, value in overrides.items():
        setattr(config, key, value)
    return VStreamLlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval()


def _step_logits(decoders, ids, memory, steps):
    """Each decoder's next-token logits from its own step function, after prefilling `ids` + `memory`
    and decoding `steps` tokens: the steps compared over the same cache contents."""
    logits = []
    with torch.inference_mode():
        for decoder in decoders:
            decoder.prefill(ids, memory)
            decoder.decode(steps)
            logits.append(decoder._step_fn(decoder._ids, decoder._pos, decoder._mask(decoder._pos)))
    return logits


@pytest.mark.parametrize("kv_heads", [4, 2])  # plain attention, and grouped-query attention
def test_fused_decode_step_equals_generate(kv_heads):
    """The fused-weight step (what the GPU graph captures) gives `generate`'s tokens, compiled (dynamo
    trace, eager backend) or not, and fusing changes neither the model's values nor its parameter count."""
    model = _fresh_model(4, num_key_value_heads=kv_heads)
    assert model.get_model().layers[0].self_attn.k_proj.out_features == 64 // 4 * kv_heads
    ids, memory = torch.tensor([1, 45, IMAGE_TOKEN_INDEX, 17, 33]), torch.randn(681, 32)
    reference = _reference(model, ids, memory, 12, None)
    state = {k: v.clone() for k, v in model.state_dict().items()}
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
    """No reference cycle through the decoder: after `gc.freeze()` (the session's warm-up) a cycle would
    never be collected, and a dropped decoder would keep its KV cache for good."""
    import gc
    import weakref

    model = _fresh_model(8)
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
    from flash_vstream.model.fused_decode import fuse_projections

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
    from flash_vstream.model.fused_decode import FusedDecodeStep

    biased = _fresh_model(6, attention_bias=True)
    with pytest.raises(NotImplementedError, match="biases"):
        FusedDecodeStep(biased)
    decoder = GreedyDecoder(biased, max_cache_len=768, fused_step=True)
    decoder.setup()  # off CUDA only the first choice is tried: its failure is recorded, the model's step runs
    assert decoder.mode == "eager" and "biases" in decoder.errors["fused"]
    ids = torch.tensor([1, 45, 17, 33])
    assert torch.equal(decoder.generate(ids, max_new_tokens=5), _reference(biased, ids, None, 5, None))


def test_watchdog_ends_a_run_that_overstays(tmp_path):
    """--hard-limit-s ends the process with tracebacks (a hung CUDA call cannot hold the run past it)."""
    import subprocess
    import sys
    import time

    started = time.time()
    result = subprocess.run([sys.executable, "-m", "flash_vstream.bench", "--output-dir", str(tmp_path),
                             "--preset", "tiny", "--device", "cpu", "--hard-limit-s", "0.5"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "Timeout" in result.stderr and "Thread" in result.stderr
    assert time.time() - started < 100


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


def test_fast_vision_encoder_paths():
    """One frame and eager(): the tower's own modules, bit for bit. The batched path (fused q/k/v, patch
    embedding as a product; compiled on CUDA) computes the same features up to rounding, and fusing
    re-points the tower's weights instead of copying them."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from flash_vstream.model.multimodal_encoder.fast_encoder import FastVisionEncoder

    config = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                              image_size=28, patch_size=14, hidden_act="quick_gelu")
    torch.manual_seed(7)
    clip = CLIPVisionModel._from_config(config, attn_implementation="sdpa").eval()
    pixels = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        stock = clip(pixels, output_hidden_states=True).hidden_states[-2]  # (3, 1 + 4, 64)
        one = clip(pixels[:1], output_hidden_states=True).hidden_states[-2][:, 1:]  # CPU kernels round per batch size
    fast = FastVisionEncoder(clip, select_layer=-2, select_feature="patch")
    assert len(fast.layers) == 2
    assert torch.equal(fast.eager(pixels), stock[:, 1:]) and torch.equal(fast(pixels[:1]), one)
    fused = fast.fused(pixels)
    torch.testing.assert_close(fused, stock[:, 1:], rtol=1e-5, atol=1e-5)
    attn = fast.layers[1].self_attn
    assert attn.v_proj.weight.data_ptr() == attn.fused_qkv_weight[2 * 64].data_ptr()
    assert attn.k_proj.bias.data_ptr() == attn.fused_qkv_bias[64:].data_ptr()
    with torch.no_grad():  # the tower itself still computes the same
        assert torch.equal(clip(pixels, output_hidden_states=True).hidden_states[-2], stock)
    fast.compile(backend="eager")  # the trace alone (quick on CPU); the GPU compiles with Inductor
    assert fast.compiled and torch.equal(fast(pixels), fused)
    assert torch.equal(fast(pixels[:1]), one)  # one frame keeps the exact path
    keep_cls = FastVisionEncoder(clip, select_layer=1, select_feature="cls_patch")
    with torch.no_grad():
        torch.testing.assert_close(keep_cls.fused(pixels), clip(pixels, output_hidden_states=True).hidden_states[1],
                                   rtol=1e-5, atol=1e-5)
