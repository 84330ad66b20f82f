"""Padding-free packing: the packed batch trains exactly as the padded one, and samples never see each other."""

import importlib.util
import json
import os
import shlex
import subprocess

import numpy as np
import pytest
import torch

from flash_vstream.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from flash_vstream.demo.tiny import build_tiny_llama, tiny_vstream_config
from flash_vstream.mm_utils import expand_image_tokens
from flash_vstream.model import VStreamLlamaForCausalLM
from flash_vstream.model.language_model.packed import TORCH_VARLEN, per_sample_counts, segment_starts
from flash_vstream.model.memory import frozen_memory, memory_num_tokens
from flash_vstream.train.dataset import DataCollatorForSupervisedDataset, LazySupervisedDataset
from flash_vstream.train.packing import (DataCollatorForPackedDataset, check_packing, pack_rows,
                                         packing_requested)
from flash_vstream.train.train import parse_args, train
from flash_vstream.train.vstream_trainer import ModalityLengthGroupedSampler
from flash_vstream.features import save_features

from support import REPO

VOCAB, WIDTH = 64, 16  # tiny LLM vocabulary, tiny CLIP width
# A small STAR memory: 1 frame -> 21 tokens, 4 frames -> 68, >= 7 frames -> 78.
MEMORY = dict(compress_size=4, compress_long_memory_size=2, video_long_memory_length=6,
              video_Turing_memory_length=6, video_retrieved_memory_length=2, video_buffer_length=40,
              memory_mode="paper")


def _model(attn="sdpa", seed=0, hidden=64, heads=4, dtype=torch.float32, device="cpu"):
    config = tiny_vstream_config(VOCAB, None, hidden_size=hidden, num_heads=heads, clip_hidden=WIDTH,
                                 attn_implementation=attn, use_cache=False, **MEMORY)
    torch.manual_seed(seed)
    return VStreamLlamaForCausalLM(config).to(device=device, dtype=dtype).train()


def _samples(config, frames=(30, None, 1, 4, None, 12), seed=0):
    """Samples of different lengths as the dataset gives them: BOS, text, one <image> expanded to the
    memory size of `frames` frames (None: text-only), supervised answer tokens."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k, t in enumerate(frames):
        prompt = torch.randint(3, VOCAB, (3 + 2 * k,), generator=gen)
        answer = torch.randint(3, VOCAB, (2 + k % 3,), generator=gen)
        ids = torch.cat([torch.tensor([1]), prompt[:2], torch.tensor([IMAGE_TOKEN_INDEX] if t else []).long(),
                         prompt[2:], answer, torch.tensor([2])])
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[-len(answer) - 1:] = ids[-len(answer) - 1:]
        item = {}
        if t:
            features = torch.randn(t, 256, WIDTH, generator=gen)
            ids, labels = expand_image_tokens(ids, memory_num_tokens(t, config), labels)
            item["features"] = features
        item.update(input_ids=ids, labels=labels)
        out.append(item)
    return out


def _as_frozen(samples, config):
    """The same samples with the memory's weight-free part built ahead (`--memory_build dataloader`)."""
    return [{**{k: v for k, v in s.items() if k != "features"},
             **({"frozen_memory": frozen_memory(s["features"], config, seed=0)} if "features" in s else {})}
            for s in samples]


def _loss_and_grads(model, batch):
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_pack_rows_fills_rows_first_fit_decreasing():
    lengths = [5, 9, 3, 7, 2, 4]
    rows = pack_rows(lengths, 10)
    assert sorted(i for r in rows for i in r) == list(range(6))
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows)
    assert rows == [[1], [3, 2], [0, 5], [4]]
    assert pack_rows(lengths) == [[0, 1, 2, 3, 4, 5]]
    with pytest.raises(ValueError, match="does not fit"):
        pack_rows([11], 10)


def test_packed_batch_layout():
    config = _model().config
    samples = _samples(config)
    lengths = [len(s["input_ids"]) for s in samples]
    batch = DataCollatorForPackedDataset(0, max_length=120)(samples)
    assert "attention_mask" not in batch and batch["input_ids"].shape[1] <= 120
    rows = pack_rows(lengths, 120)
    assert len(rows) == batch["input_ids"].shape[0] > 1 and any(len(r) > 1 for r in rows)
    starts = segment_starts(batch["position_ids"])
    # every sample (and each row's padding) restarts its positions; the segments are the cu_seq_lens
    cu = batch["cu_seq_lens_q"]
    assert cu.dtype == torch.int32 and int(cu[-1]) == batch["input_ids"].numel()
    assert starts.flatten().nonzero().flatten().tolist() == cu[:-1].tolist()
    assert batch["max_length_q"] == int((cu[1:] - cu[:-1]).max())
    # the sample tokens are all there, once, and no label is a sample's first token
    order = [i for r in rows for i in r]
    flat_ids, flat_labels = batch["input_ids"].flatten(), batch["labels"].flatten()
    for r, row in enumerate(rows):
        at = r * batch["input_ids"].shape[1]
        for i in row:
            n = lengths[i]
            assert torch.equal(flat_ids[at:at + n], samples[i]["input_ids"])
            assert flat_labels[at] == IGNORE_INDEX and torch.equal(flat_labels[at + 1:at + n], samples[i]["labels"][1:])
            at += n
    # media follow the placeholders, sample by sample
    with_media = [i for i in order if "features" in samples[i]]
    assert [f.data_ptr() for f in batch["features"]] == [samples[i]["features"].data_ptr() for i in with_media]
    counts = [c for c in per_sample_counts(batch["input_ids"] == IMAGE_TOKEN_INDEX, batch["position_ids"]) if c]
    assert counts == [memory_num_tokens(len(samples[i]["features"]), config) for i in with_media]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("media", ["features", "frozen_memory", "text"])
def test_packed_loss_and_gradients_equal_padded(attn, media):
    model = _model(attn)
    samples = _samples(model.config, frames=(None,) * 5 if media == "text" else (30, None, 1, 4, None, 12))
    if media == "frozen_memory":
        samples = _as_frozen(samples, model.config)
    padded = DataCollatorForSupervisedDataset(0)(samples)
    packed = DataCollatorForPackedDataset(0, max_length=120)(samples)
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    loss_padded, grads_padded = _loss_and_grads(model, padded)
    loss_packed, grads_packed = _loss_and_grads(model, packed)
    torch.testing.assert_close(loss_packed, loss_padded, rtol=1e-6, atol=1e-6)
    assert grads_packed.keys() == grads_padded.keys()
    trained = {"lm_head.weight", "model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"}
    if media != "text":
        trained |= {"model.mm_projector.0.weight", "model.attention_model.q_proj.weight"}
    for name in grads_padded:
        torch.testing.assert_close(grads_packed[name], grads_padded[name], rtol=1e-5, atol=1e-6, msg=name)
    for name in trained:
        assert grads_padded[name].abs().sum() > 0, name
    # the loss a trainer normalises by (labels[..., 1:] != -100, summed) is the same tokens too
    assert int((packed["labels"][..., 1:] != IGNORE_INDEX).sum()) == int((padded["labels"][..., 1:] != IGNORE_INDEX).sum())


def _sample_logits(model, batch, lengths, rows):
    """Each sample's logits, cut out of a packed batch: {sample index: (n, vocab)}."""
    with torch.no_grad():
        logits = model(**batch).logits
    out = {}
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            out[i] = logits[r, at:at + lengths[i]]
            at += lengths[i]
    return out


def test_attention_never_crosses_samples():
    model = _model().eval()
    samples = _samples(model.config)
    lengths = [len(s["input_ids"]) for s in samples]
    collate = DataCollatorForPackedDataset(0, max_length=300)  # rows of several samples
    rows = pack_rows(lengths, 300)
    assert any(len(r) >= 3 for r in rows)
    before = _sample_logits(model, collate(samples), lengths, rows)
    # one sample changes (its text and its video): no other sample's logits move
    changed = 0
    gen = torch.Generator().manual_seed(1)
    edited = [dict(s) for s in samples]
    text = edited[changed]["input_ids"] != IMAGE_TOKEN_INDEX
    edited[changed]["input_ids"] = torch.where(text, torch.randint(3, VOCAB, text.shape, generator=gen),
                                               edited[changed]["input_ids"])
    edited[changed]["features"] = torch.randn(edited[changed]["features"].shape, generator=gen)
    after = _sample_logits(model, collate(edited), lengths, rows)
    assert not torch.allclose(after[changed], before[changed])
    for i in range(len(samples)):
        if i != changed:
            torch.testing.assert_close(after[i], before[i], rtol=0, atol=1e-6)
    # and each packed sample reads as if it were alone in its batch
    for i, sample in enumerate(samples):
        alone = DataCollatorForSupervisedDataset(0)([sample])
        with torch.no_grad():
            logits = model(**alone).logits[0]
        torch.testing.assert_close(before[i], logits, rtol=1e-5, atol=1e-5)


def test_splice_checks_counts_per_packed_sample():
    model = _model()
    samples = _samples(model.config, frames=(4, 1, None))
    batch = DataCollatorForPackedDataset(0)(samples)  # one row, three samples
    assert batch["input_ids"].shape[0] == 1
    batch["features"] = batch["features"][::-1]  # the memory of the other sample in each slot
    with pytest.raises(ValueError, match="placeholder mismatch"):
        model(**batch)


def test_torch_varlen_is_a_registered_attention_for_packed_rows_only():
    from transformers import AttentionInterface

    assert TORCH_VARLEN in AttentionInterface().valid_keys()
    model = _model(TORCH_VARLEN)
    assert model.config._attn_implementation == TORCH_VARLEN
    padded = DataCollatorForSupervisedDataset(0)(_samples(model.config, frames=(None, None)))
    with pytest.raises(ValueError, match="packed training rows only"):
        model(**padded)  # a padding mask: not what this kernel runs
    check_packing(True, TORCH_VARLEN)
    with pytest.raises(ValueError, match="--packing True"):
        check_packing(False, TORCH_VARLEN)
    assert packing_requested(["--packing", "True"]) and packing_requested(["--x", "1", "--packing"])
    assert not packing_requested(["--packing", "False"]) and not packing_requested([])


# --- the GPU kernels (`pytest -m gpu`): packed bf16 against the padded sdpa batch -------------------------------

GPU_KERNELS = ["sdpa", "flex_attention", TORCH_VARLEN,
               pytest.param("flash_attention_2", marks=pytest.mark.skipif(
                   importlib.util.find_spec("flash_attn") is None, reason="flash-attn is not installed"))]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("attn", GPU_KERNELS)
def test_packed_kernels_on_gpu_match_padded_sdpa(attn):
    reference = _model("sdpa", hidden=128, heads=2, dtype=torch.bfloat16, device="cuda")  # head dim 64
    model = _model(attn, hidden=128, heads=2, dtype=torch.bfloat16, device="cuda")
    model.load_state_dict(reference.state_dict())
    samples = _samples(model.config)

    def cuda(batch):
        return {k: ([x.cuda() for x in v] if isinstance(v, list) else v.cuda() if torch.is_tensor(v) else v)
                for k, v in batch.items()}

    loss_padded, grads_padded = _loss_and_grads(reference, cuda(DataCollatorForSupervisedDataset(0)(samples)))
    loss_packed, grads_packed = _loss_and_grads(model, cuda(DataCollatorForPackedDataset(0, max_length=120)(samples)))
    torch.testing.assert_close(loss_packed, loss_padded, rtol=2e-2, atol=2e-2)
    for name in ("lm_head.weight", "model.layers.0.self_attn.q_proj.weight", "model.mm_projector.0.weight"):
        cosine = torch.nn.functional.cosine_similarity(grads_packed[name].float().flatten(),
                                                       grads_padded[name].float().flatten(), dim=0)
        assert cosine > 0.99, (name, float(cosine))


# --- the trainer with --packing True --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_tokenizer_dir, tiny_clip_dir):
    root = tmp_path_factory.mktemp("packing")
    build_tiny_llama(str(root / "llm"), tiny_tokenizer_dir, hidden_size=32, num_layers=2, num_heads=2, seed=0)
    width = json.loads((open(os.path.join(tiny_clip_dir, "config.json")).read()))["hidden_size"]
    gen = torch.Generator().manual_seed(0)
    for name, frames in (("short", 3), ("long", 20)):
        save_features(str(root / "videos" / f"{name}.safetensors"), torch.randn(frames, 256, width, generator=gen),
                      {"fps": 1})
    save_features(str(root / "images" / "still.safetensors"), torch.randn(256, width, generator=gen), {})
    turns = [{"from": "human", "value": "what colour is the background? <image>"}, {"from": "gpt", "value": "red"}]
    records = [{"id": "v-long", "video": "long.mp4", "conversations": turns},
               {"id": "v-short", "video": "short.mp4", "conversations": turns},
               {"id": "v-cut", "video": "long.mp4", "time": 2, "conversations": turns},
               {"id": "image", "image": "still.png", "conversations": turns},
               {"id": "text", "conversations": [{"from": "human", "value": "say yes please"},
                                                 {"from": "gpt", "value": "yes"}]}]
    (root / "data.json").write_text(json.dumps(records * 2))
    return root


def _argv(workdir, clip, out, *extra):
    return ["--model_name_or_path", str(workdir / "llm"), "--vision_tower", clip, "--version", "v1",
            "--data_path", str(workdir / "data.json"), "--use_features", "True",
            "--image_folder", str(workdir / "images"), "--video_folder", str(workdir / "videos"),
            "--output_dir", str(out), "--per_device_train_batch_size", "4", "--learning_rate", "5e-3",
            "--max_steps", "4", "--report_to", "none", "--logging_steps", "1", "--save_strategy", "no",
            "--lr_scheduler_type", "constant", "--dataloader_num_workers", "0", "--seed", "0",
            "--group_by_modality_length", "True", "--model_max_length", "160",
            "--video_long_memory_length", "4", "--video_Turing_memory_length", "4",
            "--compress_size", "4", "--compress_long_memory_size", "2", *extra]


def test_training_with_packing_follows_the_padded_run(workdir, tiny_clip_dir, tmp_path):
    padded = train(_argv(workdir, tiny_clip_dir, tmp_path / "padded"))
    packed = train(_argv(workdir, tiny_clip_dir, tmp_path / "packed", "--packing", "True"))
    assert isinstance(packed.data_collator, DataCollatorForPackedDataset)
    assert packed.data_collator.max_length == 160
    assert isinstance(packed._get_train_sampler(), ModalityLengthGroupedSampler)
    first = next(iter(packed.get_train_dataloader()))
    assert "attention_mask" not in first and first["input_ids"].shape[0] < 4  # 4 samples in fewer rows
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (padded, packed)]
    assert len(losses[0]) == 4
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-4)
    after = [dict(t.model.named_parameters()) for t in (padded, packed)]
    for name in ("model.mm_projector.0.weight", "model.layers.1.mlp.down_proj.weight", "lm_head.weight"):
        torch.testing.assert_close(after[1][name], after[0][name], rtol=1e-4, atol=1e-5)


def test_modality_lengths_count_the_memory_tokens(workdir, tiny_clip_dir, tmp_path):
    trainer = train(_argv(workdir, tiny_clip_dir, tmp_path / "o", "--packing", "True", "--max_steps", "1"))
    dataset, config = trainer.train_dataset, trainer.model.config
    assert isinstance(dataset, LazySupervisedDataset)
    words = 7  # "what colour is the background? <image>" + "red"
    long_clip, cut, image = (memory_num_tokens(n, config) for n in (10**6, 3, 1))
    assert image < cut < long_clip
    assert dataset.modality_lengths[:5] == [words + long_clip, words + long_clip, words + cut, words + image, -4]
    # a 20-frame clip reaches the full memory at these sizes: the estimate is its exact count
    assert memory_num_tokens(20, config) == long_clip


def test_the_script_packs_in_both_stages():
    result = subprocess.run(["bash", os.path.join(REPO, "scripts", "train_and_eval.sh")], cwd=REPO,
                            env=dict(os.environ, DRY_RUN="1"), capture_output=True, text=True, check=True)
    entry = "flash_vstream/train/train_mem.py"
    stages = [shlex.split(line) for line in result.stdout.splitlines() if entry in line]
    assert len(stages) == 2
    for words in stages:
        argv = words[words.index(entry) + 1:]
        _, data_args, training_args = parse_args(argv + ["--use_cpu", "True"])
        assert data_args.packing and training_args.group_by_modality_length
        assert packing_requested(argv)
