"""The tiny models' one home: the presets build, load through the real loaders and are seeded."""

import torch
from transformers import AutoConfig, LlamaForCausalLM

from flash_vstream.demo.tiny import build_tiny_llama, tiny_clip_config, tiny_vstream_model


def test_tiny_clip_keeps_the_16x16_patch_grid():
    config = tiny_clip_config(image_size=64)
    assert (config.image_size // config.patch_size) ** 2 == 256


def test_tiny_llama_checkpoint_loads_with_the_tokenizer(tmp_path, tiny_tokenizer_dir):
    path = build_tiny_llama(str(tmp_path / "llm"), tiny_tokenizer_dir, hidden_size=32, num_layers=1, num_heads=2)
    config = AutoConfig.from_pretrained(path)
    assert (config.hidden_size, config.num_hidden_layers, config.pad_token_id, config.eos_token_id) == (32, 1, 0, 2)
    assert (tmp_path / "llm" / "tokenizer_config.json").exists()
    again = build_tiny_llama(str(tmp_path / "again"), tiny_tokenizer_dir, hidden_size=32, num_layers=1, num_heads=2)
    a, b = LlamaForCausalLM.from_pretrained(path), LlamaForCausalLM.from_pretrained(again)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))  # seeded


def test_tiny_vstream_model_is_seeded_and_takes_overrides():
    a, b, c = tiny_vstream_model(3), tiny_vstream_model(3), tiny_vstream_model(4, num_key_value_heads=1)
    assert not a.training and a.dtype == torch.float32
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert c.config.num_key_value_heads == 1 and c.config.mm_hidden_size == 32
