"""The process pipeline of feature extraction (flash_vstream.extraction) and sparse decoding (video_io)."""

import json
import os
import shutil
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from PIL import Image

from flash_vstream.extract_features import FrameEncoder, main
from flash_vstream.extraction.decode import decode_only
from flash_vstream.extraction.preprocess import DevicePreprocessor
from flash_vstream.features import load_features_with_meta
from flash_vstream.mm_utils import process_images
from flash_vstream.video_io import _open_pyav, _sparse_frames, _stream_origin, read_frames

# How close preprocessing in torch stays to the processor's PIL path, in normalised pixel units (one uint8
# level is about 0.015 there): antialiased bicubic in float, rounded to uint8, against PIL's fixed-point filter.
PIXEL_MEAN_ABS = 0.005  # a third of a level on average
PIXEL_MAX_ABS = 0.35  # a few pixels: PIL rounds to uint8 between its two passes; noise upscaled 7x: ~20 levels
PIXEL_FAR_FRACTION = 0.01  # values more than two levels apart
# the tiny tower's patch features of those pixels (values of order 1): relative to their mean magnitude
FEATURE_MAX_REL = 0.1
FEATURE_MEAN_REL = 0.01


def write_gop_video(path, n=160, rate=10, gop=4, bframes=2, size=(64, 48)):
    """Frames of seeded noise (each frame its own pattern), H.264 with a keyframe every `gop` frames and
    B-frames: sparse decoding drops runs up to keyframes and skips non-reference frames here."""
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=rate, options={"g": str(gop), "keyint_min": str(gop),
                                                                     "bf": str(bframes), "sc_threshold": "0"})
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.codec_context.time_base = Fraction(1, rate)
        for i in range(n):
            image = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


@pytest.fixture(scope="module")
def gop_video(tmp_path_factory):
    return write_gop_video(tmp_path_factory.mktemp("gop") / "gop.mp4")


def full_and_sparse(path, **kwargs):
    a, ta = read_frames(path, sparse=False, **kwargs)
    b, tb = read_frames(path, sparse=True, **kwargs)
    return a, ta, b, tb


@pytest.mark.parametrize("fps,start,end", [(1.0, 0.0, None), (0.5, 0.0, None), (3.0, 0.0, None), (1.0, 1.3, 6.2),
                                           (2.5, 0.0, 5.0)])
def test_sparse_decoding_gives_the_same_samples(gop_video, fps, start, end):
    a, ta, b, tb = full_and_sparse(gop_video, fps=fps, start=start, end=end)
    assert ta == tb and np.array_equal(a, b)  # same frames bit for bit: references are always decoded


def test_sparse_decoding_of_example_mp4(example_mp4):
    for fps, end in ((1.0, None), (3.0, 8.0)):
        a, ta, b, tb = full_and_sparse(example_mp4, fps=fps, end=end)
        assert ta == tb and np.array_equal(a, b)


def test_sparse_decoding_decodes_less(gop_video, example_mp4):
    def decoded(path, fps):
        container = _open_pyav(path, None)
        try:
            stream = container.streams.video[0]
            return sum(1 for _ in _sparse_frames(path, container, stream, fps, 0.0, None, _stream_origin(stream)))
        finally:
            container.close()

    assert decoded(gop_video, 1.0) <= 160 * 0.55  # of 160: runs before keyframes dropped, B-frames skipped
    assert decoded(example_mp4, 1.0) < 929 * 0.6  # 929 frames, keyframes every 1.25 s


def test_device_preprocessing_matches_the_processor(tiny_clip_dir, example_mp4):
    from transformers import CLIPImageProcessor

    frames, _ = read_frames(example_mp4, fps=1.0, end=3.0)  # (4, 360, 480, 3)
    odd = np.random.default_rng(1).integers(0, 256, (3, 17, 33, 3), dtype=np.uint8)
    for size in (32, 224):
        processor = CLIPImageProcessor.from_pretrained(tiny_clip_dir, size={"shortest_edge": size},
                                                       crop_size={"height": size, "width": size})
        for batch in (frames, odd):
            for mode in ("pad", "square"):
                expected = process_images(list(batch), processor, mode)
                got = DevicePreprocessor(processor, mode)(torch.from_numpy(batch))
                assert got.shape == expected.shape == (len(batch), 3, size, size) and got.dtype == torch.float32
                diff = (got - expected).abs()
                assert diff.mean() <= PIXEL_MEAN_ABS and diff.max() <= PIXEL_MAX_ABS, (size, mode)
                assert (diff > 0.03).float().mean() <= PIXEL_FAR_FRACTION, (size, mode)

    # and the features of the two
    encoder = FrameEncoder(tiny_clip_dir, device="cpu", dtype="fp32")
    expected = encoder.encode(process_images(list(frames), encoder.image_processor, "pad"))
    with torch.inference_mode():
        got = encoder.features(DevicePreprocessor(encoder.image_processor, "pad")(torch.from_numpy(frames)))
    scale = expected.abs().mean()
    assert (got - expected).abs().max() <= FEATURE_MAX_REL * scale
    assert (got - expected).abs().mean() <= FEATURE_MEAN_REL * scale


def test_preprocessing_rejects_other_inputs(tiny_clip_dir):
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor.from_pretrained(tiny_clip_dir)
    with pytest.raises(ValueError, match="uint8"):
        DevicePreprocessor(processor)(torch.zeros(1, 8, 8, 3))
    with pytest.raises(ValueError, match="image_aspect_ratio"):
        DevicePreprocessor(processor, "crop")


@pytest.fixture(scope="module")
def media(tmp_path_factory, make_video, gop_video):
    d = tmp_path_factory.mktemp("media")
    make_video(d / "cfr.mp4", n=25, rate=10)  # 3 samples at 1 fps
    make_video(d / "vfr.mp4", times=[0, 0.1, 0.3, 1.5, 1.6, 4.2])  # 5 samples
    shutil.copy(gop_video, d / "gop.mp4")  # 16 samples
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8)).save(d / "img.png")
    (d / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"junk" * 300)
    return d


def run(inp, out, clip, *extra):
    return main(["--input", str(inp), "--output", str(out), "--vision-tower", clip, "--device", "cpu",
                 "--no-progress", "--batch-size", "4", *extra])


def test_process_pipeline_end_to_end(media, tmp_path, tiny_clip_dir):
    new, old = tmp_path / "new", tmp_path / "old"
    assert run(media, new, tiny_clip_dir, "--pipeline", "processes", "--num-workers", "2") == 1  # broken.mp4
    assert run(media, old, tiny_clip_dir, "--pipeline", "threads") == 1
    with open(new / "extract_report.json") as f:
        report = json.load(f)
    assert sorted(os.path.basename(p) for p in report["done"]) == ["cfr.mp4", "gop.mp4", "img.png", "vfr.mp4"]
    assert [os.path.basename(f["file"]) for f in report["failed"]] == ["broken.mp4"]
    assert "broken.mp4" in report["failed"][0]["error"] and "cannot open" in report["failed"][0]["error"]
    assert report["settings"]["pipeline"] == "processes" and report["frames"] == 3 + 5 + 16 + 1
    assert "gpu_busy_fraction" in report and report["gpu_busy_fraction"] is None  # CPU: no CUDA events
    for name, kind, times in (("cfr", "video", [0.0, 1.0, 2.0]), ("vfr", "video", [0.0, 1.0, 2.0, 3.0, 4.0]),
                              ("gop", "video", [float(k) for k in range(16)]), ("img", "image", [0.0])):
        got, meta = load_features_with_meta(str(new / f"{name}.safetensors"), kind=kind)
        expected, meta_old = load_features_with_meta(str(old / f"{name}.safetensors"), kind=kind)
        assert meta["timestamps"] == meta_old["timestamps"] == times and meta["source"] == meta_old["source"]
        assert got.shape == expected.shape and got.dtype == expected.dtype == torch.float16
        scale = expected.float().abs().mean()
        assert (got.float() - expected.float()).abs().max() <= FEATURE_MAX_REL * scale, name
    # resumable: a rerun skips what is done, the broken file fails again
    os.remove(new / "cfr.safetensors")
    assert run(media, new, tiny_clip_dir, "--pipeline", "processes", "--num-workers", "2") == 1
    with open(new / "extract_report.json") as f:
        report = json.load(f)
    assert [os.path.basename(p) for p in report["done"]] == ["cfr.mp4"] and len(report["skipped"]) == 3


def test_decode_only_counts_the_samples(media):
    from flash_vstream.extract_features import _Job

    jobs = [_Job(i, str(media / name), None, "video") for i, name in enumerate(["cfr.mp4", "vfr.mp4", "broken.mp4"])]
    result = decode_only(jobs, 1.0, num_workers=2)
    assert result["frames"] == 3 + 5 and result["failed"] == 1 and result["workers"] == 2
