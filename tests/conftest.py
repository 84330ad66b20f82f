import os

import pytest

from flash_vstream.demo.tiny import build_tiny_clip

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared")
EXAMPLE_MP4 = os.path.abspath(os.path.join(SHARED, "data", "example.mp4"))


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A random CLIP vision tower with the real 16x16 patch grid (32 px, patch 2), hidden 32."""
    return build_tiny_clip(str(tmp_path_factory.mktemp("tiny_clip")))


@pytest.fixture(scope="session")
def example_mp4():
    if not os.path.exists(EXAMPLE_MP4):
        pytest.skip(f"{EXAMPLE_MP4} not found")
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
