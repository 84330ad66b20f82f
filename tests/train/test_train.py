"""Training end to end on tiny models (CPU): stages, saved files, resume, DeepSpeed, LoRA."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from flash_vstream.demo.synthetic import write_mp4
from flash_vstream.demo.tiny import build_tiny_llama
from flash_vstream.model.builder import load_pretrained_model
from flash_vstream.train.train import train
from flash_vstream.features import save_features

from support import REPO


def _frames(color, n, size=24):
    frame = np.zeros((size, size, 3), dtype=np.uint8)
    frame[:] = color
    return np.stack([frame] * n)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_tokenizer_dir, tiny_clip_dir):
    root = tmp_path_factory.mktemp("train")
    build_tiny_llama(str(root / "vicuna"), tiny_tokenizer_dir, hidden_size=64, num_layers=2, num_heads=4, seed=0)
    colors = {"red": (220, 20, 20), "blue": (20, 20, 220)}
    (root / "images").mkdir()
    (root / "videos").mkdir()
    (root / "video_features").mkdir()
    (root / "image_features").mkdir()
    from flash_vstream.model.multimodal_encoder.clip_encoder import CLIPVisionTower
    from flash_vstream.mm_utils import process_images
    tower = CLIPVisionTower(tiny_clip_dir)
    raw, feats = [], []
    for i, (name, rgb) in enumerate(colors.items()):
        Image.fromarray(_frames(rgb, 1)[0]).save(root / "images" / f"{name}.png")
        write_mp4(_frames(rgb, 30), str(root / "videos" / f"{name}.mp4"), fps=1)
        video_feature = tower(process_images(list(_frames(rgb, 30)), tower.image_processor))
        save_features(str(root / "video_features" / f"{name}.safetensors"), video_feature.half(), {"fps": 1})
        save_features(str(root / "image_features" / f"{name}.safetensors"), video_feature[0].half(), {})
        for kind, rel in (("image", f"{name}.png"), ("video", f"{name}.mp4")):
            turns = [{"from": "human", "value": "what colour is the background? <image>"},
                     {"from": "gpt", "value": name}]
            raw.append({"id": f"{kind}-{name}", kind: rel, "conversations": turns})
            feats.append({"id": f"{kind}-{name}", kind: rel, "conversations": turns, **({"time": 27} if kind == "video" else {})})
    text = {"id": "text", "conversations": [{"from": "human", "value": "say yes"}, {"from": "gpt", "value": "yes"}]}
    raw.append(text)
    feats.append(text)
    (root / "raw.json").write_text(json.dumps(raw * 2))
    (root / "features.json").write_text(json.dumps(feats * 2))
    return root


def _argv(workdir, out, *extra, data="raw.json", **kw):
    argv = ["--model_name_or_path", str(workdir / "vicuna"), "--vision_tower", kw.get("clip"),
            "--data_path", str(workdir / data), "--image_folder", str(workdir / "images"),
            "--video_folder", str(workdir / "videos"), "--output_dir", str(out),
            "--per_device_train_batch_size", "2", "--learning_rate", "5e-3", "--report_to", "none",
            "--logging_steps", "1", "--save_strategy", "no", "--lr_scheduler_type", "constant",
            "--dataloader_num_workers", "0", "--seed", "0", "--group_by_modality_length", "True",
            "--video_long_memory_length", "8", "--video_Turing_memory_length", "8"]
    return argv + list(extra)


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _trainable(trainer):
    return {n for n, p in trainer.model.named_parameters() if p.requires_grad}


def test_stage1_then_stage2_raw_media(workdir, tiny_clip_dir):
    s1 = workdir / "stage1"
    trainer = train(_argv(workdir, s1, "--version", "plain", "--tune_mm_mlp_adapter", "True",
                          "--max_steps", "12", clip=tiny_clip_dir))
    names = _trainable(trainer)
    assert names and all(n.startswith(("model.mm_projector.", "model.attention_model.")) for n in names)
    assert any(n.startswith("model.attention_model.") for n in names)
    losses = _losses(trainer)
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    adapter = torch.load(s1 / "mm_projector.bin", weights_only=True)
    assert any(k.startswith("model.attention_model.q_proj") for k in adapter)
    assert any(k.startswith("model.mm_projector.0") for k in adapter)
    trained = dict(trainer.model.named_parameters())
    torch.testing.assert_close(adapter["model.mm_projector.0.weight"], trained["model.mm_projector.0.weight"].detach())

    s2 = workdir / "stage2"
    trainer2 = train(_argv(workdir, s2, "--version", "v1", "--pretrain_mm_mlp_adapter", str(s1 / "mm_projector.bin"),
                           "--max_steps", "10", "--learning_rate", "2e-3", clip=tiny_clip_dir))
    names2 = _trainable(trainer2)
    assert not any(".vision_tower." in n for n in names2)
    assert {"lm_head.weight", "model.embed_tokens.weight", "model.mm_projector.0.weight",
            "model.attention_model.q_proj.weight"} <= names2
    assert any(n.startswith("model.layers.") for n in names2)
    losses2 = _losses(trainer2)
    assert np.mean(losses2[-3:]) < np.mean(losses2[:3])
    config = json.loads((s2 / "config.json").read_text())
    assert config["model_type"] == "vstream" and config["memory_mode"] == "paper"
    tokenizer, model, processor, _ = load_pretrained_model(str(s2), device="cpu")
    from flash_vstream.conversation import conv_templates
    from flash_vstream.mm_utils import process_images, tokenizer_image_token
    conv = conv_templates["v1"].copy()
    conv.append_message("USER", "<image>\nwhat colour is the background?")
    conv.append_message("ASSISTANT", None)
    ids = tokenizer_image_token(conv.get_prompt(), tokenizer, return_tensors="pt")[None]
    out = model.generate(ids, images=[process_images(list(_frames((220, 20, 20), 3)), processor)],
                         max_new_tokens=3, do_sample=False)
    assert out.shape[1] >= 1
    # the stage-1 output also loads as model_base + adapter
    _, adapted, _, _ = load_pretrained_model(str(s1), model_base=str(workdir / "vicuna"), device="cpu")
    torch.testing.assert_close(adapted.get_model().attention_model.q_proj.weight,
                               trained["model.attention_model.q_proj.weight"].detach())


def test_features_mode_and_resume(workdir, tiny_clip_dir):
    out = workdir / "resume"
    common = ["--version", "plain", "--tune_mm_mlp_adapter", "True", "--use_features", "True",
              "--image_folder", str(workdir / "image_features"), "--video_folder", str(workdir / "video_features"),
              "--save_strategy", "steps", "--save_steps", "3"]
    first = train(_argv(workdir, out, *common, "--max_steps", "3", data="features.json", clip=tiny_clip_dir))
    assert first.state.global_step == 3
    assert (out / "checkpoint-3" / "mm_projector.bin").exists()
    stamp = (out / "checkpoint-3" / "trainer_state.json").stat().st_mtime_ns
    second = train(_argv(workdir, out, *common, "--max_steps", "6", "--resume_from_checkpoint", "auto",
                         data="features.json", clip=tiny_clip_dir))
    assert second.state.global_step == 6
    assert (out / "checkpoint-6" / "mm_projector.bin").exists()
    # continued after step 3: steps 1-3 were not run (and saved) again
    assert (out / "checkpoint-3" / "trainer_state.json").stat().st_mtime_ns == stamp
    steps = [h["step"] for h in second.state.log_history if "loss" in h]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert [h["loss"] for h in second.state.log_history[:3]] == _losses(first)


def test_bad_media_is_named_or_skipped(workdir, tiny_clip_dir, tmp_path):
    records = json.loads((workdir / "raw.json").read_text())[:3]
    records.append({"id": "ghost", "video": "missing.mp4", "conversations": records[0]["conversations"]})
    (tmp_path / "bad.json").write_text(json.dumps(records))
    argv = ["--version", "plain", "--tune_mm_mlp_adapter", "True", "--max_steps", "2",
            "--per_device_train_batch_size", "1", "--group_by_modality_length", "False"]
    with pytest.raises(Exception, match="ghost"):
        train(_argv(workdir, tmp_path / "o1", *argv, "--data_path", str(tmp_path / "bad.json"), clip=tiny_clip_dir))
    trainer = train(_argv(workdir, tmp_path / "o2", *argv, "--data_path", str(tmp_path / "bad.json"),
                          "--skip_bad_samples", "True", clip=tiny_clip_dir))
    assert len(trainer.train_dataset) == 3 and "ghost" in trainer.train_dataset.skipped[0]
    (tmp_path / "broken.json").write_text("[{\"id\": 1,")
    with pytest.raises(ValueError, match="broken.json"):
        train(_argv(workdir, tmp_path / "o3", *argv, "--data_path", str(tmp_path / "broken.json"), clip=tiny_clip_dir))


def test_lora_stage2_merges_into_a_loadable_model(workdir, tiny_clip_dir):
    out = workdir / "lora"
    trainer = train(_argv(workdir, out, "--version", "v1", "--lora_enable", "True", "--lora_r", "4",
                          "--lora_alpha", "8", "--max_steps", "3", clip=tiny_clip_dir))
    names = _trainable(trainer)
    assert any("lora_" in n for n in names) and any("mm_projector" in n for n in names)
    assert not any("lora_" not in n and "mm_projector" not in n and "attention_model" not in n for n in names)
    merged = workdir / "lora_merged"
    subprocess.run([sys.executable, os.path.join(REPO, "scripts", "merge_lora_weights.py"), "--model-path", str(out),
                    "--model-base", str(workdir / "vicuna"), "--save-model-path", str(merged)], check=True)
    _, model, _, _ = load_pretrained_model(str(merged), device="cpu")
    assert not any("lora" in k for k in model.state_dict())


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_deepspeed_on_cpu_runs_steps(workdir, tiny_clip_dir, tmp_path, zero):
    """Stage 2 from a stage-1 adapter through DeepSpeed (gloo): ZeRO-3 partitions the parameters, so
    the adapter load and the keep-in-graph term must go through gathered modules."""
    pytest.importorskip("deepspeed")
    adapter = tmp_path / "stage1"
    train(_argv(workdir, adapter, "--version", "plain", "--tune_mm_mlp_adapter", "True", "--max_steps", "1",
                clip=tiny_clip_dir))
    out = tmp_path / "ds"
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), DS_BUILD_OPS="0",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    argv = _argv(workdir, out, "--version", "v1", "--max_steps", "2", "--deepspeed",
                 os.path.join(REPO, "scripts", f"{zero}.json"), "--pretrain_mm_mlp_adapter",
                 str(adapter / "mm_projector.bin"), clip=tiny_clip_dir)
    result = subprocess.run([sys.executable, "-m", "flash_vstream.train.train_mem", *argv], env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (out / "config.json").exists()
    _, model, _, _ = load_pretrained_model(str(out), device="cpu")
    assert model.config.model_type == "vstream"
    assert model.state_dict()["model.mm_projector.0.weight"].shape[0] == model.config.hidden_size
