"""`--memory_build dataloader` (frozen memory in the data loader, Semantic Attention batched in forward)
trains exactly like `--memory_build forward` (the whole memory per sample in forward): tiny model, fp32."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from flash_vstream.demo.tiny import build_tiny_llama

from flash_vstream.model import VStreamConfig
from flash_vstream.train.dataset import DataCollatorForSupervisedDataset, LazySupervisedDataset
from flash_vstream.train.train import train
from flash_vstream.features import save_features

CLIP_WIDTH = 32  # the tiny CLIP's hidden size (demo/tiny.py)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_tokenizer_dir):
    """A tiny LLM and feature files: videos of 1, 28 and 60 frames, an image, and a text-only record."""
    root = tmp_path_factory.mktemp("memory_build")
    build_tiny_llama(str(root / "vicuna"), tiny_tokenizer_dir, hidden_size=64, num_layers=2, num_heads=4, seed=0)
    (root / "video_features").mkdir()
    (root / "image_features").mkdir()
    records = []
    for i, frames in enumerate((60, 28, 1)):
        save_features(str(root / "video_features" / f"v{i}.safetensors"), torch.randn(frames, 256, CLIP_WIDTH).half(),
                      {"fps": 1})
        records.append({"id": f"v{i}", "video": f"v{i}.mp4", "conversations": [
            {"from": "human", "value": "<image>\nwhat happens?"}, {"from": "gpt", "value": f"scene {i}"}]})
    save_features(str(root / "image_features" / "red.safetensors"), torch.randn(256, CLIP_WIDTH).half(), {})
    records.append({"id": "image", "image": "red.png", "conversations": [
        {"from": "human", "value": "what colour? <image>"}, {"from": "gpt", "value": "red"}]})
    records.append({"id": "text", "conversations": [{"from": "human", "value": "say yes"},
                                                    {"from": "gpt", "value": "yes"}]})
    (root / "features.json").write_text(json.dumps(records * 2))
    return root


def _argv(workdir, out, *extra, clip):
    return ["--model_name_or_path", str(workdir / "vicuna"), "--vision_tower", clip,
            "--data_path", str(workdir / "features.json"), "--use_features", "True",
            "--image_folder", str(workdir / "image_features"), "--video_folder", str(workdir / "video_features"),
            "--output_dir", str(out), "--per_device_train_batch_size", "4", "--learning_rate", "5e-3",
            "--report_to", "none", "--logging_steps", "1", "--save_strategy", "no", "--lr_scheduler_type", "constant",
            "--dataloader_num_workers", "0", "--seed", "0", "--use_cpu", "True", *extra]


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_dataloader_build_trains_like_forward_build(workdir, tiny_clip_dir, tmp_path):
    runs = {}
    for build in ("forward", "dataloader"):
        torch.manual_seed(0)  # the adapter missing from the LLM checkpoint is drawn from the global RNG
        trainer = train(_argv(workdir, tmp_path / build, "--version", "plain", "--tune_mm_mlp_adapter", "True",
                              "--max_steps", "3", "--memory_build", build, clip=tiny_clip_dir))
        attention = trainer.model.get_model().attention_model
        runs[build] = _losses(trainer), attention.q_proj.weight.detach().clone()
    (loss_f, q_f), (loss_d, q_d) = runs["forward"], runs["dataloader"]
    assert len(loss_f) == 3
    torch.testing.assert_close(torch.tensor(loss_d), torch.tensor(loss_f), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q_d, q_f, rtol=1e-5, atol=1e-6)  # the Semantic Attention trained the same


def test_dataloader_build_batches_frozen_memory(workdir):
    tokenizer = AutoTokenizer.from_pretrained(workdir / "vicuna")
    config = VStreamConfig.from_pretrained(workdir / "vicuna")
    config.memory_mode, config.mm_hidden_size = "paper", CLIP_WIDTH
    dataset = LazySupervisedDataset(str(workdir / "features.json"), tokenizer, config, "plain",
                                    image_folder=str(workdir / "image_features"),
                                    video_folder=str(workdir / "video_features"), use_features=True,
                                    memory_build="dataloader")
    batch = DataCollatorForSupervisedDataset(tokenizer.pad_token_id)([dataset[i] for i in (0, 1, 4)])
    assert "features" not in batch and len(batch["frozen_memory"]) == 2  # the text-only record carries none
    frozen = batch["frozen_memory"][1]  # the 28-frame video
    assert {"tokens", "abstract", "abstract_inputs"} == set(frozen)
    placeholders = (batch["input_ids"][1] == -200).sum().item()
    assert placeholders == len(frozen["tokens"]) + frozen["abstract"].shape[0] * frozen["abstract"].shape[1]
    with pytest.raises(ValueError, match="memory_build"):
        LazySupervisedDataset(str(workdir / "features.json"), tokenizer, config, "plain", use_features=True,
                              memory_build="workers")
