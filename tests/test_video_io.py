"""Video/image reading and feature files (flash_vstream.video_io)."""

import inspect
import json
import os

import av
import numpy as np
import pytest
import torch

from flash_vstream.features import (FeatureLoadError, load_features, load_features_with_meta, save_features,
                                    valid_feature_file)
from flash_vstream.utils.files import temp_files_for
from flash_vstream.video_io import (VideoReadError, is_image_path, is_url, is_video_path, iter_frames, load_image,
                                    read_frames, rotate_frame)

try:
    from flash_vstream.video_io import _import_decord

    _import_decord()
    HAVE_DECORD = True
except ImportError:
    HAVE_DECORD = False

BACKENDS = ["pyav"] + (["decord"] if HAVE_DECORD else [])
needs_decord = pytest.mark.skipif(not HAVE_DECORD, reason="decord not installed")


@pytest.fixture(scope="module")
def clips(tmp_path_factory, make_video):
    d = tmp_path_factory.mktemp("clips")
    return {
        "cfr": make_video(d / "cfr.mp4", n=35, rate=10),  # 3.4 s at 10 fps
        "vfr": make_video(d / "vfr.mp4", times=[0, 0.1, 0.3, 1.5, 1.6, 4.2]),
        "one": make_video(d / "one.mp4", n=1),
        "short": make_video(d / "short.mp4", n=5, rate=10),  # 0.4 s: shorter than 1 s
        "odd": make_video(d / "odd.mp4", n=12, size=(33, 17), pix_fmt="yuv444p"),
        "gray": make_video(d / "gray.mkv", n=12, codec="ffv1", pix_fmt="gray"),
        "rot90": make_video(d / "rot90.mp4", n=12, rotation=90),
        "rot180": make_video(d / "rot180.mp4", n=12, rotation=180),
    }


def indices(make_video, frames):
    return [make_video.frame_index(f) for f in frames]


def mod28(ids):
    return [i % 28 for i in ids]


@pytest.mark.parametrize("backend", BACKENDS)
def test_constant_rate_samples_by_time(clips, make_video, backend):
    frames, times = read_frames(clips["cfr"], fps=1.0, backend=backend)
    assert frames.dtype == np.uint8 and frames.shape == (4, 48, 64, 3)
    assert times == [0.0, 1.0, 2.0, 3.0]
    assert indices(make_video, frames) == mod28([0, 10, 20, 30])
    _, times = read_frames(clips["cfr"], fps=2.0, backend=backend)
    assert times == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    frames, times = read_frames(clips["cfr"], fps=None, backend=backend)  # every frame
    assert len(frames) == 35 and times == pytest.approx([i / 10 for i in range(35)], abs=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_variable_frame_rate_uses_timestamps(clips, make_video, backend):
    frames, times = read_frames(clips["vfr"], fps=1.0, backend=backend)
    # frames at 0, .1, .3, 1.5, 1.6, 4.2 s: on screen at 0..4 s are frames 0, 2, 4, 4, 4
    assert times == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert indices(make_video, frames) == [0, 2, 4, 4, 4]
    _, native = read_frames(clips["vfr"], fps=None, backend=backend)
    assert native == pytest.approx([0, 0.1, 0.3, 1.5, 1.6, 4.2], abs=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["one", "short"])
def test_shorter_than_one_period_gives_first_frame(clips, make_video, backend, name):
    for fps in (1.0, 0.1):
        frames, times = read_frames(clips[name], fps=fps, backend=backend)
        assert times == [0.0] and frames.shape == (1, 48, 64, 3)
        assert indices(make_video, frames) == [0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_start_and_end_cut_the_stream(clips, make_video, backend):
    frames, times = read_frames(clips["cfr"], fps=1.0, end=2.0, backend=backend)
    assert times == [0.0, 1.0, 2.0]  # end is inclusive: the frame on screen at a question time
    frames, times = read_frames(clips["cfr"], fps=1.0, start=0.5, end=2.6, backend=backend)
    assert times == [0.5, 1.5, 2.5] and indices(make_video, frames) == [5, 15, 25]
    with pytest.raises(VideoReadError, match="requested range"):
        read_frames(clips["cfr"], start=10.0, backend=backend)


def test_iteration_is_lazy(example_mp4):
    it = iter_frames(example_mp4, fps=1.0)
    assert inspect.isgenerator(it)
    frame, t = next(it)
    assert frame.shape == (360, 480, 3) and t == 0.0
    it.close()  # closes the container; the rest is never decoded


@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_size_gray_and_yuv_variants_give_rgb(clips, backend):
    frames, _ = read_frames(clips["odd"], fps=5.0, backend=backend)
    assert frames.shape[1:] == (17, 33, 3) and frames.dtype == np.uint8
    with av.open(clips["gray"]) as c:
        assert c.streams.video[0].codec_context.pix_fmt == "gray"
    frames, _ = read_frames(clips["gray"], fps=5.0, backend=backend)
    assert frames.shape[1:] == (48, 64, 3)
    assert np.array_equal(frames[..., 0], frames[..., 1]) and np.array_equal(frames[..., 1], frames[..., 2])


def test_rotate_frame_helper():
    a = np.arange(6, dtype=np.uint8).reshape(2, 3, 1).repeat(3, axis=2)  # (2, 3, 3)
    assert rotate_frame(a, 0) is a
    ccw = rotate_frame(a, 90)  # counter-clockwise: the top row becomes the left column, bottom up
    assert ccw.shape == (3, 2, 3) and ccw[:, :, 0].tolist() == [[2, 5], [1, 4], [0, 3]]
    assert rotate_frame(a, -90)[:, :, 0].tolist() == [[3, 0], [4, 1], [5, 2]]
    assert rotate_frame(a, 180)[:, :, 0].tolist() == [[5, 4, 3], [2, 1, 0]]
    assert rotate_frame(a, -180).tolist() == rotate_frame(a, 180).tolist()


@pytest.mark.parametrize("backend", BACKENDS)
def test_rotation_metadata_is_applied(clips, backend):
    frames, _ = read_frames(clips["rot90"], fps=5.0, backend=backend)
    # 64x48 stored with a 90-degree counter-clockwise display rotation: shown 48 wide, 64 high,
    # and the white top-left quarter ends up bottom-left
    assert frames.shape[1:] == (64, 48, 3)
    f = frames[0].astype(int)
    assert f[-8:, :8].mean() > 240 and f[:8, :8].mean() < 100
    frames, _ = read_frames(clips["rot180"], fps=5.0, backend=backend)
    f = frames[0].astype(int)
    assert frames.shape[1:] == (48, 64, 3) and f[-8:, -8:].mean() > 240 and f[:8, :8].mean() < 100


@pytest.mark.parametrize("backend", BACKENDS)
def test_example_mp4_one_sample_per_second(example_mp4, backend):
    with av.open(example_mp4) as c:
        s = c.streams.video[0]
        duration = float(s.duration * s.time_base)
    frames, times = read_frames(example_mp4, fps=1.0, backend=backend)
    assert frames.shape == (len(times), 360, 480, 3)
    assert times == [float(k) for k in range(len(times))]
    assert times[-1] <= duration < times[-1] + 1.0  # one sample per started second (38.7 s -> 39)
    assert len(times) == 39


@needs_decord
@pytest.mark.parametrize("name", ["cfr", "vfr", "one", "short", "odd", "gray", "rot90", "rot180", "example"])
def test_pyav_and_decord_agree(clips, example_mp4, name):
    path = example_mp4 if name == "example" else clips[name]
    end = 6.0 if name == "example" else None
    for fps in (1.0, 3.0):
        a, ta = read_frames(path, fps=fps, end=end, backend="pyav")
        b, tb = read_frames(path, fps=fps, end=end, backend="decord")
        assert ta == tb
        assert a.shape == b.shape
        assert np.abs(a.astype(int) - b.astype(int)).mean() < 1.0


def test_start_offset_agrees_between_backends(example_mp4):
    if not HAVE_DECORD:
        pytest.skip("decord not installed")
    a, ta = read_frames(example_mp4, fps=1.0, start=20.5, end=24.0)
    b, tb = read_frames(example_mp4, fps=1.0, start=20.5, end=24.0, backend="decord")
    full, tf = read_frames(example_mp4, fps=2.0, end=24.0)
    assert ta == tb == [20.5, 21.5, 22.5, 23.5]
    assert np.abs(a.astype(int) - b).mean() < 1.0
    assert np.abs(a.astype(int) - full[[41, 43, 45, 47]]).mean() < 1.0  # seeking == decoding through


@pytest.fixture(scope="module")
def broken(tmp_path_factory, example_mp4):
    d = tmp_path_factory.mktemp("broken")
    data = open(example_mp4, "rb").read()
    files = {
        "empty": (b"", "empty"),
        "garbage": (bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)), "cannot open"),
        "text": (b"not a video\n" * 50, "cannot open"),
        "header_only": (data[:10000], "cannot open"),
        "truncated": (data[:300000], "truncated"),
    }
    out = {}
    for name, (content, reason) in files.items():
        path = d / f"{name}.mp4"
        path.write_bytes(content)
        out[name] = (str(path), reason)
    audio = d / "audio.wav"
    with av.open(str(audio), "w") as c:
        s = c.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for p in s.encode(frame):
            c.mux(p)
        for p in s.encode():
            c.mux(p)
    out["audio"] = (str(audio), "no video stream")
    out["missing"] = (str(d / "missing.mp4"), "not found")
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["empty", "garbage", "text", "header_only", "truncated", "audio", "missing"])
def test_unreadable_files_raise_naming_file_and_reason(broken, backend, name):
    path, reason = broken[name]
    with pytest.raises(VideoReadError) as err:
        read_frames(path, backend=backend)
    assert path in str(err.value) and reason in str(err.value)


def test_truncated_file_readable_on_request(broken):
    frames, times = read_frames(broken["truncated"][0], allow_truncated=True)
    assert 1 <= len(times) < 10


def test_unreachable_url_fails_fast():
    url = "http://127.0.0.1:9/video.mp4"  # nothing listens on the discard port
    with pytest.raises(VideoReadError, match="127.0.0.1"):
        read_frames(url, timeout=5)


def test_bad_arguments():
    with pytest.raises(ValueError):
        iter_frames("x.mp4", fps=0)
    with pytest.raises(ValueError):
        iter_frames("x.mp4", backend="opencv")
    with pytest.raises(ValueError):
        iter_frames("x.mp4", start=3, end=1)


def test_paths_and_urls():
    assert is_video_path("a/b.MP4") and is_video_path("x.webm") and not is_video_path("x.jpg")
    assert is_image_path("a.JPG") and is_image_path("b.png") and not is_image_path("c.mkv")
    assert is_url("https://host/v.mp4") and is_url("rtsp://cam/1") and not is_url("/data/v.mp4")


def test_load_image_modes_and_errors(tmp_path):
    from PIL import Image

    rgba = tmp_path / "a.png"
    Image.new("RGBA", (7, 5), (10, 20, 30, 128)).save(rgba)
    gray = tmp_path / "g.png"
    Image.new("L", (7, 5), 99).save(gray)
    pal = tmp_path / "p.gif"
    Image.new("P", (7, 5)).save(pal)
    for p in (rgba, gray, pal):
        img = load_image(str(p))
        assert img.shape == (5, 7, 3) and img.dtype == np.uint8
    assert load_image(str(gray))[0, 0].tolist() == [99, 99, 99]
    # EXIF orientation 6 (rotate 90 clockwise to display) is applied
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = tmp_path / "r.jpg"
    Image.new("RGB", (8, 4), (200, 0, 0)).save(rotated, exif=exif)
    assert load_image(str(rotated)).shape == (8, 4, 3)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    for p in (bad, tmp_path / "none.png"):
        with pytest.raises(VideoReadError, match=str(p.name)):
            load_image(str(p))


# ----------------------------------------------------------------------------- features

def test_save_and_load_features_roundtrip(tmp_path):
    path = str(tmp_path / "sub" / "v.safetensors")
    feature = torch.randn(3, 256, 8).half()
    save_features(path, feature, {"fps": 1.0, "timestamps": [0.0, 1.0, 2.0], "source": "v.mp4",
                                  "extractor_version": "test"})
    assert not temp_files_for(path) and sorted(os.listdir(tmp_path / "sub")) == ["v.safetensors"]
    loaded, meta = load_features_with_meta(path, kind="video", hidden_size=8)
    assert loaded.dtype == torch.float16 and torch.equal(loaded, feature)
    assert meta["fps"] == 1.0 and meta["timestamps"] == [0.0, 1.0, 2.0] and meta["source"] == "v.mp4"
    assert valid_feature_file(path, kind="video", hidden_size=8, fps=1.0)
    assert not valid_feature_file(path, kind="video", hidden_size=8, fps=0.5)  # other sampling rate
    assert not valid_feature_file(path, hidden_size=16)

    image = str(tmp_path / "i.safetensors")
    save_features(image, torch.randn(256, 8), {"fps": 0, "timestamps": [0.0], "source": "i.png"})
    assert load_features(image, kind="image").shape == (1, 256, 8)
    assert load_features(image).shape == (1, 256, 8)


def _write_raw(path, tensors, metadata=None):
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    return str(path)


@pytest.mark.parametrize("case, match", [
    ("patches", "100 patches"),
    ("hidden", "hidden size 16"),
    ("int", "floating"),
    ("ndim", "shape"),
    ("empty_t", "no frames"),
    ("no_key", "no tensor 'feature'"),
    ("truncated", "truncated or corrupt"),
    ("empty_file", "truncated or corrupt"),
    ("not_safetensors", "truncated or corrupt"),
    ("nan", "NaN"),
    ("timestamps", "timestamps"),
    ("bad_meta", "metadata"),
    ("image_as_video", "shape"),
    ("missing", "not found"),
])
def test_load_features_errors_name_the_file(tmp_path, case, match):
    path = tmp_path / f"{case}.safetensors"
    good = torch.randn(2, 256, 8).half()
    if case == "patches":
        _write_raw(path, {"feature": torch.randn(2, 100, 8)})
    elif case == "hidden":
        _write_raw(path, {"feature": torch.randn(2, 256, 16)})
    elif case == "int":
        _write_raw(path, {"feature": torch.ones(2, 256, 8, dtype=torch.int64)})
    elif case == "ndim":
        _write_raw(path, {"feature": torch.randn(2, 2, 256, 8)})
    elif case == "empty_t":
        _write_raw(path, {"feature": torch.randn(0, 256, 8)})
    elif case == "no_key":
        _write_raw(path, {"features": good})
    elif case == "truncated":
        _write_raw(path, {"feature": good})
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "empty_file":
        path.write_bytes(b"")
    elif case == "not_safetensors":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    elif case == "nan":
        bad = good.clone()
        bad[1, 3, 2] = float("nan")
        _write_raw(path, {"feature": bad})
    elif case == "timestamps":
        _write_raw(path, {"feature": good}, {"timestamps": json.dumps([0.0, 1.0, 2.0])})
    elif case == "bad_meta":
        _write_raw(path, {"feature": good}, {"fps": "fast"})
    elif case == "image_as_video":
        _write_raw(path, {"feature": torch.randn(256, 8)})
    kind = "video" if case == "image_as_video" else None
    with pytest.raises(FeatureLoadError, match=match) as err:
        load_features(str(path), kind=kind, hidden_size=8)
    assert str(path) in str(err.value)
    if case != "nan":  # the header-only check cannot see values
        assert not valid_feature_file(str(path), kind=kind, hidden_size=8)


def test_interrupted_save_leaves_no_file(tmp_path, monkeypatch):
    import safetensors.torch

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    path = str(tmp_path / "v.safetensors")
    with pytest.raises(KeyboardInterrupt):
        save_features(path, torch.zeros(1, 256, 8), {})
    assert os.listdir(tmp_path) == []


def test_failed_save_keeps_the_previous_file(tmp_path):
    path = str(tmp_path / "v.safetensors")
    save_features(path, torch.ones(2, 256, 8), {"fps": 1.0, "timestamps": [0.0, 1.0]})
    with pytest.raises(Exception):
        save_features(path, torch.zeros(3, 256, 8), {"timestamps": ["not a number"]})  # fails before the rename
    feature, meta = load_features_with_meta(path, kind="video")
    assert torch.equal(feature, torch.ones(2, 256, 8)) and meta["timestamps"] == [0.0, 1.0]
    assert os.listdir(tmp_path) == ["v.safetensors"]


def test_frame_times_from_the_header_or_the_frame_rate():
    from flash_vstream.features import frame_times

    assert frame_times({"fps": 2.0, "timestamps": [0.0, 0.7, 1.1]}, 3, 1.0) == [0.0, 0.7, 1.1]
    assert frame_times({"fps": 2.0}, 3, 1.0) == [0.0, 0.5, 1.0]
    assert frame_times({}, 2, 1.0) == [0.0, 1.0]
