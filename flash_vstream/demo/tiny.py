"""The one home of the tiny models that tests, the demo and the benchmarks build.

Written as ordinary checkpoint directories, so every loader path is the real one: a small CLIP
vision tower that keeps the real 16x16 patch grid (image 32 px, patch 2 px), a sentencepiece
LLaMA tokenizer trained on local text, a small LLaMA (the stage-1 base) and a small Flash-VStream;
`tiny_vstream_model` builds the last in memory. Nothing is downloaded; weights come from fixed seeds.
"""

import os
import tempfile

import torch
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel


def tiny_clip_config(hidden_size=32, num_layers=2, num_heads=2, image_size=32):
    """A small CLIP vision config that keeps the real 16x16 patch grid."""
    return CLIPVisionConfig(
        hidden_size=hidden_size, intermediate_size=hidden_size * 2, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, image_size=image_size, patch_size=image_size // 16,
        projection_dim=hidden_size)


def build_tiny_clip(output_dir, hidden_size=32, num_layers=2, num_heads=2, image_size=32, seed=0):
    """Write a randomly initialised CLIP vision tower (16x16 patches) and its processor."""
    config = tiny_clip_config(hidden_size, num_layers, num_heads, image_size)
    torch.manual_seed(seed)
    model = CLIPVisionModel(config)
    model.save_pretrained(output_dir)
    processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    processor.save_pretrained(output_dir)
    return output_dir


def train_tokenizer(texts, output_dir, vocab_size=400):
    """Train a BPE sentencepiece model on `texts` and save it as a LLaMA tokenizer directory."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    os.makedirs(output_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.txt")
        with open(corpus, "w") as f:
            f.write("\n".join(texts))
        prefix = os.path.join(tmp, "tokenizer")
        spm.SentencePieceTrainer.train(
            input=corpus, model_prefix=prefix, vocab_size=vocab_size, model_type="bpe",
            character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False,
            minloglevel=2)
        staging = os.path.join(tmp, "tok")
        os.makedirs(staging)
        os.replace(prefix + ".model", os.path.join(staging, "tokenizer.model"))
        # transformers 5: LlamaTokenizer(vocab_file=...) builds an empty tokenizer; from a folder it works.
        tokenizer = LlamaTokenizer.from_pretrained(staging)
    tokenizer.pad_token = tokenizer.unk_token
    tokenizer.padding_side = "right"
    tokenizer.save_pretrained(output_dir)
    return output_dir


def tiny_llama_config(vocab_size, hidden_size=64, num_layers=2, num_heads=4):
    """A small LLaMA config with the tiny tokenizer's special ids (bos 1, eos 2, pad 0)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def build_tiny_llama(output_dir, tokenizer_dir, hidden_size=64, num_layers=2, num_heads=4, seed=0):
    """Write a randomly initialised small LLaMA with the tokenizer: the language model that training starts from."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    LlamaForCausalLM(tiny_llama_config(len(tokenizer), hidden_size, num_layers, num_heads)).save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def tiny_vstream_config(vocab_size, clip_dir, hidden_size=64, num_layers=2, num_heads=4, clip_hidden=32,
                        **memory_kwargs):
    """A small LLaMA-shaped `VStreamConfig` reading a tiny CLIP tower of width `clip_hidden`."""
    from ..model import VStreamConfig

    return VStreamConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=2048, mm_vision_tower=clip_dir, mm_hidden_size=clip_hidden,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False, **memory_kwargs)


def build_tiny_vstream(output_dir, tokenizer_dir, clip_dir, seed=0, **config_kwargs):
    """Write a randomly initialised tiny Flash-VStream checkpoint (config, safetensors, tokenizer)."""
    from transformers import AutoTokenizer

    from ..model import VStreamLlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    clip_hidden = CLIPVisionConfig.from_pretrained(clip_dir).hidden_size
    config = tiny_vstream_config(len(tokenizer), clip_dir, clip_hidden=clip_hidden, **config_kwargs)
    torch.manual_seed(seed)
    model = VStreamLlamaForCausalLM(config)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def tiny_vstream_model(seed=0, vocab_size=300, clip_hidden=32, dtype=torch.float32, **overrides):
    """A tiny random Flash-VStream in memory, in eval mode, without a vision tower (it reads features).

    `overrides` are set on the built config (e.g. num_key_value_heads=1, attention_bias=True)."""
    from ..model import VStreamLlamaForCausalLM

    config = tiny_vstream_config(vocab_size=vocab_size, clip_dir=None, clip_hidden=clip_hidden)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    return VStreamLlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=dtype).eval()


TINY_CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: what colour is the background now? ASSISTANT: red",
    "what was shown at the start of the stream? blue green yellow purple orange white",
    "which came first, the circle or the square? the triangle lasted longest. yes no",
    "describe the video. a red circle moves left over a blue background.",
]
