"""The LMM: splice by mask, forward/generate with frames or features, checkpoints, LLaVA parity."""

import json
import os

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from flash_vstream.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from flash_vstream.conversation import conv_templates
from flash_vstream.demo.tiny import tiny_vstream_config
from flash_vstream.mm_utils import (expand_image_tokens, process_images, tokenizer_image_token,
                                    truncate_keeping_memory)
from flash_vstream.model import VStreamConfig, VStreamLlamaForCausalLM
from flash_vstream.model.builder import load_pretrained_model
from flash_vstream.model.memory import memory_num_tokens


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_pretrained_model(tiny_model_dir, device="cpu")


def _prompt_ids(tokenizer, question="what colour is the background now?"):
    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message(conv.roles[0], "<image>\n" + question)
    conv.append_message(conv.roles[1], None)
    return tokenizer_image_token(conv.get_prompt(), tokenizer, return_tensors="pt")


def test_auto_classes_dispatch_on_model_type(tiny_model_dir):
    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert isinstance(config, VStreamConfig)
    assert config.memory_mode == "paper"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert isinstance(model, VStreamLlamaForCausalLM)


def test_config_rejects_unknown_values():
    for bad in ({"memory_mode": "fancy"}, {"compress_type": None}, {"video_sample_type": "center"},
                {"compress_size": 5}, {"compress_Turing_update_ratio": 1.5}):
        with pytest.raises(ValueError):
            VStreamConfig(**bad)


def test_splice_places_memory_at_placeholder_span(loaded):
    tokenizer, model, _, _ = loaded
    torch.manual_seed(0)
    mem = [torch.randn(5, model.config.mm_hidden_size), torch.randn(3, model.config.mm_hidden_size)]
    rows = [torch.tensor([1, 7, IMAGE_TOKEN_INDEX, 8, 9]), torch.tensor([1, IMAGE_TOKEN_INDEX, 4])]
    for side in ("right", "left"):
        expanded = [expand_image_tokens(r, len(m)) for r, m in zip(rows, mem)]
        width = max(len(r) for r in expanded)
        ids = torch.zeros(2, width, dtype=torch.long)
        for i, r in enumerate(expanded):
            if side == "right":
                ids[i, :len(r)] = r
            else:
                ids[i, width - len(r):] = r
        embeds = model.embed_with_memory(ids, mem)
        projector = model.get_model().mm_projector
        embed = model.get_model().embed_tokens
        for i, m in enumerate(mem):
            where = (ids[i] == IMAGE_TOKEN_INDEX).nonzero().flatten()
            assert len(where) == len(m)
            assert torch.equal(where, torch.arange(int(where[0]), int(where[0]) + len(m)))  # one contiguous span
            torch.testing.assert_close(embeds[i, where], projector(m))
            text = ids[i] != IMAGE_TOKEN_INDEX
            torch.testing.assert_close(embeds[i, text], embed(ids[i, text]))


def test_labels_are_ignored_on_memory_and_truncation_refuses_to_cut_it():
    ids = torch.tensor([1, 5, IMAGE_TOKEN_INDEX, 6, 7])
    labels = torch.tensor([IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 6, 7])
    ids2, labels2 = expand_image_tokens(ids, 4, labels)
    assert ids2.tolist() == [1, 5] + [IMAGE_TOKEN_INDEX] * 4 + [6, 7]
    assert labels2.tolist() == [IGNORE_INDEX] * 6 + [6, 7]
    cut_ids, cut_labels = truncate_keeping_memory(ids2, labels2, 7)
    assert cut_ids.tolist() == ids2[:7].tolist() and cut_labels.tolist() == labels2[:7].tolist()
    with pytest.raises(ValueError, match="memory tokens"):
        truncate_keeping_memory(ids2, labels2, 4, source="sample 3")


def test_mismatched_counts_raise(loaded):
    _, model, _, _ = loaded
    ids = torch.tensor([[1, IMAGE_TOKEN_INDEX, IMAGE_TOKEN_INDEX, 5]])
    with pytest.raises(ValueError, match="mismatch"):
        model.embed_with_memory(ids, [torch.randn(3, model.config.mm_hidden_size)])
    with pytest.raises(ValueError, match="mismatch"):
        model(input_ids=torch.tensor([[1, IMAGE_TOKEN_INDEX, 5]]),
              features=[torch.randn(4, 256, model.config.mm_hidden_size)])


def test_forward_with_images_equals_forward_with_tower_features(loaded, example_frames):
    tokenizer, model, processor, _ = loaded
    pixels = process_images(example_frames, processor, "pad")  # (T, 3, 32, 32)
    features = model.get_vision_tower()(pixels)  # (T, 256, D)
    assert features.shape == (len(example_frames), 256, model.config.mm_hidden_size)
    n = memory_num_tokens(len(example_frames), model.config)
    ids = expand_image_tokens(_prompt_ids(tokenizer), n)[None]
    with torch.no_grad():
        a = model(input_ids=ids, images=[pixels]).logits
        b = model(input_ids=ids, features=[features]).logits
    torch.testing.assert_close(a, b)


def test_generate_with_features_and_frames_batched(loaded, example_frames):
    tokenizer, model, processor, _ = loaded
    pixels = process_images(example_frames, processor, "pad")
    features = model.get_vision_tower()(pixels)
    a, b = _prompt_ids(tokenizer), _prompt_ids(tokenizer, "which came first?")
    width = max(len(a), len(b))
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    ids[0, :len(a)], mask[0, :len(a)] = a, 1
    ids[1, :len(b)], mask[1, :len(b)] = b, 1
    out_f = model.generate(ids, attention_mask=mask, features=[features, features[:3]], max_new_tokens=4,
                           do_sample=False)
    out_i = model.generate(ids, attention_mask=mask, images=[pixels, pixels[:3]], max_new_tokens=4,
                           do_sample=False)
    assert out_f.shape[0] == 2 and 1 <= out_f.shape[1] <= 4
    assert torch.equal(out_f, out_i)
    single = model.generate(a[None], features=[features], max_new_tokens=4, do_sample=False)
    assert torch.equal(single[0], out_f[0, :single.shape[1]])  # batching and padding change nothing


def test_save_load_round_trip_gives_identical_logits(loaded, tmp_path, example_frames):
    tokenizer, model, processor, _ = loaded
    features = model.get_vision_tower()(process_images(example_frames, processor, "pad"))
    ids = expand_image_tokens(_prompt_ids(tokenizer), memory_num_tokens(len(features), model.config))[None]
    model.save_pretrained(tmp_path / "copy")
    tokenizer.save_pretrained(tmp_path / "copy")
    saved = set()
    from safetensors import safe_open
    with safe_open(str(tmp_path / "copy" / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    assert not any(k.startswith("model.vision_tower.") for k in saved)
    assert {"model.mm_projector.0.weight", "model.mm_projector.2.weight",
            "model.attention_model.q_proj.weight", "model.attention_model.out_ln.bias"} <= saved
    _, again, _, _ = load_pretrained_model(str(tmp_path / "copy"), device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, features=[features]).logits,
                                   again(input_ids=ids, features=[features]).logits, rtol=0, atol=0)


def _released_config(clip_dir, vocab_size):
    """A config.json as the published code wrote it (legacy keys, no memory_mode)."""
    base = tiny_vstream_config(vocab_size, clip_dir).to_dict()
    base.pop("memory_mode")
    base.pop("video_retrieved_memory_length")
    base.pop("video_buffer_length")
    base.pop("compress_Turing_hidden_dim")
    base.update({
        "architectures": ["VStreamLlamaForCausalLM"], "model_type": "vstream",
        "mm_vision_tower": "openai/clip-vit-large-patch14", "mm_resampler_type": None,
        "freeze_mm_vision_resampler": False, "tune_mm_vision_resampler": False, "use_mm_proj": True,
        "tune_mm_mlp_adapter": False, "freeze_mm_mlp_adapter": False, "mm_projector_lr": None,
        "video_short_memory_length": 10, "video_max_frames": 26, "compress_type": "mean",
        "video_sample_type": "weighted_kmeans", "_name_or_path": "./checkpoints-pretrain/x/checkpoint-3000",
    })
    return base


def test_released_layout_loads_without_missing_or_unexpected_keys(loaded, tmp_path, tiny_clip_dir, monkeypatch):
    tokenizer, model, _, _ = loaded
    root = tmp_path / "Flash-VStream-7b"
    root.mkdir()
    state = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("model.vision_tower.")}
    keys = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    weight_map = {}
    for name, shard_keys in shards.items():
        torch.save({k: state[k] for k in shard_keys}, root / name)
        weight_map.update({k: name for k in shard_keys})
    (root / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (root / "config.json").write_text(json.dumps(_released_config(tiny_clip_dir, model.config.vocab_size)))
    tokenizer.save_pretrained(root)
    # the hub name maps to ckpt/clip-vit-large-patch14 under the working directory
    work = tmp_path / "work"
    (work / "ckpt").mkdir(parents=True)
    os.symlink(tiny_clip_dir, work / "ckpt" / "clip-vit-large-patch14")
    monkeypatch.chdir(work)
    released, info = VStreamLlamaForCausalLM.from_pretrained(str(root), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert released.config.memory_mode == "upstream"
    assert released.config.video_retrieved_memory_length == 3 and released.config.compress_Turing_hidden_dim == 32
    _, loaded_released, processor, _ = load_pretrained_model(str(root), device="cpu")
    assert processor is not None and loaded_released.get_vision_tower().is_loaded
    for k, v in state.items():
        assert torch.equal(loaded_released.state_dict()[k], v), k


def test_training_from_plain_llama_config_does_not_crash(tmp_path, tiny_clip_dir):
    """Upstream issue #6: a Vicuna/LLaMA config lacks every mm_* key."""
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2))
    llama.save_pretrained(tmp_path / "vicuna")
    config = VStreamConfig.from_pretrained(tmp_path / "vicuna")
    assert config.mm_hidden_size == 1024 and config.mm_projector_type == "mlp2x_gelu"
    config.mm_vision_tower, config.mm_hidden_size = tiny_clip_dir, 32
    model = VStreamLlamaForCausalLM.from_pretrained(tmp_path / "vicuna", config=config)
    model.get_model().load_vision_tower()
    torch.testing.assert_close(model.get_model().embed_tokens.weight, llama.model.embed_tokens.weight)
    out = model(input_ids=expand_image_tokens(torch.tensor([1, IMAGE_TOKEN_INDEX, 5]),
                                              memory_num_tokens(2, config))[None],
                images=[torch.rand(2, 3, 32, 32)])
    assert torch.isfinite(out.logits).all()


def test_spliced_forward_matches_transformers_llava(tiny_clip_dir, tiny_tokenizer_dir):
    """Memory reduced to one unpooled frame (upstream mode, P_spa=16): 256 patch tokens, as LLaVA."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlavaConfig, LlavaForConditionalGeneration

    config = tiny_vstream_config(300, tiny_clip_dir, memory_mode="upstream", compress_size=16)
    torch.manual_seed(1)
    ours = VStreamLlamaForCausalLM(config).eval()
    ours.get_model().load_vision_tower()
    clip_config = CLIPVisionConfig.from_pretrained(tiny_clip_dir)
    text_config = LlamaConfig(**{k: v for k, v in config.to_dict().items() if k in LlamaConfig().to_dict()})
    image_token = 299
    llava = LlavaForConditionalGeneration(LlavaConfig(
        vision_config=clip_config, text_config=text_config, image_token_id=image_token,
        projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
        multimodal_projector_bias=True)).eval()
    llava.model.vision_tower.load_state_dict(CLIPVisionModel.from_pretrained(tiny_clip_dir).state_dict())
    src = ours.state_dict()
    llava.model.language_model.load_state_dict(
        {k.removeprefix("model."): v for k, v in src.items()
         if k.startswith("model.") and not k.startswith(("model.mm_projector", "model.attention_model",
                                                          "model.vision_tower"))})
    llava.lm_head.load_state_dict(ours.lm_head.state_dict())
    proj = llava.model.multi_modal_projector
    proj.linear_1.load_state_dict(ours.get_model().mm_projector[0].state_dict())
    proj.linear_2.load_state_dict(ours.get_model().mm_projector[2].state_dict())

    pixels = torch.rand(1, 3, 32, 32)
    text = [1, 11, 12, 13]
    llava_ids = torch.tensor([text[:2] + [image_token] * 256 + text[2:]])
    our_ids = llava_ids.masked_fill(llava_ids == image_token, IMAGE_TOKEN_INDEX)
    assert memory_num_tokens(1, config) == 256
    with torch.no_grad():
        expected = llava(input_ids=llava_ids, pixel_values=pixels).logits
        got = ours(input_ids=our_ids, images=[pixels]).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_features_only_model_loads_without_the_vision_tower(loaded, tmp_path, example_frames):
    tokenizer, model, processor, _ = loaded
    features = model.get_vision_tower()(process_images(example_frames, processor, "pad"))
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["mm_vision_tower"] = str(tmp_path / "no-such-clip")
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="only pre-extracted features"):
        _, again, no_processor, _ = load_pretrained_model(str(tmp_path / "m"), device="cpu")
    assert no_processor is None
    ids = _prompt_ids(tokenizer)[None]
    assert torch.equal(again.generate(ids, features=[features], max_new_tokens=3, do_sample=False),
                       model.generate(ids, features=[features], max_new_tokens=3, do_sample=False))
    with pytest.raises(RuntimeError, match="no-such-clip"):
        again.generate(ids, images=[torch.rand(2, 3, 32, 32)], max_new_tokens=3)
