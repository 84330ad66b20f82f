"""Feature extraction CLI and API (flash_vstream.extract_features) and the benchmark smoke run."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from flash_vstream.extract_features import collect_inputs, extract_paths, main, report_name, resolve_device, resolve_shard
from flash_vstream.features import feature_file_for, load_features, load_features_with_meta, valid_feature_file
from flash_vstream.mm_utils import process_images
from flash_vstream.utils.files import temp_files_for
from flash_vstream.utils.sharding import shard_bounds
from flash_vstream.video_io import read_frames

from support import REPO as ROOT
HIDDEN = 32  # the tiny CLIP's hidden size


@pytest.fixture(scope="module")
def media(tmp_path_factory, make_video):
    """A folder: two clips (one under a folder whose name ends in .mp4), an image, a corrupt file."""
    d = tmp_path_factory.mktemp("media")
    make_video(d / "cfr.mp4", n=25, rate=10)  # 2.4 s -> 3 samples at 1 fps
    os.makedirs(d / "clips.mp4")
    make_video(d / "clips.mp4" / "vfr.mp4", times=[0, 0.1, 0.3, 1.5, 1.6, 4.2])  # 5 samples
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8)).save(d / "img.png")
    (d / "notes.txt").write_text("not media")  # ignored by the folder walk
    return d


def with_corrupt(media, tmp_path):
    d = tmp_path / "in"
    shutil.copytree(media, d)
    (d / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"junk" * 300)
    return d


def run(inp, out, clip, *extra):
    return main(["--input", str(inp), "--output", str(out), "--vision-tower", clip, "--device", "cpu",
                 "--no-progress", "--batch-size", "2", *extra])


def read_report(out, name="extract_report.json"):
    with open(os.path.join(out, name)) as f:
        return json.load(f)


def test_output_path_replaces_only_the_suffix():
    assert feature_file_for("out", os.path.join("clips.mp4", "a.mp4")) == os.path.join("out", "clips.mp4", "a.safetensors")
    assert feature_file_for("o", "x.tar.gz.webm") == os.path.join("o", "x.tar.gz.safetensors")


def test_extract_folder_with_corrupt_file(media, tmp_path, tiny_clip_dir):
    inp, out = with_corrupt(media, tmp_path), tmp_path / "out"
    assert run(inp, out, tiny_clip_dir) == 1  # a file failed

    report = read_report(out)
    assert sorted(os.path.relpath(f, inp) for f in report["done"]) == ["cfr.mp4", os.path.join("clips.mp4", "vfr.mp4"),
                                                                         "img.png"]
    assert report["skipped"] == []
    assert [os.path.basename(f["file"]) for f in report["failed"]] == ["broken.mp4"]
    assert "broken.mp4" in report["failed"][0]["error"] and "cannot open" in report["failed"][0]["error"]

    cfr, meta = load_features_with_meta(str(out / "cfr.safetensors"), kind="video", hidden_size=HIDDEN)
    assert cfr.shape == (3, 256, HIDDEN) and cfr.dtype == torch.float16
    assert meta["fps"] == 1.0 and meta["timestamps"] == [0.0, 1.0, 2.0]
    assert meta["source"] == str(inp / "cfr.mp4") and meta["extractor_version"]
    vfr, meta = load_features_with_meta(str(out / "clips.mp4" / "vfr.safetensors"), kind="video")
    assert vfr.shape == (5, 256, HIDDEN) and meta["timestamps"] == [0.0, 1.0, 2.0, 3.0, 4.0]
    # frame 4 is on screen at 2, 3 and 4 s: the same features (up to batch-shape rounding)
    torch.testing.assert_close(vfr[2], vfr[3], atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(vfr[3], vfr[4], atol=1e-2, rtol=1e-2)
    assert (vfr[0].float() - vfr[2].float()).abs().max() > 0.1
    from safetensors import safe_open
    with safe_open(str(out / "img.safetensors"), "pt") as f:
        assert list(f.get_slice("feature").get_shape()) == [256, HIDDEN]
    assert load_features(str(out / "img.safetensors"), kind="image").shape == (1, 256, HIDDEN)
    leftovers = [f for _, _, files in os.walk(out) for f in files if f.endswith(".tmp")]
    assert leftovers == [] and not os.path.exists(out / "broken.safetensors")

    # the features are the tower's layer -2 patch features of the sampled, padded frames
    from flash_vstream.model.multimodal_encoder.clip_encoder import CLIPVisionTower
    tower = CLIPVisionTower(tiny_clip_dir)
    frames, _ = read_frames(str(inp / "cfr.mp4"), fps=1.0)
    expected = tower(process_images(list(frames), tower.image_processor, "pad"))
    torch.testing.assert_close(cfr.float(), expected.float(), atol=2e-3, rtol=2e-3)

    # a rerun skips what is done; the corrupt file fails again
    assert run(inp, out, tiny_clip_dir) == 1
    report = read_report(out)
    assert report["done"] == [] and len(report["skipped"]) == 3 and len(report["failed"]) == 1
    os.remove(inp / "broken.mp4")
    assert run(inp, out, tiny_clip_dir) == 0
    # --overwrite redoes everything
    assert run(inp, out, tiny_clip_dir, "--overwrite") == 0
    assert len(read_report(out)["done"]) == 3


def test_killed_run_then_rerun_completes(media, tmp_path, tiny_clip_dir):
    out = tmp_path / "out"
    assert run(media, out, tiny_clip_dir) == 0
    good = (out / "cfr.safetensors").read_bytes()
    good_feature, good_meta = load_features_with_meta(str(out / "cfr.safetensors"))
    # what a killed run leaves: a half-written temp file and (from a writer without the rename)
    # a truncated output; and one output never written
    (out / ".cfr.safetensors.123.tmp").write_bytes(good[:100])
    (out / "cfr.safetensors").write_bytes(good[: len(good) // 2])
    os.remove(out / "img.safetensors")
    assert not valid_feature_file(str(out / "cfr.safetensors"))
    assert run(media, out, tiny_clip_dir) == 0
    report = read_report(out)
    assert sorted(os.path.basename(f) for f in report["done"]) == ["cfr.mp4", "img.png"]
    assert [os.path.basename(f) for f in report["skipped"]] == ["vfr.mp4"]
    feature, meta = load_features_with_meta(str(out / "cfr.safetensors"))
    assert torch.equal(feature, good_feature) and meta == good_meta
    assert temp_files_for(str(out / "cfr.safetensors")) == []
    assert valid_feature_file(str(out / "img.safetensors"), kind="image")


def test_nothing_to_do_never_loads_the_tower(media, tmp_path, tiny_clip_dir, monkeypatch):
    import flash_vstream.extract_features as ef

    out = tmp_path / "out"
    assert run(media, out, tiny_clip_dir) == 0

    def no_tower(*args, **kwargs):
        raise AssertionError("the tower was loaded with every output already valid")

    monkeypatch.setattr(ef, "FrameEncoder", no_tower)
    assert run(media, out, tiny_clip_dir) == 0
    assert len(read_report(out)["skipped"]) == 3


def test_dtype_fps_and_end_flags(media, tmp_path, tiny_clip_dir):
    out = tmp_path / "out"
    assert run(media / "cfr.mp4", out, tiny_clip_dir, "--dtype", "bf16", "--fps", "2") == 0
    feature, meta = load_features_with_meta(str(out / "cfr.safetensors"))
    assert feature.dtype == torch.bfloat16 and feature.shape[0] == 5 and meta["fps"] == 2.0
    assert meta["dtype"] == "bf16" and meta["kind"] == "video"
    # a different --fps makes the existing output stale: it is redone, not skipped
    assert run(media / "cfr.mp4", out, tiny_clip_dir, "--dtype", "fp32", "--fps", "1", "--end", "1") == 0
    assert len(read_report(out)["done"]) == 1
    feature = load_features(str(out / "cfr.safetensors"))
    assert feature.dtype == torch.float32 and feature.shape[0] == 2  # samples at 0 and 1 s


def test_example_mp4_capped(example_mp4, tmp_path, tiny_clip_dir):
    out = tmp_path / "out"
    assert run(example_mp4, out, tiny_clip_dir, "--fps", "0.25", "--batch-size", "4") == 0
    feature, meta = load_features_with_meta(str(out / "example.safetensors"), kind="video", hidden_size=HIDDEN)
    assert feature.shape == (10, 256, HIDDEN)  # 0, 4, ..., 36 s of a 38.7 s video
    assert meta["timestamps"] == [4.0 * k for k in range(10)]


def test_decord_backend_gives_same_features(media, tmp_path, tiny_clip_dir):
    pytest.importorskip("decord")
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(media / "clips.mp4", a, tiny_clip_dir) == 0
    assert run(media / "clips.mp4", b, tiny_clip_dir, "--backend", "decord") == 0
    fa, ma = load_features_with_meta(str(a / "vfr.safetensors"))
    fb, mb = load_features_with_meta(str(b / "vfr.safetensors"))
    assert ma["timestamps"] == mb["timestamps"]
    torch.testing.assert_close(fa, fb, atol=1e-2, rtol=1e-2)


def test_sharding_by_flags_and_env(media, tmp_path, tiny_clip_dir, monkeypatch):
    out = tmp_path / "out"
    for i in range(2):
        assert run(media, out, tiny_clip_dir, "--num-chunks", "2", "--chunk-idx", str(i)) == 0
    reports = [read_report(out, report_name(2, i)) for i in range(2)]
    assert not os.path.exists(out / "extract_report.json")
    done = [f for r in reports for f in r["done"]]
    assert len(done) == 3 and len(set(done)) == 3 and all(r["done"] for r in reports)

    out2 = tmp_path / "out2"
    monkeypatch.setenv("WORLD_SIZE", "3")
    for rank in range(3):
        monkeypatch.setenv("RANK", str(rank))
        assert run(media, out2, tiny_clip_dir) == 0
    done = [f for rank in range(3) for f in read_report(out2, f"extract_report.chunk{rank}of3.json")["done"]]
    assert sorted(done) == sorted(reports[0]["done"] + reports[1]["done"])


def test_shard_helpers():
    bounds = [shard_bounds(10, 3, i) for i in range(3)]
    assert bounds == [(0, 3), (3, 6), (6, 10)]
    assert shard_bounds(2, 4, 0) == (0, 0)
    assert resolve_shard(None, None, {}) == (1, 0, False)
    assert resolve_shard(None, None, {"WORLD_SIZE": "8", "RANK": "5"}) == (8, 5, True)
    assert resolve_shard(4, 1, {"WORLD_SIZE": "8", "RANK": "5"}) == (4, 1, True)  # flags win
    with pytest.raises(ValueError):
        resolve_shard(2, 2, {})
    with pytest.raises(ValueError):
        resolve_shard(2, None, {})
    assert resolve_device("cuda", {"LOCAL_RANK": "3"}) == "cuda:3"
    assert resolve_device("cpu", {"LOCAL_RANK": "3"}) == "cpu"
    assert report_name() == "extract_report.json"


def test_list_files(media, tmp_path, tiny_clip_dir):
    text = tmp_path / "list.txt"
    text.write_text("# videos\ncfr.mp4\n\nimg.png\ncfr.mp4\n")
    root, paths, missing = collect_inputs(str(media), str(text))
    assert paths == ["cfr.mp4", "img.png"] and missing == []

    qa = tmp_path / "test_qa.json"
    qa.write_text(json.dumps([
        {"video_id": "cfr", "question": "q", "id": "1", "answer": "a", "answer_type": "x"},
        {"video_id": "vfr", "question": "q", "id": "2", "answer": "a", "answer_type": "x"},
        {"video_id": "cfr", "question": "q2", "id": "3", "answer": "a", "answer_type": "x"},
        {"video_id": "absent", "question": "q", "id": "4", "answer": "a", "answer_type": "x"},
    ]))
    out = tmp_path / "out"
    assert run(media, out, tiny_clip_dir, "--list", str(qa)) == 1
    report = read_report(out)
    assert sorted(os.path.basename(f) for f in report["done"]) == ["cfr.mp4", "vfr.mp4"]
    assert len(report["failed"]) == 1 and "absent" in report["failed"][0]["error"]

    train = tmp_path / "train.json"
    train.write_text(json.dumps([
        {"id": "a", "video": "clips.mp4/vfr.mp4", "conversations": []},
        {"id": "b", "image": "img.png", "conversations": []},
        {"id": "c", "conversations": []},  # text only
    ]))
    _, paths, missing = collect_inputs(str(media), str(train))
    assert paths == ["clips.mp4/vfr.mp4", "img.png"] and missing == []


def test_python_api_with_built_tower(media, tmp_path, tiny_clip_dir):
    from flash_vstream.model.multimodal_encoder.clip_encoder import CLIPVisionTower

    tower = CLIPVisionTower(tiny_clip_dir)
    report = extract_paths(["cfr.mp4", str(media / "img.png")], str(media), str(tmp_path / "f"), tower,
                           batch_size=8, progress=False, report_path=str(tmp_path / "f" / "r.json"))
    assert len(report["done"]) == 2 and report["failed"] == [] and report["frames"] == 4
    assert json.load(open(tmp_path / "f" / "r.json"))["done"] == report["done"]
    assert load_features(str(tmp_path / "f" / "cfr.safetensors")).shape == (3, 256, HIDDEN)


def test_bench_extract_tiny_smoke(example_mp4, tmp_path):
    from benchmarks import extract as bench
    out = tmp_path / "bench.json"
    assert bench.main(["--tiny", "--device", "cpu", "--end", "2", "--video", example_mp4, "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {r["backend"] for r in result["decode"]} >= {"pyav"}
    assert {r["mode"] for r in result["decode"]} == {"native", "1fps"}
    assert result["encoder"] and all(r["frames_per_s"] > 0 for r in result["encoder"])
    assert result["latency_1_frame"]["ms"] > 0 and result["preprocess"]["frames_per_s"] > 0


def test_extract_features_sh_on_cpu(media, tmp_path, tiny_clip_dir):
    """The paper-setting script over a README-shaped data folder (tiny tower, CPU)."""
    data = tmp_path / "data"
    videos = data / "eval_video" / "MSVD-QA" / "videos"
    os.makedirs(videos)
    shutil.copy(media / "cfr.mp4", videos / "vid1.mp4")
    shutil.copy(media / "clips.mp4" / "vfr.mp4", videos / "unused.mp4")  # not in test_qa.json
    (data / "eval_video" / "MSVD-QA" / "test_qa.json").write_text(json.dumps(
        [{"video_id": "vid1", "question": "q", "id": "vid1_0", "answer": "a", "answer_type": "x"},
         {"video_id": "gone", "question": "q", "id": "gone_0", "answer": "a", "answer_type": "x"}]))
    os.makedirs(data / "pretrain" / "images" / "00000")
    shutil.copy(media / "img.png", data / "pretrain" / "images" / "00000" / "1.png")
    env = dict(os.environ, DATA=str(data), VISION_TOWER=tiny_clip_dir, DEVICE="cpu", BATCH_SIZE="4",
               EVAL_DATASETS="MSVD-QA MSRVTT-QA", PYTHON=sys.executable,
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "extract_features.sh")], env=env,
                          capture_output=True, text=True, timeout=120)
    # the video named "gone" in test_qa.json has no file: reported, exit status 1, the rest extracted
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 done, 0 skipped, 1 failed" in proc.stdout and "FAILED" in proc.stderr and "'gone'" in proc.stderr
    assert "MSRVTT-QA/videos does not exist" in proc.stdout
    features = data / "eval_video" / "MSVD-QA" / "video_features"
    assert sorted(os.listdir(features)) == ["extract_report.json", "vid1.safetensors"]
    assert load_features(str(features / "vid1.safetensors"), kind="video").shape == (3, 256, HIDDEN)
    report = read_report(features)
    assert [os.path.basename(f) for f in report["done"]] == ["vid1.mp4"] and len(report["failed"]) == 1
    image = data / "pretrain" / "image_features" / "00000" / "1.safetensors"
    assert load_features(str(image), kind="image").shape == (1, 256, HIDDEN)


def test_encoder_error_fails_only_that_file(media, tmp_path, tiny_clip_dir, monkeypatch):
    import flash_vstream.extract_features as ef

    real = ef.FrameEncoder.encode

    def encode(self, pixels):
        if pixels.shape[0] == 1:  # the image is the only one-frame batch
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(self, pixels)

    monkeypatch.setattr(ef.FrameEncoder, "encode", encode)
    out = tmp_path / "out"
    assert run(media, out, tiny_clip_dir, "--batch-size", "8") == 1
    report = read_report(out)
    assert len(report["done"]) == 2 and [os.path.basename(f["file"]) for f in report["failed"]] == ["img.png"]
    assert "out of memory" in report["failed"][0]["error"] and not os.path.exists(out / "img.safetensors")
