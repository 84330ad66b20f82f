import os

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter (numpy, on CPU tensors); it is chosen when
# Triton is imported, so before anything imports flash_vstream.runtime.triton_kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from flash_vstream.demo.tiny import build_tiny_clip  # noqa: E402

from support import EXAMPLE_MP4  # noqa: E402


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A random CLIP vision tower with the real 16x16 patch grid (32 px, patch 2), hidden 32."""
    return build_tiny_clip(str(tmp_path_factory.mktemp("tiny_clip")))


@pytest.fixture(scope="session")
def example_mp4():
    """The real video the repository tracks (assets/example.mp4): a test that needs it fails without it."""
    assert os.path.exists(EXAMPLE_MP4), f"{EXAMPLE_MP4} is missing from the checkout"
    return EXAMPLE_MP4


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    from flash_vstream.demo.tiny import TINY_CORPUS, train_tokenizer

    return train_tokenizer(TINY_CORPUS * 20, str(tmp_path_factory.mktemp("tiny_tok")), vocab_size=300)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_dir, tiny_clip_dir):
    """A random tiny Flash-VStream checkpoint (paper memory mode, released memory sizes)."""
    from flash_vstream.demo.tiny import build_tiny_vstream

    return build_tiny_vstream(str(tmp_path_factory.mktemp("tiny_model")), tiny_tokenizer_dir, tiny_clip_dir)


@pytest.fixture(scope="session")
def example_frames():
    """Six small synthetic RGB frames (uint8 HxWx3): three red-ish, three blue-ish."""
    import numpy as np

    rng = np.random.default_rng(0)
    frames = []
    for i in range(6):
        base = np.array([200, 30, 30] if i < 3 else [30, 30, 200], dtype=np.int16)
        noise = rng.integers(-20, 20, size=(40, 48, 3))
        frames.append(np.clip(base + noise, 0, 255).astype(np.uint8))
    return frames


def _frame_level(i):
    """Grey level of frame i in `make_video` clips: 28 levels 8 apart, so a decoded frame
    (lossy, +-3) names its index modulo 28."""
    return 16 + (8 * i) % 224


@pytest.fixture(scope="session")
def make_video():
    """Factory writing a small test clip with PyAV: `make_video(path, times=None, n=10, rate=10,
    size=(64, 48), pix_fmt="yuv420p", codec="libx264", rotation=None)`.

    Frame i is uniform grey `frame_level(i)` except a white top-left quarter (to see rotation).
    `times` (seconds) sets each frame's timestamp by hand: a variable-frame-rate clip. Returns
    the path. `make_video.frame_level` and `make_video.frame_index(frame)` decode the level.
    """
    from fractions import Fraction

    import av
    import numpy as np

    def write(path, times=None, n=10, rate=10, size=(64, 48), pix_fmt="yuv420p", codec="libx264", rotation=None):
        width, height = size
        times = [i / rate for i in range(n)] if times is None else list(times)
        tb = Fraction(1, 1000)
        with av.open(str(path), "w") as container:
            stream = container.add_stream(codec, rate=rate)
            stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
            stream.codec_context.time_base = tb
            stream.time_base = tb
            if rotation is not None:
                stream.set_display_rotation(rotation)
            for i, t in enumerate(times):
                image = np.full((height, width, 3), _frame_level(i), np.uint8)
                image[: height // 2, : width // 2] = 255
                frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                frame.pts, frame.time_base = int(round(t * 1000)), tb
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        return str(path)

    def frame_index(frame):
        # the bottom-right quarter holds the grey level
        h, w = frame.shape[:2]
        level = float(frame[h // 2:, w // 2:].mean())
        return int(round((level - 16) / 8)) % 28

    write.frame_level = _frame_level
    write.frame_index = frame_index
    return write


@pytest.fixture
def make_qa_tree(tiny_model_dir):
    """Factory for a tiny benchmark: `make(root)` writes root/video_features/{v0,v1,v2}.safetensors
    (random CLIP-width features of 3, 5 and 7 frames, so a line's `frames` tells which video it
    read) and root/test_qa.json with five questions; returns (qa_file, video_dir, items)."""
    import json

    import torch

    from flash_vstream.features import save_features

    with open(os.path.join(tiny_model_dir, "config.json")) as f:
        width = json.load(f)["mm_hidden_size"]

    def make(root, lengths=(("v0", 3), ("v1", 5), ("v2", 7)), items=None):
        video_dir = os.path.join(str(root), "video_features")
        gen = torch.Generator().manual_seed(0)
        for video_id, frames in lengths:
            save_features(os.path.join(video_dir, f"{video_id}.safetensors"),
                          torch.randn(frames, 256, width, generator=gen), {"fps": 1.0})
        if items is None:
            items = [
                {"video_id": "v0", "question": "what colour is the background now?", "answer": "red"},
                {"video_id": "v1", "question": "which came first, the circle or the square?", "answer": "circle"},
                {"video_id": "v2", "question": "describe the video.", "answer": "a red circle moves left"},
                {"video_id": "v2", "question": "what was shown at the start?", "answer": "blue", "time": 1},
                {"video_id": "v1", "question": "is the triangle yellow?", "answer": "yes"},
            ]
            items = [{**it, "id": f"{it['video_id']}_{n}", "answer_type": n % 2, "duration": 7}
                     for n, it in enumerate(items)]
        qa_file = os.path.join(str(root), "test_qa.json")
        with open(qa_file, "w") as f:
            json.dump(items, f)
        return qa_file, video_dir, items

    return make
