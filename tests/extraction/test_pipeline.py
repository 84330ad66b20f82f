"""The process pipeline's failure policy (flash_vstream.extraction.pipeline): an encoder error fails the files
of that batch and no other; the decoders and the writer go on."""

import json
import os

import torch

from flash_vstream.extract_features import FrameEncoder, main
from flash_vstream.features import load_features


def test_an_encoder_error_fails_the_files_of_that_batch_only(tmp_path, make_video, tiny_clip_dir, monkeypatch):
    videos = tmp_path / "videos"
    os.makedirs(videos)
    for i in range(6):
        make_video(videos / f"clip{i}.mp4", n=25, rate=10)  # 3 samples each: batches of 4 span two files
    real, calls = FrameEncoder.features, []

    def features(self, pixels):
        calls.append(pixels.shape[0])
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(self, pixels)

    monkeypatch.setattr(FrameEncoder, "features", features)
    out = tmp_path / "out"
    code = main(["--input", str(videos), "--output", str(out), "--vision-tower", tiny_clip_dir, "--device", "cpu",
                 "--no-progress", "--batch-size", "4", "--pipeline", "processes", "--num-workers", "2"])
    assert code == 1 and len(calls) == 5  # 18 samples, less the rows of failed files not yet encoded
    with open(out / "extract_report.json") as f:
        report = json.load(f)
    assert report["frames"] == 3 * len(report["done"])  # frames of the files written, no others
    failed = {os.path.basename(f["file"]) for f in report["failed"]}
    done = {os.path.basename(f) for f in report["done"]}
    # the second batch's 4 rows come from two or three files (rows 4-7 of the stream): those fail, the rest not
    assert 2 <= len(failed) <= 3 and done | failed == {f"clip{i}.mp4" for i in range(6)} and not done & failed
    assert all("encoding: RuntimeError: CUDA out of memory (simulated)" in f["error"] for f in report["failed"])
    for name in failed:
        assert not os.path.exists(out / name.replace(".mp4", ".safetensors"))
    for name in done:
        feature = load_features(str(out / name.replace(".mp4", ".safetensors")), kind="video")
        assert feature.shape[0] == 3 and torch.isfinite(feature.float()).all()


def test_a_file_longer_than_the_flush_comes_back_in_parts_with_the_same_features(tmp_path, make_video, tiny_clip_dir,
                                                                                  monkeypatch):
    """A long video's rows leave the device every FLUSH_ROWS rows and are joined when saved: the file equals
    the one saved from a single piece (same batches, same rows, same timestamps)."""
    from flash_vstream.extraction import pipeline
    from flash_vstream.features import load_features_with_meta

    videos = tmp_path / "videos"
    os.makedirs(videos)
    make_video(videos / "long.mp4", n=120, rate=10)  # 12 samples
    make_video(videos / "short.mp4", n=25, rate=10)  # 3 samples

    def extract(out):
        return main(["--input", str(videos), "--output", str(out), "--vision-tower", tiny_clip_dir, "--device",
                     "cpu", "--no-progress", "--batch-size", "4", "--pipeline", "processes", "--num-workers", "2"])

    assert extract(tmp_path / "whole") == 0
    monkeypatch.setattr(pipeline, "FLUSH_ROWS", 2)  # every batch's rows of a file leave as one part
    assert extract(tmp_path / "parts") == 0
    for name, samples in (("long", 12), ("short", 3)):
        whole, meta = load_features_with_meta(str(tmp_path / "whole" / f"{name}.safetensors"), kind="video")
        parts, meta_parts = load_features_with_meta(str(tmp_path / "parts" / f"{name}.safetensors"), kind="video")
        assert parts.shape[0] == samples and meta_parts["timestamps"] == meta["timestamps"] == [float(t) for t in
                                                                                            range(samples)]
        assert torch.equal(parts, whole), name
